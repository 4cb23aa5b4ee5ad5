"""The auto-decoder: latent code ``w`` + Gaussian embedding ``e_k`` -> residuals to the template
(paper section 3.3.1, Eq. 2-8).

A shallow MLP ``h(w, e_k)`` predicts, for every Gaussian ``k`` of the template ``T``, the
residuals ``dG_k = (d_mu, d_s, d_q, d_alpha, d_c)``, applied as (:func:`apply_residuals`)::

    mu_k = mu_k^T + d_mu                    (2)   metres
    s_k  = s_k^T * exp(d_s)                 (3)   i.e. log_scales add
    q_k  = norm(q_k^T + d_q)                (4)   wxyz
    a_k  = sigmoid(logit(a_k^T) + d_alpha)  (5)   i.e. opacity logits add
    c_k  = c_k^T + d_c                      (6)   all 16 SH coefficients of each colour channel

There is no encoder yet: every training subject ``i`` owns a free latent code ``w_i`` (drawn
from N(0, 1)), and the MLP, the codes and the embeddings ``e_k`` (initialised with a sinusoidal
encoding of the template centres, :func:`positional_embedding`) are optimised together on the
subjects' images (:func:`train_decoder`) with ``0.6 L1 + 0.3 (1 - SSIM) [+ 0.1 LPIPS]`` plus L2
penalties on the position and scale residuals (Eq. 7-8). Notebook 04 later trains an image
encoder to predict these codes.

Shapes: codes ``w`` are ``[..., latent_dim]`` and decode to Gaussians ``[..., K, ...]``; the
embeddings are ``[K, embed_dim]``, shared by every subject.

Departures from the authors' code (see ``docs`` in the shared notes), each deliberate:

- initialisation: the last Linear of each output head is zero (so training starts exactly at the
  template) and the other layers use PyTorch's default initialisation. The authors scale every
  layer by a Xavier gain of 0.02, which also starts near the template but shrinks the hidden
  activations by orders of magnitude per layer;
- the position head's output is in centimetres (``AutoDecoder.means_scale = 0.01`` metres per
  unit), so one learning rate suits every head;
- residuals apply to the template centres (Eq. 2), not to per-subject tracked points;
- the first Linear layer is evaluated as ``W_w w + W_e e_k + b`` (the same numbers as on the
  concatenation ``[w, e_k]``), so its ``w`` part is computed once per subject instead of K times;
- the MLP may compute in bfloat16 (:attr:`DecoderConfig.mlp_dtype`; weights, codes, embeddings and
  residuals stay float32, as in mixed-precision training): the presets ask for it where the CPU
  multiplies bfloat16 natively (AVX512-BF16 or AMX), which halves the decoder's share of a training
  step (``benchmarks/decoder.py``). The authors train in float32, and so does the default config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._io import (
    ArtifactError,
    CheckpointFile,
    StageConfig,
    atomic_save_tensors,
    check_fields,
    meta_json,
    read_artifact,
)
from .cameras import Cameras
from .comm import Comm, make_comm
from .data.subject import MultiViewSubject
from .gaussians import Gaussians
from .loop import StepLoop, load_optimizer_tensors, optimizer_tensors
from .metrics import lpips_available, psnr
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
    "AutoDecoder", "DecoderConfig", "DecoderResult", "Residuals", "apply_residuals", "positional_embedding",
    "train_decoder", "DecoderStepInfo", "residual_penalty", "step_items", "DECODER_FILE", "LATENTS_FILE", "CHECKPOINT_FILE",
    "checkpoint_state", "MLP_DTYPES", "MLP_DTYPE_CHOICES", "resolve_mlp_dtype", "StepLoss", "decoder_loss",
]

DECODER_FILE = "decoder.safetensors"
"""Decoder weights, Gaussian embeddings, template and config, in a run folder."""
LATENTS_FILE = "latents.safetensors"
"""The training subjects' latent codes ``w`` and their metrics, in a run folder."""
_DECODER_FORMAT = "fastavatar-nb decoder v2"
_LATENTS_FORMAT = "fastavatar-nb latents v2"
CHECKPOINT_FILE = "decoder_checkpoint.safetensors"
"""The resumable checkpoint of :func:`train_decoder`, one file in its ``checkpoint`` folder: weights,
codes, embeddings, Adam state and histories, with config and progress as JSON in its metadata."""
_CKPT_FORMAT = "fastavatar-nb decoder checkpoint v4"  # v4: Adam's state as loop.optimizer_tensors names it
_LEGACY_CHECKPOINT = ("decoder_state.json", "decoder_state.safetensors")  # the two-file layout (v2), refused
_CKPT_STATE_KEYS = ("config", "subject_ids", "step", "steps", "seconds")
HEADS: dict[str, int] = {"means": 3, "log_scales": 3, "quats": 4, "opacity_logits": 1, "sh": 48}
"""Output heads of the decoder and their sizes (59 numbers per Gaussian, as in the paper)."""
_METRICS = StageScores.score_names()
MLP_DTYPES = ("float32", "bfloat16")
"""Dtypes the decoder's MLP computes in."""
MLP_DTYPE_CHOICES = ("auto", *MLP_DTYPES)
"""What :attr:`DecoderConfig.mlp_dtype` and the presets' ``mlp_dtype`` accept (``"auto"``: :func:`resolve_mlp_dtype`)."""


def _native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products are native here: a CPU with AVX512-BF16 or AMX-BF16."""
    if device.type != "cpu":
        return False  # CUDA: the MLP is a small share of a step there; kept in float32 (not yet run)
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # an older torch or a platform without the probe: float32
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_mlp_dtype(mlp_dtype: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bfloat16"`` on a CPU that multiplies it natively, else ``"float32"``; other
    values of :data:`MLP_DTYPES` pass through."""
    if mlp_dtype == "auto":
        return "bfloat16" if _native_bf16(torch.device(device)) else "float32"
    if mlp_dtype not in MLP_DTYPES:
        raise ValueError(f"mlp_dtype must be 'auto' or one of {MLP_DTYPES}, got {mlp_dtype!r}")
    return mlp_dtype


