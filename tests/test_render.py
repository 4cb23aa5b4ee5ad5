"""The torch rasterizer against analytic images, a dense reference, finite differences and gsplat's torch code."""

from __future__ import annotations

import math

import pytest
import torch
from scenes import random_scene

from fastavatar_nb.cameras import Cameras, intrinsics
from fastavatar_nb.gaussians import Gaussians, covariance, rgb_to_sh0
from fastavatar_nb.render import render, resolve_backend
from fastavatar_nb.render.numba_rasterizer import numba_status
from fastavatar_nb.render.sh import eval_sh_bases, sh_to_color
from fastavatar_nb.render.torch_rasterizer import (
    ALPHA_MAX,
    ALPHA_MIN,
    TRANSMITTANCE_MIN,
    conics_from_covariances,
    perspective_projection,
    world_to_camera,
)


def identity_camera(W=32, H=24, f=40.0, dtype=torch.float64, cx=None, cy=None) -> Cameras:
    cx = W / 2 if cx is None else cx
    cy = H / 2 if cy is None else cy
    return Cameras(torch.eye(4, dtype=dtype)[None], intrinsics(f, f, cx, cy)[None].to(dtype), W, H)


def one_gaussian(mean, scale, opacity, rgb, dtype=torch.float64) -> Gaussians:
    sh = torch.zeros(1, 16, 3, dtype=dtype)
    sh[0, 0] = rgb_to_sh0(torch.tensor(rgb, dtype=dtype))
    return Gaussians(
        torch.tensor([mean], dtype=dtype), torch.full((1, 3), math.log(scale), dtype=dtype),
        torch.tensor([[1.0, 0, 0, 0]], dtype=dtype), torch.logit(torch.tensor([opacity], dtype=dtype)), sh,
    )


def dense_reference(g: Gaussians, cams: Cameras, background):
    """Every pixel against every Gaussian, sorted by depth, with gsplat's rules: no tiles."""
    B = 1
    means, quats, scales = g.means[None], g.quats[None], g.scales[None]
    covars = covariance(quats, scales)
    mc, cc = world_to_camera(means, covars, cams.viewmats[None])
    m2, c2 = perspective_projection(mc, cc, cams.Ks[None], cams.width, cams.height)
    conics, _, det = conics_from_covariances(c2)
    depth = mc[..., 2]
    campos = torch.linalg.inv(cams.viewmats)[:, :3, 3]
    colors = sh_to_color(g.sh[None, None].expand(B, len(cams), -1, -1, -1), means[:, None] - campos[None, :, None], 3)
    H, W = cams.height, cams.width
    ys, xs = torch.meshgrid(torch.arange(H, dtype=g.dtype) + 0.5, torch.arange(W, dtype=g.dtype) + 0.5, indexing="ij")
    out = []
    for c in range(len(cams)):
        order = torch.argsort(depth[0, c])
        img = torch.zeros(H, W, 3, dtype=g.dtype)
        T = torch.ones(H, W, dtype=g.dtype)
        done = torch.zeros(H, W, dtype=torch.bool)
        for k in order.tolist():
            if depth[0, c, k] <= 0.01 or det[0, c, k] <= 0:
                continue
            a, b, cc_ = conics[0, c, k]
            dx, dy = xs - m2[0, c, k, 0], ys - m2[0, c, k, 1]
            sigma = 0.5 * (a * dx * dx + cc_ * dy * dy) + b * dx * dy
            alpha = torch.clamp_max(g.opacities[k] * torch.exp(-sigma), ALPHA_MAX)
            use = (alpha >= ALPHA_MIN) & ~done
            nT = T * (1 - alpha)
            stop = use & (nT <= TRANSMITTANCE_MIN)
            done |= stop
            use &= ~stop
            img = img + torch.where(use[..., None], (alpha * T)[..., None] * colors[0, c, k], 0.0)
            T = torch.where(use, nT, T)
        out.append(img + T[..., None] * torch.as_tensor(background, dtype=g.dtype))
    return torch.stack(out)


# ---------------------------------------------------------------------------- analytic


