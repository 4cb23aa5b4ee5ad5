"""Live displays when nobody watches: FASTAVATAR_HEADLESS, progress_bar, LiveCurves' rationed redraws."""

from __future__ import annotations

import io

import pytest

from fastavatar_nb import _live
from fastavatar_nb.viewers import LiveCurves

PLOTLY = "application/vnd.plotly.v1+json"


class FakeFrontend:
    """Stands in for IPython.display.display and its handle; each draw costs `cost` fake seconds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cost: float = 0.0) -> None:
        import IPython.display

        self.now = 0.0
        self.cost = cost
        self.calls: list[tuple[str, float, dict]] = []  # (kind, fake time, bundle)
        frontend = self

        class Handle:
            def update(self, obj, raw=False):
                frontend._record("update", obj)

        def fake_display(obj, raw=False, display_id=None):
            frontend._record("display", obj)
            return Handle()

        monkeypatch.setattr(IPython.display, "display", fake_display)

    def _record(self, kind: str, bundle: dict) -> None:
        self.now += self.cost
        self.calls.append((kind, self.now, bundle))

    def clock(self) -> float:
        return self.now

    def points(self, index: int = -1, trace: int = 0) -> list[float]:
        return list(self.calls[index][2][PLOTLY]["data"][trace]["y"])


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend to run inside a Jupyter kernel, with FASTAVATAR_HEADLESS unset."""
    monkeypatch.setattr(_live, "in_notebook_kernel", lambda: True)
    monkeypatch.delenv(_live.HEADLESS_ENV, raising=False)


def run_loop(curves: LiveCurves, frontend: FakeFrontend, steps: int, step_s: float) -> None:
    for step in range(steps):
        frontend.now += step_s
        curves.update(step, loss=1.0 / (step + 1), psnr=10.0 + step / steps)
    curves.finish()


@pytest.mark.parametrize(("value", "expected"), [
    (None, False), ("", False), ("0", False), ("false", False), ("No", False), ("off", False),
    ("1", True), ("true", True), ("yes", True),
])
def test_headless_env(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool) -> None:
    if value is None:
        monkeypatch.delenv(_live.HEADLESS_ENV, raising=False)
    else:
        monkeypatch.setenv(_live.HEADLESS_ENV, value)
    assert _live.headless() is expected
    monkeypatch.setattr(_live, "in_notebook_kernel", lambda: True)
    assert _live.live_displays() is (not expected)
    monkeypatch.setattr(_live, "in_notebook_kernel", lambda: False)
    assert _live.live_displays() is False


def test_not_a_kernel_here() -> None:
    assert _live.in_notebook_kernel() is False  # pytest: IPython may be imported, but no kernel


def test_live_curves_headless_draw_once_at_finish(kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_live.HEADLESS_ENV, "1")
    frontend = FakeFrontend(monkeypatch, cost=0.05)
    curves = LiveCurves("fit", clock=frontend.clock)
    assert curves.live and not curves.redraw
    run_loop(curves, frontend, steps=1600, step_s=0.26)
    assert [c[0] for c in frontend.calls] == ["display"]  # one output, drawn by finish()
    assert curves.redraws == 0
    assert frontend.points(trace=0) == [1.0 / (s + 1) for s in range(1600)]  # every point, none thinned
    assert len(frontend.points(trace=1)) == 1600


def test_live_curves_outside_a_kernel_display_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_live.HEADLESS_ENV, raising=False)
    frontend = FakeFrontend(monkeypatch)
    curves = LiveCurves("fit", clock=frontend.clock)
    run_loop(curves, frontend, steps=50, step_s=0.1)
    assert frontend.calls == [] and len(curves.figure().data[0].y) == 50


