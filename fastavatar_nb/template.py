"""The template 3DGS head T (paper section 3.2): the per-Gaussian average of S subject fits.

Because every fit starts from corresponded points (point k is the same place on every head)
and fitting never adds, removes or reorders Gaussians, Gaussian k of every fit describes the
same part of the face, and the template is simply the statistical average of each parameter
of each Gaussian.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ._io import (
    ArtifactError,
    StageConfig,
    atomic_save_tensors,
    check_fields,
    checked_metadata,
    read_artifact,
)
from .gaussians import NUM_SH, Gaussians, knn_spacing, rgb_to_sh0

__all__ = ["TemplateConfig", "average_quaternions", "build_template", "random_template", "save_template", "load_template",
           "template_metadata"]

TEMPLATE_PLY = "template.ply"
TEMPLATE_SAFETENSORS = "template.safetensors"
_TEMPLATE_FORMAT = "fastavatar-nb template"
_MISSING_HINT = "build one with build_template and save_template (notebook 02)"


@dataclass(frozen=True)
class TemplateConfig(StageConfig):
    """Settings of the template's construction (paper section 3.2; notebook 02); the fits themselves are
    :class:`~fastavatar_nb.fitting.FitConfig`'s."""

    subjects: int | None = None
    """Training subjects fitted and averaged into the template (the first ones of the training split);
    ``None``: all of them, as the paper does. The average of a few dozen heads is already the average
    head, and per-subject fits are the slowest stage on a CPU."""

    def validate(self) -> TemplateConfig:
        """Raise ``ValueError`` naming a bad field; returns ``self``."""
        check_fields(self, positive_int=("subjects",), optional=("subjects",))
        return self


def average_quaternions(quats: Tensor, dim: int = 0, weights: Tensor | None = None) -> Tensor:
    """Average rotations given as quaternions with the eigenvector method (Markley et al. 2007).

    The average is the unit quaternion ``q`` maximising ``sum_i w_i (q . q_i)^2``: the
    eigenvector of largest eigenvalue of ``M = sum_i w_i q_i q_i^T`` (a 4x4 matrix per
    average). Because ``q_i`` enters only through ``q_i q_i^T``, the result does not depend on
    the sign of any input (``q`` and ``-q`` are the same rotation), needs no reference
    hemisphere, and equals the normalised arithmetic mean when the inputs are close and
    sign-aligned. The sign of the output is chosen so that it lies in the hemisphere of the
    (weighted) majority of the inputs, i.e. ``sum_i w_i (q . q_i) >= 0``.

    Args:
        quats: ``[..., 4]`` quaternions (wxyz, any non-zero norm: normalised first so every
            input counts equally).
        dim: the dimension to average over (must not be the last one).
        weights: optional non-negative weights, broadcastable to ``quats.shape[:-1]``.

    Returns:
        Unit quaternions with ``dim`` removed.
    """
    if quats.shape[-1] != 4:
        raise ValueError(f"average_quaternions: quats must be [..., 4], got {tuple(quats.shape)}")
    nd = quats.ndim
    if not -nd <= dim < nd or dim % nd == nd - 1:
        raise ValueError(f"average_quaternions: dim={dim} is not a batch dimension of {tuple(quats.shape)}")
    dim = dim % nd
    norm = quats.norm(dim=-1, keepdim=True)
    if (norm < 1e-12).any():
        raise ValueError("average_quaternions: some quaternions have zero norm")
    q = quats / norm
    w = torch.ones(q.shape[:-1], dtype=q.dtype, device=q.device) if weights is None else \
        torch.as_tensor(weights, dtype=q.dtype, device=q.device).expand(q.shape[:-1])
    if (w < 0).any():
        raise ValueError("average_quaternions: weights must be non-negative")
    M = torch.einsum("...i,...j->...ij", q * w[..., None], q).sum(dim)           # [..., 4, 4]
    # eigh in float64: the top eigenvalue is well separated for any sensible spread
    _, vecs = torch.linalg.eigh(M.double())
    avg = vecs[..., :, -1].to(q.dtype)                                              # [..., 4]
    agree = ((q * avg.unsqueeze(dim)).sum(-1) * w).sum(dim)                         # [...]
    avg = torch.where(agree[..., None] < 0, -avg, avg)
    return avg / avg.norm(dim=-1, keepdim=True)