def test_single_isotropic_gaussian_matches_analytic_image():
    f, z, s, o = 40.0, 2.0, 0.05, 0.8
    # mean on the optical axis (so J has no third column); the principal point is pixel (16, 12)'s centre
    cam = identity_camera(f=f, cx=16.5, cy=12.5)
    g = one_gaussian([0.0, 0.0, z], s, o, [0.9, 0.2, 0.1])
    out = render(g, cam, background=0.0, backend="torch")
    var = (f * s / z) ** 2 + 0.3  # EWA: (f s / z)^2 plus the 0.3 px low-pass
    ys, xs = torch.meshgrid(torch.arange(24, dtype=torch.float64) + 0.5, torch.arange(32, dtype=torch.float64) + 0.5,
                            indexing="ij")
    r2 = (xs - 16.5) ** 2 + (ys - 12.5) ** 2
    alpha = o * torch.exp(-0.5 * r2 / var)
    alpha = torch.where(alpha >= 1 / 255, alpha, torch.zeros_like(alpha))
    torch.testing.assert_close(out.alphas[0], alpha, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(out.colors[0], alpha[..., None] * torch.tensor([0.9, 0.2, 0.1], dtype=torch.float64),
                               atol=1e-10, rtol=1e-9)
    # expected depth is exactly z wherever anything is drawn
    assert torch.allclose(out.depths[0][alpha > 0], torch.tensor(z, dtype=torch.float64))
    assert (out.depths[0][alpha == 0] == 0).all()


def test_compositing_two_gaussians_and_background_is_exact():
    f = 40.0
    cam = identity_camera(f=f)
    c_front, c_back, bg = [0.9, 0.1, 0.2], [0.1, 0.8, 0.3], torch.tensor([0.3, 0.5, 1.0], dtype=torch.float64)
    front = one_gaussian([0.0125, 0.0125, 1.0], 0.02, 0.6, c_front)  # projects onto pixel (16, 12)'s centre
    back = one_gaussian([0.025, 0.025, 2.0], 0.05, 0.7, c_back)
    for order in ([front, back], [back, front]):  # storage order must not matter: depth decides
        g = Gaussians(*(torch.cat([getattr(x, n) for x in order]) for n in
                        ("means", "log_scales", "quats", "opacity_logits", "sh")))
        out = render(g, cam, background=bg, backend="torch")
        px = out.colors[0, 12, 16]
        want = (0.6 * torch.tensor(c_front, dtype=torch.float64)
                + 0.7 * (1 - 0.6) * torch.tensor(c_back, dtype=torch.float64)
                + (1 - 0.6) * (1 - 0.7) * bg)
        torch.testing.assert_close(px, want, atol=1e-12, rtol=0)
        torch.testing.assert_close(out.alphas[0, 12, 16], torch.tensor(1 - 0.4 * 0.3, dtype=torch.float64))
        torch.testing.assert_close(out.depths[0, 12, 16], torch.tensor((0.6 * 1.0 + 0.28 * 2.0) / 0.88, dtype=torch.float64))


def test_opaque_stack_stops_at_transmittance_floor():
    cam = identity_camera(cx=16.5, cy=12.5)
    layers = [one_gaussian([0.0, 0.0, 1.0 + 0.1 * i], 0.05, 0.995, [1.0, 0, 0] if i < 2 else [0, 1.0, 0])
              for i in range(4)]
    g = Gaussians(*(torch.cat([getattr(x, n) for x in layers]) for n in
                    ("means", "log_scales", "quats", "opacity_logits", "sh")))
    px = render(g, cam, background=0.0, backend="torch").colors[0, 12, 16]
    # after two layers of alpha 0.995, T = 2.5e-5 < 1e-4: the second layer would cross the floor and is
    # excluded (gsplat's rule), and so is everything behind it: only the first layer counts
    torch.testing.assert_close(px, torch.tensor([0.995, 0.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------- reference


@pytest.mark.parametrize("tile_size", [4, 8, 16])
def test_tiled_renderer_equals_dense_reference(tile_size):
    g = random_scene(40, seed=1)
    cams = Cameras.cat([identity_camera(W=37, H=29, f=60.0),
                        Cameras(torch.tensor([[[0.9950, 0, -0.0998, 0.2], [0, 1, 0, 0.05], [0.0998, 0, 0.9950, 0.1],
                                               [0, 0, 0, 1]]], dtype=torch.float64),
                                intrinsics(55.0, 58.0, 17.0, 15.0)[None].double(), 37, 29)])
    out = render(g, cams, background=torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64), backend="torch", tile_size=tile_size)
    ref = dense_reference(g, cams, [0.2, 0.4, 0.6])
    torch.testing.assert_close(out.colors, ref, atol=1e-10, rtol=0)


def test_projection_and_sh_match_gsplat_torch_reference():
    T = pytest.importorskip("gsplat.cuda._torch_impl")
    g = random_scene(50, seed=2)
    cams = Cameras.nersemble_rig(width=110).to(torch.float64)
    cams = Cameras(cams.viewmats, cams.Ks, cams.width, cams.height)
    g.means[:, 2] -= 2.0  # around the origin, where the rig looks
    covars = covariance(g.quats, g.scales)
    radii_ref, m2_ref, depth_ref, con_ref, _ = T._fully_fused_projection(
        g.means, covars, cams.viewmats, cams.Ks, cams.width, cams.height)
    mc, cc = world_to_camera(g.means[None], covars[None], cams.viewmats[None])
    m2, c2 = perspective_projection(mc, cc, cams.Ks[None], cams.width, cams.height)
    con, _, _ = conics_from_covariances(c2)
    torch.testing.assert_close(m2[0], m2_ref)
    torch.testing.assert_close(con[0], con_ref)
    torch.testing.assert_close(mc[0, ..., 2], depth_ref)
    dirs = torch.randn(200, 3, dtype=torch.float64)
    coeffs = torch.randn(200, 16, 3, dtype=torch.float64)
    for deg in range(4):
        ref = T._spherical_harmonics(deg, dirs, coeffs)
        torch.testing.assert_close(sh_to_color(coeffs, dirs, deg), (ref + 0.5).clamp_min(0))
    assert eval_sh_bases(torch.nn.functional.normalize(dirs, dim=-1), 0)[:, 1:].abs().max() == 0


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=pytest.mark.skipif(
    not numba_status()[0], reason="numba backend unavailable"))])