# ------------------------------------------------------------------------------ residuals
@dataclass
class Residuals:
    """Per-Gaussian offsets to the template (Eq. 2-6), batched like the codes that made them.

    Attributes:
        means: ``[..., K, 3]`` metres, added to the centres.
        log_scales: ``[..., K, 3]`` added to the log-scales (scales multiply by ``exp``).
        quats: ``[..., K, 4]`` added to the template quaternion before normalising.
        opacity_logits: ``[..., K]`` added to the opacity logits.
        sh: ``[..., K, 16, 3]`` added to the SH coefficients.
    """

    means: Tensor
    log_scales: Tensor
    quats: Tensor
    opacity_logits: Tensor
    sh: Tensor

    def magnitudes(self) -> dict[str, Tensor]:
        """Mean absolute value of each kind of residual, ``[...]`` per decoded head (for plots)."""
        return {f.name: getattr(self, f.name).abs().flatten(len(self.means.shape) - 2).mean(-1)
                for f in dataclasses.fields(self)}


def apply_residuals(template: Gaussians, residuals: Residuals) -> Gaussians:
    """The subject-specific Gaussians of Eq. 2-6: template ``[K, ...]`` + residuals ``[..., K, ...]``.

    Returns Gaussians with the residuals' batch shape. Quaternions are normalised (Eq. 4), so a
    residual of ``-q^T`` is the only one that cannot give a valid rotation (it is nudged by 1e-12).
    """
    if template.batch_shape:
        raise ValueError(f"apply_residuals: the template must be unbatched [K, ...], got batch shape "
                         f"{tuple(template.batch_shape)}")
    if residuals.means.shape[-2] != template.num_gaussians:
        raise ValueError(f"apply_residuals: residuals for K={residuals.means.shape[-2]} Gaussians, template has "
                         f"K={template.num_gaussians}")
    q = template.quats + residuals.quats
    return Gaussians(
        means=template.means + residuals.means,
        log_scales=template.log_scales + residuals.log_scales,
        quats=q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12),
        opacity_logits=template.opacity_logits + residuals.opacity_logits,
        sh=template.sh + residuals.sh,
    )


def positional_embedding(points: Tensor, dim: int) -> Tensor:
    """Sinusoidal encoding of points, the initial Gaussian embeddings ``e_k`` (paper 3.3.1).

    The points are normalised to ``[-1, 1]`` by their bounding box (centre and largest
    half-extent, so the aspect ratio is kept); the embedding is the normalised coordinates
    followed by ``sin(2^f pi x), cos(2^f pi x)`` of each coordinate for ``f = 0 .. F-1`` with
    ``F = (dim - 3) // 6``, and zeros in the ``(dim - 3) % 6`` last entries (free to learn).

    Args:
        points: ``[K, 3]`` template centres.
        dim: embedding size, at least 3.

    Returns:
        ``[K, dim]``.
    """
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"positional_embedding: points must be [K, 3], got {tuple(points.shape)}")
    if dim < 3:
        raise ValueError(f"positional_embedding: dim must be >= 3, got {dim}")
    lo, hi = points.amin(0), points.amax(0)
    x = (points - (lo + hi) / 2) / ((hi - lo).amax() / 2).clamp_min(1e-12)
    nfreq = (dim - 3) // 6
    freqs = math.pi * 2.0 ** torch.arange(nfreq, dtype=points.dtype, device=points.device)
    ang = (x[:, None, :] * freqs[:, None]).reshape(len(points), -1)  # [K, 3F]
    out = torch.cat([x, torch.sin(ang), torch.cos(ang)], dim=-1)
    return F.pad(out, (0, dim - out.shape[-1]))


def check_codes(w: Any, latent_dim: int, where: str, dtype: torch.dtype | None = None,
                device: torch.device | None = None) -> None:
    """Raise ``ValueError`` naming ``w`` unless it is a tensor of codes ``[..., latent_dim]`` of
    ``dtype`` on ``device`` with finite values (a NaN or infinite code decodes to NaN Gaussians)."""
    if not isinstance(w, Tensor):
        raise ValueError(f"{where}: w must be a tensor of codes [..., {latent_dim}], got {type(w).__name__}; "
                         "convert it with torch.as_tensor(w, dtype=torch.float32)")
    if w.ndim == 0 or w.shape[-1] != latent_dim:
        raise ValueError(f"{where}: w must be codes of shape [..., {latent_dim}] (latent_dim {latent_dim}), got shape "
                         f"{list(w.shape)}; one code is a [{latent_dim}] vector, N codes are [N, {latent_dim}]")
    if dtype is not None and w.dtype != dtype:
        raise ValueError(f"{where}: w must be {dtype} (the decoder's weights), got {w.dtype}; convert it with "
                         f"w.to({dtype})")
    if device is not None and w.device != device:
        raise ValueError(f"{where}: w is on {w.device}, the decoder on {device}; move it with w.to({str(device)!r})")
    bad = ~torch.isfinite(w)
    if bad.any():
        rows = bad.reshape(-1, latent_dim).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"{where}: w must be finite, got {int(bad.sum())} NaN or infinite values of "
                         f"{w.numel()} (in codes {rows[:8]}{' ...' if len(rows) > 8 else ''} of "
                         f"{list(w.shape[:-1]) or 'one'}), which would decode to NaN Gaussians; check where the codes "
                         "come from (a diverged training, refinement or edit, or an encoder fed a missing face) and "
                         "pass finite codes")


