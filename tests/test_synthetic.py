"""Tests of the procedural multi-view head generator (``fastavatar_nb.data.synthetic``)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_scripts import load_script

from fastavatar_nb.cameras import Cameras
from fastavatar_nb.checkpoints import SHIPPED
from fastavatar_nb.data import read_subject, write_subject
from fastavatar_nb.data import synthetic as S
from fastavatar_nb.data._sdf import capsule, ellipsoid, ray_sphere_interval, smin, sphere_trace

REPO = Path(__file__).resolve().parents[1]
SMOKE_W, SMOKE_H, SMOKE_K = 69, 100, 2500


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a samples folder, except the shipped checkpoints (``course/``: tests/test_checkpoints.py)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in SHIPPED}


FLOAT_ATOL, FLOAT_RTOL = 1e-6, 1e-5
"""How far a regenerated number may fall from the committed one: float32 results differ in their last bits
between CPUs (SIMD paths, libm); measured between two x86_64 machines: 6e-8 in the points, 4e-8 in the
cameras. A change of the generator moves them by far more."""
PIXEL_LEVELS, PIXEL_FRACTION = 4, 1e-3
"""The same for the 8-bit photos: at most four levels, on at most 0.1% of the values (measured over the 64
sample photos: one level on up to 0.04% of the values, two levels on 3 values of one photo: pixels where a
surface edge rounds the other way). A change of the generator moves most pixels."""


_NUMBER = re.compile(r"(-?\d+\.?\d*(?:[eE][-+]?\d+)?)")
"""A decimal number in JSON or PLY text (the group keeps it in ``split``'s output)."""


def _close_numbers(a: str, b: str) -> bool:
    """Two texts equal but for numbers within FLOAT_ATOL + FLOAT_RTOL * |n| (JSON, ASCII PLY)."""
    ta, tb = _NUMBER.split(a), _NUMBER.split(b)
    if len(ta) != len(tb) or ta[0::2] != tb[0::2]:
        return False
    x, y = np.array(ta[1::2], dtype=float), np.array(tb[1::2], dtype=float)
    return bool(np.all(np.abs(x - y) <= FLOAT_ATOL + FLOAT_RTOL * np.abs(y)))


def _same_content(a: bytes, b: bytes, name: str) -> bool:
    """The same file up to float rounding: identical bytes; for PNGs the decoded pixels (the compressed stream
    depends on the zlib build) within PIXEL_LEVELS on PIXEL_FRACTION of the values; for JSON and PLY text the
    same words with numbers within FLOAT_ATOL / FLOAT_RTOL."""
    if a == b:
        return True
    if name.endswith(".png"):
        from PIL import Image

        ia, ib = Image.open(io.BytesIO(a)), Image.open(io.BytesIO(b))
        if ia.mode != ib.mode or ia.size != ib.size:
            return False
        d = np.abs(np.asarray(ia).astype(int) - np.asarray(ib).astype(int))
        return bool(d.max() <= PIXEL_LEVELS and (d > 0).mean() <= PIXEL_FRACTION)
    if name.endswith((".json", ".ply")):
        return _close_numbers(a.decode(), b.decode())
    return False


def test_same_content_tolerates_float_rounding_only():
    from PIL import Image

    def enc(x):
        out = io.BytesIO()
        Image.fromarray(x).save(out, format="PNG")
        return out.getvalue()

    img = np.full((100, 69, 3), 200, np.uint8)
    near, far, many = img.copy(), img.copy(), img.copy()
    near[0, 0, 0], far[0, 0, 0] = 203, 210
    many[:10] = 201  # 10% of the values
    png = io.BytesIO(enc(img))
    assert _same_content(enc(near), png.getvalue(), "a.png")
    assert not _same_content(enc(far), png.getvalue(), "a.png") and not _same_content(enc(many), png.getvalue(), "a.png")
    assert _same_content(b'{"m": [-0.17855854332447052, 2]}', b'{"m": [-0.1785585731267929, 2]}', "t.json")
    assert not _same_content(b'{"m": [-0.1786, 2]}', b'{"m": [-0.1785585731267929, 2]}', "t.json")
    assert not _same_content(b'{"m": [1, 2]}', b'{"n": [1, 2]}', "t.json")
    assert not _same_content(b'{"m": [1, 2]}', b'{"m": [1, 2, 3]}', "t.json")
    assert not _same_content(b"ab", b"ac", "README.md")


@pytest.fixture(scope="module")
def smoke_subject():
    """One subject at the smoke preset's size (rendered once for the module)."""
    return S.generate_subject(3, SMOKE_W, SMOKE_H, SMOKE_K)


# ----------------------------------------------------------------------------- primitives
def test_sdf_primitives_match_analytic_distances():
    p = torch.tensor([[0.3, 0.0, 0.0], [0.0, -0.05, 0.0], [0.0, 0.0, 0.5]])
    x, y, z = p.unbind(-1)
    # an ellipsoid with equal radii is a sphere: exact distance
    torch.testing.assert_close(ellipsoid(x, y, z, (0, 0, 0), (0.1, 0.1, 0.1)), p.norm(dim=-1) - 0.1)
    # a capsule from the origin to (0, 0, 1) with radius 0.1
    torch.testing.assert_close(capsule(x, y, z, (0, 0, 0), (0, 0, 1), 0.1, 0.1), torch.tensor([0.2, -0.05, -0.1]))
    a, b = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.12, 0.5, 0.3])
    assert (smin(a, b, 0.05) <= torch.minimum(a, b) + 1e-7).all()
    torch.testing.assert_close(smin(a, b, 0.05)[1], a[1])  # far apart: plain minimum


