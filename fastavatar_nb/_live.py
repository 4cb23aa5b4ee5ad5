"""Live displays (progress bars, redrawn figures) and what they do when nobody watches them.

A notebook run headless (``fastavatar-nb run``, ``make test``'s nbval, ``nbconvert --execute``)
has no frontend: every redraw of a live figure and every tick of a widget progress bar is still
sent as a message to the client that runs the kernel, and a flood of them can outlast that
client's patience (nbval gives up after 5 s without a message it wants). Such runs set the
environment variable ``FASTAVATAR_HEADLESS=1`` (:data:`HEADLESS_ENV`); then

- :func:`live_displays` is False, so :class:`fastavatar_nb.plots.LiveCurves` draws its figure
  once, at ``finish()``;
- :func:`progress_bar` is a plain text bar that writes a handful of whole lines (start, every
  tenth of the way, a heartbeat every 5 minutes, the end) instead of a widget.

This module is imported by the training code: it imports nothing heavy (tqdm only when a bar
is made, IPython never: it is looked up only when the process already imported it).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from typing import Any

__all__ = ["HEADLESS_ENV", "headless", "in_notebook_kernel", "live_displays", "progress_bar"]

HEADLESS_ENV = "FASTAVATAR_HEADLESS"
"""Environment variable: ``1`` when no frontend watches the kernel (``0``, empty or unset: one may)."""

HEADLESS_LINES = 10
"""A headless bar with a known total writes a line each time it passes another 1/HEADLESS_LINES of it."""

HEADLESS_HEARTBEAT_S = 300.0
"""... and at least one line this often (seconds) while it moves, whatever the total."""

HEADLESS_MININTERVAL_S = 1.0
"""Least time between two looks at a headless bar (tqdm's ``mininterval``; lines are rarer)."""

_FALSE = {"", "0", "false", "no", "off"}


def headless() -> bool:
    """True when ``FASTAVATAR_HEADLESS`` says no frontend watches this process.

    Unset, empty, ``0``, ``false``, ``no`` and ``off`` (any case) mean a frontend may watch; any
    other value (``1``, ``true``, ...) means headless.
    """
    return os.environ.get(HEADLESS_ENV, "").strip().lower() not in _FALSE


def in_notebook_kernel() -> bool:
    """True inside a Jupyter kernel (IPython with a kernel attached), else False.

    IPython is not imported here: a process that has not imported it is not a kernel.
    """
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    if get is None:
        return False
    shell = get()
    return shell is not None and getattr(shell, "kernel", None) is not None


def live_displays() -> bool:
    """Whether live redraws (figures replaced in place, widget progress bars) are wanted.

    False when ``FASTAVATAR_HEADLESS`` is set (a headless run: nobody watches), else True in a
    Jupyter kernel and False elsewhere (a script or a test: there is nothing to redraw into).
    """
    return not headless() and in_notebook_kernel()


def progress_bar(*args: Any, **kwargs: Any):
    """A tqdm progress bar suited to where it runs; takes tqdm's arguments.

    - in a Jupyter kernel with a frontend: ``tqdm.auto.tqdm`` (a widget bar);
    - in a terminal or script (not headless): ``tqdm.auto.tqdm`` (a text bar redrawn in place);
    - headless (``FASTAVATAR_HEADLESS=1``): a text bar that writes whole lines, at most about
      ``HEADLESS_LINES + 2`` per bar (plus one per ``HEADLESS_HEARTBEAT_S`` of a long one), so a
      headless notebook gets a few progress lines in its output instead of a stream of messages.

    The training code imports it in place of tqdm: ``from ._live import progress_bar as tqdm``.
    """
    if not headless():
        from tqdm.auto import tqdm

        return tqdm(*args, **kwargs)
    kwargs["mininterval"] = max(float(kwargs.get("mininterval") or 0.0), HEADLESS_MININTERVAL_S)
    kwargs.setdefault("ncols", 100)
    kwargs["file"] = _LineWriter(kwargs.get("file") or sys.stderr)
    return _headless_bar_class()(*args, **kwargs)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _LineWriter:
    """A file wrapper that turns tqdm's in-place redraws (``\\r``, cursor moves) into whole lines."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, s: str) -> int:
        for piece in re.split(r"[\r\n]", _ANSI.sub("", str(s))):
            if piece.strip():
                self._file.write(piece.rstrip() + "\n")
        return len(s)

    def flush(self) -> None:
        flush = getattr(self._file, "flush", None)
        if flush is not None:
            flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


_HEADLESS_BAR: type | None = None


def _headless_bar_class() -> type:
    """tqdm's text bar, printing a line only at the start, each tenth, a heartbeat and the end."""
    global _HEADLESS_BAR
    if _HEADLESS_BAR is not None:
        return _HEADLESS_BAR
    from tqdm.std import tqdm as std_tqdm

    class HeadlessBar(std_tqdm):
        """A text bar for headless runs: whole lines, few of them (see :func:`progress_bar`)."""

        _line_n: float | None = None
        _line_t: float = -math.inf

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            if msg is not None:  # tqdm clears the bar with msg="" (leave=False, tqdm.write): nothing to do
                if msg:
                    self.fp.write(msg)
                return True
            closing = self.disable  # tqdm.close() sets disable before its last display()
            now = time.monotonic()
            if self._line_n is None:
                due = True
            elif self.n == self._line_n:
                due = False
            elif closing:
                due = True
            elif self.total:
                step = self.total / HEADLESS_LINES
                due = (self.n >= self.total
                       or math.floor(self.n / step) > math.floor(self._line_n / step)
                       or now - self._line_t >= HEADLESS_HEARTBEAT_S)
            else:
                due = now - self._line_t >= HEADLESS_HEARTBEAT_S
            if due:
                self._line_n, self._line_t = self.n, now
                self.fp.write(self.__str__())
                self.fp.flush()
            return True

    _HEADLESS_BAR = HeadlessBar
    return HeadlessBar
