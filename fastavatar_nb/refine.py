"""Test-time refinement (paper section 3.5): adapt the feed-forward head to its one input photo.

The encoder predicts a code ``w`` from one photo and the decoder turns it into a head in one
pass. Refinement then minimises the same photometric loss as decoder training on the **input
view only**, starting from that prediction, by optimising

- the code ``w`` (the head stays on the decoder's manifold of heads), and
- the decoder MLP ``h`` itself (a copy: the shared decoder is never changed), which can add
  details no code of the training subjects explains.

The paper optimises both "jointly" for 300 iterations; the authors' code optimises ``w`` in the
first half and the MLP in the second. :class:`RefineConfig` offers both (``schedule``; the default
is the paper's ``joint``, the best on the validation subjects); the embeddings ``e_k`` and the
template stay frozen unless ``embeddings_lr > 0``.

Only one view constrains the head, so the other views can get worse while the input view gets
better: notebook 06 measures both, and :func:`refine_views` runs the paper's protocol (one
refinement per input view).

Only the photo and its camera are used: no 3D points, masks or other views of the subject
(those are for scoring only). A camera estimated from the photo itself (:mod:`fastavatar_nb.photo`)
can be refined along with the head (``pose_rotation_lr``, ``pose_translation_lr``). The loss covers every pixel of a photo on white, the same objective
as decoder training; :func:`refine` checks the photo's background
(:func:`~fastavatar_nb.objective.check_on_white`) and refuses another one unless ``weights``
say which pixels the loss may see.

Shapes: a code is ``[latent_dim]``, a head ``[K, ...]``; the input view is an image
``[H, W, 3]`` in [0, 1] on white with its camera (``Cameras`` of one view); :func:`input_view`
takes both from a subject.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor, nn

from ._checks import check_images
from ._io import StageConfig, check_fields
from .cameras import Cameras, rotvec_to_matrix
from .data.subject import MultiViewSubject
from .decoder import DecoderConfig, DecoderResult, apply_residuals, residual_penalty
from .gaussians import Gaussians
from .loop import StepLoop
from .metrics import lpips_available, psnr
from .objective import check_on_white, photometric_loss
from .render import Backend, render, resolve_backend

__all__ = ["Schedule", "RefineConfig", "RefineResult", "RefineLoss", "RefineStepInfo", "input_view", "refine", "refine_loss", "refine_views"]

Schedule = Literal["code_then_decoder", "joint", "code", "decoder"]


@dataclass(frozen=True)
class RefineConfig(StageConfig):
    """Settings of :func:`refine`. Defaults: the smoke preset's 50 steps on a CPU.

    The loss is the decoder's own (its :class:`~fastavatar_nb.decoder.DecoderConfig`: L1, SSIM
    and LPIPS weights, the residual penalties, SH degree and tile size), as in the paper and the
    authors' code ("same image loss"), over every pixel of the photo (or the ``weights`` given to
    :func:`refine`).
    """

    steps: int = 50
    """Optimiser steps on the input view (paper: 300)."""
    schedule: Schedule = "joint"
    """What each step optimises: ``"joint"`` (both at every step, as the paper words it),
    ``"code_then_decoder"`` (the authors' code: ``w`` for the first ``code_fraction`` of the steps,
    then the MLP), ``"code"`` or ``"decoder"`` only (for ablations). Chosen on the validation
    subjects at the smoke preset (2 subjects x 4 input cameras, whole-image PSNR on the other
    views, ``benchmarks/results/cpu-2core/refine_sweep_smoke.json``): joint 21.48 dB against the
    authors' schedule's 20.76 dB at the same learning rates (feed-forward 14.88 dB)."""
    code_fraction: float = 0.5
    """Share of the steps that optimise ``w`` in the ``"code_then_decoder"`` schedule."""
    code_lr: float = 3e-2
    """Adam learning rate of ``w`` (3e-2 and 1e-2 within 0.05 dB on the validation subjects)."""
    decoder_lr: float = 3e-4
    """Adam learning rate of the MLP's weights (1e-3 fits the input view better and the other
    views no better: the sweep above)."""
    embeddings_lr: float = 0.0
    """Adam learning rate of the embeddings ``e_k`` while the MLP is optimised (0: frozen)."""
    grad_clip: float = 1.0
    """Clip the gradient norm of every step (0: no clipping)."""
    pose_rotation_lr: float = 0.0
    """Adam learning rate (radians) of a rotation applied to the input camera at every step (0: the
    camera is trusted, as a calibrated one is). A photo's camera is estimated from five landmarks
    (:mod:`fastavatar_nb.photo`) and is several degrees off; refining it photometrically brings it
    within a few degrees (``benchmarks/photo.py``)."""
    pose_translation_lr: float = 0.0
    """Adam learning rate (metres) of a shift of the input camera, with ``pose_rotation_lr``."""
    code_prior_weight: float = 0.0
    """Weight of a pull toward the starting code ``w_0`` (the encoder's), added to the loss:
    ``code_prior_weight * ||w - w_0||^2 / ||w_0||^2`` (relative, so one weight suits codes of any length).
    A photo constrains only what its camera sees; the prior keeps what it cannot see near the encoder's
    guess (0: no prior, as the paper)."""

    @property
    def refines_pose(self) -> bool:
        """Whether the input camera's pose is optimised too."""
        return self.pose_rotation_lr > 0 or self.pose_translation_lr > 0

    def validate(self) -> RefineConfig:
        """Raise ``ValueError`` naming the first bad field; returns ``self``."""
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"RefineConfig.steps must be a non-negative int, got {self.steps!r}")
        if self.schedule not in ("code_then_decoder", "joint", "code", "decoder"):
            raise ValueError("RefineConfig.schedule must be 'code_then_decoder', 'joint', 'code' or 'decoder', "
                             f"got {self.schedule!r}")
        if not (isinstance(self.code_fraction, (int, float)) and 0 <= self.code_fraction <= 1):
            raise ValueError(f"RefineConfig.code_fraction must be in [0, 1], got {self.code_fraction!r}")
        check_fields(self, non_negative=("code_lr", "decoder_lr", "embeddings_lr", "grad_clip", "pose_rotation_lr",
                                         "pose_translation_lr", "code_prior_weight"))
        return self

    @property
    def code_steps(self) -> int:
        """Steps that optimise ``w`` only (the first ones)."""
        if self.schedule == "code_then_decoder":
            return round(self.steps * self.code_fraction)
        return self.steps if self.schedule == "code" else 0

    def optimises(self, step: int) -> tuple[bool, bool]:
        """``(code, decoder)``: what step ``step`` (0-based) optimises."""
        if self.schedule == "joint":
            return True, True
        if self.schedule == "code":
            return True, False
        if self.schedule == "decoder":
            return False, True
        return (True, False) if step < self.code_steps else (False, True)