def test_sphere_trace_hits_a_sphere_at_the_analytic_distance():
    n = 5
    ox, oy, oz = torch.zeros(n), torch.linspace(-0.05, 0.05, n), torch.full((n,), 2.0)
    dx, dy, dz = torch.zeros(n), torch.zeros(n), -torch.ones(n)
    t0, t1 = ray_sphere_interval(ox, oy, oz, dx, dy, dz, (0.0, 0.0, 0.0), 0.5)
    sdf = lambda x, y, z: torch.sqrt(x * x + y * y + z * z) - 0.1
    t, hit = sphere_trace(sdf, ox, oy, oz, dx, dy, dz, t0, t1, eps=1e-6)
    assert hit.all()
    torch.testing.assert_close(t, 2.0 - torch.sqrt(0.01 - oy ** 2), atol=2e-6, rtol=0)
    # a ray that passes beside the sphere misses
    t, hit = sphere_trace(sdf, ox[:1] + 0.2, oy[:1], oz[:1], dx[:1], dy[:1], dz[:1], t0[:1] * 0, t1[:1] + 3)
    assert not hit.any()


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_files_and_other_seeds_differ(tmp_path):
    a = S.generate_subject(11, 24, None, 300, subject_id="s")
    b = S.generate_subject(11, 24, None, 300, subject_id="s")
    c = S.generate_subject(12, 24, None, 300, subject_id="s")
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.points, b.points)
    fa, fb = _files(write_subject(a, tmp_path / "a")), _files(write_subject(b, tmp_path / "b"))
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    assert not torch.equal(a.images, c.images)
    assert a.attributes["seed"] == 11 and a.attributes != c.attributes


def test_data_samples_regenerate(tmp_path):
    """The first committed sample is reproduced by scripts/make_data_samples.py, up to float rounding
    (:func:`_same_content`)."""
    committed = REPO / "data_samples"
    assert (committed / "synth_000" / "transforms.json").is_file(), "data_samples/ is missing: run the script"
    mod = load_script("scripts/make_data_samples.py")
    mod.make_data_samples(tmp_path, num_subjects=1, progress=False)
    new, old = _files(tmp_path / "synth_000"), _files(committed / "synth_000")
    assert new.keys() == old.keys()
    differ = [k for k in new if not _same_content(new[k], old[k], k)]
    assert not differ, f"regenerated files differ from data_samples/synth_000: {differ}"
    assert (tmp_path / "README.md").read_bytes() == (committed / "README.md").read_bytes()


@pytest.mark.slow
def test_all_data_samples_regenerate(tmp_path):
    committed = REPO / "data_samples"
    mod = load_script("scripts/make_data_samples.py")
    mod.make_data_samples(tmp_path, progress=False)
    new, old = _files(tmp_path), _files(committed)
    assert new.keys() == old.keys()
    assert [k for k in new if not _same_content(new[k], old[k], k)] == []
    # committed samples stay small (a few MB at most)
    assert sum(len(v) for v in old.values()) < 3_000_000