def test_gradients_match_finite_differences(backend):
    g = random_scene(6, seed=3, spread=0.25, scale=(0.04, 0.08))
    g.opacity_logits.uniform_(-0.5, 0.5)
    cam = identity_camera(W=18, H=14, f=30.0)
    weights = torch.randn(1, 14, 18, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss(means, log_scales, quats, opacity_logits, sh):
        out = render(Gaussians(means, log_scales, quats, opacity_logits, sh), cam, background=0.3, backend=backend)
        return (out.colors * weights).sum() + 0.5 * out.alphas.sum() + 0.1 * out.depths.sum()

    params = [t.clone().requires_grad_() for t in g.parameters().values()]
    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- batching & API


def test_batch_of_subjects_equals_each_alone():
    gs = [random_scene(30, seed=s) for s in range(3)]
    batch = Gaussians.stack(gs)
    cams = Cameras.cat([identity_camera(), identity_camera(f=50.0)])
    out = render(batch, cams, backend="torch")
    assert out.colors.shape == (3, 2, 24, 32, 3)
    for i, g in enumerate(gs):
        one = render(g, cams, backend="torch")
        torch.testing.assert_close(out.colors[i], one.colors, atol=1e-12, rtol=0)
        torch.testing.assert_close(out.depths[i], one.depths, atol=1e-12, rtol=0)
    # per-subject cameras [S, C]
    per = Cameras(cams.viewmats[None].expand(3, -1, -1, -1), cams.Ks[None].expand(3, -1, -1, -1), 32, 24)
    torch.testing.assert_close(render(batch, per, backend="torch").colors, out.colors)


def test_float32_matches_float64():
    g = random_scene(200, seed=4, spread=0.5)
    cam = identity_camera(W=64, H=48, f=80.0)
    o64 = render(g, cam, backend="torch")
    o32 = render(g.to(torch.float32), cam.to(torch.float32), backend="torch")
    assert (o32.colors.double() - o64.colors).abs().max() < 1e-4


def test_scene_behind_camera_gives_empty_image():
    g = random_scene(20, seed=5)
    g.means[:, 2] *= -1  # everything behind the camera
    out = render(g, identity_camera(), background=torch.tensor([1.0, 0.5, 0.0]), backend="torch")
    assert out.alphas.abs().max() == 0
    torch.testing.assert_close(out.colors[0], torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64).expand(24, 32, 3))


