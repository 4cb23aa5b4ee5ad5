"""The compiled CPU backend (numba) against the torch reference: images and every gradient, edge cases,
finite differences (``test_render.py``, both backends), and its refusals and fallbacks.

Tolerances: in float64 the two backends agree to float rounding (``PARITY_RTOL`` = 1e-5 relative is
the issue's bar; they agree far closer); in float32 their sums run in different orders, so images and
gradients are compared with ``FLOAT32_RTOL`` relative to the largest value.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from scenes import head_scene
from scenes import random_scene as _random_scene

from fastavatar_nb.cameras import Cameras, intrinsics
from fastavatar_nb.gaussians import Gaussians, rgb_to_sh0
from fastavatar_nb.render import RenderMemoryError, render, resolve_backend
from fastavatar_nb.render import numba_rasterizer as nr

pytestmark = pytest.mark.skipif(not nr.numba_status()[0], reason=f"numba backend unavailable: {nr.numba_status()[1]}")

PARITY_RTOL = 1e-5
FLOAT32_RTOL = 2e-4


def camera(W=32, H=24, f=40.0, dtype=torch.float64, yaw_deg=0.0) -> Cameras:
    """A pinhole camera at the origin looking along +z, optionally turned about y."""
    view = torch.eye(4, dtype=dtype)
    a = math.radians(yaw_deg)
    view[:3, :3] = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=dtype)
    return Cameras(view[None], intrinsics(f, f, W / 2, H / 2)[None].to(dtype), W, H)


def scene(K, seed=0, dtype=torch.float64, spread=0.3, depth=2.0, scale=(0.02, 0.08)) -> Gaussians:
    """:func:`scenes.random_scene` with opacities up to 0.95 (logits -1 to 3): opaque stacks reach the stop."""
    return _random_scene(K, seed, dtype, spread, depth, scale, opacity_logits=(-1.0, 3.0))


def both(g: Gaussians, cams: Cameras, background=1.0, sh_degree=3, seed=1, **kw):
    """Render with each backend and backpropagate one random cotangent through colours, alphas and depths.

    Returns ``{backend: (RenderOutput, {parameter name: gradient})}``."""
    results = {}
    for backend in ("torch", "numba"):
        p = g.clone().requires_grad_()
        out = render(p, cams, background=background, backend=backend, sh_degree=sh_degree, **kw)
        assert out.backend == backend
        gen = torch.Generator().manual_seed(seed)
        w = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (out.colors, out.alphas, out.depths)]
        loss = sum((t * wi).sum() for t, wi in zip((out.colors, out.alphas, out.depths), w, strict=True))
        loss.backward()
        results[backend] = (out, {k: v.grad for k, v in p.parameters().items()})
    return results


def assert_parity(results, rtol=PARITY_RTOL):
    (ref, ref_grads), (out, grads) = results["torch"], results["numba"]
    for name in ("colors", "alphas", "depths"):
        a, b = getattr(ref, name), getattr(out, name)
        assert a.shape == b.shape, name
        scale = max(float(a.detach().abs().max()), 1e-12)
        assert float((a - b).abs().max()) <= rtol * scale, f"{name}: {float((a - b).abs().max())} vs {scale}"
    for name, a in ref_grads.items():
        b = grads[name]
        if a is None or b is None:  # nothing drawn: a backend may leave a parameter out of the graph
            a, b = (torch.zeros(0) if t is None else t for t in (a, b))
            assert a.abs().sum() == 0 and b.abs().sum() == 0, name
            continue
        assert torch.isfinite(b).all(), name
        scale = max(float(a.abs().max()), 1e-12)
        assert float((a - b).abs().max()) <= rtol * scale, f"d/d{name}: {float((a - b).abs().max())} vs {scale}"


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
def test_images_and_every_gradient_match_the_torch_backend(sh_degree):
    g = scene(300, seed=sh_degree, spread=0.6)
    cams = Cameras.cat([camera(W=64, H=48, f=70.0), camera(W=64, H=48, f=60.0, yaw_deg=8.0)])
    res = both(g, cams, sh_degree=sh_degree)
    assert res["numba"][0].alphas.max() > 0.5  # something was drawn
    assert_parity(res)


def test_float32_matches_the_torch_backend():
    g = scene(400, seed=11, spread=0.6, dtype=torch.float32)
    res = both(g, camera(W=70, H=50, f=60.0, dtype=torch.float32))
    assert res["numba"][0].colors.dtype == torch.float32
    assert_parity(res, rtol=FLOAT32_RTOL)


@pytest.mark.parametrize("size", [(17, 13), (33, 31), (16, 32)])
@pytest.mark.parametrize("tile_size", [4, 16, None])
def test_image_sizes_off_the_tile_grid(size, tile_size):
    g = scene(120, seed=2, spread=0.5)
    W, H = size
    assert_parity(both(g, camera(W=W, H=H, f=30.0), tile_size=tile_size))


def test_batched_gaussians_and_cameras():
    gs = Gaussians.stack([scene(80, seed=s) for s in range(3)])
    cams = Cameras.cat([camera(), camera(f=50.0, yaw_deg=-5.0)])
    res = both(gs, cams)
    assert res["numba"][0].colors.shape == (3, 2, 24, 32, 3)
    assert_parity(res)
    # per-subject cameras [S, C]
    per = Cameras(cams.viewmats[None].expand(3, -1, -1, -1), cams.Ks[None].expand(3, -1, -1, -1), 32, 24)
    assert_parity(both(gs, per))


@pytest.mark.parametrize("background", [None, 0.25, (1.0, 0.5, 0.0), "per-camera"])
def test_every_background_form(background):
    cams = Cameras.cat([camera(), camera(f=50.0)])
    if background == "per-camera":
        background = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert_parity(both(scene(60, seed=4), cams, background=background))


def test_behind_the_camera_off_screen_tiny_and_huge():
    g = scene(60, seed=5, spread=0.4)
    g.means[:10, 2] *= -1  # behind the camera
    g.means[10:20, 0] += 5.0  # far off-screen to the right
    g.means[20:25, 2] = 0.005  # in front of the camera, inside the near plane
    g.log_scales[25:35] = math.log(1e-5)  # far below a pixel
    g.log_scales[35:40] = math.log(2.0)  # covers the whole image many times over
    g.opacity_logits[35:40] = -3.0
    res = both(g, camera())
    assert_parity(res)
    for name in ("means", "sh"):  # the culled ones got nothing, in both backends
        assert res["numba"][1][name][:10].abs().max() == 0


def test_everything_behind_the_camera_and_no_gaussians():
    g = scene(20, seed=6)
    g.means[:, 2] *= -1
    res = both(g, camera(), background=(1.0, 0.5, 0.0))
    assert res["numba"][0].alphas.abs().max() == 0
    assert_parity(res)
    empty = scene(5).select(torch.zeros(5, dtype=torch.bool)).clone().requires_grad_()
    out = render(empty, camera(), background=torch.tensor([1.0, 0.5, 0.0]), backend="numba")
    assert out.colors.shape == (1, 24, 32, 3) and out.alphas.abs().max() == 0
    torch.testing.assert_close(out.colors[0], torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64).expand(24, 32, 3))
    out.colors.sum().backward()  # runs, with zero gradients
    assert empty.means.grad is not None and empty.means.grad.numel() == 0


def test_opaque_stack_stops_where_the_reference_does():
    # many opaque Gaussians on top of each other: pixels end at the transmittance floor
    g = scene(40, seed=7, spread=0.02, scale=(0.1, 0.2))
    g.opacity_logits.fill_(4.0)
    res = both(g, camera())
    assert res["numba"][0].alphas.max() > 0.999
    assert_parity(res)


def test_camera_gradients_use_the_reference_projection():
    g = scene(80, seed=8)
    cams = camera(W=40, H=30)
    out = {}
    for backend in ("torch", "numba"):
        view = cams.viewmats.clone().requires_grad_()
        o = render(g, Cameras(view, cams.Ks, 40, 30), backend=backend)
        (o.colors * torch.linspace(0, 1, 3, dtype=torch.float64)).sum().backward()
        out[backend] = (o.colors.detach(), view.grad)
    torch.testing.assert_close(out["numba"][0], out["torch"][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out["numba"][1], out["torch"][1], rtol=PARITY_RTOL, atol=1e-12)
    assert out["numba"][1].abs().max() > 0


def test_single_gaussian_matches_the_analytic_image():
    sh = torch.zeros(1, 16, 3, dtype=torch.float64)
    sh[0, 0] = rgb_to_sh0(torch.tensor([0.2, 0.6, 1.0], dtype=torch.float64))
    s = 0.05
    g = Gaussians(torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64), torch.full((1, 3), math.log(s), dtype=torch.float64),
                  torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64), torch.logit(torch.tensor([0.7], dtype=torch.float64)),
                  sh)
    cam = camera(W=31, H=31, f=60.0)
    out = render(g, cam, background=None, backend="numba")
    sigma_px2 = (60.0 * s / 2.0) ** 2 + 0.3  # EWA at the centre + the low-pass
    ys, xs = torch.meshgrid(torch.arange(31.0) + 0.5, torch.arange(31.0) + 0.5, indexing="ij")
    r2 = (xs - 15.5) ** 2 + (ys - 15.5) ** 2
    alpha = (0.7 * torch.exp(-0.5 * r2 / sigma_px2)).double()
    alpha = torch.where(alpha >= 1 / 255, alpha, torch.zeros_like(alpha))
    # the analytic image takes J at the centre; off-centre pixels see J change by (x/z)^2 ~ 1e-3 relative
    torch.testing.assert_close(out.alphas[0], alpha, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ choice and refusals


def test_auto_picks_numba_on_the_cpu():
    assert resolve_backend("auto", "cpu") == "numba"
    assert render(scene(5), camera()).backend == "numba"


def test_auto_falls_back_to_torch_with_the_reason(monkeypatch, caplog):
    import fastavatar_nb.render as render_pkg

    monkeypatch.setattr(render_pkg, "numba_status", lambda: (False, "numba is not importable (test)"))
    monkeypatch.setattr(render_pkg, "_announced", set())
    with caplog.at_level(logging.INFO, logger="fastavatar_nb.render"):
        assert resolve_backend("auto", "cpu") == "torch"
    assert "numba unavailable: numba is not importable (test)" in caplog.text
    with pytest.raises(RuntimeError, match="backend='numba' is unavailable: numba is not importable.*backend='torch'"):
        resolve_backend("numba", "cpu")


def test_a_failed_compilation_is_reported_not_raised(monkeypatch):
    import fastavatar_nb.render._numba_kernels as kernels

    def broken():
        raise RuntimeError("LLVM said no")

    monkeypatch.setattr(nr, "_STATUS", None)
    monkeypatch.setattr(kernels, "warm_up", broken)
    ok, why = nr.numba_status()
    assert not ok and "could not compile the kernels (RuntimeError: LLVM said no)" in why
    monkeypatch.setattr(nr, "_STATUS", None)  # the next caller compiles again (monkeypatch restores warm_up)


def test_unsupported_inputs_name_the_case_and_the_torch_backend():
    g, cam = scene(5), camera()
    with pytest.raises(nr.NumbaBackendError, match="float32 or float64.*backend='torch'"):
        nr.rasterize_numba(*(t[None].half() for t in (g.means, g.quats, g.scales, g.opacities, g.sh, cam.viewmats,
                                                      cam.Ks)), 32, 24)
    with pytest.raises(nr.NumbaBackendError, match="sh is torch.float16 but means are torch.float64"):
        nr.rasterize_numba(g.means[None], g.quats[None], g.scales[None], g.opacities[None], g.sh[None].half(),
                           cam.viewmats[None], cam.Ks[None], 32, 24)
    with pytest.raises(nr.NumbaBackendError, match="SH degrees 0-3.*backend='torch'"):
        nr.rasterize_numba(g.means[None], g.quats[None], g.scales[None], g.opacities[None], g.sh[None],
                           cam.viewmats[None], cam.Ks[None], 32, 24, sh_degree=4)
    with pytest.raises(RuntimeError, match="renders on the CPU.*meta"):
        resolve_backend("numba", "meta")


def test_one_thread_where_torch_threads_spin(monkeypatch, caplog):
    monkeypatch.setattr(nr, "spin_limited", lambda: False)
    monkeypatch.setattr(nr, "_ONE_THREAD_SAID", False)
    torch.set_num_threads(2)
    with caplog.at_level(logging.INFO, logger="fastavatar_nb.render"):
        assert nr.compiled_threads() == 1
        assert nr.compiled_threads() == 1
    assert caplog.text.count("runs on 1 thread of 2") == 1 and "GOMP_SPINCOUNT=1000" in caplog.text
    monkeypatch.setattr(nr, "spin_limited", lambda: True)
    assert nr.compiled_threads() == 2
    # and the images do not depend on the threads
    g, cam = scene(200, seed=9, spread=0.6), camera(W=50, H=40)
    two = render(g, cam, backend="numba").colors
    torch.set_num_threads(1)
    torch.testing.assert_close(render(g, cam, backend="numba").colors, two, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("K,width,n_cams", [(2500, 69, 4), (300, 200, 2), (5000, 275, 1), (200, 16, 1)])
def test_memory_estimate_bounds_the_measured_peak(K, width, n_cams, grad, peak_tracker):
    """The estimate is at least the peak of live tensor bytes, and at most twice it (measured/estimate 0.58-0.76
    over 200-20,000 Gaussians, 16x23 to 550x802 pixels, 1-16 images, with and without gradients)."""
    g, cams = head_scene(K), Cameras.nersemble_rig(width=width)[:n_cams]
    if grad:
        g = g.clone().requires_grad_()
    with (torch.enable_grad() if grad else torch.no_grad()), peak_tracker() as m:
        out = render(g, cams, backend="numba", memory_budget_gb=100)
        if grad:
            (out.colors.sum() + out.alphas.sum()).backward()
    flat = [t[None] for t in (g.means, g.quats, g.scales, g.opacities)]
    with torch.no_grad():
        m2, _, _, _, radii = nr.project(*flat, cams.viewmats[None], cams.Ks[None], cams.width, cams.height)
        rects = nr.tile_rects(m2[0], radii[0], cams.width, cams.height, nr.NUMBA_TILE_SIZE)
    overlaps = int(((rects[..., 1] - rects[..., 0]) * (rects[..., 3] - rects[..., 2])).sum())
    est = nr.estimate_numba_memory(n_cams, K, cams.width, cams.height, overlaps, 4, grad)
    assert 0.5 * est <= m.peak <= est, (m.peak, est)


def test_groups_without_gradients_equal_one_pass_and_refuse_with_gradients():
    g, cams = head_scene(2000), Cameras.nersemble_rig(width=69)[:6]
    with torch.no_grad():
        full = render(g, cams, backend="numba", memory_budget_gb=100)
        budget = nr.estimate_numba_memory(6, 2000, cams.width, cams.height, 10 ** 5, 4, False) / 3 / 2 ** 30
        grouped = render(g, cams, backend="numba", memory_budget_gb=budget)
    torch.testing.assert_close(grouped.colors, full.colors, rtol=0, atol=0)
    torch.testing.assert_close(grouped.depths, full.depths, rtol=0, atol=0)
    with pytest.raises(RenderMemoryError, match="numba backend.*backward pass.*cameras\\[i:j\\]"):
        render(g.clone().requires_grad_(), cams, backend="numba", memory_budget_gb=budget)
