"""The photometric objective every stage shares, and how every stage is scored.

Fitting (notebook 02), decoder training (03), test-time refinement (06) and the evaluation
protocol (07) all compare renders with photos the same way, and this module is the one place
that says how:

- **Loss** (:func:`photometric_loss`): ``l1 L1 + ssim (1 - SSIM) [+ lpips LPIPS]`` over the
  **whole image** on white. The corresponded points cover the whole foreground the photos show
  (head, neck and bust: :mod:`fastavatar_nb.data.bust`), so no pixel needs to be hidden from the
  loss. Optional per-pixel ``weights`` restrict it (e.g. a user's own photo that is not on white).
- **Scores** (:func:`evaluate_views`): PSNR, SSIM, MAE (and LPIPS where its weights exist) over
  the whole image on white, as the authors score them: the headline of every table. A secondary
  *head* score covers the foreground above the collar line (:func:`head_region`), defined from
  the ground-truth mask and the camera alone (no 3D points), so any method can be scored on it.
- **Test time** uses only what one photo carries: :func:`check_on_white` is the rule for a
  photo's loss region (every pixel of a photo on white); ground truth is for scoring only.

Views: :data:`HOLDOUT_VIEW` (camera 8, NeRSemble's validation camera) is never trained on by the
fits or the decoder; :func:`train_views` lists the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ._io import StageConfig, check_fields
from .cameras import Cameras
from .data.nersemble import HOLDOUT_VIEW
from .gaussians import Gaussians
from .metrics import image_loss, lpips, mae, psnr, ssim
from .render import Backend, render

__all__ = [
    "HOLDOUT_VIEW", "COLLAR_Y", "WHITE_LEVEL", "MIN_WHITE_BORDER", "NotOnWhiteError", "subject_ids", "train_views",
    "photometric_loss", "head_region", "check_on_white", "evaluate_views", "StageScores", "EvaluationConfig",
]

COLLAR_Y = -0.19
"""Height (metres, world +y up, head at the origin) of the collar line: the neck base where
FLAME's points end in NeRSemble and where the synthetic heads' neck meets the shirt. The head
region (:func:`head_region`) is the foreground above it."""

WHITE_LEVEL = 0.9
"""A pixel is white when all three channels are at least this (photos are in [0, 1])."""

MIN_WHITE_BORDER = 0.5
"""Share of a photo's border pixels that must be white for :func:`check_on_white`. The shirt runs
off the bottom and sides of the frame: measured white shares are 0.82-0.99 on NeRSemble frames
(subjects 306 and 369, every camera) and 0.70-0.80 on the synthetic heads; a photo on a grey or
busy background scores near 0."""


@dataclass(frozen=True)
class EvaluationConfig(StageConfig):
    """Settings of the paper's protocol on the test subjects (notebook 07, :mod:`fastavatar_nb.evaluation`)."""

    input_views: int | None = None
    """Input views per test subject (:func:`fastavatar_nb.evaluation.input_views`: camera 8 and views spread over
    the rig); ``None``: every view with a face, as the paper. Each refined head costs the refinement's steps."""

    def validate(self) -> EvaluationConfig:
        """Raise ``ValueError`` naming a bad field; returns ``self``."""
        check_fields(self, positive_int=("input_views",), optional=("input_views",))
        return self


class NotOnWhiteError(ValueError):
    """A photo given to a stage whose loss covers every pixel is not composited on white."""


def subject_ids(subjects: Sequence, caller: str) -> list[str]:
    """The ids of a list or dataset of subjects (a dataset's ``subject_ids`` without loading it);
    repeated ids raise ``ValueError`` naming ``caller`` and the repeats."""
    ids = getattr(subjects, "subject_ids", None)
    ids = list(ids) if ids is not None else [s.subject_id for s in subjects]
    dup = sorted({s for s in ids if ids.count(s) > 1})
    if dup:
        raise ValueError(f"{caller}: subject ids must be unique, repeated: {dup}")
    return ids


def train_views(num_views: int, holdout_view: int | None = HOLDOUT_VIEW) -> list[int]:
    """Training view indices: every view except ``holdout_view`` (``None``: every view)."""
    if holdout_view is not None and not 0 <= holdout_view < num_views:
        raise ValueError(f"holdout_view {holdout_view} does not exist for a subject with {num_views} views; "
                         "set holdout_view=None to train on every view")
    views = [c for c in range(num_views) if c != holdout_view]
    if not views:
        raise ValueError(f"no training views left: {num_views} views, holdout_view {holdout_view}")
    return views


