"""Per-subject 3DGS fits with a fixed, corresponded set of K Gaussians (paper section 3.2).

Every subject's Gaussians start at its corresponded points (point ``k`` is the same place on
every head) and are optimised with the standard 3DGS loss and per-parameter Adam learning
rates (gsplat's ``simple_trainer``), but **without densification or pruning**: K stays fixed
and Gaussian ``k`` keeps its identity, which is what lets :func:`fastavatar_nb.template.build_template`
average the fits. A mild position regulariser keeps each Gaussian near its anchor point;
:attr:`FitResult.drift` reports how far they moved anyway.

Subjects are optimised in batches: parameters are ``[S, K, ...]`` tensors and one optimiser
step renders one view of every subject in the batch (cameras ``[S, 1]``). The loss is the sum
of the per-subject losses and Adam is element-wise, so a subject's fit does not depend on
which other subjects share its batch (up to floating-point summation order).

Loss and scores: the corresponded points cover the whole foreground the photos show (head, neck
and bust, :mod:`fastavatar_nb.data.bust`), so the loss is the shared photometric objective over
every pixel (:func:`fastavatar_nb.objective.photometric_loss`) and the reported PSNR/SSIM are over
the whole image on white (:func:`fastavatar_nb.objective.evaluate_views`); the held-out view is
also scored over the head alone (``heldout_psnr_head``, :func:`fastavatar_nb.objective.head_region`).

Views: a subject's training views are all its views except ``FitConfig.holdout_view``
(:data:`~fastavatar_nb.objective.HOLDOUT_VIEW`), on which the fit is evaluated. Each subject visits
its training views in a fresh random order every epoch; the order is a pure function of
``(seed, subject index, epoch)`` (numpy ``SeedSequence``), so a run resumed from a checkpoint
sees exactly the views an uninterrupted run would.

Checkpoints (``checkpoint=`` a folder): one file, ``fit_checkpoint.safetensors``
(:data:`CHECKPOINT_FILE`): parameters, Adam moments and step counts, finished fits, metrics and
loss histories as tensors, with the config, subject ids, progress and Adam hyper-parameters as
JSON in its metadata (:func:`checkpoint_state` reads them). It is replaced atomically (one
rename, :func:`fastavatar_nb._io.save_checkpoint`) every ``checkpoint_every`` steps and after each
batch of subjects, so a run killed at any moment resumes from the last complete checkpoint; a
damaged checkpoint, one of another run or leftovers of the earlier two-file layout
(``fit_state.json`` + ``fit_state.safetensors``) are refused with a
:class:`~fastavatar_nb._io.CheckpointError` naming the file and the way out (``overwrite=True``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._io import (
    CheckpointFile,
    StageConfig,
    atomic_save_tensors,
    check_fields,
    meta_json,
    read_artifact,
)
from .cameras import Cameras
from .data.subject import MultiViewSubject, stack_subjects
from .gaussians import Gaussians, knn, knn_spacing
from .loop import OPTIMIZER_FIELDS, StepLoop, load_optimizer_tensors, optimizer_tensors
from .metrics import psnr
from .objective import (
    HOLDOUT_VIEW,
    StageScores,
    evaluate_views,
    head_region,
    photometric_loss,
    subject_ids,
    train_views,
)
from .render import Backend, render, resolve_backend

__all__ = [
    "FitConfig", "FitResult", "fit_subjects", "estimate_normals", "sample_point_colors", "init_gaussians",
    "view_for_step", "FitStepInfo", "SHORT_RUN_LRS", "LONG_RUN_LRS", "SHORT_RUN_STEPS", "CHECKPOINT_FILE", "checkpoint_state",
    "FitLoss", "fit_loss",
]

CHECKPOINT_FILE = "fit_checkpoint.safetensors"
"""The resumable checkpoint of :func:`fit_subjects`, one file in its ``checkpoint`` folder."""
_LEGACY_CHECKPOINT = ("fit_state.json", "fit_state.safetensors")  # the two-file layout (format v2), refused
_FORMAT = "fastavatar-nb fit checkpoint v4"  # v4: Adam's state as loop.optimizer_tensors names it
_RESULT_FORMAT = "fastavatar-nb fits v2"
_PARAM_NAMES = ("means", "log_scales", "quats", "opacity_logits", "sh0", "shN")
_METRICS = ("init_train_psnr", *StageScores.score_names())
_DONE = (*(f"g.{k}" for k in ("means", "log_scales", "quats", "opacity_logits", "sh")), "anchors", *_METRICS)
_STATE_KEYS = ("config", "subject_ids", "num_done", "batch_start", "step", "seconds")
_LR_FIELDS = ("means_lr", "scales_lr", "quats_lr", "opacities_lr", "sh0_lr", "shN_lr")


@dataclass(frozen=True)
class FitConfig(StageConfig):
    """Settings of :func:`fit_subjects`. Learning rates follow gsplat's ``simple_trainer``."""

    iterations: int = 200
    """Optimiser steps per subject (each renders one training view of every subject in the batch)."""
    batch_size: int = 4
    """Subjects optimised together (parameters ``[S, K, ...]``)."""
    scene_scale: float = 0.1
    """Scene size in metres (about a head's radius); the means' learning rate is multiplied by it
    and the position regulariser is measured in it."""
    means_lr: float | None = None
    """Adam learning rate of the centres, in units of ``scene_scale`` per step. ``None`` (every
    learning rate below too): chosen by the run's length, :data:`SHORT_RUN_LRS` for fewer than
    :data:`SHORT_RUN_STEPS` iterations, else :data:`LONG_RUN_LRS` (gsplat's); see :meth:`learning_rates`."""
    means_lr_final: float = 0.01
    """Factor the means' learning rate decays to (exponentially) by the last step (gsplat)."""
    scales_lr: float | None = None
    """Learning rate of the log-scales (``None``: by the run's length)."""
    quats_lr: float | None = None
    """Learning rate of the (unnormalised) quaternions (``None``: by the run's length)."""
    opacities_lr: float | None = None
    """Learning rate of the opacity logits (``None``: by the run's length)."""
    sh0_lr: float | None = None
    """Learning rate of the SH DC coefficients (``None``: by the run's length)."""
    shN_lr: float | None = None
    """Learning rate of the higher SH bands (``None``: by the run's length)."""
    sh_degree: int = 3
    """Highest SH band optimised and rendered at the end."""
    sh_degree_interval: int | None = None
    """Steps between enabling SH bands (degree ``min(step // interval, sh_degree)``); ``None``:
    ``iterations // (sh_degree + 2)``, so the last band switches on at 3/5 of the run (gsplat:
    1000 of 30000)."""
    ssim_lambda: float = 0.2
    """Loss ``(1 - ssim_lambda) L1 + ssim_lambda (1 - SSIM)`` on white background."""
    position_reg_weight: float = 1.0
    """Weight of ``mean_k |mu_k - anchor_k|^2 / scene_scale^2`` (per subject) keeping Gaussians near
    their corresponded anchor points; 0 disables it."""
    init_opacity: float = 0.5
    """Initial opacity of every Gaussian."""
    init_scale: float = 1.0
    """Initial in-surface scale as a multiple of the mean distance to the 3 nearest points (that
    distance is clamped at 3x its median over the subject, so isolated points stay small)."""
    init_thickness: float = 0.1
    """Initial scale along the normal relative to the in-surface scale (flat discs on the surface)."""
    normal_neighbours: int = 16
    """Neighbours used to estimate point normals (PCA)."""
    holdout_view: int | None = HOLDOUT_VIEW
    """View index excluded from training and evaluated (:data:`~fastavatar_nb.objective.HOLDOUT_VIEW`);
    ``None``: train on all."""
    evaluate: bool = True
    """Measure PSNR/SSIM of every training view before and after fitting and of the held-out view
    (about ``2 C`` extra renders per subject); ``False`` leaves the metrics NaN (benchmarks)."""
    checkpoint_every: int = 50
    """Steps between checkpoints (when a checkpoint folder is given)."""
    tile_size: int | None = None
    """Rasterizer tile size; ``None``: the backend's default (the torch rasterizer picks 4, 8 or 16
    from the Gaussians' screen size)."""
    seed: int = 0
    """Seed of the view schedule."""

    def validate(self) -> FitConfig:
        """Raise ``ValueError`` naming the first bad field; returns ``self``."""
        check_fields(self, positive_int=("iterations", "batch_size", "normal_neighbours", "checkpoint_every",
                                         "tile_size"),
                     positive=("scene_scale", "means_lr_final", "init_scale", "init_thickness"),
                     non_negative=(*_LR_FIELDS, "position_reg_weight"), optional=(*_LR_FIELDS, "tile_size"))
        if not 0.0 <= self.ssim_lambda <= 1.0:
            raise ValueError(f"FitConfig.ssim_lambda must be in [0, 1], got {self.ssim_lambda!r}")
        if not 0.0 < self.init_opacity < 1.0:
            raise ValueError(f"FitConfig.init_opacity must be in (0, 1), got {self.init_opacity!r}")
        if self.sh_degree not in (0, 1, 2, 3):
            raise ValueError(f"FitConfig.sh_degree must be 0..3, got {self.sh_degree!r}")
        if self.sh_degree_interval is not None and (not isinstance(self.sh_degree_interval, int)
                                                    or self.sh_degree_interval < 1):
            raise ValueError(f"FitConfig.sh_degree_interval must be None or a positive int, got {self.sh_degree_interval!r}")
        if self.holdout_view is not None and (not isinstance(self.holdout_view, int) or self.holdout_view < 0):
            raise ValueError(f"FitConfig.holdout_view must be None or a view index >= 0, got {self.holdout_view!r}")
        return self

    def degree_at(self, step: int) -> int:
        """SH degree used at optimiser step ``step`` (0-based)."""
        interval = self.sh_degree_interval or max(1, self.iterations // (self.sh_degree + 2))
        return min(step // interval, self.sh_degree)

    def learning_rates(self) -> dict[str, float]:
        """The six learning rates this config trains with: each field that is set, else the default
        for the run's length (:data:`SHORT_RUN_LRS` below :data:`SHORT_RUN_STEPS` iterations,
        :data:`LONG_RUN_LRS` from there on), so a short run never gets rates tuned for 30,000 steps."""
        defaults = SHORT_RUN_LRS if self.iterations < SHORT_RUN_STEPS else LONG_RUN_LRS
        return {name: float(defaults[name] if getattr(self, name) is None else getattr(self, name))
                for name in _LR_FIELDS}

    def means_lr_at(self, step: int) -> float:
        """Absolute learning rate of the means at ``step``: ``means_lr * scene_scale`` decaying
        exponentially to ``means_lr_final`` times that at the last step."""
        frac = step / max(1, self.iterations - 1)
        return self.learning_rates()["means_lr"] * self.scene_scale * self.means_lr_final ** frac

SHORT_RUN_STEPS = 1000
"""Runs with fewer iterations than this use :data:`SHORT_RUN_LRS`, longer ones :data:`LONG_RUN_LRS`."""

LONG_RUN_LRS: dict[str, float] = {"means_lr": 1.6e-4, "scales_lr": 5e-3, "quats_lr": 1e-3, "opacities_lr": 5e-2,
                                  "sh0_lr": 2.5e-3, "shN_lr": 2.5e-3 / 20}
"""gsplat ``simple_trainer``'s learning rates (tuned for 30,000 steps), for runs of thousands of steps
(the full preset's 5,000)."""

SHORT_RUN_LRS: dict[str, float] = {**LONG_RUN_LRS, "means_lr": 1e-2, "scales_lr": 5e-2, "quats_lr": 1e-2,
                                   "sh0_lr": 5e-2, "shN_lr": 2.5e-3}
"""Learning rates for runs of a few hundred steps (the smoke preset), found by a sweep on the
synthetic heads at 69x101, K = 2,500, 100 steps: training-view PSNR 28.7 dB against 23.8 dB
with gsplat's rates (which assume 30,000 steps)."""


# ----------------------------------------------------------------------------- initialisation
def estimate_normals(points: Tensor, k: int = 16, center: Tensor | None = None) -> Tensor:
    """Unit surface normals of a point cloud by PCA of each point's neighbourhood.

    The normal is the eigenvector of the smallest eigenvalue of the covariance of the point's
    ``k`` nearest neighbours, oriented away from ``center`` (default: the centroid of the
    points, i.e. outwards for a head).

    Args:
        points: ``[..., K, 3]``, K > k.
        k: neighbours per point.
        center: ``[..., 3]`` orientation centre.

    Returns:
        ``[..., K, 3]`` unit normals.
    """
    if points.ndim < 2 or points.shape[-1] != 3:
        raise ValueError(f"estimate_normals: points must be [..., K, 3], got {tuple(points.shape)}")
    K = points.shape[-2]
    if K <= k:
        raise ValueError(f"estimate_normals: need more than k={k} points, got K={K}")
    flat = points.reshape(-1, K, 3)
    if center is None:
        centers = flat.mean(1)
    else:
        c = torch.as_tensor(center, dtype=points.dtype, device=points.device)
        centers = c.expand(points.shape[:-2] + (3,)).reshape(-1, 3)
    out = []
    for p, c in zip(flat, centers, strict=True):
        nb = p[knn(p, k)[1]]                                        # [K, k, 3]
        d = nb - nb.mean(1, keepdim=True)
        cov = d.transpose(1, 2) @ d                                 # [K, 3, 3]
        _, vecs = torch.linalg.eigh(cov.double())
        n = vecs[..., 0].to(p.dtype)                                # smallest eigenvalue
        sign = torch.where(((p - c) * n).sum(-1, keepdim=True) < 0, -1.0, 1.0)
        out.append(n * sign)
    return torch.stack(out).reshape(points.shape)


def sample_point_colors(points: Tensor, normals: Tensor | None, images: Tensor, masks: Tensor,
                        cameras: Cameras, mask_threshold: float = 0.5) -> Tensor:
    """Colour of each point averaged over the views that see it.

    Each point is projected into every view and the image is sampled bilinearly there. A view
    counts when the point is in front of the camera, inside the image and inside the
    foreground mask, weighted by ``cos^2`` of the angle between the normal and the direction
    to the camera (back-facing views get weight 0; this stands in for an occlusion test on a
    closed, mostly convex head). Points no view sees take the colour of the nearest point that
    has one.

    Args:
        points: ``[K, 3]``; normals: ``[K, 3]`` unit (``None``: every view weight 1).
        images: ``[C, H, W, 3]``; masks: ``[C, H, W]``; cameras: ``C`` cameras of that size.

    Returns:
        ``[K, 3]`` colours in [0, 1].
    """
    C, H, W = masks.shape
    uv, z = cameras.project(points)                                   # [C, K, 2], [C, K]
    grid = torch.stack([uv[..., 0] / W * 2 - 1, uv[..., 1] / H * 2 - 1], -1)[:, :, None, :]  # [C, K, 1, 2]
    col = F.grid_sample(images.permute(0, 3, 1, 2), grid, mode="bilinear", align_corners=False)[..., 0]
    col = col.permute(0, 2, 1)                                        # [C, K, 3]
    m = F.grid_sample(masks[:, None], grid, mode="bilinear", align_corners=False)[:, 0, :, 0]  # [C, K]
    inside = (z > 0) & (grid[..., 0, 0].abs() <= 1) & (grid[..., 0, 1].abs() <= 1) & (m > mask_threshold)
    w = inside.to(points.dtype)
    if normals is not None:
        to_cam = cameras.centers[:, None, :] - points[None]            # [C, K, 3]
        cos = (F.normalize(to_cam, dim=-1) * normals[None]).sum(-1)
        w = w * cos.clamp_min(0) ** 2
    total = w.sum(0)                                                  # [K]
    colors = (w[..., None] * col).sum(0) / total.clamp_min(1e-12)[:, None]
    seen = total > 1e-6
    if not seen.any():
        raise ValueError("sample_point_colors: no point projects into any view's foreground mask; "
                         "check that points and cameras share a coordinate frame")
    if not seen.all():
        nearest = torch.cdist(points[~seen], points[seen]).argmin(1)
        colors[~seen] = colors[seen][nearest]
    return colors.clamp(0, 1)


def init_gaussians(subject: MultiViewSubject, config: FitConfig | None = None,
                   views: Sequence[int] | None = None) -> Gaussians:
    """Initial Gaussians ``[K, ...]`` for one subject (3DGS initialisation, fixed K).

    Centres at the corresponded points; flat discs tangent to the surface (normals from
    :func:`estimate_normals`, in-surface scale ``init_scale`` times the mean 3-nearest-neighbour
    spacing, thickness ``init_thickness`` of that); DC colour from the images
    (:func:`sample_point_colors` over ``views``, default the training views); higher SH bands 0;
    opacity ``init_opacity``.
    """
    config = config or FitConfig()
    pts = subject.points
    normals = estimate_normals(pts, k=config.normal_neighbours)
    views = list(train_views(subject.num_views, config.holdout_view)) if views is None else list(views)
    v = torch.tensor(views, device=pts.device)
    cams = Cameras(subject.cameras.viewmats[v], subject.cameras.Ks[v], subject.width, subject.height)
    colors = sample_point_colors(pts, normals, subject.images[v], subject.masks[v], cams)
    g = Gaussians.from_points(pts, colors, scale=config.init_scale * _clamped_spacing(pts),
                              opacity=config.init_opacity, normals=normals)
    g.log_scales[..., 2] += math.log(config.init_thickness / 0.1)  # from_points makes discs of thickness 0.1
    return g


def _clamped_spacing(points: Tensor) -> Tensor:
    """Mean 3-nearest-neighbour distance ``[..., K]``, clamped at 3x its median (isolated points)."""
    sp = knn_spacing(points, k=3)
    return torch.minimum(sp, 3.0 * sp.median(dim=-1, keepdim=True).values)


# ------------------------------------------------------------------------------- view schedule
def view_for_step(seed: int, subject_index: int, step: int, num_train_views: int) -> int:
    """Position in the training-view list that subject ``subject_index`` renders at ``step``.

    Epoch ``e = step // num_train_views`` visits every training view once in the order
    ``default_rng(SeedSequence([seed, subject_index, e])).permutation(num_train_views)``.
    """
    epoch, pos = divmod(step, num_train_views)
    rng = np.random.default_rng(np.random.SeedSequence([seed, subject_index, epoch]))
    return int(rng.permutation(num_train_views)[pos])


# ----------------------------------------------------------------------------------- results
@dataclass
class FitResult(StageScores):
    """Fits of S subjects and how good they are.

    Attributes:
        subject_ids: ``S`` subject names, in the order of every ``[S, ...]`` tensor.
        gaussians: fitted Gaussians ``[S, K, ...]``.
        anchors: ``[S, K, 3]`` the corresponded points each fit started from.
        init_train_psnr: ``[S]`` mean PSNR over the training views of the initial Gaussians.
        train_psnr, train_ssim, heldout_psnr, heldout_ssim, heldout_psnr_head: ``[S]`` whole-image
            scores after fitting (:class:`~fastavatar_nb.objective.StageScores`).
        init_train_psnr: ``[S]`` mean PSNR over the training views of the initial Gaussians.
        loss_history, psnr_history: ``[S, iterations]`` training loss and PSNR of the view
            rendered at each step.
        config: the :class:`FitConfig` used.
        backend: renderer backend used.
        seconds: wall time of the optimisation (summed over resumed sessions).
    """

    subject_ids: list[str]
    gaussians: Gaussians
    anchors: Tensor
    init_train_psnr: Tensor
    loss_history: Tensor
    psnr_history: Tensor
    config: FitConfig
    backend: str = "torch"
    seconds: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def drift(self) -> Tensor:
        """``[S, K]`` distance in metres of each fitted centre from its anchor point."""
        return (self.gaussians.means.detach() - self.anchors).norm(dim=-1)

    def drift_stats(self) -> dict[str, Tensor]:
        """Per-subject drift summary in millimetres: ``mean, median, p95, max`` each ``[S]``."""
        d = self.drift.float() * 1000.0
        return {"mean_mm": d.mean(-1), "median_mm": d.median(-1).values,
                "p95_mm": torch.quantile(d, 0.95, dim=-1), "max_mm": d.amax(-1)}

    def table(self) -> list[dict[str, float | str]]:
        """One row per subject: ids, whole-image PSNR/SSIM (train and held-out), the held-out head
        PSNR, initial PSNR and drift."""
        ds = self.drift_stats()
        rows = []
        for i, sid in enumerate(self.subject_ids):
            rows.append({
                "subject": sid,
                "init_train_psnr": float(self.init_train_psnr[i]),
                "train_psnr": float(self.train_psnr[i]), "train_ssim": float(self.train_ssim[i]),
                "heldout_psnr": float(self.heldout_psnr[i]), "heldout_ssim": float(self.heldout_ssim[i]),
                "heldout_psnr_head": float(self.heldout_psnr_head[i]),
                "drift_mean_mm": float(ds["mean_mm"][i]), "drift_p95_mm": float(ds["p95_mm"][i]),
            })
        return rows

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write every tensor to one safetensors file (config and ids in its JSON metadata)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"gaussians.{k}": v for k, v in self.gaussians.detach().parameters().items()}
        tensors["anchors"] = self.anchors
        for name in (*_METRICS, "loss_history", "psnr_history"):
            tensors[name] = getattr(self, name)
        meta = {"format": _RESULT_FORMAT, "subject_ids": json.dumps(self.subject_ids),
                "config": self.config.to_json(), "backend": self.backend, "seconds": repr(self.seconds),
                "extra": json.dumps(self.extra)}
        atomic_save_tensors(tensors, path, meta)
        return path

    @staticmethod
    def load(path: str | os.PathLike, device: torch.device | str = "cpu") -> FitResult:
        """Read a file written by :meth:`save`."""
        path, hint = Path(path), "fit the subjects with fit_subjects (notebook 02)"
        gs = [f"gaussians.{k}" for k in ("means", "log_scales", "quats", "opacity_logits", "sh")]
        meta, t = read_artifact(path, _RESULT_FORMAT, hint, device=device, meta_keys=("subject_ids", "config"),
                                tensor_names=(*gs, "anchors", *_METRICS, "loss_history", "psnr_history"))
        g = Gaussians(**{k: t[f"gaussians.{k}"] for k in ("means", "log_scales", "quats", "opacity_logits", "sh")})
        return FitResult(
            subject_ids=meta_json(path, meta, "subject_ids", hint), gaussians=g, anchors=t["anchors"],
            **{name: t[name] for name in (*_METRICS, "loss_history", "psnr_history")},
            config=FitConfig.from_dict(meta_json(path, meta, "config", hint)), backend=meta.get("backend", "torch"),
            seconds=float(meta.get("seconds", "0")), extra=json.loads(meta.get("extra", "{}")),
        )


# ----------------------------------------------------------------------------------- fitting
def _checkpoint(folder: str | os.PathLike) -> CheckpointFile:
    return CheckpointFile(folder, CHECKPOINT_FILE, _FORMAT, "fit checkpoint", legacy=_LEGACY_CHECKPOINT)


def checkpoint_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The JSON state of the fit checkpoint in ``folder`` (config, ``subject_ids``, progress:
    ``num_done`` subjects finished, ``batch_start`` and ``step`` of the batch in progress, ``seconds``),
    without reading its tensors.

    Raises:
        FileNotFoundError: no checkpoint in ``folder``.
        CheckpointError: a damaged or foreign file, or leftovers of the old two-file layout.
    """
    return _checkpoint(folder).state()


def _check_resumable(ckpt: CheckpointFile, st: dict[str, Any], t: dict[str, Tensor], n: int, T: int, bs: int) -> None:
    """Raise a :class:`~fastavatar_nb._io.CheckpointError` when the state and the tensors of a fit
    checkpoint disagree (they are written together, so this means a damaged or hand-made file)."""
    num_done, b0, step = st["num_done"], st["batch_start"], st["step"]
    if not (isinstance(num_done, int) and 0 <= num_done <= n and (num_done % bs == 0 or num_done == n)):
        raise ckpt.refuse(f"its state says {num_done!r} subjects are done, expected a multiple of the batch size {bs} "
                          f"up to {n}")
    for k in ("hist.loss", "hist.psnr"):
        if k not in t or tuple(t[k].shape) != (n, T):
            raise ckpt.refuse(f"tensor {k!r} should be [{n}, {T}] (subjects, iterations), found "
                              f"{list(t[k].shape) if k in t else 'none'}")
    rows = {k: (t[f"done.{k}"].shape[0] if t[f"done.{k}"].ndim else -1) if f"done.{k}" in t else None for k in _DONE}
    want = num_done if num_done else None
    bad = {k: r for k, r in rows.items() if r != want}
    if bad:
        raise ckpt.refuse(f"the state and the tensors disagree: the state says {num_done} subjects are done, but the "
                          f"finished fits hold {bad} rows (None: absent)")
    cur = [k for k in t if k.startswith(("cur.", "opt."))]
    if b0 is None:
        if step != 0 or cur:
            raise ckpt.refuse(f"the state and the tensors disagree: no batch in progress, but step {step!r} and "
                              f"{len(cur)} tensors of a batch in progress")
        return
    if b0 != num_done or not (isinstance(step, int) and 1 <= step < T):
        raise ckpt.refuse(f"its state says batch_start {b0!r}, step {step!r}; expected batch_start {num_done} (the "
                          f"next unfinished subject) and a step in 1..{T - 1}")
    need = [f"cur.{k}" for k in (*_PARAM_NAMES, "init_train_psnr")] + [f"opt.means.0.{k}" for k in OPTIMIZER_FIELDS]
    missing = [k for k in need if k not in t]
    if missing:
        raise ckpt.refuse(f"the state says step {step} of a batch in progress, but the tensors {missing} are absent")
    taken = int(t["opt.means.0.step"].reshape(-1)[0])
    if taken != step:
        raise ckpt.refuse(f"the state and the tensors disagree: the state says step {step} of the batch starting at "
                          f"subject {b0}, but the optimiser state holds {taken} steps")


def _split_params(g: Gaussians) -> dict[str, Tensor]:
    return {"means": g.means, "log_scales": g.log_scales, "quats": g.quats, "opacity_logits": g.opacity_logits,
            "sh0": g.sh[..., :1, :], "shN": g.sh[..., 1:, :]}


def _join_params(p: dict[str, Tensor]) -> Gaussians:
    return Gaussians(p["means"], p["log_scales"], p["quats"], p["opacity_logits"], torch.cat([p["sh0"], p["shN"]], -2))


def _make_optimizer(params: dict[str, Tensor], config: FitConfig) -> torch.optim.Adam:
    r = config.learning_rates()
    lrs = {"means": config.means_lr_at(0), "log_scales": r["scales_lr"], "quats": r["quats_lr"],
           "opacity_logits": r["opacities_lr"], "sh0": r["sh0_lr"], "shN": r["shN_lr"]}
    # eps as in gsplat: tiny, so steps are normalised even for faint gradients
    return torch.optim.Adam([{"params": [params[n]], "lr": lrs[n], "name": n} for n in _PARAM_NAMES], eps=1e-15)


@dataclass
class FitLoss:
    """One fit step's objective for ``S`` subjects (:func:`fit_loss`); each ``[S]`` is one per subject."""

    loss: Tensor
    """``[S]`` what the step minimises (summed over the subjects: each fit's gradient is its own)."""
    l1: Tensor
    """``[S]`` mean absolute error of the render."""
    ssim: Tensor
    """``[S]`` SSIM of the render (the value; the loss holds ``1 - SSIM``)."""
    position: Tensor
    """``[S]`` the position regulariser ``mean_k |mu_k - p_k|^2 / scene_scale^2`` (before its weight)."""
    colors: Tensor
    """``[S, 1, H, W, 3]`` the renders on white."""


def fit_loss(gaussians: Gaussians, cameras: Cameras, images: Tensor, anchors: Tensor, config: FitConfig, step: int,
             backend: Backend = "auto") -> FitLoss:
    """The loss of step ``step`` of :func:`fit_subjects`, the function its loop calls: each subject's
    Gaussians rendered at its one view on white with the SH bands of that step
    (:meth:`FitConfig.degree_at`), scored by ``(1 - lambda) L1 + lambda (1 - SSIM)``
    (:func:`~fastavatar_nb.objective.photometric_loss`, ``lambda = ssim_lambda``), plus
    ``position_reg_weight`` times the mean squared distance of each centre from its anchor point in
    ``scene_scale`` units.

    Args:
        gaussians: ``[S, K]``; cameras: ``[S, 1]``; images: ``[S, 1, H, W, 3]``; anchors: ``[S, K, 3]``.
    """
    out = render(gaussians, cameras, background=1.0, backend=backend, sh_degree=config.degree_at(step),
                 tile_size=config.tile_size)
    terms = photometric_loss(out.colors, images, None, 1.0 - config.ssim_lambda, config.ssim_lambda)
    position = ((gaussians.means - anchors) ** 2).sum(-1).mean(-1) / config.scene_scale ** 2
    return FitLoss(loss=terms["total"][:, 0] + config.position_reg_weight * position, l1=terms["l1"][:, 0],
                   ssim=terms["ssim"][:, 0], position=position, colors=out.colors)


def _resume_fit(ckpt: CheckpointFile | None, overwrite: bool, config: FitConfig, ids: list[str],
                shard: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(state, saved tensors)`` to start :func:`fit_subjects` from: a fresh state, or the checkpoint's when it is
    of the same run (checked: config, subjects, shard, sizes; another run raises) and ``overwrite`` is off
    (with it, the checkpoint is discarded)."""
    state: dict[str, Any] = {"num_done": 0, "batch_start": None, "step": 0, "seconds": 0.0}
    if ckpt is None or not ckpt.exists():
        return state, {}
    if overwrite:
        ckpt.discard()
        return state, {}
    st, saved = ckpt.load(state_keys=_STATE_KEYS, tensor_names=("hist.loss", "hist.psnr"))
    ckpt.require_same_run(st, {"config": json.loads(config.to_json()), "subject_ids": ids,
                               "subject_indices": shard.get("subject_indices")}, "fit")
    _check_resumable(ckpt, st, saved, len(ids), config.iterations, config.batch_size)
    state.update({k: st[k] for k in ("num_done", "batch_start", "step", "seconds")})
    return state, saved


def _save_fit(ckpt: CheckpointFile, config: FitConfig, ids: list[str], shard: dict[str, Any], state: dict[str, Any],
              seconds: float, backend_name: str, hist_loss: Tensor, hist_psnr: Tensor, done: dict[str, Tensor],
              cur: dict[str, Tensor] | None, opt: torch.optim.Adam | None) -> None:
    """Write :func:`fit_subjects`' resumable checkpoint: its state, the histories, the finished fits (``done.*``)
    and, mid-batch, the current batch's parameters (``cur.*``) with Adam's state."""
    tensors = {"hist.loss": hist_loss, "hist.psnr": hist_psnr, **{f"done.{k}": v for k, v in done.items()}}
    if cur is not None:
        tensors.update({f"cur.{k}": v for k, v in cur.items()})
        tensors.update(optimizer_tensors(opt))
    ckpt.save({"config": json.loads(config.to_json()), "subject_ids": ids, **shard, "num_done": state["num_done"],
               "batch_start": state["batch_start"], "step": state["step"], "seconds": seconds,
               "backend": backend_name,
               "view_schedule": "numpy default_rng(SeedSequence([seed, subject_index, epoch])).permutation",
               "optimizer": {"type": "Adam", "eps": 1e-15, "betas": [0.9, 0.999],
                             "lr": {g["name"]: g["lr"] for g in opt.param_groups} if opt else None}},
              tensors)


def _set_means_lr(opt: torch.optim.Adam, config: FitConfig, step: int) -> None:
    """The means' learning rate of ``step`` (:meth:`FitConfig.means_lr_at`); the other groups keep theirs."""
    for grp in opt.param_groups:
        if grp["name"] == "means":
            grp["lr"] = config.means_lr_at(step)


def _start_batch(batch: list[MultiViewSubject], images: Tensor, cams: Cameras, tv: list[int], config: FitConfig,
                 backend_name: str, dev: torch.device, saved: dict[str, Tensor], saved_step: int
                 ) -> tuple[dict[str, Tensor], torch.optim.Adam, int, Tensor]:
    """A batch's parameters (leaves), their Adam, the first step and the initial training PSNR ``[S]``: from
    ``saved`` (a checkpoint taken in this batch, at step ``saved_step``) when it holds them, else fresh
    (:func:`init_gaussians`)."""
    resuming = "cur.means" in saved
    if resuming:
        params = {k: saved[f"cur.{k}"].to(dev).clone() for k in _PARAM_NAMES}
    else:
        params = _split_params(Gaussians.stack([init_gaussians(s, config) for s in batch]).clone())
    step0 = int(saved_step) if resuming else 0
    for v in params.values():
        v.requires_grad_(True)
    opt = _make_optimizer(params, config)
    if resuming:
        load_optimizer_tensors(opt, saved)
        _set_means_lr(opt, config, step0)
    if resuming and "cur.init_train_psnr" in saved:
        init_psnr = saved["cur.init_train_psnr"].to(dev)
    elif not config.evaluate:
        init_psnr = torch.full((len(batch),), float("nan"), device=dev)
    else:
        init_psnr = evaluate_views(_join_params(params).detach(), images, cams, tv, backend=backend_name, sh_degree=0,
                                   tile_size=config.tile_size)["psnr"].mean(1)
    return params, opt, step0, init_psnr


def _score_batch(fitted: Gaussians, images: Tensor, masks: Tensor, cams: Cameras, tv: list[int], anchors: Tensor,
                 init_psnr: Tensor, config: FitConfig, backend_name: str) -> dict[str, Tensor]:
    """A finished batch's fits and scores, by the names of :data:`_DONE`: its training views, and the held-out
    view (whole image and head region); NaN where ``config.evaluate`` is off or there is no held-out view."""
    S, dev = images.shape[0], images.device
    if config.evaluate:
        tr = evaluate_views(fitted, images, cams, tv, backend=backend_name, sh_degree=config.sh_degree,
                            tile_size=config.tile_size)
    else:
        tr = {k: torch.full((S, 1), float("nan"), device=dev) for k in ("psnr", "ssim")}
    if config.holdout_view is not None and config.evaluate:
        ho = evaluate_views(fitted, images, cams, [config.holdout_view], head_region(masks, cams),
                            backend_name, config.sh_degree, tile_size=config.tile_size)
    else:
        ho = {k: torch.full((S, 1), float("nan"), device=dev) for k in ("psnr", "ssim", "psnr_head")}
    return {**{f"g.{k}": v for k, v in fitted.parameters().items()}, "anchors": anchors,
            "init_train_psnr": init_psnr, "train_psnr": tr["psnr"].mean(1), "train_ssim": tr["ssim"].mean(1),
            "heldout_psnr": ho["psnr"][:, 0], "heldout_ssim": ho["ssim"][:, 0],
            "heldout_psnr_head": ho["psnr_head"][:, 0]}


def _subject_order(n: int, subject_indices: Sequence[int] | None) -> list[int]:
    """Each subject's index in the view schedule: ``subject_indices`` (checked: ``n`` distinct, >= 0) or ``0..n-1``."""
    order = list(range(n)) if subject_indices is None else [int(i) for i in subject_indices]
    if len(order) != n or len(set(order)) != n or (order and min(order) < 0):
        raise ValueError(f"fit_subjects: subject_indices must be {n} distinct indices >= 0 (one per subject), "
                         f"got {list(subject_indices or [])!r}")
    return order


def _load_batch(subjects: Sequence[MultiViewSubject], want: list[str], idx: list[int],
                dev: torch.device) -> list[MultiViewSubject]:
    """The batch's subjects on ``dev``, checked to be the ones the run started with (a lazy dataset may change)."""
    batch = [subjects[i].to(dev) for i in idx]
    got = [s.subject_id for s in batch]
    if got != want:
        raise ValueError(f"fit_subjects: subjects changed while fitting (expected {want}, got {got})")
    return batch


def _fit_step(params: dict[str, Tensor], opt: torch.optim.Adam, images: Tensor, cams: Cameras, anchors: Tensor,
              order: list[int], tv: list[int], config: FitConfig, step: int, backend: str) -> tuple[FitLoss, Tensor]:
    """One step of :func:`fit_subjects` on a batch: each subject's view of this step (:func:`view_for_step` of its
    index ``order[s]``), :func:`fit_loss`, backward, Adam, then the means' learning rate of the next step.
    Returns the step's :class:`FitLoss` and the PSNR ``[S]`` of its renders."""
    ar = torch.arange(images.shape[0], device=images.device)
    pos = torch.tensor([tv[view_for_step(config.seed, k, step, len(tv))] for k in order], device=images.device)
    cam = Cameras(cams.viewmats[ar, pos][:, None], cams.Ks[ar, pos][:, None], cams.width, cams.height)
    gt = images[ar, pos][:, None]                                    # [S, 1, H, W, 3]
    step_loss = fit_loss(_join_params(params), cam, gt, anchors, config, step, backend)
    opt.zero_grad(set_to_none=True)
    step_loss.loss.sum().backward()
    opt.step()
    _set_means_lr(opt, config, step + 1)
    with torch.no_grad():
        return step_loss, psnr(step_loss.colors.detach().clamp(0, 1), gt)[:, 0]


class FitStepInfo(TypedDict):
    """What :func:`fit_subjects` gives its callback after every step (:class:`~fastavatar_nb.loop.StepLoop`);
    ``step`` and ``steps`` count the steps of the batch in progress."""

    step: int
    """Steps done in this batch."""
    steps: int
    """Steps of a batch (``config.iterations``)."""
    batch_start: int
    """The index of the batch's first subject."""
    subject_ids: list[str]
    """The batch's subjects."""
    loss: Tensor
    """``[S]`` each subject's loss (:func:`fit_loss`)."""
    l1: Tensor
    """``[S]`` the L1 term."""
    ssim: Tensor
    """``[S]`` the SSIM of the render."""
    psnr: Tensor
    """``[S]`` the PSNR of the render."""
    sh_degree: int
    """The SH degree rendered at this step."""


def fit_subjects(subjects: Sequence[MultiViewSubject], config: FitConfig | None = None, backend: Backend = "auto",
                 device: torch.device | str | None = None, checkpoint: str | os.PathLike | None = None,
                 overwrite: bool = False, progress: bool = True,
                 callback: Callable[[FitStepInfo], None] | None = None,
                 subject_indices: Sequence[int] | None = None) -> FitResult:
    """Fit K corresponded Gaussians to each subject (fixed K, no densification or pruning).

    Args:
        subjects: S subjects (a list or a lazy dataset such as ``SubjectDataset``; read one
            batch at a time). Subjects in one batch need equal views, image size and K.
        config: settings (default :class:`FitConfig`).
        backend: renderer backend (``"auto"``, ``"torch"``, ``"gsplat"``).
        device: where to optimise (default: the first subject's device).
        checkpoint: folder for a resumable checkpoint, or ``None``. When it already holds a
            checkpoint of the same config and subjects the run resumes from it (a finished one
            returns at once); a different checkpoint raises unless ``overwrite``.
        overwrite: discard an existing, different checkpoint in ``checkpoint`` and start afresh.
        progress: show a tqdm progress bar.
        callback: called after every step with a :class:`FitStepInfo`: ``step`` and ``steps`` of the batch in
            progress, ``batch_start``, ``subject_ids``, the ``[S_batch]`` ``loss``, ``l1``, ``ssim`` and ``psnr``
            of the rendered views, and ``sh_degree``.
        subject_indices: each subject's index in a larger list it was taken from, used by the view
            schedule (:func:`view_for_step`) instead of its position (default ``0 .. S-1``): a part of
            that list made of whole batches is then fitted exactly as in the whole list (the shards of
            :mod:`fastavatar_nb.distributed`). Stored in the checkpoint and checked on resume.

    Returns:
        A :class:`FitResult`.
    """
    config = (config or FitConfig()).validate()
    ids = subject_ids(subjects, "fit_subjects")
    n, T, bs = len(ids), config.iterations, config.batch_size
    if n == 0:
        raise ValueError("fit_subjects: no subjects given")
    sched = _subject_order(n, subject_indices)
    shard = {} if sched == list(range(n)) else {"subject_indices": sched}  # in checkpoints of a shard only
    dev = torch.device(device) if device is not None else subjects[0].device
    backend_name = resolve_backend(backend, dev)
    ckpt = _checkpoint(checkpoint) if checkpoint is not None else None
    state, saved = _resume_fit(ckpt, overwrite, config, ids, shard)
    hist_loss = saved.get("hist.loss", torch.full((n, T), float("nan")))
    hist_psnr = saved.get("hist.psnr", torch.full((n, T), float("nan")))
    done: dict[str, Tensor] = {k[5:]: v for k, v in saved.items() if k.startswith("done.")}
    taken = state["num_done"] // bs * T + (state["step"] if state["batch_start"] is not None else 0)
    with StepLoop(math.ceil(n / bs) * T, desc="fitting subjects", done=taken, seconds=float(state["seconds"]),
                  progress=progress, callback=callback) as loop:
        for b0 in range(state["num_done"], n, bs):
            idx = list(range(b0, min(n, b0 + bs)))
            batch = _load_batch(subjects, [ids[i] for i in idx], idx, dev)
            images, masks, cams, anchors = stack_subjects(batch)
            tv = train_views(images.shape[1], config.holdout_view)
            params, opt, step0, init_psnr = _start_batch(batch, images, cams, tv, config, backend_name, dev,
                                                         saved if state["batch_start"] == b0 else {}, state["step"])
            state["batch_start"] = b0
            for step in loop.steps(step0, T):
                step_loss, p = _fit_step(params, opt, images, cams, anchors, [sched[i] for i in idx], tv, config, step,
                                         backend_name)
                hist_loss[idx, step], hist_psnr[idx, step] = step_loss.loss.detach().cpu(), p.cpu()
                state["step"] = step + 1
                if ckpt is not None and step + 1 < T and loop.due(step + 1, config.checkpoint_every, T):
                    cur = {**{k: v.detach() for k, v in params.items()}, "init_train_psnr": init_psnr}
                    _save_fit(ckpt, config, ids, shard, state, loop.seconds, backend_name, hist_loss, hist_psnr,
                              done, cur, opt)
                loop.record(FitStepInfo(step=step + 1, steps=T, batch_start=b0, subject_ids=[ids[i] for i in idx],
                                        loss=step_loss.loss.detach(), l1=step_loss.l1.detach(),
                                        ssim=step_loss.ssim.detach(), psnr=p, sh_degree=config.degree_at(step)),
                            loss=float(step_loss.loss.detach().mean()), psnr=float(p.mean()))
            new = _score_batch(_join_params({k: v.detach() for k, v in params.items()}), images, masks, cams, tv,
                               anchors, init_psnr, config, backend_name)
            done.update({k: torch.cat([done[k], v.detach().cpu()]) if k in done else v.detach().cpu()
                         for k, v in new.items()})
            state.update(num_done=b0 + len(idx), batch_start=None, step=0)
            saved = {}
            if ckpt is not None:
                _save_fit(ckpt, config, ids, shard, state, loop.seconds, backend_name, hist_loss, hist_psnr, done,
                          None, None)
    g = Gaussians(**{k: done[f"g.{k}"].to(dev) for k in ("means", "log_scales", "quats", "opacity_logits", "sh")})
    return FitResult(subject_ids=ids, gaussians=g, anchors=done["anchors"].to(dev),
                     **{m: done[m].to(dev) for m in _METRICS}, loss_history=hist_loss, psnr_history=hist_psnr,
                     config=config, backend=backend_name, seconds=loop.seconds)