# ----------------------------------------------------------------------------- geometry
def _march_from_cameras(params, cams: Cameras, uv: torch.Tensor) -> torch.Tensor:
    """World hit points [C, N, 3] of rays through pixel positions uv [C, N, 2] (inf where missed)."""
    C, N = uv.shape[:2]
    cam = torch.arange(C)[:, None].expand(C, N).reshape(-1)
    rays = S._pixel_rays(cams, cam, uv[..., 0].reshape(-1), uv[..., 1].reshape(-1))
    head = S._Head(params)
    t0, t1 = ray_sphere_interval(*rays, S._BOUND_C, S._BOUND_R)
    t, hit = sphere_trace(head.sdf, *rays, t0, t1, max_steps=400, eps=1e-5, step_scale=0.8)
    ox, oy, oz, dx, dy, dz = rays
    pts = torch.stack([ox + t * dx, oy + t * dy, oz + t * dz], -1)
    pts[~hit] = float("inf")
    return pts.reshape(C, N, 3)


def test_landmark_points_project_onto_the_visible_surface_in_all_views(smoke_subject):
    """Point k seen by each camera is the surface point that camera's pixel ray hits (within a pixel)."""
    sub = smoke_subject
    params = S.sample_head_params(3)
    lm = S.landmark_indices(SMOKE_K)
    idx = torch.tensor([lm["nose_tip"], lm["left_eye"], lm["right_eye"], lm["mouth"], lm["chin"]])
    pts = sub.points[idx]
    cams = sub.cameras
    uv, depth = cams.project(pts)  # [16, 5, 2]
    hits = _march_from_cameras(params, cams, uv)
    err = (hits - pts[None]).norm(dim=-1)  # [16, 5]
    pixel = 1.15 / float(cams.Ks[:, 0, 0].mean())  # metres per pixel at the head
    visible = err < 0.5 * pixel
    # the nose tip is seen by all 16 cameras; the eyes and mouth by most
    assert visible[:, 0].all(), f"nose tip not on the visible surface in views {(~visible[:, 0]).nonzero().tolist()}"
    assert visible[:, 1:4].sum(0).min() >= 10, visible.sum(0)
    # and those pixels are foreground in the rendered masks
    col, row = uv[..., 0].floor().long(), uv[..., 1].floor().long()
    m = sub.masks[torch.arange(16)[:, None], row, col]
    assert (m[visible] > 0).all()  # a visible point's pixel is (at least partly) foreground
    assert (m[visible] > 0.5).float().mean() > 0.9  # and mostly inside (silhouette points may be half covered)


def test_landmark_index_is_the_same_anatomical_place_on_every_head():
    K = 2600  # 1,768 head rays (68 % of K: the rest cover the neck and the bust)
    lm = S.landmark_indices(K)
    for seed in (0, 5, 9):
        params = S.sample_head_params(seed)
        head = S._Head(params)
        pts = S.surface_points(params, K)
        # the nose-tip point is on the nose, near its tip (noses differ in length by ~1.5 cm)
        nose_tip = torch.tensor([0.0, head.nose_b[1], head.nose_b[2] + head.nose_rb])
        q = pts[lm["nose_tip"]]
        assert (q - nose_tip).norm() < 0.015, seed
        assert capsule(q[:1], q[1:2], q[2:], head.nose_a, head.nose_b, head.nose_ra, head.nose_rb) < 0.003, seed
        # the eye points are on the eyeballs' visible fronts
        for name, sx in (("left_eye", 1.0), ("right_eye", -1.0)):
            centre = torch.tensor([sx * head.eye_x, head.eye_y, head.eye_z])
            q = pts[lm[name]]
            assert abs(float((q - centre).norm()) - head.eye_rad) < 0.002 and q[2] > centre[2], (seed, name)
        # every point is on the surface (|sdf| well below a pixel at full scale, ~1 mm)
        d = S.head_sdf(params, pts).abs()
        assert d.max() < 1e-3 and d.median() < 1e-5


def test_open_mouth_lowers_the_chin():
    base = S.sample_head_params(4)
    closed = dataclasses.replace(base, mouth_open=0.0, smile=0.0)
    opened = dataclasses.replace(base, mouth_open=1.0, smile=0.0)

    def chin_bottom(params):  # march up from below the chin, in front of the neck
        o = [torch.zeros(1), torch.full((1,), -0.17), torch.full((1,), 0.05)]
        d = [torch.zeros(1), torch.ones(1), torch.zeros(1)]
        t, hit = sphere_trace(S._Head(params).sdf, *o, *d, torch.zeros(1), torch.ones(1) * 0.4, eps=1e-5)
        assert hit.all()
        return float(-0.17 + t[0])

    drop = chin_bottom(closed) - chin_bottom(opened)
    assert 0.012 < drop < 0.032, drop  # the jaw drops by 22 mm at mouth_open = 1