def test_live_curves_ration_redraws_like_notebook_03(kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    # Notebook 03 at smoke: 1,600 steps in about 420 s; a redraw that costs 20 ms.
    frontend = FakeFrontend(monkeypatch, cost=0.02)
    curves = LiveCurves("auto-decoder training", cols=2, clock=frontend.clock)
    assert curves.live and curves.redraw
    run_loop(curves, frontend, steps=1600, step_s=0.26)
    kinds = [c[0] for c in frontend.calls]
    assert kinds[0] == "display" and set(kinds[1:]) == {"update"}
    # min_interval_s = 1 s alone would allow about 420 redraws; the 5 %-of-age rule leaves < 100
    assert 30 <= curves.redraws <= 100 and len(frontend.calls) == curves.redraws + 1
    times = [c[1] for c in frontend.calls[:-1]]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 1.0
    assert max(gaps) < 0.1 * times[-1] + 1.0  # never frozen: the wait is 5 % of the age
    assert all(len(c[2][PLOTLY]["data"][0]["y"]) <= curves.live_points for c in frontend.calls[:-1])
    assert frontend.points() == [1.0 / (s + 1) for s in range(1600)]  # finish(): every point


def test_live_curves_slow_draws_wait_ten_times_their_cost(kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    frontend = FakeFrontend(monkeypatch, cost=2.0)  # a loaded machine: each redraw takes 2 s
    curves = LiveCurves("fit", min_interval_s=0.0, clock=frontend.clock)
    run_loop(curves, frontend, steps=500, step_s=0.1)
    times = [c[1] for c in frontend.calls[:-1]]
    assert len(times) >= 2
    assert all(b - a >= 10 * 2.0 for a, b in zip(times, times[1:], strict=False))
    assert curves.redraws <= 1 + (500 * 0.1 + 2.0 * len(times)) / 20.0
    assert len(frontend.points()) == 500


def test_live_curves_max_redraws(kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    frontend = FakeFrontend(monkeypatch)
    curves = LiveCurves("fit", mode="display", min_interval_s=0.0, max_redraws=5, clock=frontend.clock)
    run_loop(curves, frontend, steps=40, step_s=1.0)
    assert curves.redraws == 5 and len(frontend.calls) == 6
    assert len(frontend.points()) == 40
    with pytest.raises(ValueError, match="max_redraws"):
        LiveCurves(max_redraws=-1)
    with pytest.raises(ValueError, match="live_points"):
        LiveCurves(live_points=1)


def test_figure_thinning_keeps_the_ends() -> None:
    curves = LiveCurves("fit", mode="none")
    for step in range(1001):
        curves.update(step, loss=float(step))
    y = list(curves.figure(max_points=11).data[0].y)
    assert y == [float(s) for s in range(0, 1001, 100)]
    assert len(curves.figure().data[0].y) == 1001


def lines_of(monkeypatch: pytest.MonkeyPatch, run) -> list[str]:
    monkeypatch.setenv(_live.HEADLESS_ENV, "1")
    out = io.StringIO()
    run(out)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    return [line for line in text.split("\n") if line]


def test_progress_bar_headless_writes_a_few_whole_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    def train(out: io.StringIO) -> None:
        bar = _live.progress_bar(total=1600, desc="training the decoder", unit="step", mininterval=0.5, file=out)
        for _ in range(1600):
            bar.update(1)
            bar.set_postfix(loss="0.1000", refresh=True)  # even a refresh on every step
        bar.close()

    lines = lines_of(monkeypatch, train)
    assert 2 <= len(lines) <= _live.HEADLESS_LINES + 2
    assert lines[0].startswith("training the decoder:   0%") and "1600/1600" in lines[-1]
    assert sum("1600/1600" in line for line in lines) == 1

    def loops(out: io.StringIO) -> None:
        for _ in _live.progress_bar(range(37), desc="subjects", file=out):
            pass
        for _ in _live.progress_bar(iter(range(50)), desc="no total", file=out):
            pass
        for _ in _live.progress_bar(range(3), desc="views", file=out):
            for _ in _live.progress_bar(range(100), desc="refining", leave=False, file=out):
                pass
        for _ in _live.progress_bar(range(9), desc="off", disable=True, file=out):
            pass

    lines = lines_of(monkeypatch, loops)
    assert [line.split(":")[0] for line in lines].count("subjects") == 2
    assert [line.split(":")[0] for line in lines].count("no total") == 2 and "50it" in lines[3]
    assert "views: 100%" in lines[-1] and not any(line.startswith("off") for line in lines)
    assert len(lines) <= 4 + 2 + 3 * (_live.HEADLESS_LINES + 2)


def test_progress_bar_not_headless_is_tqdm_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    from tqdm.auto import tqdm

    monkeypatch.setenv(_live.HEADLESS_ENV, "0")
    bar = _live.progress_bar(total=3, file=io.StringIO())
    assert type(bar) is tqdm
    bar.close()
    monkeypatch.setenv(_live.HEADLESS_ENV, "1")
    bar = _live.progress_bar(total=3, file=io.StringIO(), mininterval=0.1)
    from tqdm.notebook import tqdm_notebook
    from tqdm.std import tqdm as std_tqdm

    assert isinstance(bar, std_tqdm) and not isinstance(bar, tqdm_notebook)
    assert bar.mininterval >= _live.HEADLESS_MININTERVAL_S
    bar.close()


def test_live_module_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    code = ("import sys, fastavatar_nb; before = set(sys.modules); import fastavatar_nb._live as m; "
            "m.live_displays(); print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['fastavatar_nb._live']"  # the package's own imports aside, nothing new