def test_bad_inputs_raise_clear_errors():
    g = random_scene(5)
    cam = identity_camera()
    with pytest.raises(ValueError, match="unknown render backend"):
        render(g, cam, backend="opengl")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        resolve_backend("gsplat", "cpu")
    bad = g.clone()
    bad.means[2, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        render(bad, cam)
    bad = g.clone()
    bad.quats[1] = 0
    with pytest.raises(ValueError, match="zero norm"):
        render(bad, cam)
    with pytest.raises(ValueError, match="must have shape"):
        Gaussians(g.means, g.log_scales[:, :2], g.quats, g.opacity_logits, g.sh)
    with pytest.raises(ValueError, match="cannot be rendered"):
        render(Gaussians.stack([g, g]), Cameras(cam.viewmats[None].expand(3, -1, -1, -1),
                                                cam.Ks[None].expand(3, -1, -1, -1), 32, 24))
    with pytest.raises(ValueError, match="background"):
        render(g, cam, background=torch.zeros(4))
    with pytest.raises(ValueError, match="focal"):
        render(g, Cameras(cam.viewmats, cam.Ks * 0, 32, 24))


# ---------------------------------------------------------------------------- GPU parity


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scene", ["random", "head"])
def test_gsplat_and_torch_backends_agree(scene):
    from fastavatar_nb.render.gsplat_backend import gsplat_status

    ok, why = gsplat_status()
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    K = 10_000
    if scene == "random":
        g = random_scene(K, seed=6, dtype=torch.float32, spread=0.4, depth=0.0, scale=(0.002, 0.01))
    else:
        d = torch.nn.functional.normalize(torch.randn(K, 3), dim=-1)
        g = Gaussians.from_points(d * torch.tensor([0.08, 0.11, 0.095]), colors=torch.rand(K, 3), normals=d)
        g.sh[:, 1:] = torch.randn(K, 15, 3) * 0.05
    cams = Cameras.nersemble_rig(width=138)
    g, cams = g.to("cuda"), cams.to("cuda")
    outs, grads = {}, {}
    w = torch.rand(16, cams.height, cams.width, 3, device="cuda")
    for backend in ("torch", "gsplat"):
        p = g.clone().requires_grad_()
        o = render(p, cams, backend=backend)
        ((o.colors * w).sum() + o.alphas.sum()).backward()
        outs[backend], grads[backend] = o, {k: v.grad for k, v in p.parameters().items()}
    assert (outs["torch"].colors - outs["gsplat"].colors).abs().mean() < 1e-3
    assert (outs["torch"].alphas - outs["gsplat"].alphas).abs().mean() < 1e-3
    for k in grads["torch"]:
        a, b = grads["torch"][k], grads["gsplat"][k]
        assert (a - b).abs().mean() < 1e-3 * max(1.0, b.abs().mean().item()), k


def test_automatic_tile_size_changes_speed_not_the_image():
    from fastavatar_nb.render.torch_rasterizer import auto_tile_size

    g = random_scene(300, seed=7, spread=0.6)
    cam = identity_camera(W=70, H=50, f=60.0)
    auto = render(g, cam, backend="torch")
    for ts in (4, 16):
        torch.testing.assert_close(render(g, cam, backend="torch", tile_size=ts).colors, auto.colors,
                                   atol=1e-12, rtol=0)
    # tiny Gaussians -> small tiles; huge Gaussians -> large tiles
    m = torch.zeros(10, 2)
    assert auto_tile_size(m, torch.full((10, 2), 1)) == 4
    assert auto_tile_size(m + 100, torch.full((10, 2), 200)) == 16
    assert auto_tile_size(m, torch.zeros(10, 2, dtype=torch.long)) == 16  # nothing visible


def test_bad_dtypes_devices_and_empty_gaussians():
    from fastavatar_nb.render import RenderDtypeError

    g, cam = random_scene(5, dtype=torch.float32), identity_camera(dtype=torch.float32)
    for dt in (torch.float16, torch.bfloat16):
        with pytest.raises(RenderDtypeError, match=rf"{str(dt)[6:]}.*gaussians.to\(torch.float32\)"):
            render(g.to(dt), cam, backend="torch")
    assert issubclass(RenderDtypeError, TypeError)
    with pytest.raises(ValueError, match="focal.*camera"):
        render(g, Cameras(cam.viewmats, cam.Ks * torch.tensor([-1.0, 1, 1])[:, None], 32, 24))
    # no Gaussians: the background, with gradients that flow (zeros)
    empty = g.select(torch.zeros(5, dtype=torch.bool)).clone().requires_grad_()
    out = render(empty, cam, background=torch.tensor([1.0, 0.5, 0.0]), backend="torch")
    assert out.colors.shape == (1, 24, 32, 3) and out.alphas.abs().max() == 0
    torch.testing.assert_close(out.colors[0], torch.tensor([1.0, 0.5, 0.0]).expand(24, 32, 3))
    out.colors.sum().backward()
    # validate=False skips the value pass (for training loops), the cheap checks stay
    bad = g.clone()
    bad.means[0, 0] = float("nan")
    render(bad, cam, backend="torch", validate=False)
    with pytest.raises(ValueError, match="non-finite"):
        render(bad, cam, backend="torch")
