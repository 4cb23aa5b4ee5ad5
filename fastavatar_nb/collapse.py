"""The paper's section 3.3 finding, reproducible: encoder and decoder trained together collapse to one face.

FastAvatar trains in stages: an auto-decoder with a free code ``w_i`` per subject first (section 3.3), then
an encoder distilled onto those codes (section 3.4). The paper explains why: "training the encoder and
decoder simultaneously in an end-to-end fashion results in a degenerate mapping that always produces an
average, blurry face". :func:`train_end_to_end` is that end-to-end alternative, with the stages' own parts
and losses: each step encodes one input photo per subject (the encoder MLP on its FaceNet embedding), decodes
the code, renders other views and minimises the decoder's loss (:func:`fastavatar_nb.decoder.decoder_loss`,
Eq. 2-8), through the decoder *and* the encoder. :func:`likeness_psnr` measures the collapse: how alike the
heads of different subjects are (the PSNR between their renders; high means alike).

Notebook 04 runs it beside the staged recipe at the same number of decoder steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .cameras import Cameras
from .data.subject import MultiViewSubject, stack_subjects
from .decoder import AutoDecoder, DecoderConfig, apply_residuals, decoder_loss, positional_embedding
from .encoder import EncoderConfig, EncoderMLP
from .gaussians import Gaussians
from .objective import subject_ids, train_views
from .render import Backend, render, resolve_backend

__all__ = ["EndToEndResult", "train_end_to_end", "likeness_psnr", "image_likeness_psnr"]


@dataclass
class EndToEndResult:
    """What :func:`train_end_to_end` trained.

    Attributes:
        decoder, embeddings: the decoder MLP (eval mode) and the embeddings ``e_k`` ``[K, embed_dim]``.
        encoder: the encoder MLP (eval mode): ``encoder(embeddings [B, 512]) -> w [B, latent_dim]``.
        template: the template the residuals apply to.
        loss_history, psnr_history: ``[steps]`` the loss and the mean PSNR of each step's renders.
        seconds: training time.
    """

    decoder: AutoDecoder
    embeddings: Tensor
    encoder: EncoderMLP
    template: Gaussians
    loss_history: Tensor
    psnr_history: Tensor
    seconds: float

    def decode(self, face_embeddings: Tensor) -> Gaussians:
        """Heads ``[B, K]`` of FaceNet embeddings ``[B, 512]``: encoder, then decoder (no gradient)."""
        with torch.no_grad():
            w = self.encoder(face_embeddings.to(self.embeddings.device))
            return apply_residuals(self.template, self.decoder(w, self.embeddings))


def train_end_to_end(subjects: Sequence[MultiViewSubject], template: Gaussians, face_embeddings: Tensor,
                     found: Tensor, steps: int, decoder_config: DecoderConfig | None = None,
                     encoder_config: EncoderConfig | None = None, subjects_per_step: int = 2,
                     backend: Backend = "auto", progress: bool = True) -> EndToEndResult:
    """Train the encoder MLP and the decoder together from images (the recipe the paper warns against).

    Each step draws ``subjects_per_step`` subjects (with replacement when there are fewer), one input view with
    a face for each (its FaceNet embedding goes through the encoder) and ``decoder_config.views_per_step`` of
    its training views (the held-out view never), and minimises :func:`~fastavatar_nb.decoder.decoder_loss` with
    one Adam over the decoder (``decoder_lr``), the embeddings ``e_k`` (``embeddings_lr``) and the encoder
    (``encoder_config.lr``), clipped at ``decoder_config.grad_clip``. No code is free: every ``w`` comes from the
    encoder. Seeded by ``decoder_config.seed``.

    Args:
        subjects: the training subjects (equal views, size and K, the template's K).
        template: ``[K]`` the template.
        face_embeddings, found: ``[N, C, 512]`` FaceNet embeddings of every view and ``[N, C]`` where a face was
            found (``pipeline.ensure_embeddings``).
        steps: optimiser steps.
        decoder_config, encoder_config: the stages' settings (architecture, learning rates, loss weights).
        subjects_per_step: subjects per step (>= 2: the encoder's BatchNorm needs two samples).
    """
    from ._live import progress_bar as tqdm

    dcfg = (decoder_config or DecoderConfig()).validate()
    ecfg = (encoder_config or EncoderConfig()).validate()
    ids = subject_ids(subjects, "train_end_to_end")
    n = len(ids)
    if n == 0:
        raise ValueError("train_end_to_end: no subjects given")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"train_end_to_end: steps must be a positive int, got {steps!r}")
    if subjects_per_step < 2:
        raise ValueError(f"train_end_to_end: subjects_per_step must be >= 2 (the encoder's BatchNorm), got "
                         f"{subjects_per_step}")
    views = subjects[0].num_views
    if face_embeddings.shape[:2] != (n, views) or found.shape != (n, views):
        raise ValueError(f"train_end_to_end: face_embeddings must be [{n}, {views}, 512] and found [{n}, {views}] "
                         f"for {n} subjects of {views} views, got {tuple(face_embeddings.shape)} and "
                         f"{tuple(found.shape)}")
    if ecfg.reads_photos:
        raise ValueError("train_end_to_end: the encoder here reads the face embedding only (photo_grid (0, 0), "
                         "the paper's g_MLP)")
    faceless = [ids[i] for i in range(n) if not bool(found[i].any())]
    if faceless:
        raise ValueError(f"train_end_to_end: no view of {faceless} has a face MTCNN found: no input photo")
    dev = template.device
    backend_name = resolve_backend(backend, dev)
    images, _, rig, _ = stack_subjects(subjects)                                      # [N, C, H, W, 3], [N, C]
    images, rig = images.to(dev), rig.to(dev)
    tv = torch.tensor(train_views(views, dcfg.holdout_view))

    torch.manual_seed(dcfg.seed)
    decoder = dcfg.make_decoder(dev)
    embeddings = positional_embedding(template.means, dcfg.embed_dim).requires_grad_(True)
    encoder = ecfg.make_model(dcfg.latent_dim, face_embeddings.shape[-1], dev)  # embedding only (checked above)
    opt = torch.optim.Adam([{"params": list(decoder.parameters()), "lr": dcfg.decoder_lr},
                            {"params": [embeddings], "lr": dcfg.embeddings_lr},
                            {"params": list(encoder.parameters()), "lr": ecfg.lr}])
    params = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(dcfg.seed)
    losses, psnrs = torch.empty(steps), torch.empty(steps)
    emb = face_embeddings.to(dev)
    decoder.train()
    encoder.train()
    t0 = time.perf_counter()
    for step in tqdm(range(steps), desc="training end to end", disable=not progress, unit="step", mininterval=0.5):
        s = (torch.randperm(n, generator=gen) if n >= subjects_per_step
             else torch.randint(n, (subjects_per_step,), generator=gen))[:subjects_per_step]
        v_in = torch.stack([found[i].nonzero()[torch.randint(int(found[i].sum()), (1,), generator=gen)][0, 0]
                            for i in s.tolist()])
        v = tv[torch.randperm(len(tv), generator=gen)[:dcfg.views_per_step]]
        s, v_in, v = s.to(dev), v_in.to(dev), v.to(dev)
        w = encoder(emb[s, v_in])                                                     # [B, latent_dim]
        cams = Cameras(rig.viewmats[s[:, None], v[None]], rig.Ks[s[:, None], v[None]], rig.width, rig.height)
        out = decoder_loss(decoder, template, w, embeddings, images[s[:, None], v[None]], cams, dcfg, backend_name)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if dcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, dcfg.grad_clip)
        opt.step()
        losses[step], psnrs[step] = float(out.loss.detach()), float(out.psnr.mean())
    decoder.eval()
    encoder.eval()
    return EndToEndResult(decoder=decoder, embeddings=embeddings.detach(), encoder=encoder, template=template,
                          loss_history=losses, psnr_history=psnrs, seconds=time.perf_counter() - t0)


@torch.no_grad()
def likeness_psnr(heads: Gaussians, camera: Cameras, backend: Backend = "auto") -> float:
    """How alike ``N >= 2`` heads ``[N, K]`` look: ``-10 log10`` of the mean squared difference between the
    renders (on white) of every pair of different heads at ``camera`` (one view). Alike heads score high
    (identical ones: ``inf``); distinct people's photos score low (the dataset's own pairs are the reference)."""
    if heads.batch_shape == () or heads.batch_shape[0] < 2 or len(heads.batch_shape) != 1:
        raise ValueError(f"likeness_psnr: need heads [N, K] with N >= 2, got batch shape {tuple(heads.batch_shape)}")
    images = render(heads, camera.to(heads.means.device), background=1.0, backend=backend).colors[:, 0].clamp(0, 1)
    return image_likeness_psnr(images)


def image_likeness_psnr(images: Tensor) -> float:
    """:func:`likeness_psnr` of images ``[N, H, W, 3]`` themselves (e.g. the subjects' photos at one camera)."""
    n = images.shape[0]
    if images.ndim != 4 or n < 2:
        raise ValueError(f"image_likeness_psnr: need images [N, H, W, 3] with N >= 2, got {tuple(images.shape)}")
    a, b = torch.triu_indices(n, n, 1)
    mse = float((images[a].double() - images[b].double()).square().mean())
    return math.inf if mse == 0 else -10 * math.log10(mse)