def build_template(fits: Gaussians) -> Gaussians:
    """Average S corresponded fits into the template ``T`` (paper section 3.2).

    Each parameter of Gaussian k is averaged over the subjects in the space it is stored and
    optimised in:

    - ``means``: arithmetic mean of the centres (metres);
    - ``log_scales``: arithmetic mean of log-scales, i.e. the geometric mean of the scales
      (scales are positive and multiplicative; this is also the space the decoder's residuals
      act in, paper Eq. 3);
    - ``opacity_logits``: arithmetic mean of the logits (the decoder adds residuals in logit
      space, Eq. 5);
    - ``sh``: arithmetic mean of the SH coefficients (colour is linear in them, so the DC
      term gives the mean colour);
    - ``quats``: eigenvector (Markley) average of the unit quaternions, see
      :func:`average_quaternions`. Chosen over sign alignment to a reference quaternion
      because it is exactly sign-invariant and does not depend on which subject is picked as
      the reference when rotations are spread (Gaussians that are nearly isotropic can end up
      with very different quaternions on different subjects).

    Args:
        fits: Gaussians ``[S, K, ...]`` (one leading subject dimension), S >= 1.

    Returns:
        Unbatched template Gaussians ``[K, ...]`` (detached; unit quaternions).
    """
    if not isinstance(fits, Gaussians):
        raise TypeError(f"build_template: fits must be Gaussians, got {type(fits).__name__}")
    if len(fits.batch_shape) != 1:
        raise ValueError(f"build_template: fits must be [S, K, ...] (one subject dimension), "
                         f"got batch_shape {tuple(fits.batch_shape)}")
    f = fits.detach()
    f.validate()
    return Gaussians(
        means=f.means.mean(0),
        log_scales=f.log_scales.mean(0),
        quats=average_quaternions(f.quats, dim=0),
        opacity_logits=f.opacity_logits.mean(0),
        sh=f.sh.mean(0),
    )


RANDOM_LOG_SCALE_SPREAD = 1.0
""":func:`random_template`: log-scales are drawn uniformly within this many nats of the points' log-spacing."""


def random_template(points: Tensor, seed: int = 0) -> Gaussians:
    """A template with random parameters at given centres: Table 2's "Random Init" ablation.

    Nothing is fitted: only the centres carry information (the Gaussians must sit where the subjects'
    corresponded points are, or Gaussian ``k`` would not be the same part of every head, which the
    decoder's residuals and the embeddings ``e_k`` rely on). Every other parameter is drawn at random:

    - ``log_scales``: ``log(spacing_k) + U(-1, 1) * RANDOM_LOG_SCALE_SPREAD`` per axis, where ``spacing_k``
      is point ``k``'s mean distance to its 3 nearest neighbours (random sizes around the points' spacing);
    - ``quats``: uniformly random rotations (normalised 4D standard normals);
    - ``opacity_logits``: standard normal (opacities spread around 0.5);
    - ``sh``: a uniformly random colour in the DC band, higher bands zero.

    Args:
        points: ``[K, 3]`` centres, e.g. the mean of the training subjects' corresponded points
            (``torch.stack([s.points for s in train]).mean(0)``).
        seed: seed of the draws (same seed, same template).

    Returns:
        Unbatched Gaussians ``[K, ...]`` on ``points``' device and dtype.
    """
    if not isinstance(points, Tensor) or points.ndim != 2 or points.shape[-1] != 3 or not points.is_floating_point():
        raise ValueError(f"random_template: points must be a float tensor [K, 3], got "
                         f"{tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__}")
    if len(points) < 4 or not torch.isfinite(points).all():
        raise ValueError(f"random_template: points must be at least 4 finite points, got K = {len(points)} with "
                         f"{int((~torch.isfinite(points)).any(-1).sum())} non-finite")
    k, dt = len(points), points.dtype
    gen = torch.Generator().manual_seed(int(seed))

    def draw(*shape: int, uniform: bool = False) -> Tensor:
        t = torch.rand(shape, generator=gen) if uniform else torch.randn(shape, generator=gen)
        return t.to(device=points.device, dtype=dt)

    log_spacing = knn_spacing(points, k=3).clamp_min(1e-6).log()
    quats = draw(k, 4)
    sh = torch.zeros(k, NUM_SH, 3, dtype=dt, device=points.device)
    sh[:, 0] = rgb_to_sh0(draw(k, 3, uniform=True))
    return Gaussians(means=points.detach().clone(),
                     log_scales=log_spacing[:, None] + (2 * draw(k, 3, uniform=True) - 1) * RANDOM_LOG_SCALE_SPREAD,
                     quats=quats / quats.norm(dim=-1, keepdim=True), opacity_logits=draw(k), sh=sh).validate()


