"""The paper's single-image protocol (section 4): one view in, the other views scored.

For a test subject with C views, a method predicts a head from **one** input view; the head is
rendered at the remaining C - 1 views and compared with the ground truth; this is repeated with
each view as the input. :func:`novel_view_metrics` scores a batch of such predictions of one
subject over the same region of the image as the fits and the decoder (background plus the head
the subject's points cover), so the numbers of every stage compare.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .cameras import Cameras
from .data.subject import MultiViewSubject
from .fitting import evaluate_views, region_weights, support_masks
from .gaussians import Gaussians
from .render import Backend

__all__ = ["novel_view_metrics"]


@torch.no_grad()
def novel_view_metrics(subject: MultiViewSubject, heads: Gaussians, input_views: Sequence[int],
                       backend: Backend = "auto", support_scale: float = 1.0,
                       region: str = "support") -> dict[str, Tensor]:
    """Score heads predicted from single views of one subject on all of its other views.

    Args:
        subject: the subject (its images, masks, cameras and points, on the heads' device).
        heads: ``[V, K, ...]``: head ``j`` was predicted from view ``input_views[j]``.
        input_views: ``V`` view indices.
        backend: renderer backend.
        support_scale: scale of the support region (as in ``FitConfig``); region: ``"support"``
            or ``"image"`` (every pixel).

    Returns:
        ``{"psnr": [V], "ssim": [V], "psnr_image": [V]}``: for each head, the mean over the
        ``C - 1`` views other than its input view.
    """
    views = list(input_views)
    if heads.batch_shape != (len(views),):
        raise ValueError(f"novel_view_metrics: need heads [V, K] for V={len(views)} input views, got batch shape "
                         f"{tuple(heads.batch_shape)}")
    bad = [v for v in views if not 0 <= v < subject.num_views]
    if bad:
        raise ValueError(f"novel_view_metrics: input views {bad} do not exist ({subject.subject_id} has "
                         f"{subject.num_views} views)")
    if region not in ("support", "image"):
        raise ValueError(f"novel_view_metrics: region must be 'support' or 'image', got {region!r}")
    cams = Cameras(subject.cameras.viewmats[None], subject.cameras.Ks[None], subject.width, subject.height)  # [1, C]
    weights = None
    if region == "support":
        weights = region_weights(subject.masks, support_masks(subject.points, subject.cameras, support_scale,
                                                              backend))[None]
    out: dict[str, list[Tensor]] = {"psnr": [], "ssim": [], "psnr_image": []}
    for j, v in enumerate(views):
        others = [c for c in range(subject.num_views) if c != v]
        m = evaluate_views(heads[j:j + 1], subject.images[None], cams, others, weights, backend)
        for k in out:
            out[k].append(m[k].mean())
    return {k: torch.stack(v) for k, v in out.items()}
