"""Test scenes shared by the renderer tests (imported like ``repo_scripts``): random Gaussians in front of a
camera at the origin, and Gaussians on a head-sized ellipsoid."""

from __future__ import annotations

import torch

from fastavatar_nb.gaussians import Gaussians


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