@dataclass
class RefineResult:
    """A refined head.

    Attributes:
        head: ``[K, ...]`` the refined Gaussians (detached).
        code: ``[latent_dim]`` the refined ``w``; initial_code: the ``w`` it started from.
        decoder: the refined copy of the MLP (the input ``DecoderResult``'s is untouched);
            embeddings: ``[K, embed_dim]`` (refined only when ``embeddings_lr > 0``).
        loss_history, psnr_history: ``[steps]`` loss and PSNR on the input view at each step,
            measured before that step's update (``psnr_history[0]`` is the feed-forward head's).
        final_psnr: PSNR of ``head`` on the input view.
        config: the :class:`RefineConfig`; seconds: wall time of the optimisation (the callback's
            time left out).
        camera: the input camera, refined when ``config.refines_pose`` (else the one given).
    """

    head: Gaussians
    code: Tensor
    initial_code: Tensor
    decoder: nn.Module
    embeddings: Tensor
    loss_history: Tensor
    psnr_history: Tensor
    final_psnr: float
    config: RefineConfig
    seconds: float
    camera: Cameras | None = None


def input_view(subject: MultiViewSubject, view: int) -> tuple[Tensor, Cameras]:
    """``(image [H, W, 3], camera)`` of one view of a subject: what :func:`refine` gets at test time
    (the photo and its camera, nothing else of the subject)."""
    if not 0 <= view < subject.num_views:
        raise ValueError(f"input_view: view {view} does not exist ({subject.subject_id} has {subject.num_views} "
                         "views)")
    return subject.images[view], subject.cameras[[view]]


