"""Test scenes shared by the tests (imported by name like ``repo_scripts``; not in conftest.py, whose name
tests/browser/conftest.py shares): random Gaussians in front of a camera at the origin, Gaussians on a
head-sized ellipsoid, a known head rendered from the rig (:func:`rig_scene`) and a small random decoder
(:func:`small_decoder_result`)."""

from __future__ import annotations

import math

import torch

from fastavatar_nb.cameras import Cameras
from fastavatar_nb.data.subject import MultiViewSubject
from fastavatar_nb.decoder import DecoderConfig, DecoderResult, positional_embedding
from fastavatar_nb.gaussians import Gaussians, knn_spacing
from fastavatar_nb.render import render

RIG_W, RIG_H = 16, 24
"""Image size of :func:`rig_scene`'s 16 views."""


def random_scene(K, seed=0, dtype=torch.float64, spread=0.3, depth=2.0, scale=(0.02, 0.08),
                 opacity_logits=(-1.0, 2.0)) -> Gaussians:
    """K Gaussians in a ``spread``-wide cube ``depth`` metres in front of the origin, random rotations, sizes,
    opacities and SH (0.3 standard deviation)."""
    gen = torch.Generator().manual_seed(seed)
    means = (torch.rand(K, 3, generator=gen, dtype=dtype) - 0.5) * spread
    means[:, 2] += depth
    log_scales = torch.log(torch.empty(K, 3, dtype=dtype).uniform_(*scale, generator=gen))
    quats = torch.randn(K, 4, generator=gen, dtype=dtype)
    opac = torch.empty(K, dtype=dtype).uniform_(*opacity_logits, generator=gen)
    sh = torch.randn(K, 16, 3, generator=gen, dtype=dtype) * 0.3
    return Gaussians(means, log_scales, quats, opac, sh)


def head_scene(K, seed=0) -> Gaussians:
    """K Gaussians on a head-sized ellipsoid (0.16 x 0.22 x 0.19 m), flattened along its normal, random colours."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(K, 3, generator=gen), dim=-1)
    g = Gaussians.from_points(d * torch.tensor([0.08, 0.11, 0.095]), colors=torch.rand(K, 3, generator=gen), normals=d)
    g.sh[:, 1:] = torch.randn(K, 15, 3, generator=gen) * 0.05
    return g


def sphere_points(K: int, radius: float, seed: int) -> torch.Tensor:
    """Roughly uniform points on a sphere (Fibonacci lattice, randomly rotated per seed)."""
    i = torch.arange(K, dtype=torch.float64) + 0.5
    phi = torch.acos(1 - 2 * i / K)
    theta = math.pi * (1 + 5 ** 0.5) * i
    p = torch.stack([torch.cos(theta) * torch.sin(phi), torch.cos(phi), torch.sin(theta) * torch.sin(phi)], -1)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (p @ q.T * radius).float()


def rig_scene(seed: int, K: int = 200, cams: Cameras | None = None) -> tuple[MultiViewSubject, Gaussians]:
    """A known Gaussian 'head' rendered from the 16-camera rig: the subject and the ground truth."""
    g = torch.Generator().manual_seed(seed)
    pts = sphere_points(K, 0.1, seed)
    normals = pts / pts.norm(dim=-1, keepdim=True)
    # a smooth colour field (about one period across the head)
    colors = (0.5 + 0.4 * torch.sin(2.5 * pts / 0.1 + torch.rand(3, generator=g) * 6)).clamp(0, 1)
    truth = Gaussians.from_points(pts, colors, scale=knn_spacing(pts) * 0.9, opacity=0.95, normals=normals)
    cams = cams if cams is not None else Cameras.nersemble_rig(RIG_W, RIG_H)
    with torch.no_grad():
        out = render(truth, cams, background=1.0, backend="torch", tile_size=4)
    noisy = pts + 0.004 * torch.randn(pts.shape, generator=g)
    subject = MultiViewSubject(f"s{seed}", out.colors.clamp(0, 1).contiguous(), out.alphas.clamp(0, 1).contiguous(),
                               cams, noisy)
    return subject, truth


def small_decoder_result(latent_dim: int = 8) -> DecoderResult:
    """A small random decoder (non-zero heads, so codes matter) on a 150-Gaussian template."""
    _, truth = rig_scene(3, K=150)
    cfg = DecoderConfig(latent_dim=latent_dim, embed_dim=15, hidden_dim=32, depth=2, tile_size=4)
    torch.manual_seed(0)
    dec = cfg.make_decoder()
    for head in dec.heads.values():
        torch.nn.init.normal_(head[-1].weight, std=0.3)
    dec.eval()
    nan = torch.full((1,), float("nan"))
    return DecoderResult(decoder=dec, embeddings=positional_embedding(truth.means, 15), template=truth,
                         codes=torch.zeros(1, latent_dim), subject_ids=["s"], train_psnr=nan, train_ssim=nan,
                         heldout_psnr=nan, heldout_ssim=nan, heldout_psnr_head=nan, loss_history=nan,
                         psnr_history=nan, config=cfg)