# -------------------------------------------------------------------------------- the MLP
class AutoDecoder(nn.Module):
    """``h(w, e_k)``: shared MLP body and one small head per kind of residual.

    Body: ``depth`` Linear layers of width ``hidden_dim`` with ReLU on ``[w, e_k]``; heads:
    Linear ``hidden_dim -> hidden_dim``, ReLU, Linear to 3 (means), 3 (log-scales), 4 (quats),
    1 (opacity logit), 48 (SH). With the defaults (``latent_dim=512, embed_dim=32``) it has
    812,603 parameters, the authors' ~0.8 M.

    Args:
        latent_dim: size of a code ``w``; embed_dim: size of an embedding ``e_k``.
        hidden_dim, depth: width and number of Linear layers of the body.
        means_scale: metres per unit of the position head's output (0.01: centimetres).
        compute_dtype: ``"float32"`` or ``"bfloat16"``: what the Linear layers multiply in on float32
            inputs (autocast; parameters and residuals stay float32, float64 inputs stay float64).
    """

    def __init__(self, latent_dim: int = 512, embed_dim: int = 32, hidden_dim: int = 256, depth: int = 6,
                 means_scale: float = 0.01, compute_dtype: str = "float32") -> None:
        super().__init__()
        for name, v in (("latent_dim", latent_dim), ("embed_dim", embed_dim), ("hidden_dim", hidden_dim),
                        ("depth", depth)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"AutoDecoder: {name} must be a positive int, got {v!r}")
        self.latent_dim, self.embed_dim, self.hidden_dim, self.depth = latent_dim, embed_dim, hidden_dim, depth
        self.means_scale = float(means_scale)
        if compute_dtype not in MLP_DTYPES:
            raise ValueError(f"AutoDecoder: compute_dtype must be one of {MLP_DTYPES}, got {compute_dtype!r}")
        self.compute_dtype = compute_dtype
        self.body = nn.ModuleList([nn.Linear(latent_dim + embed_dim, hidden_dim)]
                                  + [nn.Linear(hidden_dim, hidden_dim) for _ in range(depth - 1)])
        self.heads = nn.ModuleDict({name: nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                                        nn.Linear(hidden_dim, size))
                                    for name, size in HEADS.items()})
        for head in self.heads.values():  # residuals start at exactly zero: the template
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    def architecture(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready): ``AutoDecoder(**d.architecture())`` rebuilds it."""
        return {"latent_dim": self.latent_dim, "embed_dim": self.embed_dim, "hidden_dim": self.hidden_dim,
                "depth": self.depth, "means_scale": self.means_scale, "compute_dtype": self.compute_dtype}

    def forward(self, w: Tensor, embeddings: Tensor) -> Residuals:
        """Residuals of every Gaussian for every code.

        Args:
            w: ``[..., latent_dim]`` codes; embeddings: ``[K, embed_dim]``.

        Returns:
            :class:`Residuals` with batch shape ``[...]`` (``w.shape[:-1]``) and K Gaussians.
        """
        check_codes(w, self.latent_dim, "AutoDecoder", dtype=self.body[0].weight.dtype,
                    device=self.body[0].weight.device)
        if embeddings.ndim != 2 or embeddings.shape[-1] != self.embed_dim:
            raise ValueError(f"AutoDecoder: embeddings must be [K, {self.embed_dim}], got {tuple(embeddings.shape)}")
        low = self.compute_dtype == "bfloat16" and w.dtype == torch.float32
        with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=low):
            out = self._mlp(w, embeddings)
        if low:
            out = {name: v.float() for name, v in out.items()}
        return Residuals(means=out["means"] * self.means_scale, log_scales=out["log_scales"], quats=out["quats"],
                         opacity_logits=out["opacity_logits"][..., 0],
                         sh=out["sh"].unflatten(-1, (16, 3)))

    def _mlp(self, w: Tensor, embeddings: Tensor) -> dict[str, Tensor]:
        first = self.body[0]
        # first layer on [w, e_k] = W_w w + W_e e_k + b: the w part once per code, not once per Gaussian
        h = (F.linear(w, first.weight[:, :self.latent_dim])[..., None, :]
             + F.linear(embeddings, first.weight[:, self.latent_dim:], first.bias))
        h = F.relu(h)
        for layer in self.body[1:]:
            h = F.relu(layer(h))
        return {name: head(h) for name, head in self.heads.items()}


# -------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DecoderConfig(StageConfig):
    """Settings of :func:`train_decoder`. Defaults: the paper's losses at a CPU-sized schedule."""

    epochs: int = 20
    """Passes over every (training subject, training view) pair."""
    subjects_per_step: int = 1
    """Subjects decoded per optimiser step."""
    views_per_step: int = 2
    """Training views rendered per decoded subject and step (the decode costs more than a render
    on a CPU, so two views share it; the authors' code renders one). At a fixed time budget the number
    of steps matters most: see ``benchmarks/results/cpu-2core/decoder_sweep_smoke.json``."""
    latent_dim: int = 512
    """Size of the codes ``w``."""
    codes_init_std: float = 1.0
    """Standard deviation of the codes' initialisation (the paper: standard normal, 1.0). Small
    codes (DeepSDF's 0.01) start every subject at the same point, so subjects that look alike
    move their codes the same way: a code space an encoder can generalise in."""
    embed_dim: int = 32
    """Size of the Gaussian embeddings ``e_k``."""
    hidden_dim: int = 256
    """Width of the MLP."""
    depth: int = 6
    """Linear layers in the MLP body."""
    decoder_lr: float = 1e-3
    """Adam learning rate of the MLP (decays exponentially to ``lr_final`` times it)."""
    codes_lr: float = 1e-2
    """Learning rate of the codes ``w``."""
    embeddings_lr: float = 3e-2
    """Learning rate of the embeddings ``e_k`` (higher than the MLP's: each ``e_k`` is seen by one
    Gaussian only)."""
    template_lr: float = 0.0
    """Adam learning rate of the template's own parameters, optimised jointly with the MLP, the codes
    and the embeddings (the centres' rate is this times ``scene_scale``, in metres per step; it decays
    like the others). 0: the template stays as given, the paper's method. Above 0: Table 2's
    "Joint-Opt." ablation (``benchmarks/ablations.py``); the learnt template is the result's ``template``."""
    lr_final: float = 0.1
    """Factor every learning rate decays to by the last step."""
    l1_weight: float = 0.6
    """Weight of L1 (paper Eq. 7: lambda_2)."""
    ssim_weight: float = 0.3
    """Weight of 1 - SSIM (lambda_3)."""
    lpips_weight: float = 0.0
    """Weight of LPIPS (lambda_1; the authors' code's 0.1, the paper gives no value). Needs LPIPS weights on disk
    (:func:`fastavatar_nb.metrics.lpips_available`); raises otherwise."""
    means_reg_weight: float = 0.01
    """lambda_4: weight of ``mean_k |d_mu_k|^2 / scene_scale^2``."""
    scales_reg_weight: float = 0.001
    """lambda_5: weight of ``mean_k |d_s_k|^2``."""
    scene_scale: float = 0.1
    """Metres in which the position penalty is measured (about a head's radius)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm of every step at this value (0: no clipping)."""
    holdout_view: int | None = HOLDOUT_VIEW
    """View never trained on, evaluated (:data:`~fastavatar_nb.objective.HOLDOUT_VIEW`)."""
    sh_degree: int = 3
    """SH degree rendered."""
    checkpoint_every: int = 50
    """Steps between checkpoints (when a folder is given)."""
    tile_size: int | None = None
    """Rasterizer tile size (``None``: the backend's choice)."""
    seed: int = 0
    """Seed of the codes' initialisation and of the (subject, views) schedule."""
    mlp_dtype: str = "float32"
    """What the MLP multiplies in: ``"float32"`` (the authors'), ``"bfloat16"`` (mixed precision:
    parameters, codes and residuals stay float32) or ``"auto"`` (bfloat16 where the CPU multiplies
    it natively, :func:`resolve_mlp_dtype`; the presets' choice). The trained decoder records the
    dtype it used."""

    def validate(self) -> DecoderConfig:
        """Raise ``ValueError`` naming the first bad field; returns ``self``."""
        check_fields(self, positive_int=("epochs", "subjects_per_step", "views_per_step", "latent_dim", "embed_dim",
                                         "hidden_dim", "depth", "checkpoint_every", "tile_size"),
                     non_negative=("decoder_lr", "codes_lr", "embeddings_lr", "l1_weight", "ssim_weight",
                                   "lpips_weight", "means_reg_weight", "scales_reg_weight", "grad_clip",
                                   "template_lr"),
                     positive=("lr_final", "scene_scale", "codes_init_std"), optional=("tile_size",))
        if self.embed_dim < 3:
            raise ValueError(f"DecoderConfig.embed_dim must be >= 3 (it starts as the template positions), "
                             f"got {self.embed_dim}")
        if self.sh_degree not in (0, 1, 2, 3):
            raise ValueError(f"DecoderConfig.sh_degree must be 0..3, got {self.sh_degree!r}")
        if self.holdout_view is not None and (not isinstance(self.holdout_view, int) or self.holdout_view < 0):
            raise ValueError(f"DecoderConfig.holdout_view must be None or a view index >= 0, got {self.holdout_view!r}")
        if self.mlp_dtype not in MLP_DTYPE_CHOICES:
            raise ValueError(f"DecoderConfig.mlp_dtype must be one of {MLP_DTYPE_CHOICES}, got {self.mlp_dtype!r}")
        return self

    def make_decoder(self, device: torch.device | str = "cpu") -> AutoDecoder:
        """A freshly initialised :class:`AutoDecoder` of this config's size on ``device``, computing
        in :attr:`mlp_dtype` as resolved there."""
        return AutoDecoder(self.latent_dim, self.embed_dim, self.hidden_dim, self.depth,
                           compute_dtype=resolve_mlp_dtype(self.mlp_dtype, device)).to(device)