def photometric_loss(colors: Tensor, gt: Tensor, weights: Tensor | None = None, l1_weight: float = 0.8,
                     ssim_weight: float = 0.2, lpips_weight: float = 0.0) -> dict[str, Tensor]:
    """The image loss of every stage: ``l1 L1 + ssim (1 - SSIM) [+ lpips LPIPS]`` on white.

    Args:
        colors: ``[..., H, W, 3]`` render composited on the same background as ``gt``.
        gt: ``[..., H, W, 3]`` photos in [0, 1].
        weights: optional ``[..., H, W]`` in [0, 1]: pixels of weight 0 show the ground truth in the
            prediction (so neither L1 nor SSIM sees them), weight 1 the render, soft weights a
            blend. ``None``: every pixel (the default of every stage).
        l1_weight, ssim_weight, lpips_weight: see :func:`fastavatar_nb.metrics.image_loss`.

    Returns:
        :func:`~fastavatar_nb.metrics.image_loss`'s dict of ``[...]`` terms (``"total"`` to minimise).
    """
    pred = colors
    if weights is not None:
        pred = weights[..., None] * colors + (1.0 - weights[..., None]) * gt
    return image_loss(pred, gt, l1_weight, ssim_weight, lpips_weight)


@torch.no_grad()
def head_region(masks: Tensor, cameras: Cameras, collar_y: float = COLLAR_Y) -> Tensor:
    """The head: foreground pixels above the collar line, per view (for the secondary *head* score).

    A pixel is above the collar line when its ray, met with the vertical plane through the world
    origin facing the camera, passes above ``collar_y``. Only the ground-truth mask and the camera
    are used (no 3D points), so the region is the same for every method scored on the view.

    Args:
        masks: ``[..., C, H, W]`` soft foreground masks; cameras: ``[..., C]`` cameras of that size.

    Returns:
        ``[..., C, H, W]`` weights in [0, 1]: the mask where the pixel is above the line, 0 below.
    """
    H, W = masks.shape[-2:]
    if (cameras.width, cameras.height) != (W, H):
        raise ValueError(f"head_region: cameras are {cameras.width}x{cameras.height} but masks are {W}x{H}")
    dev, dt = masks.device, masks.dtype
    R, t = cameras.viewmats[..., :3, :3], cameras.viewmats[..., :3, 3]            # [..., C, 3, 3], [..., C, 3]
    centre = -(R.transpose(-1, -2) @ t[..., None])[..., 0]                          # [..., C, 3]
    K = cameras.Ks
    u = torch.arange(W, device=dev, dtype=dt) + 0.5
    v = torch.arange(H, device=dev, dtype=dt) + 0.5
    xc = (u[None, :] - K[..., 0, 2, None, None]) / K[..., 0, 0, None, None]         # [..., C, 1, W]
    yc = (v[:, None] - K[..., 1, 2, None, None]) / K[..., 1, 1, None, None]         # [..., C, H, 1]
    xc, yc = torch.broadcast_tensors(xc, yc)
    d_cam = torch.stack([xc, yc, torch.ones_like(xc)], -1)                          # [..., C, H, W, 3]
    d = d_cam @ R[..., None, :, :]                                                  # rows of R: camera axes
    fwd = R[..., 2, :].clone()
    fwd[..., 1] = 0.0                                                               # horizontal forward
    n = fwd / fwd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    denom = (d * n[..., None, None, :]).sum(-1)
    s = -(centre * n).sum(-1)[..., None, None] / denom.clamp_min(1e-12)
    y = centre[..., 1, None, None] + s * d[..., 1]
    return masks * (y > collar_y).to(dt)