def save_template(template: Gaussians, directory: str | os.PathLike, overwrite: bool = False,
                  metadata: dict[str, str] | None = None) -> tuple[Path, Path]:
    """Write the template as ``template.ply`` (3DGS layout, opens in any splat viewer) and
    ``template.safetensors`` (exact tensors, what :func:`load_template` reads).

    Args:
        template: unbatched Gaussians ``[K, ...]``.
        directory: output folder (created if missing).
        overwrite: replace existing template files; without it an existing file raises
            ``FileExistsError``.
        metadata: optional string key/values stored in the safetensors header
            (e.g. the subject ids the template was built from).

    Returns:
        ``(ply_path, safetensors_path)``.
    """
    if template.batch_shape:
        raise ValueError(f"save_template: template must be unbatched [K, ...], got batch_shape "
                         f"{tuple(template.batch_shape)}")
    d = Path(directory)
    ply, st = d / TEMPLATE_PLY, d / TEMPLATE_SAFETENSORS
    for p in (ply, st):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass overwrite=True to replace it")
    d.mkdir(parents=True, exist_ok=True)
    t = template.detach().to("cpu", torch.float32).validate()
    t.save_ply(ply)
    meta = {"format": _TEMPLATE_FORMAT, "num_gaussians": str(t.num_gaussians)}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"save_template: metadata keys and values must be strings (bad keys: {bad})")
        meta.update(metadata)
    atomic_save_tensors(t.parameters(), st, meta)
    return ply, st


def load_template(directory: str | os.PathLike, device: torch.device | str = "cpu") -> Gaussians:
    """Read ``template.safetensors`` written by :func:`save_template` from ``directory``.

    (``template.ply`` holds the same numbers in float32 and can be read with
    ``Gaussians.load_ply``.)
    """
    st = Path(directory) / TEMPLATE_SAFETENSORS
    names = ("means", "log_scales", "quats", "opacity_logits", "sh")
    _, tensors = read_artifact(st, _TEMPLATE_FORMAT, _MISSING_HINT, device=device, tensor_names=names)
    try:
        return Gaussians(**{k: tensors[k] for k in names}).validate()
    except ValueError as e:
        raise ArtifactError(f"{st}: its tensors are not a valid template ({e}); the file is damaged or was not written "
                            f"by save_template; {_MISSING_HINT}") from e


def template_metadata(directory: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in ``template.safetensors`` (see :func:`save_template`)."""
    return checked_metadata(Path(directory) / TEMPLATE_SAFETENSORS, _TEMPLATE_FORMAT, _MISSING_HINT)