def step_items(seed: int, epoch: int, num_subjects: int, num_train_views: int,
               views_per_step: int) -> list[tuple[int, list[int]]]:
    """The (subject index, training-view positions) items of one epoch, in training order.

    Each subject's training views are shuffled and cut into chunks of ``views_per_step`` (the
    last chunk may be shorter); all chunks of all subjects are then shuffled together. Every
    (subject, view) pair appears exactly once per epoch. A pure function of its arguments
    (numpy ``SeedSequence([seed, epoch])``), so a resumed run trains on what an uninterrupted
    run would.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    items = []
    for s in range(num_subjects):
        order = rng.permutation(num_train_views).tolist()
        items += [(s, order[i:i + views_per_step]) for i in range(0, num_train_views, views_per_step)]
    perm = rng.permutation(len(items))
    return [items[i] for i in perm]


# ------------------------------------------------------------------------------- results
@dataclass
class DecoderResult(StageScores):
    """A trained auto-decoder with its codes, embeddings, template and how well it reconstructs.

    Attributes:
        decoder: the MLP ``h``; embeddings: ``[K, embed_dim]`` the learnt ``e_k``.
        template: ``[K, ...]`` the template Gaussians the residuals apply to.
        codes: ``[N, latent_dim]`` one learnt ``w_i`` per training subject.
        subject_ids: ``N`` names in the order of ``codes`` and the metrics.
        train_psnr, train_ssim, heldout_psnr, heldout_ssim, heldout_psnr_head: ``[N]`` scores of
            the decoded subjects (:class:`~fastavatar_nb.objective.StageScores`).
        loss_history, psnr_history: ``[steps]`` mean loss and PSNR of each step's renders.
        config, backend, seconds: how it was trained and for how long (summed over resumes).
    """

    decoder: AutoDecoder
    embeddings: Tensor
    template: Gaussians
    codes: Tensor
    subject_ids: list[str]
    loss_history: Tensor
    psnr_history: Tensor
    config: DecoderConfig
    backend: str = "torch"
    seconds: float = 0.0

    def decode(self, w: Tensor) -> Gaussians:
        """Gaussians ``[..., K, ...]`` of codes ``w`` ``[..., latent_dim]`` (no gradient).

        Raises:
            ValueError: ``w`` is not a finite float tensor ``[..., latent_dim]`` on the decoder's device.
        """
        p = self.decoder.body[0].weight
        check_codes(w, self.decoder.latent_dim, "DecoderResult.decode", p.dtype, p.device)
        with torch.no_grad():
            return apply_residuals(self.template, self.decoder(w, self.embeddings))

    def residuals(self, w: Tensor) -> Residuals:
        """The residuals of codes ``w`` (no gradient); ``w`` is checked as in :meth:`decode`."""
        p = self.decoder.body[0].weight
        check_codes(w, self.decoder.latent_dim, "DecoderResult.residuals", p.dtype, p.device)
        with torch.no_grad():
            return self.decoder(w, self.embeddings)

    def code(self, subject_id: str) -> Tensor:
        """The learnt code ``w`` of a training subject."""
        if subject_id not in self.subject_ids:
            raise KeyError(f"{subject_id!r} is not a training subject of this decoder; it knows "
                           f"{self.subject_ids}")
        return self.codes[self.subject_ids.index(subject_id)]

    def table(self) -> list[dict[str, float | str]]:
        """One row per training subject with its decoded PSNR/SSIM."""
        return [{"subject": sid, **{m: float(getattr(self, m)[i]) for m in _METRICS}}
                for i, sid in enumerate(self.subject_ids)]

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
        """Write ``decoder.safetensors`` (weights, embeddings, template, config) and
        ``latents.safetensors`` (codes, ids, metrics, histories) into ``directory``."""
        d = Path(directory)
        paths = (d / DECODER_FILE, d / LATENTS_FILE)
        for p in paths:
            if p.exists() and not overwrite:
                raise FileExistsError(f"{p} exists; pass overwrite=True to replace it")
        d.mkdir(parents=True, exist_ok=True)
        dec = {f"decoder.{k}": v for k, v in self.decoder.state_dict().items()}
        dec["embeddings"] = self.embeddings
        dec.update({f"template.{k}": v for k, v in self.template.detach().parameters().items()})
        meta = {"format": _DECODER_FORMAT, "architecture": json.dumps(self.decoder.architecture()),
                "config": self.config.to_json(), "backend": self.backend, "seconds": repr(self.seconds)}
        atomic_save_tensors(dec, paths[0], meta)
        lat = {"codes": self.codes, "loss_history": self.loss_history, "psnr_history": self.psnr_history,
               **{m: getattr(self, m) for m in _METRICS}}
        atomic_save_tensors(lat, paths[1], {"format": _LATENTS_FORMAT, "subject_ids": json.dumps(self.subject_ids)})
        return paths

    @staticmethod
    def load(directory: str | os.PathLike, device: torch.device | str = "cpu") -> DecoderResult:
        """Read what :meth:`save` wrote into ``directory``."""
        d = Path(directory)
        hint = "train a decoder with train_decoder (notebook 03)"
        gs = ("means", "log_scales", "quats", "opacity_logits", "sh")
        dec_meta, dec_t = read_artifact(d / DECODER_FILE, _DECODER_FORMAT, hint, device=device,
                                        meta_keys=("architecture", "config"),
                                        tensor_names=("embeddings", *(f"template.{k}" for k in gs)))
        lat_meta, lat_t = read_artifact(d / LATENTS_FILE, _LATENTS_FORMAT, hint, device=device,
                                        meta_keys=("subject_ids",),
                                        tensor_names=("codes", "loss_history", "psnr_history", *_METRICS))
        arch = meta_json(d / DECODER_FILE, dec_meta, "architecture", hint)
        try:
            decoder = AutoDecoder(**arch).to(device)
            decoder.load_state_dict({k[8:]: v for k, v in dec_t.items() if k.startswith("decoder.")})
        except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: load_state_dict's missing/unexpected keys
            raise ArtifactError(f"{d / DECODER_FILE}: its weights do not make the decoder its metadata describes "
                                f"({arch}): {e}; the file is damaged or was not written by fastavatar-nb; {hint}") from e
        decoder.eval()
        template = Gaussians(**{k: dec_t[f"template.{k}"] for k in gs})
        return DecoderResult(
            decoder=decoder, embeddings=dec_t["embeddings"], template=template, codes=lat_t["codes"],
            subject_ids=meta_json(d / LATENTS_FILE, lat_meta, "subject_ids", hint), **{m: lat_t[m] for m in _METRICS},
            loss_history=lat_t["loss_history"], psnr_history=lat_t["psnr_history"],
            config=DecoderConfig.from_dict(meta_json(d / DECODER_FILE, dec_meta, "config", hint)),
            backend=dec_meta.get("backend", "torch"), seconds=float(dec_meta.get("seconds", "0")))


# ------------------------------------------------------------------------------- training
def residual_penalty(residuals: Residuals, config: DecoderConfig) -> Tensor:
    """The L2 penalties of Eq. 7-8 on the position and scale residuals (a scalar):
    ``means_reg_weight mean_k |d_mu_k|^2 / scene_scale^2 + scales_reg_weight mean_k |d_s_k|^2``
    (means over every Gaussian of every decoded subject)."""
    return (config.means_reg_weight * (residuals.means ** 2).sum(-1).mean() / config.scene_scale ** 2
            + config.scales_reg_weight * (residuals.log_scales ** 2).sum(-1).mean())


@dataclass
class StepLoss:
    """One training step's loss (:func:`decoder_loss`): ``loss = image.mean() + penalty``."""

    loss: Tensor
    """The scalar minimised (Eq. 7-8)."""
    image: Tensor
    """``[B * V]`` image terms, one per render: ``l1 L1 + ssim (1 - SSIM) [+ lpips LPIPS]`` on white."""
    penalty: Tensor
    """The residual penalty (:func:`residual_penalty`), a scalar."""
    psnr: Tensor
    """``[B * V]`` PSNR of each render (no gradient), for the progress bar and the history."""