def check_on_white(image: Tensor, name: str = "image", white: float = WHITE_LEVEL,
                   min_border: float = MIN_WHITE_BORDER) -> float:
    """Check that a photo ``[H, W, 3]`` is composited on white; returns its white-border share.

    The rule of every test-time loss that covers the whole image: the photo's background must be
    white (as the training photos are), judged by its border pixels (at least ``min_border`` of
    them with every channel >= ``white``). A photo on another background would teach the head to
    paint that background.

    Raises:
        NotOnWhiteError: naming ``name``, the share found and what to do.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} must be [H, W, 3], got {tuple(image.shape)}")
    border = torch.cat([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])   # [P, 3]
    share = float((border >= white).all(-1).float().mean())
    if share < min_border:
        raise NotOnWhiteError(
            f"{name} is not on a white background: {share:.0%} of its border pixels are white (need "
            f"{min_border:.0%}, every channel >= {white}). Composite the photo on white first (e.g. with a "
            "foreground mask: mask * photo + (1 - mask)), or pass weights= (1 on the pixels the loss may see).")
    return share


@torch.no_grad()
def evaluate_views(gaussians: Gaussians, images: Tensor, cameras: Cameras, views: Sequence[int],
                   head_weights: Tensor | None = None, backend: Backend = "auto", sh_degree: int = 3,
                   views_per_render: int = 4, tile_size: int | None = None, with_lpips: bool = False,
                   identity: Callable[[Tensor, list[int]], Tensor] | None = None) -> dict[str, Tensor]:
    """PSNR, SSIM and MAE (and LPIPS) of batched heads on the given views, over the whole image on white.

    Args:
        gaussians: ``[S, K, ...]``; images: ``[S, C, H, W, 3]``; cameras: ``[S, C]``.
        views: view indices to evaluate.
        head_weights: optional ``[S, C, H, W]`` head region (:func:`head_region`) for the secondary
            ``*_head`` scores.
        with_lpips: also ``lpips`` (whole image); raises
            :class:`~fastavatar_nb.metrics.LpipsUnavailableError` where its weights are missing.
        identity: optional ``score(renders [S, v, H, W, 3], view indices) -> [S, v]`` for an
            ``identity`` entry (e.g. :func:`fastavatar_nb.evaluation.identity_scorer`: FaceNet
            cosine to the photos; NaN where a photo has no detected face).

    Returns:
        Dict of ``[S, V]`` per-view values: ``psnr``, ``ssim`` (11-pixel Gaussian windows, 'valid'),
        ``mae`` over every pixel; with ``head_weights`` also ``psnr_head``, ``ssim_head``,
        ``mae_head``; ``lpips`` and ``identity`` if asked.
    """
    keys = ["psnr", "ssim", "mae"] + (["psnr_head", "ssim_head", "mae_head"] if head_weights is not None else [])
    keys += (["lpips"] if with_lpips else []) + (["identity"] if identity is not None else [])
    out: dict[str, list[Tensor]] = {k: [] for k in keys}
    vs = list(views)
    H, W = images.shape[-3:-1]
    pad = "valid" if min(H, W) >= 11 else "same"
    for i in range(0, len(vs), views_per_render):
        v = torch.tensor(vs[i:i + views_per_render], device=images.device)
        cams = Cameras(cameras.viewmats[:, v], cameras.Ks[:, v], cameras.width, cameras.height)
        pred = render(gaussians, cams, background=1.0, backend=backend, sh_degree=sh_degree,
                      tile_size=tile_size).colors.clamp(0, 1)
        gt = images[:, v]
        out["psnr"].append(psnr(pred, gt))
        out["ssim"].append(ssim(pred, gt, padding=pad))
        out["mae"].append(mae(pred, gt))
        if head_weights is not None:
            w = head_weights[:, v]
            out["psnr_head"].append(psnr(pred, gt, mask=w))
            out["ssim_head"].append(ssim(pred, gt, padding=pad, mask=w))
            out["mae_head"].append(mae(pred, gt, mask=w))
        if with_lpips:
            out["lpips"].append(lpips(pred, gt))
        if identity is not None:
            out["identity"].append(identity(pred, vs[i:i + views_per_render]).to(pred.device))
    return {k: torch.cat(x, 1) for k, x in out.items()}


@dataclass
class StageScores:
    """How well a stage (the fits, the decoder) reproduces its training subjects: ``[S]`` tensors,
    one value per subject, over the whole image on white unless named ``_head``.

    Attributes:
        train_psnr, train_ssim: means over the training views.
        heldout_psnr, heldout_ssim: on the held-out view (:data:`HOLDOUT_VIEW`; NaN without one).
        heldout_psnr_head: the held-out view's PSNR over the head alone (:func:`head_region`), a
            secondary score.
    """

    train_psnr: Tensor
    train_ssim: Tensor
    heldout_psnr: Tensor
    heldout_ssim: Tensor
    heldout_psnr_head: Tensor

    @staticmethod
    def score_names() -> tuple[str, ...]:
        """The names of the score fields, in order."""
        return tuple(f.name for f in fields(StageScores))