def _check_inputs(avatars: DecoderResult, code: Tensor, image: Tensor, camera: Cameras,
                  weights: Tensor | None) -> None:
    L = avatars.codes.shape[-1]
    if not isinstance(code, Tensor) or not code.is_floating_point():
        raise TypeError(f"refine: code must be a float tensor of shape [{L}] (e.g. encode_faces(...)[0] or "
                        f"avatars.code(subject_id)), got {getattr(code, 'dtype', type(code).__name__)}")
    if code.shape != (L,):
        raise ValueError(f"refine: need one code of shape [{L}] (the decoder's latent size), got {tuple(code.shape)}")
    if not torch.isfinite(code).all():
        raise ValueError("refine: the code has NaN/inf entries (was no face found in the input photo? "
                         "encode_faces gives NaN codes for such views)")
    if camera.viewmats.shape[:-2] != (1,):
        raise ValueError(f"refine: need the camera of exactly one view (Cameras of shape [1]), got "
                         f"{tuple(camera.viewmats.shape[:-2])}")
    check_images(image, "image", fn="refine", batched=False)
    if image.shape != (camera.height, camera.width, 3):
        raise ValueError(f"refine: image must be [H, W, 3] = [{camera.height}, {camera.width}, 3] to match the "
                         f"camera, got {tuple(image.shape)}")
    if weights is not None and weights.shape != image.shape[:2]:
        raise ValueError(f"refine: weights must be [H, W] = {tuple(image.shape[:2])}, got {tuple(weights.shape)}")


def code_drift(w: Tensor, w0: Tensor) -> Tensor:
    """``||w - w_0||^2 / ||w_0||^2``: how far a code moved from where it started, relative to its length (the
    term :attr:`RefineConfig.code_prior_weight` weighs; a zero ``w_0`` counts as length 1)."""
    norm = w0.detach().square().sum()
    return (w - w0.detach()).square().sum() / torch.where(norm > 0, norm, torch.ones_like(norm))


@dataclass
class RefineLoss:
    """One refinement step's loss (:func:`refine_loss`): ``loss = image + penalty + prior``."""

    loss: Tensor
    """The scalar minimised."""
    image: Tensor
    """``l1 L1 + ssim (1 - SSIM) [+ lpips LPIPS]`` of the render against the photo on white (a scalar)."""
    penalty: Tensor
    """The decoder's residual penalty (Eq. 8, :func:`~fastavatar_nb.decoder.residual_penalty`), a scalar."""
    prior: Tensor
    """``code_prior_weight`` times :func:`code_drift` (zero when the weight is 0), a scalar."""
    colors: Tensor
    """``[1, H, W, 3]`` the render at the input camera on white (with its gradient)."""


def refine_loss(decoder: nn.Module, template: Gaussians, w: Tensor, embeddings: Tensor, image: Tensor, camera: Cameras,
                decoder_config: DecoderConfig, weights: Tensor | None = None, code_prior_weight: float = 0.0,
                initial_code: Tensor | None = None, backend: Backend = "auto") -> RefineLoss:
    """The loss of one step of :func:`refine`, the function its loop calls (paper section 3.5: the decoder's
    own loss, Eq. 2-8, on the one input photo).

    Decodes ``w`` ``[latent_dim]`` with the embeddings ``e_k`` into residuals, applies them to the template,
    renders the head at ``camera`` (``Cameras`` ``[1]``) on white and scores it against ``image`` ``[H, W, 3]``
    with the decoder's weights (``decoder_config``, a :class:`~fastavatar_nb.decoder.DecoderConfig`) over
    ``weights`` ``[H, W]`` (``None``: every pixel), plus the residual penalty and, with
    ``code_prior_weight > 0``, the code's drift from ``initial_code``. Gradients flow to ``w``, the decoder,
    the embeddings and the camera where they require them; ``loss.backward()`` and the optimiser steps are
    the caller's."""
    res = decoder(w, embeddings)
    out = render(apply_residuals(template, res), camera, background=1.0, backend=backend,
                 sh_degree=decoder_config.sh_degree, tile_size=decoder_config.tile_size)
    wt = None if weights is None else weights[None, None]
    image_term = photometric_loss(out.colors[None], image[None, None], wt, decoder_config.l1_weight,
                                  decoder_config.ssim_weight, decoder_config.lpips_weight)["total"].mean()
    penalty = residual_penalty(res, decoder_config)
    prior = torch.zeros((), device=w.device)
    if code_prior_weight > 0:
        if initial_code is None:
            raise ValueError("refine_loss: code_prior_weight > 0 needs initial_code, the code w_0 refinement started at")
        prior = code_prior_weight * code_drift(w, initial_code)
    return RefineLoss(loss=image_term + penalty + prior, image=image_term, penalty=penalty, prior=prior,
                      colors=out.colors)