def decoder_loss(decoder: AutoDecoder, template: Gaussians, w: Tensor, embeddings: Tensor, images: Tensor,
                 cameras: Cameras, config: DecoderConfig, backend: Backend = "auto") -> StepLoss:
    """The loss of one training step of :func:`train_decoder` (paper Eq. 2-8), the function its loop calls.

    Decodes the codes ``w`` ``[B, latent_dim]`` with the embeddings ``e_k`` into residuals, applies them to
    the template (Eq. 2-6), renders each head at its ``V`` cameras (``cameras`` ``[B, V]``) on white and
    scores the renders against ``images`` ``[B, V, H, W, 3]`` (Eq. 7), plus the residual penalty (Eq. 8).
    Gradients flow to the decoder, ``w``, the embeddings (and the template when it requires them);
    ``loss.backward()`` and the optimiser step are the caller's."""
    res = decoder(w, embeddings)                                                     # [B, K] residuals
    out = render(apply_residuals(template, res), cameras, background=1.0, backend=backend,
                 sh_degree=config.sh_degree, tile_size=config.tile_size)            # colors [B, V, H, W, 3]
    image = photometric_loss(out.colors, images, None, config.l1_weight, config.ssim_weight,
                             config.lpips_weight)["total"].flatten()
    penalty = residual_penalty(res, config)
    with torch.no_grad():
        p = psnr(out.colors.detach().clamp(0, 1), images).flatten()
    return StepLoss(loss=image.mean() + penalty, image=image, penalty=penalty, psnr=p)


def _check_template(template: Gaussians, num_points: int) -> None:
    if template.batch_shape:
        raise ValueError("train_decoder: the template must be unbatched Gaussians [K, ...] "
                         f"(build_template's output), got batch shape {tuple(template.batch_shape)}")
    if template.num_gaussians != num_points:
        raise ValueError(f"train_decoder: the template has K={template.num_gaussians} Gaussians but the subjects have "
                         f"{num_points} corresponded points; build the template from fits of these subjects")


