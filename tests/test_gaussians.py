"""Gaussians container and the standard 3DGS PLY layout."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastavatar_nb.gaussians import (
    GAUSSIAN_PLY_PROPERTIES,
    Gaussians,
    covariance,
    quat_from_z_to,
    quat_to_rotmat,
    read_points_ply,
    rgb_to_sh0,
    write_points_ply,
)
from fastavatar_nb.ply import PlyError, read_ply


def random_gaussians(K=50, seed=0, batch=()) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians(torch.randn(*batch, K, 3, generator=g), torch.randn(*batch, K, 3, generator=g) - 4,
                     torch.randn(*batch, K, 4, generator=g), torch.randn(*batch, K, generator=g),
                     torch.randn(*batch, K, 16, 3, generator=g))


def test_ply_round_trip_is_bit_exact(tmp_path: Path):
    g = random_gaussians(123)
    p = g.save_ply(tmp_path / "a.ply")
    back = Gaussians.load_ply(p)
    for name, t in g.parameters().items():
        assert torch.equal(getattr(back, name), t), name
    back.save_ply(tmp_path / "b.ply")
    assert (tmp_path / "a.ply").read_bytes() == (tmp_path / "b.ply").read_bytes()


def test_ply_layout_is_the_reference_3dgs_one(tmp_path: Path):
    g = random_gaussians(7)
    for band in range(1, 16):  # a recognisable value per (band, channel)
        for ch in range(3):
            g.sh[:, band, ch] = 100 * ch + band
    p = g.save_ply(tmp_path / "g.ply")
    header = p.read_bytes().split(b"end_header\n")[0].decode()
    assert "format binary_little_endian 1.0" in header
    props = [ln.split()[-1] for ln in header.splitlines() if ln.startswith("property")]
    assert props == GAUSSIAN_PLY_PROPERTIES and len(props) == 62
    assert all(ln.split()[1] == "float" for ln in header.splitlines() if ln.startswith("property"))
    v = read_ply(p)["vertex"].data
    rest = np.stack([v[f"f_rest_{i}"] for i in range(45)], -1)
    # channel-major: the 15 red coefficients first, then green, then blue
    np.testing.assert_array_equal(rest[0], np.concatenate([np.arange(1, 16) + 100 * ch for ch in range(3)]))
    np.testing.assert_array_equal(v["opacity"], g.opacity_logits.numpy())
    np.testing.assert_array_equal(v["scale_2"], g.log_scales[:, 2].numpy())
    np.testing.assert_array_equal(v["rot_0"], g.quats[:, 0].numpy())  # w first


def test_reads_files_written_by_gsplats_exporter(tmp_path: Path):
    exporter = pytest.importorskip("gsplat.exporter")
    g = random_gaussians(40, seed=1)
    exporter.export_splats(g.means, g.log_scales, g.quats, g.opacity_logits, g.sh[:, :1], g.sh[:, 1:],
                           format="ply", save_to=str(tmp_path / "gs.ply"))
    back = Gaussians.load_ply(tmp_path / "gs.ply")
    for name, t in g.parameters().items():
        torch.testing.assert_close(getattr(back, name), t, rtol=0, atol=0)


def test_lower_sh_degree_files_load_with_zero_high_bands(tmp_path: Path):
    exporter = pytest.importorskip("gsplat.exporter")
    g = random_gaussians(10, seed=2)
    exporter.export_splats(g.means, g.log_scales, g.quats, g.opacity_logits, g.sh[:, :1], g.sh[:, 1:4],
                           format="ply", save_to=str(tmp_path / "d1.ply"))
    back = Gaussians.load_ply(tmp_path / "d1.ply")
    torch.testing.assert_close(back.sh[:, :4], g.sh[:, :4])
    assert back.sh[:, 4:].abs().max() == 0


def test_corrupt_and_wrong_ply_files_raise_plyerror(tmp_path: Path):
    g = random_gaussians(20)
    p = g.save_ply(tmp_path / "g.ply")
    data = p.read_bytes()
    (tmp_path / "trunc.ply").write_bytes(data[: len(data) - 100])
    with pytest.raises(PlyError, match="truncated"):
        Gaussians.load_ply(tmp_path / "trunc.ply")
    (tmp_path / "junk.ply").write_bytes(b"\x89PNG\r\n garbage")
    with pytest.raises(PlyError, match="not a PLY"):
        Gaussians.load_ply(tmp_path / "junk.ply")
    (tmp_path / "hdr.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty float x\n")
    with pytest.raises(PlyError, match="end_header"):
        Gaussians.load_ply(tmp_path / "hdr.ply")
    write_points_ply(tmp_path / "pts.ply", torch.rand(5, 3))
    with pytest.raises(PlyError, match="not a 3DGS Gaussian PLY"):
        Gaussians.load_ply(tmp_path / "pts.ply")
    with pytest.raises(PlyError, match="no such file"):
        Gaussians.load_ply(tmp_path / "missing.ply")
    bad = g.clone()
    bad.means[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        bad.save_ply(tmp_path / "nan.ply")
    assert not (tmp_path / "nan.ply").exists()
    with pytest.raises(ValueError, match="writes one set"):
        random_gaussians(5, batch=(2,)).save_ply(tmp_path / "batched.ply")


def test_points_ply_ascii_round_trip(tmp_path: Path):
    pts = torch.rand(30, 3) - 0.5
    cols = torch.rand(30, 3)
    write_points_ply(tmp_path / "p.ply", pts, cols)
    assert (tmp_path / "p.ply").read_text().startswith("ply\nformat ascii 1.0")
    p2, c2, n2 = read_points_ply(tmp_path / "p.ply")
    torch.testing.assert_close(p2, pts, rtol=0, atol=1e-7)
    torch.testing.assert_close(c2, (cols * 255).round() / 255)
    assert n2 is None


def test_nersemble_points3d_reads(shared_dir):
    pts, cols, normals = read_points_ply(shared_dir / "data/nersemble_samples/306/points3d.ply")
    assert pts.shape == (10_144, 3)
    assert cols is None and normals is None  # the VHAP export stores zeros
    assert 0.05 < pts.norm(dim=-1).median() < 0.2  # a head in metres around the origin


def test_activations_and_covariance():
    g = random_gaussians(30, seed=3)
    torch.testing.assert_close(g.scales, g.log_scales.exp())
    torch.testing.assert_close(g.opacities, torch.sigmoid(g.opacity_logits))
    R = quat_to_rotmat(g.quats)
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3).expand(30, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(30), atol=1e-5, rtol=0)
    cov = covariance(g.quats, g.scales)
    torch.testing.assert_close(torch.linalg.eigvalsh(cov), (g.scales ** 2).sort(-1).values, atol=1e-9, rtol=1e-4)
    # 90 degrees about z maps x to y
    q = torch.tensor([math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)])
    torch.testing.assert_close(quat_to_rotmat(q) @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]), atol=1e-6, rtol=0)
    n = torch.nn.functional.normalize(torch.randn(100, 3), dim=-1)
    n[0] = torch.tensor([0, 0, -1.0])
    torch.testing.assert_close(quat_to_rotmat(quat_from_z_to(n))[..., 2], n, atol=1e-5, rtol=0)


def test_batching_indexing_and_stacking():
    a, b = random_gaussians(10, 1), random_gaussians(10, 2)
    s = Gaussians.stack([a, b])
    assert s.batch_shape == (2,) and s.num_gaussians == 10 and len(s) == 2
    assert torch.equal(s[1].sh, b.sh)
    assert s.select(torch.arange(3)).num_gaussians == 3 and s.select(torch.arange(3)).batch_shape == (2,)
    with pytest.raises(ValueError, match="equal K"):
        Gaussians.stack([a, random_gaussians(11)])
    with pytest.raises(IndexError):
        a[0]


def test_from_points_initialisation():
    pts = torch.rand(200, 3)
    cols = torch.rand(200, 3)
    g = Gaussians.from_points(pts, cols, opacity=0.3)
    torch.testing.assert_close(g.dc_colors, cols, atol=1e-6, rtol=0)
    torch.testing.assert_close(g.opacities, torch.full((200,), 0.3))
    torch.testing.assert_close(g.sh[:, 0], rgb_to_sh0(cols))
    # knn scale: a regular grid with spacing h gives scale h
    h = 0.01
    grid = torch.stack(torch.meshgrid(*(torch.arange(5.0) * h,) * 3, indexing="ij"), -1).reshape(-1, 3)
    g = Gaussians.from_points(grid)
    assert torch.allclose(g.scales.median(), torch.tensor(h), rtol=1e-4)


def test_bad_construction_is_refused_clearly(tmp_path: Path):
    pts = torch.rand(10, 3)
    for bad in (-0.01, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be positive and finite"):
            Gaussians.from_points(pts, scale=bad)
    with pytest.raises(ValueError, match="scale must be positive"):
        Gaussians.from_points(pts, scale=torch.full((10,), -1.0))
    with pytest.raises(ValueError, match="opacity must be in"):
        Gaussians.from_points(pts, scale=0.01, opacity=1.0)
    g = Gaussians.from_points(pts, scale=0.01)
    with pytest.raises(TypeError, match="floating-point"):
        Gaussians(g.means.long(), g.log_scales, g.quats, g.opacity_logits, g.sh)
    with pytest.raises(TypeError, match="means must be a torch.Tensor"):
        Gaussians(g.means.numpy(), g.log_scales, g.quats, g.opacity_logits, g.sh)
    with pytest.raises(TypeError, match="different dtypes"):
        Gaussians(g.means.double(), g.log_scales, g.quats, g.opacity_logits, g.sh).validate()
    # PLY: duplicate properties, a header missing a property the data has, a truncated ASCII row
    data = g.save_ply(tmp_path / "g.ply").read_bytes()
    (tmp_path / "dup.ply").write_bytes(data.replace(b"property float x\n", b"property float x\nproperty float x\n"))
    with pytest.raises(PlyError, match=r"dup\.ply.*declares property 'x' twice"):
        Gaussians.load_ply(tmp_path / "dup.ply")
    (tmp_path / "hdr.ply").write_bytes(data.replace(b"property float nz\n", b""))
    with pytest.raises(PlyError, match=r"hdr\.ply: 40 bytes follow"):
        Gaussians.load_ply(tmp_path / "hdr.ply")
    write_points_ply(tmp_path / "a.ply", pts)
    (tmp_path / "a.ply").write_bytes((tmp_path / "a.ply").read_bytes()[:-30])
    with pytest.raises(PlyError, match=r"a\.ply: element 'vertex' row 9 has"):
        read_points_ply(tmp_path / "a.ply")