class RefineStepInfo(TypedDict):
    """What :func:`refine` gives its callback after every step (:class:`~fastavatar_nb.loop.StepLoop`)."""

    step: int
    """Steps done."""
    steps: int
    """Steps of the refinement."""
    loss: float
    """The step's loss (:func:`refine_loss`)."""
    psnr: float
    """The PSNR of the render the step used, against the photo (over ``weights`` when given)."""
    head: Callable[[], Gaussians]
    """Returns the current head (decoded on demand: a callback that draws it pays for it)."""


def refine(avatars: DecoderResult, code: Tensor, image: Tensor, camera: Cameras, weights: Tensor | None = None,
           config: RefineConfig | None = None, backend: Backend = "auto", progress: bool = True,
           callback: Callable[[RefineStepInfo], None] | None = None) -> RefineResult:
    """Refine the head of ``code`` on one input view (paper section 3.5).

    Each step decodes ``w`` with the (copied) MLP, renders the input view on white and minimises
    ``l1 L1 + ssim (1 - SSIM) [+ lpips LPIPS]`` over ``weights`` plus the decoder's residual
    penalties [+ ``code_prior_weight`` :func:`code_drift`] (:func:`refine_loss`, the step's loss), with Adam;
    ``config.schedule`` decides whether the step moves ``w``, the MLP or both.

    Args:
        avatars: the trained decoder (its template, embeddings and MLP; none of them is changed).
        code: ``[latent_dim]`` the starting code (the encoder's prediction).
        image: ``[H, W, 3]`` the input photo in [0, 1] on white; camera: its ``Cameras`` ``[1]``.
        weights: ``[H, W]`` loss weights in [0, 1]. ``None`` (the rule for a photo on white): every
            pixel, after :func:`~fastavatar_nb.objective.check_on_white` has checked the background.
        config: settings (default :class:`RefineConfig`).
        backend: renderer backend; progress: show a tqdm bar.
        callback: called after every step with a :class:`RefineStepInfo` (``step``, ``steps``, ``loss``,
            ``psnr`` of the render that step used, and ``head``, a function returning the current Gaussians).

    Returns:
        A :class:`RefineResult`.

    Raises:
        NotOnWhiteError: ``weights`` is ``None`` and the photo is not on white.
    """
    config = (config or RefineConfig()).validate()
    dcfg = avatars.config  # the decoder's loss
    if dcfg.lpips_weight > 0 and not lpips_available():
        raise ValueError("refine: the decoder was trained with LPIPS (lpips_weight > 0), whose network weights are "
                         "not on this machine (see fastavatar_nb.metrics.lpips_available)")
    dev = avatars.template.device
    code, image = code.detach().to(dev), image.to(dev)
    camera = camera.to(dev)
    weights = None if weights is None else weights.to(dev)
    _check_inputs(avatars, code, image, camera, weights)
    if weights is None:
        check_on_white(image, "refine: the input photo")
    backend_name = resolve_backend(backend, dev)

    decoder = copy.deepcopy(avatars.decoder).to(dev)
    decoder.train(False)
    template = avatars.template.detach()
    w = code.clone().requires_grad_(True)
    emb = avatars.embeddings.detach().clone().requires_grad_(config.embeddings_lr > 0)
    mlp = list(decoder.parameters())
    code_opt = torch.optim.Adam([w], lr=config.code_lr)
    groups: list[dict[str, Any]] = [{"params": mlp, "lr": config.decoder_lr}]
    if config.embeddings_lr > 0:
        groups.append({"params": [emb], "lr": config.embeddings_lr})
    mlp_opt = torch.optim.Adam(groups)
    gt, wt = image[None, None], None if weights is None else weights[None, None]  # [1, 1, H, W, ...]
    # the camera's pose: a rotation (axis-angle, applied in the camera's frame) and a shift of the given one
    d_rot = torch.zeros(3, device=dev, requires_grad=config.pose_rotation_lr > 0)
    d_shift = torch.zeros(3, device=dev, requires_grad=config.pose_translation_lr > 0)
    pose_opt = torch.optim.Adam([{"params": [d_rot], "lr": config.pose_rotation_lr},
                                 {"params": [d_shift], "lr": config.pose_translation_lr}])
    pose_params = [p for p in (d_rot, d_shift) if p.requires_grad]

    def current_camera() -> Cameras:
        if not pose_params:
            return camera
        V = camera.viewmats[0]
        R = rotvec_to_matrix(d_rot) @ V[:3, :3]
        top = torch.cat([R, (V[:3, 3] + d_shift)[:, None]], 1)
        return Cameras(torch.cat([top, V[3:]], 0)[None], camera.Ks, camera.width, camera.height)

    def current_head() -> Gaussians:
        with torch.no_grad():
            return apply_residuals(template, decoder(w, emb)).detach()

    losses = torch.full((config.steps,), float("nan"))
    psnrs = torch.full((config.steps,), float("nan"))
    with StepLoop(config.steps, desc="refining", progress=progress, callback=callback) as loop:
        for step in loop.steps(0, config.steps):
            do_code, do_mlp = config.optimises(step)
            w.requires_grad_(do_code)
            for p in mlp:
                p.requires_grad_(do_mlp)
            emb.requires_grad_(do_mlp and config.embeddings_lr > 0)
            step_loss = refine_loss(decoder, template, w, emb, image, current_camera(), dcfg, weights,
                                    config.code_prior_weight, code, backend_name)
            total = step_loss.loss
            code_opt.zero_grad(set_to_none=True)
            mlp_opt.zero_grad(set_to_none=True)
            pose_opt.zero_grad(set_to_none=True)
            total.backward()
            params = ([w] if do_code else []) + (mlp + ([emb] if emb.requires_grad else []) if do_mlp else [])
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            if do_code:
                code_opt.step()
            if do_mlp:
                mlp_opt.step()
            if pose_params:
                pose_opt.step()
            losses[step] = float(total.detach())
            with torch.no_grad():
                psnrs[step] = float(psnr(step_loss.colors.detach().clamp(0, 1)[None], gt, mask=wt).flatten()[0])
            loop.record(RefineStepInfo(step=step + 1, steps=config.steps, loss=float(losses[step]),
                                       psnr=float(psnrs[step]), head=current_head),
                        loss=float(losses[step]), psnr=float(psnrs[step]))
    seconds = loop.seconds
    for p in mlp:
        p.requires_grad_(False)
    head = current_head()
    with torch.no_grad():
        final_camera = Cameras(current_camera().viewmats.detach(), camera.Ks, camera.width, camera.height)
        final = render(head, final_camera, background=1.0, backend=backend_name, sh_degree=dcfg.sh_degree,
                       tile_size=dcfg.tile_size).colors.clamp(0, 1)
        final_psnr = float(psnr(final[None], gt, mask=wt).flatten()[0])
    return RefineResult(head=head, code=w.detach(), initial_code=code, decoder=decoder, embeddings=emb.detach(),
                        loss_history=losses, psnr_history=psnrs, final_psnr=final_psnr, config=config,
                        seconds=seconds, camera=final_camera)