# ----------------------------------------------------------------------------- images and labels
def test_masks_and_images_are_consistent(smoke_subject):
    sub = smoke_subject
    assert sub.images.shape == (16, SMOKE_H, SMOKE_W, 3) and sub.masks.shape == (16, SMOKE_H, SMOKE_W)
    assert sub.points.shape == (SMOKE_K, 3) and sub.camera_ids == [f"{i:02d}" for i in range(16)]
    bg = sub.masks == 0
    assert (sub.images[bg] == 1.0).all(), "background is not pure white where the mask is 0"
    fg = sub.masks == 1
    assert sub.images[fg].mean() < 0.8  # the head is not white
    soft = (sub.masks > 0) & (sub.masks < 1)
    assert soft.any(), "masks should be soft (antialiased) at silhouettes"
    # every view shows a head of similar size (10% to 70% of the frame)
    cover = sub.masks.mean((1, 2))
    assert ((cover > 0.1) & (cover < 0.7)).all(), cover
    # the corresponded points fall inside the masks (points on a silhouette may be less than half covered)
    # (bust points may lie below the frame, so the whole-frame check is on the head and neck points)
    assert (sub.mask_coverage(sub.points[:-S.num_bust_points(SMOKE_K)]) > 0.9).all()
    uv, _ = sub.cameras.project(sub.points)
    inside = (uv[..., 0] >= 0) & (uv[..., 0] < SMOKE_W) & (uv[..., 1] >= 0) & (uv[..., 1] < SMOKE_H)
    col, row = uv[..., 0].floor().long().clamp(0, SMOKE_W - 1), uv[..., 1].floor().long().clamp(0, SMOKE_H - 1)
    m = sub.masks[torch.arange(16)[:, None], row, col]
    assert (m[inside] > 0).float().mean() > 0.99


def test_attributes_present_with_types(smoke_subject):
    a = smoke_subject.attributes
    for key in ("smiling", "mouth_open", "long_hair", "beard", "brows_raised", "bald"):
        assert isinstance(a[key], bool), key
    for key in ("skin_tone", "smile_amount", "mouth_open_amount", "brows_raised_amount", "beard_amount",
                "hair_length", "jaw_width", "nose_length", "eye_spacing"):
        assert isinstance(a[key], float), key
    for key in ("expression", "hair_style", "hair_colour", "eye_colour"):
        assert isinstance(a[key], str), key
    assert isinstance(a["seed"], int) and a["generator_version"] == S.GENERATOR_VERSION
    assert a["smiling"] == (a["smile_amount"] > 0.5) and a["long_hair"] == (a["hair_length"] > 0.12)
    assert 0.0 <= a["skin_tone"] <= 1.0
    json.dumps(a)  # serialisable as attributes.json


def test_labels_vary_over_seeds():
    attrs = [S.sample_head_params(s).attributes() for s in range(60)]
    for key in ("smiling", "mouth_open", "long_hair", "beard"):
        frac = np.mean([a[key] for a in attrs])
        assert 0.1 < frac < 0.9, (key, frac)
    assert {a["expression"] for a in attrs} == {"neutral", "smile", "shout", "surprise", "smile_open"}


def test_skin_tones_span_dark_to_light():
    tones = [S.sample_head_params(s).skin_tone for s in range(40)]
    assert min(tones) < 0.1 and max(tones) > 0.9

    def lum(c):
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    ramp = [lum(S.skin_albedo(t)) for t in np.linspace(0, 1, 21)]
    assert ramp[0] < 0.2 and ramp[-1] > 0.8
    assert all(b >= a - 0.02 for a, b in zip(ramp, ramp[1:], strict=False))  # (nearly) monotone light ramp


def test_rendered_skin_follows_the_tone():
    base = S.sample_head_params(7)
    cams = Cameras.nersemble_rig(width=40)[8]
    lums = []
    for tone in (0.05, 0.5, 0.95):
        im, m = S.render_head(dataclasses.replace(base, skin_tone=tone, beard=0.0), cams, supersample=1)
        h, w = im.shape[1:3]
        face = im[0, int(0.38 * h):int(0.5 * h), int(0.35 * w):int(0.65 * w)]  # cheeks and nose
        lums.append(float(face.mean()))
    assert lums[0] + 0.2 < lums[1] < lums[2] - 0.1, lums