def _training_state(config: DecoderConfig, template: Gaussians, n: int, dev: torch.device
                    ) -> tuple[AutoDecoder, Tensor, Tensor, Gaussians, torch.optim.Adam]:
    """A fresh decoder, ``n`` codes ``w_i``, the embeddings ``e_k`` (and, with ``template_lr > 0``, the
    template as leaves of its own) and their Adam optimiser, one parameter group each, seeded by the config."""
    torch.manual_seed(config.seed)
    decoder = config.make_decoder(dev)
    gen = torch.Generator().manual_seed(config.seed)
    codes = (torch.randn(n, config.latent_dim, generator=gen) * config.codes_init_std).to(dev).requires_grad_(True)
    embeddings = positional_embedding(template.means, config.embed_dim).requires_grad_(True)
    groups = [
        {"params": list(decoder.parameters()), "lr": config.decoder_lr, "name": "decoder"},
        {"params": [codes], "lr": config.codes_lr, "name": "codes"},
        {"params": [embeddings], "lr": config.embeddings_lr, "name": "embeddings"},
    ]
    if config.template_lr > 0:  # joint optimisation: the template's fields become leaves of their own
        template = template.clone().requires_grad_(True)
        tp = template.parameters()
        groups += [{"params": [tp["means"]], "lr": config.template_lr * config.scene_scale, "name": "template.means"},
                   {"params": [v for k, v in tp.items() if k != "means"], "lr": config.template_lr,
                    "name": "template"}]
    return decoder, codes, embeddings, template, torch.optim.Adam(groups)


