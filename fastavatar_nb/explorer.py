"""The latent explorer: sliders over the latent space, each move decoded and drawn in the browser.

A code is built from the sliders as in the paper's section 3.6,

    w = (1 - t) w_a + t w_b + sum_j lambda_j * spread_j * n_j,

(interpolation between two subjects' codes, then each attribute direction ``n_j`` scaled by its
training codes' spread, so ``lambda`` counts standard deviations), decoded in the kernel
(``decode(w)``, about 20 ms at the smoke preset on a CPU) and sent to a
:class:`~fastavatar_nb.webviewer.HeadViewer`, which replaces the head's Gaussians without
reloading the page. Orbiting stays in the browser.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .editing import AttributeDirection, edit, interpolate
from .gaussians import Gaussians
from .webviewer import HeadViewer

__all__ = ["LatentExplorer", "LAMBDA_RANGE_SD"]

LAMBDA_RANGE_SD = 3.0
"""The attribute sliders run from -3 to +3 standard deviations of the training codes along the direction."""


class LatentExplorer:
    """Sliders for ``t`` between two codes and ``lambda`` per attribute direction, with a live 3D head.

    Args:
        decode: codes ``[L]`` -> :class:`Gaussians` (e.g. ``DecoderResult.decode``).
        w_a, w_b: the two ends of the interpolation (``[L]`` each), ``t = 0`` and ``t = 1``.
        directions: attribute directions (notebook 05's SVM normals); none gives the ``t`` slider only.
        names: labels of the two ends (e.g. subject ids).
        t: the initial interpolation weight.
        reference: an extra panel shown beside the explored head (e.g. ``{"template": template}``),
            fixed while the sliders move.
        **view: :class:`~fastavatar_nb.webviewer.HeadViewer` keywords (``width``, ``height``, ``pitch_deg``, ...).
    """

    def __init__(self, decode: Callable[[Tensor], Gaussians], w_a: Tensor, w_b: Tensor,
                 directions: Sequence[AttributeDirection] = (), *, names: tuple[str, str] = ("w_a", "w_b"),
                 t: float = 0.0, reference: dict[str, Gaussians] | None = None, **view: Any) -> None:
        import ipywidgets as widgets

        interpolate(w_a, w_b, 0.0)  # checks the two codes (shape, finite values) with editing's messages
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must be in [0, 1], got {t}")
        for d in directions:
            if not isinstance(d, AttributeDirection):
                raise TypeError(f"directions must be AttributeDirection objects, got {type(d).__name__}")
            if d.direction.shape[-1] != w_a.shape[-1]:
                raise ValueError(f"the direction {d.name!r} has {d.direction.shape[-1]} entries but the codes have "
                                 f"{w_a.shape[-1]}: use directions found on codes of this decoder")
        self.decode = decode
        self.w_a, self.w_b = w_a.detach(), w_b.detach()
        self.directions = list(directions)
        self.names = (str(names[0]), str(names[1]))
        self.t = widgets.FloatSlider(value=t, min=0.0, max=1.0, step=0.05, description="t",
                                     continuous_update=True, readout_format=".2f")
        self.amounts = {d.name: widgets.FloatSlider(value=0.0, min=-LAMBDA_RANGE_SD, max=LAMBDA_RANGE_SD, step=0.25,
                                                    description=d.name, continuous_update=True, readout_format="+.2f",
                                                    style={"description_width": "initial"})
                        for d in self.directions}
        """``lambda`` per direction, in standard deviations of the training codes along it."""
        self.status = widgets.Label()
        self.last_ms = 0.0
        head = self._decode()
        panels = {self._title(): head, **(reference or {})}
        self.viewer = HeadViewer(panels, **view)
        for s in (self.t, *self.amounts.values()):
            s.observe(self._on_change, names="value")
        ends = widgets.HTML(f"<b>t</b>: 0 = {self.names[0]}, 1 = {self.names[1]}; "
                            "each attribute slider in standard deviations of the training codes")
        self.widget = widgets.VBox([self.viewer.box, ends, self.t, *self.amounts.values(), self.status])
        """The layout: the viewer, then the sliders and a status line."""
        self._show_status()

    def code(self) -> Tensor:
        """The code ``w`` the sliders describe now (``[L]``)."""
        w = interpolate(self.w_a, self.w_b, float(self.t.value))
        for d in self.directions:
            amount = float(self.amounts[d.name].value)
            if amount:
                w = edit(w, d, amount * d.spread)
        return w

    def set(self, t: float | None = None, **amounts: float) -> None:
        """Move sliders from code (``t``, and ``lambda`` by attribute name); the head is decoded once."""
        unknown = sorted(set(amounts) - set(self.amounts))
        if unknown:
            raise KeyError(f"no attribute slider {unknown}; this explorer has {sorted(self.amounts)}")
        self._holding = True
        try:
            if t is not None:
                self.t.value = float(t)
            for name, value in amounts.items():
                self.amounts[name].value = float(value)
        finally:
            self._holding = False
        self._on_change(None)

    @property
    def head(self) -> Gaussians:
        """The explored head as shown (the viewer's first panel)."""
        return self.viewer.heads[0]

    _holding = False

    def _decode(self) -> Gaussians:
        start = time.perf_counter()
        with torch.no_grad():
            head = self.decode(self.code())
        self.last_ms = 1000 * (time.perf_counter() - start)
        return head

    def _title(self) -> str:
        parts = [f"t = {self.t.value:.2f}"] + [f"{n} {s.value:+.2f} sd" for n, s in self.amounts.items() if s.value]
        return ", ".join(parts)

    def _on_change(self, change: dict | None) -> None:
        if self._holding:
            return
        self.viewer.set_head(0, self._decode(), title=self._title())
        self._show_status()

    def _show_status(self) -> None:
        self.status.value = f"decoded in {self.last_ms:.0f} ms (K = {self.head.num_gaussians:,})"

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, Any]:
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        bundle["text/html"] = self.viewer.offline_html()  # without a kernel: the head at the sliders' position
        bundle["text/plain"] = f"LatentExplorer({self._title()}; {self.names[0]} -> {self.names[1]})"
        return bundle

    def __repr__(self) -> str:
        return f"LatentExplorer({self._title()}; {self.names[0]} -> {self.names[1]}, {len(self.directions)} directions)"