def test_bad_inputs_raise_with_the_value():
    with pytest.raises(ValueError, match="mohawk"):
        S.HeadParams(hair_style="mohawk")
    with pytest.raises(ValueError, match="smile"):
        S.HeadParams(smile=1.5)
    with pytest.raises(ValueError, match="supersample"):
        S.render_head(S.HeadParams(), Cameras.nersemble_rig(width=20), supersample=0)
    with pytest.raises(ValueError, match="num_points"):
        S.canonical_rays(0)


# ----------------------------------------------------------------------------- datasets
def test_generate_dataset_writes_resumes_and_refuses_to_overwrite(tmp_path):
    kw = dict(seed=5, width=16, num_points=200, progress=False)
    paths = S.generate_dataset(tmp_path, 2, **kw)
    assert [p.name for p in paths] == ["synth_000", "synth_001"]
    sub = read_subject(paths[1])
    assert sub.subject_id == "synth_001" and sub.num_views == 16 and sub.num_points == 200
    assert sub.attributes["seed"] == S.subject_seed(5, 1)
    expect = S.generate_subject(S.subject_seed(5, 1), 16, None, 200)
    assert torch.allclose(sub.points, expect.points, atol=1e-6)
    assert (sub.images - expect.images).abs().max() <= 0.5 / 255 + 1e-6
    # resume: complete subjects are not rewritten; growing the dataset keeps them
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "synth_000").rglob("*")}
    paths3 = S.generate_dataset(tmp_path, 3, **kw)
    assert len(paths3) == 3 and {p: p.stat().st_mtime_ns for p in (tmp_path / "synth_000").rglob("*")} == before
    # a deleted file is restored identically
    img = tmp_path / "synth_000" / "images" / "00000_03.png"
    data = img.read_bytes()
    img.unlink()
    S.generate_dataset(tmp_path, 1, **kw)
    assert img.read_bytes() == data
    # a different subject in the folder is never overwritten silently
    with pytest.raises(FileExistsError, match="different subject"):
        S.generate_dataset(tmp_path, 1, **{**kw, "seed": 6})
    S.generate_dataset(tmp_path, 1, **{**kw, "seed": 6}, overwrite=True)
    assert json.loads((tmp_path / "synth_000" / "attributes.json").read_text())["seed"] == S.subject_seed(6, 0)
    # a foreign folder is refused even with overwrite
    (tmp_path / "other_000").mkdir()
    (tmp_path / "other_000" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        S.generate_dataset(tmp_path, 1, **kw, prefix="other")
    with pytest.raises(FileExistsError):
        S.generate_dataset(tmp_path, 1, **kw, prefix="other", overwrite=True)
    assert (tmp_path / "other_000" / "notes.txt").read_text() == "mine"


def test_canonical_rays_cover_head_and_neck_and_are_fixed():
    K = 500
    o, d = S.canonical_rays(K)
    assert o.shape == d.shape == (K, 3)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(K))
    assert torch.equal(o, S.canonical_rays(K)[0]) and torch.equal(d, S.canonical_rays(K)[1])
    n_neck, n_bust = S.num_neck_rays(K), S.num_bust_points(K)
    assert n_neck == 60 and n_bust == 100  # NECK_FRACTION = 12 %, BUST_FRACTION = 20 %: head, neck, bust
    n_head = K - n_neck - n_bust
    head_o, head_d = o[:n_head], d[:n_head]
    neck_o, neck_d = o[n_head:n_head + n_neck], d[n_head:n_head + n_neck]
    bo, bd = S.bust_rays(n_bust, S.BUST_ANCHOR)
    assert torch.equal(o[-n_bust:], bo) and torch.equal(d[-n_bust:], bd)
    # head rays aim at the head centre from 0.6 m; denser on the face side, left-right balanced
    centre = torch.tensor(S.HEAD_CENTER)
    torch.testing.assert_close(head_o + 0.6 * head_d, centre.expand_as(head_o), atol=1e-6, rtol=0)
    assert (-head_d[:, 2] > 0).float().mean() > 0.6
    assert math.isclose(float(head_d[:, 0].mean()), 0.0, abs_tol=0.02)
    # neck rays are horizontal, aimed at the neck axis, spread over the band's heights and all azimuths
    assert neck_d[:, 1].abs().max() == 0
    axis = torch.tensor([S.NECK_AXIS_XZ[0], S.NECK_AXIS_XZ[1]])
    torch.testing.assert_close(neck_o[:, [0, 2]] + 0.3 * neck_d[:, [0, 2]], axis.expand(n_neck, 2), atol=1e-6, rtol=0)
    lo, hi = S.NECK_BAND_Y
    assert lo <= float(neck_o[:, 1].min()) < lo + 0.01 and hi - 0.01 < float(neck_o[:, 1].max()) <= hi
    azimuth = torch.atan2(neck_d[:, 0], neck_d[:, 2])
    assert torch.histc(azimuth, bins=8, min=-math.pi, max=math.pi).min() >= n_neck / 8 * 0.7