def _save_checkpoint(ckpt: CheckpointFile, state: dict[str, Any], decoder: AutoDecoder, codes: Tensor,
                     embeddings: Tensor, opt: torch.optim.Adam, hist_loss: Tensor, hist_psnr: Tensor,
                     template: Gaussians | None) -> None:
    """Write the resumable checkpoint (read back by :func:`_resume`): weights, codes, embeddings, histories,
    the jointly learnt template when given, and Adam's state (:func:`~fastavatar_nb.loop.optimizer_tensors`)."""
    t = {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    t.update({"codes": codes.detach(), "embeddings": embeddings.detach(), "hist.loss": hist_loss,
              "hist.psnr": hist_psnr})
    if template is not None:
        t.update({f"template.{k}": v.detach() for k, v in template.parameters().items()})
    t.update(optimizer_tensors(opt))
    ckpt.save(state, t)


@dataclass
class _Staged:
    """Every training subject in memory: images and the held-out view's head region as uint8, cameras."""

    images_u8: Tensor   # [N, C, H, W, 3]
    heads_u8: Tensor    # [N, 0 or 1, H, W]
    cameras: Cameras    # [N, C]
    num_views: int
    width: int
    height: int


def _stage_subjects(subjects: Sequence[MultiViewSubject], ids: list[str], template: Gaussians,
                    holdout_view: int | None, dev: torch.device) -> _Staged:
    """Check the subjects against each other and the template, and hold them on ``dev``."""
    imgs, heads, vms, kss = [], [], [], []
    num_views = width = height = None
    for i in range(len(ids)):
        s = subjects[i]
        if s.subject_id != ids[i]:
            raise ValueError(f"train_decoder: subject {i} is {s.subject_id!r}, expected {ids[i]!r}")
        _check_template(template, s.num_points)
        if num_views is None:
            num_views, width, height = s.num_views, s.width, s.height
        elif (s.num_views, s.width, s.height) != (num_views, width, height):
            raise ValueError(f"train_decoder: all subjects need the same views and image size; {s.subject_id} has "
                             f"{s.num_views} views at {s.width}x{s.height}, the first had {num_views} at {width}x{height}")
        s = s.to(dev)
        imgs.append((s.images * 255).round().to(torch.uint8))
        hv = [holdout_view] if holdout_view is not None else []
        heads.append((head_region(s.masks[hv], s.cameras[hv]) * 255).round().to(torch.uint8))
        vms.append(s.cameras.viewmats)
        kss.append(s.cameras.Ks)
    assert num_views is not None and width is not None and height is not None
    return _Staged(torch.stack(imgs), torch.stack(heads), Cameras(torch.stack(vms), torch.stack(kss), width, height),
                   num_views, width, height)


def train_decoder(subjects: Sequence[MultiViewSubject], template: Gaussians, config: DecoderConfig | None = None,
                  backend: Backend = "auto", device: torch.device | str | None = None,
                  checkpoint: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
                  callback: Callable[[DecoderStepInfo], None] | None = None,
                  distributed: bool = False) -> DecoderResult:
    """Train the auto-decoder, the codes ``w_i`` and the embeddings ``e_k`` on the subjects' images.

    Each step decodes ``subjects_per_step`` subjects (see :func:`step_items`), renders ``views_per_step`` of each
    one's training views and minimises :func:`decoder_loss` (Eq. 7-8 on the whole image on white) with Adam,
    exponentially decaying learning rates and gradient clipping (the loop's bar, decay,
    checkpoints and callback: :class:`~fastavatar_nb.loop.StepLoop`). The template stays fixed unless
    ``config.template_lr > 0`` (Table 2's joint optimisation).

    Args:
        subjects: the N training subjects (a list or a ``SubjectDataset``): equal views, image
            size and K, which must be the template's K. All are held in memory (as uint8).
        template: ``[K, ...]`` from :func:`~fastavatar_nb.template.build_template`.
        config: settings (default :class:`DecoderConfig`).
        backend, device: renderer backend and where to train (default: the template's device).
        checkpoint: folder for a resumable checkpoint (one file, :data:`CHECKPOINT_FILE`, replaced
            atomically every ``checkpoint_every`` steps). An existing checkpoint of the same config
            and subjects resumes (a finished one returns at once); another one, a damaged one or
            leftovers of the earlier two-file layout (``decoder_state.json`` + ``.safetensors``)
            raise a :class:`~fastavatar_nb._io.CheckpointError` unless ``overwrite``.
            With ``config.template_lr > 0`` it also holds the template being learnt.
        progress: show a tqdm progress bar.
        callback: called after every step with a :class:`DecoderStepInfo` (``step``, ``steps``, ``epoch``,
            ``loss``, ``psnr``: means over the step's renders, and the current ``codes``).
        distributed: this process is one rank of an initialised ``torch.distributed`` process
            group, every rank calling with the same arguments: each step's items are split over
            the ranks and the gradients summed (data parallel; only rank 0 writes the checkpoint).
            Use :func:`fastavatar_nb.distributed.train_decoder_distributed`, which explains it.

    Returns:
        A :class:`DecoderResult` (its metrics are measured on every subject's training views and
        on the held-out view after training).
    """
    config = (config or DecoderConfig()).validate()
    ids = subject_ids(subjects, "train_decoder")
    if not ids:
        raise ValueError("train_decoder: no subjects given")
    if config.lpips_weight > 0 and not lpips_available():
        raise ValueError("train_decoder: lpips_weight > 0 needs the LPIPS network weights, which are not on this "
                         "machine (see fastavatar_nb.metrics.lpips_available); set lpips_weight=0")
    n, dev = len(ids), torch.device(device) if device is not None else template.device
    backend_name, comm = resolve_backend(backend, dev), make_comm(distributed, dev)  # one process: LocalComm
    data = _stage_subjects(subjects, ids, template.detach().to(dev), config.holdout_view, dev)
    tv = train_views(data.num_views, config.holdout_view)
    bs = config.subjects_per_step
    steps_per_epoch = math.ceil(len(step_items(config.seed, 0, n, len(tv), config.views_per_step)) / bs)
    total = config.epochs * steps_per_epoch
    decoder, codes, embeddings, template, opt = _training_state(config, template.detach().to(dev), n, dev)
    base_lrs, joint = [g["lr"] for g in opt.param_groups], template if config.template_lr > 0 else None
    hist_loss, hist_psnr = torch.full((total,), float("nan")), torch.full((total,), float("nan"))
    ckpt, step0, seconds0 = _resume(checkpoint, overwrite, config, ids, total, decoder, codes, embeddings, opt,
                                    hist_loss, hist_psnr, dev, joint)
    items: tuple[int, list[tuple[int, list[int]]]] = (-1, [])  # (epoch, its items): shuffled once per epoch
    with StepLoop(total, desc="training the decoder", done=step0, seconds=seconds0, progress=progress,
                  callback=callback) as loop:
        for step in loop.steps(step0, total, decay=(opt, base_lrs, config.lr_final)):
            epoch, k = divmod(step, steps_per_epoch)
            if items[0] != epoch:
                items = (epoch, step_items(config.seed, epoch, n, len(tv), config.views_per_step))
            hist_loss[step], hist_psnr[step] = _train_step(decoder, codes, embeddings, template, opt, data, tv,
                                                           items[1][k * bs:(k + 1) * bs], comm, config, backend_name)
            if ckpt is not None and comm.rank == 0 and loop.due(step + 1, config.checkpoint_every, total):
                _save_checkpoint(ckpt, {"config": json.loads(config.to_json()), "subject_ids": ids, "step": step + 1,
                                        "steps": total, "seconds": loop.seconds, "backend": backend_name}, decoder,
                                 codes, embeddings, opt, hist_loss, hist_psnr, joint)
            loop.record(DecoderStepInfo(step=step + 1, steps=total, epoch=epoch, loss=float(hist_loss[step]),
                                        psnr=float(hist_psnr[step]), codes=codes.detach()),
                        loss=float(hist_loss[step]), psnr=float(hist_psnr[step]))
    decoder.eval()
    result = DecoderResult(
        decoder=decoder, embeddings=embeddings.detach(), template=template.detach(), codes=codes.detach(), subject_ids=ids,
        train_psnr=torch.empty(n), train_ssim=torch.empty(n), heldout_psnr=torch.full((n,), float("nan")),
        heldout_ssim=torch.full((n,), float("nan")), heldout_psnr_head=torch.full((n,), float("nan")),
        loss_history=hist_loss, psnr_history=hist_psnr, config=config, backend=backend_name, seconds=loop.seconds)
    _score(result, data, tv, comm)
    return result


class DecoderStepInfo(TypedDict):
    """What :func:`train_decoder` gives its callback after every step (:class:`~fastavatar_nb.loop.StepLoop`)."""

    step: int
    """Steps done."""
    steps: int
    """Steps of the run."""
    epoch: int
    """The epoch of this step (from 0)."""
    loss: float
    """The step's loss (Eq. 7-8), over every render of the step."""
    psnr: float
    """The mean PSNR of the step's renders."""
    codes: Tensor
    """The current codes ``w_i``, ``[N, latent_dim]``."""


def _train_step(decoder: AutoDecoder, codes: Tensor, embeddings: Tensor, template: Gaussians, opt: torch.optim.Adam,
                data: _Staged, tv: list[int], batch: list[tuple[int, list[int]]], comm: Comm, config: DecoderConfig,
                backend: str) -> tuple[float, float]:
    """One optimiser step of :func:`train_decoder` on this rank's part of ``batch`` (its ``(subject, views)`` items):
    :func:`decoder_loss` for each group of items with equal view counts (the last chunk of a subject's views may be
    shorter), weighted so that the ranks' losses sum to the mean image term over every render of the batch plus the
    residual penalty; the gradients summed over the ranks, clipped, and Adam's step. Returns the step's loss and the
    mean PSNR of its renders, over all ranks."""
    dev, tv_t = codes.device, torch.tensor(tv, device=codes.device)
    part = comm.part(batch)  # this rank's items (all of them in one process)
    params = [p for grp in opt.param_groups for p in grp["params"]]
    opt.zero_grad(set_to_none=True)
    loss, psnrs = torch.zeros((), device=dev), []
    renders = sum(len(v) for _, v in batch)
    for size in sorted({len(v) for _, v in part}):
        rows = [(si, v) for si, v in part if len(v) == size]
        s_t = torch.tensor([si for si, _ in rows], device=dev)
        vpos = tv_t[torch.tensor([v for _, v in rows], device=dev)]               # [b, V] view indices
        step_loss = decoder_loss(
            decoder, template, codes[s_t], embeddings, data.images_u8[s_t[:, None], vpos].float() / 255.0,
            Cameras(data.cameras.viewmats[s_t[:, None], vpos], data.cameras.Ks[s_t[:, None], vpos],
                    data.width, data.height), config, backend)
        loss = loss + step_loss.image.sum() / renders + step_loss.penalty * (len(rows) / len(batch))
        psnrs.append(step_loss.psnr)
    if part:
        loss.backward()
    comm.sum_grads_(params)
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    opt.step()
    p_sum = float(torch.cat(psnrs).double().sum()) if psnrs else 0.0
    tot_loss, tot_psnr, count = comm.sum_stats([float(loss.detach()), p_sum, sum(len(p) for p in psnrs)])
    return tot_loss, tot_psnr / count


def _score(result: DecoderResult, data: _Staged, tv: list[int], comm: Comm) -> None:
    """Fill ``result``'s metrics: every subject's decoded head on its training views and the held-out view
    (each rank scores every ``world_size``-th batch of ``subjects_per_step``; the rows are then gathered)."""
    config, backend_name, n = result.config, result.backend, len(result.subject_ids)
    bs, width, height = config.subjects_per_step, data.width, data.height
    owned = torch.zeros(n, dtype=torch.bool)  # distributed: each rank scores every world_size-th batch
    for b0 in range(0, n, bs):
        if (b0 // bs) % comm.world_size != comm.rank:
            continue
        owned[b0:b0 + bs] = True
        sl = slice(b0, min(n, b0 + bs))
        g = result.decode(result.codes[sl])
        ims = data.images_u8[sl].float() / 255.0
        cams = Cameras(data.cameras.viewmats[sl], data.cameras.Ks[sl], width, height)
        tr = evaluate_views(g, ims, cams, tv, backend=backend_name, sh_degree=config.sh_degree,
                            tile_size=config.tile_size)
        result.train_psnr[sl], result.train_ssim[sl] = tr["psnr"].mean(1).cpu(), tr["ssim"].mean(1).cpu()
        if config.holdout_view is not None:
            hv = [config.holdout_view]
            ho = evaluate_views(g, ims[:, hv], Cameras(cams.viewmats[:, hv], cams.Ks[:, hv], width, height), [0],
                                data.heads_u8[sl].float() / 255.0, backend_name, config.sh_degree,
                                tile_size=config.tile_size)
            result.heldout_psnr[sl], result.heldout_ssim[sl] = ho["psnr"][:, 0].cpu(), ho["ssim"][:, 0].cpu()
            result.heldout_psnr_head[sl] = ho["psnr_head"][:, 0].cpu()
    for m in _METRICS:
        comm.gather_rows_(getattr(result, m), owned)


def _checkpoint(folder: str | os.PathLike) -> CheckpointFile:
    return CheckpointFile(folder, CHECKPOINT_FILE, _CKPT_FORMAT, "decoder checkpoint", legacy=_LEGACY_CHECKPOINT)


def checkpoint_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The JSON state of the decoder checkpoint in ``folder`` (config, ``subject_ids``, ``step`` of
    ``steps``, ``seconds``), without reading its tensors.

    Raises:
        FileNotFoundError: no checkpoint in ``folder``.
        CheckpointError: a damaged or foreign file, or leftovers of the old two-file layout.
    """
    return _checkpoint(folder).state()


def _resume(folder: str | os.PathLike | None, overwrite: bool, config: DecoderConfig, ids: list[str], total: int,
            decoder: AutoDecoder, codes: Tensor, embeddings: Tensor, opt: torch.optim.Adam, hist_loss: Tensor,
            hist_psnr: Tensor, dev: torch.device, template: Gaussians | None = None
            ) -> tuple[CheckpointFile | None, int, float]:
    """The checkpoint file of ``folder`` (``None``: no checkpointing) and where training starts: ``(file, step,
    seconds)``. A checkpoint there is loaded into the fresh model and optimiser (and ``template``, when it is
    trained jointly), or deleted with ``overwrite``.

    Refuses (:class:`~fastavatar_nb._io.CheckpointError`) a checkpoint of another config or other
    subjects, and one whose state and tensors disagree (step, shapes, optimiser step counts)."""
    if folder is None:
        return None, 0, 0.0
    ckpt = _checkpoint(folder)
    if not ckpt.exists():
        return ckpt, 0, 0.0
    if overwrite:
        ckpt.discard()
        return ckpt, 0, 0.0
    weights = [f"decoder.{k}" for k in decoder.state_dict()]
    own = {} if template is None else {f"template.{k}": v for k, v in template.parameters().items()}
    state, t = ckpt.load(dev, state_keys=_CKPT_STATE_KEYS,
                         tensor_names=(*weights, "codes", "embeddings", "hist.loss", "hist.psnr", *own))
    ckpt.require_same_run(state, {"config": json.loads(config.to_json()), "subject_ids": ids}, "decoder run")
    step = state["step"]
    if state["steps"] != total or not (isinstance(step, int) and 0 < step <= total):
        raise ckpt.refuse(f"its state says step {step!r} of {state['steps']!r}, expected a step in 1..{total} of {total}")
    shapes = {"codes": tuple(codes.shape), "embeddings": tuple(embeddings.shape), "hist.loss": (total,),
              "hist.psnr": (total,), **{f"decoder.{k}": tuple(v.shape) for k, v in decoder.state_dict().items()},
              **{k: tuple(v.shape) for k, v in own.items()}}
    bad = {k: list(t[k].shape) for k, s in shapes.items() if tuple(t[k].shape) != s}
    if bad:
        raise ckpt.refuse(f"tensors of the wrong shape {bad}, expected {({k: list(shapes[k]) for k in bad})}")
    steps = {k: int(v.reshape(-1)[0]) for k, v in t.items() if k.startswith("opt.") and k.endswith(".step")}
    if not steps or any(v != step for v in steps.values()):
        raise ckpt.refuse(f"the state and the tensors disagree: the state says step {step}, but the optimiser state "
                          f"holds {sorted(set(steps.values())) or 'no'} steps")
    decoder.load_state_dict({k[8:]: v for k, v in t.items() if k.startswith("decoder.")})
    with torch.no_grad():
        codes.copy_(t["codes"])
        embeddings.copy_(t["embeddings"])
        for k, v in own.items():
            v.copy_(t[k])
    hist_loss.copy_(t["hist.loss"].cpu())
    hist_psnr.copy_(t["hist.psnr"].cpu())
    load_optimizer_tensors(opt, t)
    return ckpt, int(step), float(state.get("seconds", 0.0))
