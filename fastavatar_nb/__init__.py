"""fastavatar-nb: FastAvatar (one face image -> a 3D Gaussian Splatting head) for Jupyter.

Typical use in a notebook::

    import fastavatar_nb as fa
    from fastavatar_nb.render import render
    preset = fa.presets.get("auto")          # "smoke" on a CPU, "full" on a CUDA GPU
    out = render(gaussians, cameras)         # colors [..., C, H, W, 3], alphas, depths

:class:`Gaussians` and :class:`Cameras` are imported here; ``fa.render`` is the renderer
subpackage (``fa.render.render`` the function, ``fa.render.torch_rasterizer`` its steps).
The stage modules (``presets``, ``data``, ``objective``, ``fitting``, ``template``, ``decoder``,
``refine``, ``distributed``, ``pipeline``, ``metrics``, ``viewers``, ``checkpoints``, ``photo``, ...) load on first use so ``import fastavatar_nb`` stays quick.
"""

from __future__ import annotations

import importlib
import logging
import sys

from ._openmp import limit_spin

limit_spin()  # before torch loads OpenMP (see fastavatar_nb._openmp)

from . import render  # noqa: E402
from .cameras import Cameras  # noqa: E402
from .gaussians import Gaussians  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Cameras", "Gaussians", "render", "__version__"]

_LAZY = {"presets", "data", "fitting", "template", "decoder", "pipeline", "faces", "encoder", "editing", "evaluation",
         "metrics", "viewers", "cli", "report", "ply", "gaussians", "cameras", "objective", "refine", "distributed", "threads",
         "checkpoints", "photo", "webviewer", "explorer", "figures", "report_results", "images", "plots", "orbit", "collapse", "runtime", "photo_io"}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fastavatar_nb' has no attribute {name!r}")


def _default_logging() -> None:
    """Show the package's INFO lines (e.g. which renderer was chosen and why) on stderr.

    Only when the application configured nothing for ``fastavatar_nb``; silence it with
    ``logging.getLogger("fastavatar_nb").setLevel(logging.WARNING)``.
    """
    log = logging.getLogger(__name__)
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[fastavatar_nb] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


_default_logging()