def test_surface_points_cover_the_neck_down_to_the_collar():
    params = S.sample_head_params(3)
    pts = S.surface_points(params, 800)
    n_neck, n_bust = S.num_neck_rays(800), S.num_bust_points(800)
    neck = pts[800 - n_bust - n_neck:800 - n_bust]
    # the neck points lie on the neck (about 5 cm from its axis) or on hair/jaw/collar in front of it
    radius = (neck[:, [0, 2]] - torch.tensor([S.NECK_AXIS_XZ])).norm(dim=-1)
    assert float(radius.min()) > 0.035 and float(radius.median()) < 0.07
    assert float(pts[:800 - n_bust, 1].min()) < -0.17  # the lowest neck points reach the collar
    # every point is on the surface
    sdf = S.head_sdf(params, pts)
    assert float(sdf.abs().max()) < 1e-4


def test_bust_points_lie_on_the_shirt_for_many_subjects_and_correspond():
    """The last B points are on the shirt below the neck base for 30 seeds plus long-hair and bearded heads."""
    K = 600
    B = S.num_bust_points(K)
    seeds = list(range(30))
    seeds += [s for s in range(30, 400) if S.sample_head_params(s).hair_length > 0.2][:3]
    seeds += [s for s in range(30, 400) if S.sample_head_params(s).beard > 0.8][:3]
    busts = []
    for seed in seeds:
        params = S.sample_head_params(seed)
        pts = S.surface_points(params, K)  # raises if any ray misses
        bust = pts[-B:]
        assert float(bust[:, 1].max()) < S.BUST_ANCHOR[1] - 0.01, seed  # below the neck base
        assert float(S.head_sdf(params, bust).abs().max()) < 1e-4, seed  # on the surface
        head = S._Head(params)
        shirt = head._parts(bust[:, 0], bust[:, 1], bust[:, 2])["shirt"]
        assert float(shirt.abs().max()) < 0.01, seed  # on the shirt (within its blend into the neck)
        busts.append(bust)
    stack = torch.stack(busts)
    spread = (stack - stack.median(0).values).norm(dim=-1)
    assert float(spread.median()) < 0.01 and float(spread.max()) < 0.03  # bust point k: same place on every subject


def test_bust_points_project_into_the_masks(smoke_subject):
    B = S.num_bust_points(SMOKE_K)
    cov = smoke_subject.mask_coverage(smoke_subject.points[-B:])
    uv, _ = smoke_subject.cameras.project(smoke_subject.points[-B:])
    inside = (uv[..., 0] >= 0) & (uv[..., 0] < SMOKE_W) & (uv[..., 1] >= 0) & (uv[..., 1] < SMOKE_H)
    # every bust point in a view's frame is foreground there (silhouette points may be half covered)
    assert float(cov.sum() / inside.float().mean(-1).sum()) > 0.95, cov
    assert (inside.sum(0) >= 2).all()  # each bust point is seen by at least two cameras
    assert float(cov[8]) > 0.6


@pytest.mark.gpu
def test_cuda_render_matches_cpu():
    params = S.sample_head_params(2)
    cams = Cameras.nersemble_rig(width=40)
    im_cpu, m_cpu = S.render_head(params, cams, supersample=2)
    im_gpu, m_gpu = S.render_head(params, cams, supersample=2, device="cuda")
    assert im_gpu.device.type == "cuda"
    assert (m_gpu.cpu() - m_cpu).abs().mean() < 0.01
    assert (im_gpu.cpu() - im_cpu).abs().mean() < 0.01
