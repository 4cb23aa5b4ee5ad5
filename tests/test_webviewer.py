"""The browser viewer's kernel side (fastavatar_nb.webviewer, fastavatar_nb.explorer), without a browser.

What the browser draws from these bytes is checked in tests/browser/test_webgl_viewer.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from fastavatar_nb.editing import AttributeDirection, edit, interpolate
from fastavatar_nb.gaussians import SH_C0, Gaussians
from fastavatar_nb.viewers import OrbitViewer, orbit_framing
from fastavatar_nb.webviewer import (
    ASSET,
    BYTES_PER_GAUSSIAN,
    FALLBACK_NOTE,
    HeadViewer,
    pack_head,
    viewer_state,
    write_html,
)

REPO = ASSET.parents[2]


def head(K: int = 40, seed: int = 0, shift: float = 0.0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=torch.randn(K, 3, generator=g) * 0.05 + shift,
        log_scales=torch.randn(K, 3, generator=g) * 0.3 - 5.0,
        quats=torch.randn(K, 4, generator=g) * 3.0,  # not normalised: pack_head normalises
        opacity_logits=torch.randn(K, generator=g) * 2.0,
        sh=torch.randn(K, 16, 3, generator=g),
    )


def unpack(buf: bytes) -> dict[str, np.ndarray]:
    """The layout js/src/splat_viewer.js reads (unpackHead), written again in numpy."""
    K = len(buf) // BYTES_PER_GAUSSIAN
    f = np.frombuffer(buf, dtype="<f4", count=10 * K)
    return {"means": f[:3 * K].reshape(K, 3), "scales": f[3 * K:6 * K].reshape(K, 3),
            "quats": f[6 * K:10 * K].reshape(K, 4),
            "rgba": np.frombuffer(buf, dtype=np.uint8, offset=40 * K).reshape(K, 4)}


# ----------------------------------------------------------------------------- pack_head
def test_pack_head_layout_round_trips_the_activated_parameters() -> None:
    g = head()
    buf = pack_head(g)
    assert len(buf) == 40 * BYTES_PER_GAUSSIAN
    u = unpack(buf)
    np.testing.assert_array_equal(u["means"], g.means.numpy())
    np.testing.assert_allclose(u["scales"], torch.exp(g.log_scales).numpy(), rtol=1e-6)
    q = g.quats / g.quats.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(u["quats"], q.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(u["quats"], axis=-1), 1.0, rtol=1e-6)
    # colour: SH degree 0 only, 0.5 + SH_C0 * DC clamped to [0, 1], and the sigmoid opacity, to 1/255
    rgb = (0.5 + SH_C0 * g.sh[:, 0]).clamp(0, 1).numpy()
    alpha = torch.sigmoid(g.opacity_logits).numpy()
    np.testing.assert_allclose(u["rgba"][:, :3] / 255, rgb, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(u["rgba"][:, 3] / 255, alpha, atol=0.5 / 255 + 1e-6)
    assert (u["rgba"][:, :3] == 0).any() and (u["rgba"][:, :3] == 255).any(), "random SH must hit both clamps"


def test_pack_head_ignores_higher_sh_bands_and_gradients() -> None:
    g = head()
    other = Gaussians(g.means, g.log_scales, g.quats, g.opacity_logits, g.sh.clone())
    other.sh[:, 1:] += 5.0  # view-dependent bands: the browser draws degree 0
    assert pack_head(g) == pack_head(other)
    assert pack_head(g.clone().requires_grad_()) == pack_head(g)


@pytest.mark.parametrize("bad, message", [
    (lambda: "not gaussians", "shows Gaussians, got str"),
    (lambda: Gaussians.stack([head(), head(seed=1)]), r"batch_shape \(2,\).*index it first"),
    (lambda: head(K=0), "K = 0"),
    (lambda: Gaussians(*[t if i else t.clone().fill_(float("nan")) for i, t in enumerate(head().parameters().values())]),
     "means has 120 non-finite"),
])
def test_pack_head_refuses_bad_input(bad, message) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        pack_head(bad())


# ----------------------------------------------------------------------------- viewer_state
def test_viewer_state_frames_like_the_orbit_viewer() -> None:
    g = head()
    st = viewer_state(g, fov_y_deg=20.0)
    target, distance = orbit_framing(g, 20.0)
    assert st["target"] == list(target) and st["distance"] == distance
    orbit = OrbitViewer(g, 16, 16, backend="torch", fov_y_deg=20.0)
    assert tuple(orbit.target) == target and orbit.distance.value == pytest.approx(distance)
    # several heads: the first one frames the shared camera; titles from a mapping
    st = viewer_state({"a": g, "b": head(seed=2, shift=1.0)})
    assert st["titles"] == ["a", "b"] and st["target"] == list(target) and len(st["heads"]) == 2
    # a batch shows each set
    assert len(viewer_state(Gaussians.stack([g, g, g]))["heads"]) == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"width": 4}, "at least 8x8"),
    ({"fov_y_deg": 0.0}, "fov_y_deg must be in"),
    ({"distance": -1.0}, "distance must be positive"),
    ({"background": (1.0, 0.5)}, "background must be one value or three"),
    ({"background": 2.0}, "background must be one value or three"),
    ({"titles": ["one", "two"]}, "2 titles for 1 heads"),
])
def test_viewer_state_refuses_bad_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        viewer_state(head(), **kwargs)


def test_viewer_state_refuses_titles_twice_and_no_heads() -> None:
    with pytest.raises(ValueError, match="not both"):
        viewer_state({"a": head()}, titles=["b"])
    with pytest.raises(ValueError, match="at least one head"):
        viewer_state([])


# ----------------------------------------------------------------------------- pages
def _page_state(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="fa-splat-state">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_html_page_is_self_contained_and_carries_the_heads(tmp_path) -> None:
    g, title = head(), 'Ann </script><b>"x"</b>'
    path = write_html(tmp_path / "v.html", {title: g}, title=title, info={"K": 40}, images={"photo": np.zeros((4, 4, 3))})
    page = path.read_text()
    state = _page_state(page)
    import base64
    assert base64.b64decode(state["heads_b64"][0]) == pack_head(g)
    assert state["titles"] == [title]
    # one </script> per script element: the title and the data cannot close them early
    assert page.count("</script>") == 3
    assert "&lt;/script&gt;" in page  # the title in <title>/<h2> is escaped
    # nothing is loaded from elsewhere: no src/href to another file or host
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "import(" in page and ASSET.read_text()[:200] in page
    assert "<th>K</th><td>40</td>" in page and "data:image/png;base64," in page


def test_write_html_asks_before_overwriting(tmp_path) -> None:
    path = write_html(tmp_path / "head.html", head())
    before = path.read_text()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_html(path, head(seed=3))
    assert path.read_text() == before
    write_html(path, head(seed=3), overwrite=True)
    assert path.read_text() != before
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_html(tmp_path, head())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_html(tmp_path / "missing" / "head.html", head())


def test_bundle_names_the_locked_gsplat_version() -> None:
    text = ASSET.read_text()
    lock = json.loads((REPO / "js" / "package-lock.json").read_text())
    version = lock["packages"]["node_modules/gsplat"]["version"]
    assert f"gsplat.js {version}" in text.splitlines()[1], "rebuild the bundle with `make js`"
    assert "MIT License" in text[:2000] and "</script" not in text.lower()
    # the file: and blob: worker fix of build.mjs is in the bundle (see js/build.mjs)
    assert text.count('self.origin==="null"') == 2


# ----------------------------------------------------------------------------- HeadViewer
def test_head_viewer_set_head_and_view_update_the_widget() -> None:
    a, b = head(), head(seed=5)
    v = HeadViewer({"feed-forward": a, "truth": b}, width=64, height=80, yaw_deg=10.0)
    w = v.widget
    assert w.titles == ["feed-forward", "truth"] and (w.width, w.height, w.yaw) == (64, 80, 10.0)
    assert w.heads == [pack_head(a), pack_head(b)]
    assert w._esm == ASSET.read_text()
    c = head(seed=6)
    v.set_head(1, c, title="refined")
    assert w.heads == [pack_head(a), pack_head(c)] and w.titles == ["feed-forward", "refined"]
    assert v.heads[1] is not c and torch.equal(v.heads[1].means, c.means)
    with pytest.raises(IndexError, match="has 2 panel"):
        v.set_head(2, c)
    v.set_view(yaw=45.0, distance=2.0)
    assert (w.yaw, w.pitch, w.distance) == (45.0, 0.0, 2.0)
    with pytest.raises(ValueError, match="positive"):
        v.set_view(distance=0.0)
    st = v.state()
    assert st["yaw"] == 45.0 and st["heads"] == w.heads


def test_head_viewer_displays_widget_and_offline_page() -> None:
    v = HeadViewer(head(), width=64, height=80)
    bundle = v._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/html"].startswith("<iframe srcdoc=") and "fa-splat-state" in bundle["text/html"]
    assert "K=40" in bundle["text/plain"]


def test_head_viewer_falls_back_to_the_orbit_viewer_without_webgl() -> None:
    a, b = head(), head(seed=7)
    v = HeadViewer([a, b], titles=["a", "b"], width=24, height=32, fallback_backend="torch")
    assert v.box.children == (v.widget,)
    v.widget.renderer = "ANGLE (SwiftShader)"  # a browser with WebGL2: nothing changes
    assert v.box.children == (v.widget,)
    v.widget.renderer = "unavailable"  # what the browser reports without WebGL2
    note, row = v.box.children
    assert note.value == FALLBACK_NOTE and len(row.children) == 2
    first = v._fallback[0].current_image().copy()
    v.set_head(0, head(seed=8, shift=0.01))
    assert not np.array_equal(first, v._fallback[0].current_image()), "the fallback viewer must show the new head"


# ----------------------------------------------------------------------------- LatentExplorer
class _CountingDecoder:
    """Codes [L] -> Gaussians whose means move with the code: a stand-in for DecoderResult.decode."""

    def __init__(self, base: Gaussians) -> None:
        self.base, self.calls = base, 0

    def __call__(self, w: torch.Tensor) -> Gaussians:
        self.calls += 1
        g = self.base.clone()
        g.means = g.means + w[:3] * 0.01
        return g


def test_latent_explorer_decodes_the_code_the_sliders_describe() -> None:
    from fastavatar_nb.explorer import LatentExplorer

    L = 8
    w_a, w_b = torch.zeros(L), torch.arange(1.0, L + 1)
    n = torch.nn.functional.normalize(torch.ones(L), dim=0)
    d = AttributeDirection("smiling", n, bias=0.0, spread=0.5, train_accuracy=1.0, num_positive=3, num_negative=3)
    decode = _CountingDecoder(head())
    ex = LatentExplorer(decode, w_a, w_b, [d], names=("ann", "bo"), reference={"template": head()}, width=32, height=40)
    assert decode.calls == 1 and ex.viewer.titles == ["t = 0.00", "template"]
    ex.t.value = 0.5
    assert decode.calls == 2
    torch.testing.assert_close(ex.code(), interpolate(w_a, w_b, 0.5))
    ex.set(t=0.25, smiling=2.0)  # several sliders, one decode
    assert decode.calls == 3
    torch.testing.assert_close(ex.code(), edit(interpolate(w_a, w_b, 0.25), d, 2.0 * 0.5))
    torch.testing.assert_close(ex.head.means, decode.base.means + ex.code()[:3] * 0.01)
    assert ex.viewer.widget.heads[0] == pack_head(ex.head)
    assert ex.viewer.titles[0] == "t = 0.25, smiling +2.00 sd"
    assert "decoded in" in ex.status.value and "text/html" in ex._repr_mimebundle_()
    with pytest.raises(KeyError, match="no attribute slider"):
        ex.set(bald=1.0)


def test_latent_explorer_refuses_bad_codes_and_directions() -> None:
    from fastavatar_nb.explorer import LatentExplorer

    decode = _CountingDecoder(head())
    with pytest.raises(ValueError, match="same shape"):
        LatentExplorer(decode, torch.zeros(8), torch.zeros(9))
    with pytest.raises(ValueError, match="NaN"):
        LatentExplorer(decode, torch.zeros(8), torch.full((8,), float("nan")))
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        LatentExplorer(decode, torch.zeros(8), torch.ones(8), t=1.5)
    d = AttributeDirection("bald", torch.ones(5), 0.0, 1.0, 1.0, 1, 1)
    with pytest.raises(ValueError, match="'bald' has 5 entries but the codes have 8"):
        LatentExplorer(decode, torch.zeros(8), torch.ones(8), [d])
    assert decode.calls == 0


# ----------------------------------------------------------------------------- a subject's points as Gaussians
def test_point_gaussians_colour_each_point_from_the_view_facing_it() -> None:
    import dataclasses

    from fastavatar_nb.data import read_subject

    s = read_subject(REPO / "data_samples" / "synth_000")
    C = s.num_views
    palette = torch.rand(C, 3, generator=torch.Generator().manual_seed(0))
    flat = dataclasses.replace(s, images=palette[:, None, None, :].expand(C, s.height, s.width, 3).contiguous())
    g = flat.point_gaussians()
    assert g.num_gaussians == s.num_points
    torch.testing.assert_close(g.means, s.points)
    torch.testing.assert_close(g.opacities, torch.full((s.num_points,), 0.95))
    colors = g.dc_colors
    # every colour is one view's; the frontmost point (largest z, the nose) takes the most frontal camera's
    nearest = torch.cdist(colors, palette).argmin(1)
    torch.testing.assert_close(colors, palette[nearest], atol=1e-5, rtol=0)
    # the frontmost point (the nose) takes one of the central cameras, the sides take cameras on their side
    centres = s.cameras.centers
    assert abs(float(centres[nearest[int(s.points[:, 2].argmax())], 0])) < 0.2
    side = s.points[:, 0].abs() > 0.05
    same_side = torch.sign(centres[nearest[side], 0]) == torch.sign(s.points[side, 0])
    assert same_side.float().mean() > 0.9