def refine_views(avatars: DecoderResult, subject: MultiViewSubject, codes: Tensor, views: Sequence[int],
                 config: RefineConfig | None = None, backend: Backend = "auto",
                 progress: bool = True) -> tuple[Gaussians, Tensor]:
    """The paper's protocol for refinement: one refined head per input view of a subject.

    Each refinement sees only its input view's photo and camera (:func:`input_view`).

    Args:
        avatars: the trained decoder; subject: the (test) subject, on the decoder's device.
        codes: ``[V, latent_dim]`` the encoder's code of each input view; views: the ``V`` view indices.
        config: settings (default :class:`RefineConfig`).
        progress: one bar over the views.

    Returns:
        ``(heads [V, K], seconds [V])``: the refined heads (score them with
        :func:`fastavatar_nb.evaluation.novel_view_metrics`) and each refinement's time.
    """
    from ._live import progress_bar as tqdm

    config = (config or RefineConfig()).validate()
    views = list(views)
    if codes.ndim != 2 or codes.shape[0] != len(views):
        raise ValueError(f"refine_views: need codes [V, latent_dim] for V={len(views)} views, got "
                         f"{tuple(codes.shape)}")
    heads, seconds = [], []
    for j, v in enumerate(tqdm(views, desc=f"refining {subject.subject_id}", disable=not progress, unit="view",
                               mininterval=0.5)):
        image, cam = input_view(subject, v)
        r = refine(avatars, codes[j], image, cam, None, config, backend, progress=False)
        heads.append(r.head)
        seconds.append(r.seconds)
    return Gaussians.stack(heads), torch.tensor(seconds)
