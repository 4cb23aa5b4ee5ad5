"""MultiViewSubject, the NeRSemble/VHAP reader/writer and SubjectDataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastavatar_nb.cameras import Cameras
from fastavatar_nb.data import (
    MissingSubjectFileError,
    MultiViewSubject,
    SubjectDataset,
    SubjectFormatError,
    list_subject_dirs,
    read_subject,
    split_subjects,
    stack_subjects,
    write_split,
    write_subject,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLES = SHARED / "data" / "nersemble_samples"


def make_subject(seed: int = 0, width: int = 32, num_points: int = 50, subject_id: str = "s0",
                 height: int | None = None) -> MultiViewSubject:
    g = torch.Generator().manual_seed(seed)
    cams = Cameras.nersemble_rig(width=width, height=height)
    C, H, W = len(cams), cams.height, cams.width
    return MultiViewSubject(
        subject_id=subject_id,
        images=torch.rand(C, H, W, 3, generator=g),
        masks=torch.rand(C, H, W, generator=g),
        cameras=cams,
        points=(torch.rand(num_points, 3, generator=g) - 0.5) * 0.2,
        attributes={"smile": 0.25, "hair_length": 3, "glasses": True, "skin": "dark"},
        camera_ids=[f"cam{i:02d}" for i in range(C)],
    )


@pytest.fixture
def written(tmp_path) -> tuple[MultiViewSubject, Path]:
    s = make_subject()
    return s, write_subject(s, tmp_path / "s0")


# ----------------------------------------------------------------- round trip
def test_round_trip(written):
    s, folder = written
    r = read_subject(folder)
    assert r.subject_id == "s0" and r.camera_ids == s.camera_ids and r.attributes == s.attributes
    assert (r.width, r.height, r.num_views) == (32, 47, 16)
    torch.testing.assert_close(r.cameras.viewmats, s.cameras.viewmats, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.cameras.Ks, s.cameras.Ks, atol=1e-5, rtol=1e-6)
    assert (r.images - s.images).abs().max() <= 0.5 / 255 + 1e-6
    assert (r.masks - s.masks).abs().max() <= 0.5 / 255 + 1e-6
    torch.testing.assert_close(r.points, s.points, atol=1e-6, rtol=0)
    assert isinstance(r.attributes["hair_length"], int) and r.attributes["glasses"] is True


def test_written_layout(written):
    s, folder = written
    assert sorted(p.name for p in folder.iterdir()) == [
        "attributes.json", "fg_masks", "images", "points3d.ply", "transforms.json",
        "transforms_test.json", "transforms_train.json", "transforms_val.json"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    val = json.loads((folder / "transforms_val.json").read_text())
    train = json.loads((folder / "transforms_train.json").read_text())
    assert [f["camera_index"] for f in val["frames"]] == [8]
    assert [f["camera_index"] for f in train["frames"]] == [i for i in range(16) if i != 8]
    meta = json.loads((folder / "transforms.json").read_text())
    f0 = meta["frames"][0]
    assert f0["file_path"] == "images/00000_00.png" and f0["fg_mask_path"] == "fg_masks/00000_00.png"
    # transform_matrix is OpenGL camera-to-world: its translation is the camera centre
    np.testing.assert_allclose(f0["transform_matrix"][0][3], s.cameras.centers[0, 0].item(), atol=1e-5)
    assert (folder / "points3d.ply").read_bytes().startswith(b"ply\nformat ascii")
    with Image.open(folder / "fg_masks/00000_03.png") as m, Image.open(folder / "images/00000_03.png") as im:
        assert m.mode == "L" and im.mode == "RGB" and im.size == (32, 47)


def test_overwrite(written, tmp_path):
    s, folder = written
    other = make_subject(seed=1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_subject(other, folder)
    assert (read_subject(folder).images - s.images).abs().max() < 1 / 255  # untouched
    write_subject(other, folder, overwrite=True)
    assert (read_subject(folder).images - other.images).abs().max() < 1 / 255
    junk = tmp_path / "not_a_subject"
    junk.mkdir()
    (junk / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a subject"):
        write_subject(s, junk, overwrite=True)
    assert (junk / "precious.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    write_subject(s, empty)
    assert read_subject(empty).num_views == 16


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import fastavatar_nb.data.nersemble as nm

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(nm, "write_points_ply", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_subject(make_subject(), tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------- bad inputs
def test_missing_folder_and_transforms(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_subject(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingSubjectFileError, match="transforms.json"):
        read_subject(tmp_path / "empty")


def test_missing_image(written):
    _, folder = written
    (folder / "images/00000_05.png").unlink()
    with pytest.raises(MissingSubjectFileError, match="00000_05.png"):
        read_subject(folder)


def test_missing_mask(written):
    _, folder = written
    (folder / "fg_masks/00000_02.png").unlink()
    with pytest.raises(FileNotFoundError, match="fg_masks/00000_02.png"):
        read_subject(folder)


def test_missing_points(written):
    _, folder = written
    (folder / "points3d.ply").unlink()
    with pytest.raises(MissingSubjectFileError, match="points3d.ply"):
        read_subject(folder)


def test_image_size_mismatch(written):
    _, folder = written
    Image.new("RGB", (20, 47), "white").save(folder / "images/00000_01.png")
    with pytest.raises(SubjectFormatError, match=r"00000_01.png.*20x47.*w=32, h=47"):
        read_subject(folder)


def test_mask_size_mismatch(written):
    _, folder = written
    Image.new("L", (32, 40)).save(folder / "fg_masks/00000_07.png")
    with pytest.raises(SubjectFormatError, match=r"fg_masks/00000_07.png.*32x40"):
        read_subject(folder)


def test_empty_frames(written):
    _, folder = written
    meta = json.loads((folder / "transforms.json").read_text())
    meta["frames"] = []
    (folder / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(SubjectFormatError, match="no frames"):
        read_subject(folder)


def test_unreadable_png_and_json(written):
    _, folder = written
    (folder / "images/00000_04.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(SubjectFormatError, match=r"00000_04.png.*unreadable"):
        read_subject(folder)
    (folder / "transforms.json").write_text("{not json")
    with pytest.raises(SubjectFormatError, match="not valid JSON"):
        read_subject(folder)


def test_timesteps_order_and_optional_files(written):
    s, folder = written
    (folder / "attributes.json").unlink()
    meta = json.loads((folder / "transforms.json").read_text())
    later = [dict(f, timestep_index=1, file_path=f["file_path"].replace("00000_", "00001_")) for f in meta["frames"]]
    for f in later[:3]:  # timestep 1 has views 0..2 (their files are copies of view 15's)
        shutil.copy(folder / "images/00000_15.png", folder / f["file_path"])
    meta["frames"] = list(reversed(meta["frames"])) + later[:3]  # order in the file does not matter
    (folder / "transforms.json").write_text(json.dumps(meta))
    r = read_subject(folder)
    assert r.attributes == {} and r.num_views == 16 and r.camera_ids == s.camera_ids
    torch.testing.assert_close(r.cameras.viewmats, s.cameras.viewmats, atol=1e-5, rtol=0)
    r1 = read_subject(folder, timestep=1)
    assert r1.num_views == 3 and (r1.images[0] - s.images[15]).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(SubjectFormatError, match="no frames of timestep 2"):
        read_subject(folder, timestep=2)
    meta["frames"] = meta["frames"][:16] + [meta["frames"][0]]
    (folder / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(SubjectFormatError, match="camera_index twice"):
        read_subject(folder)


def test_list_subject_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_subject_dirs(tmp_path / "missing")
    (tmp_path / "stuff").mkdir()
    with pytest.raises(FileNotFoundError, match="no subject folders"):
        list_subject_dirs(tmp_path)


# ------------------------------------------------------------- validation
def test_subject_validation_names_field():
    s = make_subject()
    with pytest.raises(ValueError, match=r"masks must be \[C, H, W\].*\(16, 47, 32\).*\(16, 47, 31\)"):
        MultiViewSubject("x", s.images, s.masks[..., :31], s.cameras, s.points)
    with pytest.raises(ValueError, match=r"cameras are 64x94.*images are 32x47"):
        MultiViewSubject("x", s.images, s.masks, Cameras.nersemble_rig(64, 94), s.points)
    with pytest.raises(ValueError, match=r"C = 15 cameras"):
        MultiViewSubject("x", s.images[:15], s.masks[:15], s.cameras, s.points)
    with pytest.raises(ValueError, match=r"points must be \[K, 3\]"):
        MultiViewSubject("x", s.images, s.masks, s.cameras, s.points[:, :2])
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        MultiViewSubject("x", s.images * 2, s.masks, s.cameras, s.points)
    with pytest.raises(TypeError, match="float32"):
        MultiViewSubject("x", s.images.double(), s.masks, s.cameras, s.points)
    with pytest.raises(TypeError, match="attribute 'a'"):
        MultiViewSubject("x", s.images, s.masks, s.cameras, s.points, attributes={"a": [1]})
    assert MultiViewSubject("x", s.images, s.masks, s.cameras, s.points).camera_ids[3] == "03"


def test_views_and_stack():
    s = make_subject()
    v = s.view(8)
    assert v.num_views == 1 and v.camera_ids == ["cam08"]
    torch.testing.assert_close(v.images[0], s.images[8])
    torch.testing.assert_close(v.cameras.viewmats[0], s.cameras.viewmats[8])
    rest = s.select_views([i for i in range(16) if i != 8])
    assert rest.num_views == 15 and "cam08" not in rest.camera_ids
    images, masks, cams, points = stack_subjects([s, make_subject(seed=2)])
    assert images.shape == (2, 16, 47, 32, 3) and masks.shape == (2, 16, 47, 32)
    assert cams.viewmats.shape == (2, 16, 4, 4) and points.shape == (2, 50, 3)


# ------------------------------------------------------------------ resize
def test_resize_consistency():
    s = make_subject(width=64, height=94)
    r = s.resize(32, 47)
    sx, sy = 32 / 64, 47 / 94
    torch.testing.assert_close(r.cameras.Ks[:, 0, :], s.cameras.Ks[:, 0, :] * sx)
    torch.testing.assert_close(r.cameras.Ks[:, 1, :], s.cameras.Ks[:, 1, :] * sy)
    uv0, _ = s.cameras.project(s.points)
    uv1, _ = r.cameras.project(s.points)
    torch.testing.assert_close(uv1, uv0 * torch.tensor([sx, sy]), atol=1e-3, rtol=1e-5)
    assert r.images.shape == (16, 47, 32, 3) and r.masks.shape == (16, 47, 32)
    # the antialiased filter preserves the mean
    torch.testing.assert_close(r.images[:, :, :, 0].mean(), s.images[:, :, :, 0].mean(), atol=2e-3, rtol=0)
    # keep aspect with one side
    assert (s.resize(width=16).width, s.resize(width=16).height) == (16, 24)


def test_resize_moves_a_dot_to_the_scaled_pixel():
    s = make_subject(width=64, height=94)
    C, H, W = s.num_views, s.height, s.width
    uv, _ = s.cameras.project(torch.zeros(1, 3))  # the origin in every view
    masks = torch.zeros(C, H, W)
    for c in range(C):  # a 4x4 blob around the origin's pixel
        u, v = int(uv[c, 0, 0]), int(uv[c, 0, 1])
        masks[c, v - 2:v + 2, u - 2:u + 2] = 1.0
    s = MultiViewSubject("dot", s.images, masks, s.cameras, s.points)
    r = s.resize(32, 47)
    uv_r, _ = r.cameras.project(torch.zeros(1, 3))
    ys, xs = torch.meshgrid(torch.arange(47) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    for c in range(C):
        m = r.masks[c]
        centroid = torch.stack([(m * xs).sum() / m.sum(), (m * ys).sum() / m.sum()])
        blob = torch.tensor([int(uv[c, 0, 0]), int(uv[c, 0, 1])]) * torch.tensor([32 / 64, 47 / 94])
        torch.testing.assert_close(centroid, blob, atol=0.15, rtol=0)  # blob centre, scaled
        assert (centroid - uv_r[c, 0]).abs().max() < 1.0  # and the origin lands in it


def test_read_with_resize(written):
    _, folder = written
    r = read_subject(folder, width=16)
    assert (r.width, r.height) == (16, 24)
    torch.testing.assert_close(r.images, read_subject(folder).resize(16, 24).images)


# ------------------------------------------------------------------ dataset
def test_split_subjects_deterministic_disjoint():
    ids = [f"{i:03d}" for i in range(40)]
    train, val, test = split_subjects(ids, num_test=7, seed=3, num_val=5)
    assert len(test) == 7 and len(val) == 5 and len(train) == 28
    assert not set(train) & set(test) and not set(train) & set(val) and not set(val) & set(test)
    assert sorted(train + val + test) == ids
    assert split_subjects(list(reversed(ids)), num_test=7, seed=3, num_val=5) == (train, val, test)  # order-independent
    assert split_subjects(ids, num_test=7, seed=4, num_val=5) != (train, val, test)
    assert split_subjects(ids, num_test=7, seed=3)[2] == test  # the test subjects do not depend on num_val
    assert len(split_subjects(ids[:12])[2]) == 2 and len(split_subjects([f"{i}" for i in range(417)])[2]) == 7
    with pytest.raises(ValueError, match="num_test"):
        split_subjects(ids, num_test=41)
    with pytest.raises(ValueError, match="num_val=5 must be >= 0 and add up to at most the 40"):
        split_subjects(ids, num_test=36, num_val=5)


def test_dataset_lazy_split_and_resize(tmp_path):
    for i in range(5):
        write_subject(make_subject(seed=i, subject_id=f"x{i}", width=16), tmp_path / f"x{i}")
    (tmp_path / "not_a_subject").mkdir()
    train = SubjectDataset(tmp_path, "train", num_test=2, seed=1)
    test = SubjectDataset(tmp_path, "test", num_test=2, seed=1)
    assert len(train) == 3 and len(test) == 2 and not set(train.subject_ids) & set(test.subject_ids)
    assert SubjectDataset(tmp_path, "test", num_test=2, seed=1).subject_ids == test.subject_ids
    assert len(SubjectDataset(tmp_path, "all")) == 5
    s = test[0]
    assert s.subject_id == test.subject_ids[0] and test[0] is s  # cached
    small = SubjectDataset(tmp_path, "all", width=8)
    assert (small[1].width, small[1].height) == (8, 12)
    shutil.rmtree(tmp_path / "x4")  # lazily loaded: the dataset was listed, not read
    write_split(tmp_path, train=["x0", "x1"], test=["x3"], val=["x2"])
    ds = SubjectDataset(tmp_path, "test")
    assert ds.subject_ids == ["x3"] and "split.json" in ds.split_source
    assert SubjectDataset(tmp_path, "val").subject_ids == ["x2"]
    with pytest.raises(ValueError, match="split must be one of"):
        SubjectDataset(tmp_path, "holdout")
    # an older split file without "val": no val subjects
    (tmp_path / "split.json").write_text(json.dumps({"train": ["x0", "x1"], "test": ["x3"]}))
    assert len(SubjectDataset(tmp_path, "val")) == 0 and SubjectDataset(tmp_path, "train").subject_ids == ["x0", "x1"]
    # overlapping subjects are refused, naming the subject and both parts
    with pytest.raises(SubjectFormatError, match="subject 'x1' is in both 'train' and 'val'"):
        write_split(tmp_path, train=["x0", "x1"], test=["x3"], val=["x1"])
    (tmp_path / "split.json").write_text(json.dumps({"train": ["x0", "x1"], "val": ["x2"], "test": ["x2"]}))
    with pytest.raises(SubjectFormatError, match=r"split.json: subject 'x2' is in both 'val' and 'test'"):
        SubjectDataset(tmp_path, "train")
    (tmp_path / "split.json").write_text(json.dumps({"train": ["x0", "x0"], "test": []}))
    with pytest.raises(SubjectFormatError, match="listed twice in 'train'"):
        SubjectDataset(tmp_path, "train")
    (tmp_path / "split.json").write_text(json.dumps({"train": ["x0"], "test": [], "holdout": ["x1"]}))
    with pytest.raises(SubjectFormatError, match="unknown keys"):
        SubjectDataset(tmp_path, "train")


# ------------------------------------------------------------- real samples
@pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/data/nersemble_samples not present")
@pytest.mark.parametrize("sid", ["306", "369"])
def test_real_nersemble_sample(sid):
    s = read_subject(SAMPLES / sid)
    assert s.num_views == 16 and s.images.shape == (16, 802, 550, 3) and s.masks.shape == (16, 802, 550)
    assert s.num_points == 10144 and len(set(s.camera_ids)) == 16
    assert (s.images[s.masks < 0.01] > 0.9).float().mean() > 0.95  # background is white
    dist = s.cameras.centers.norm(dim=-1)
    assert dist.min() > 1.0 and dist.max() < 1.3  # 1.05 to 1.23 m from the head
    cov = s.mask_coverage()
    assert cov.min() >= 0.95, cov
    small = s.resize(69, 101)
    assert small.mask_coverage().min() >= 0.95
    fx = small.cameras.Ks[:, 0, 0]
    torch.testing.assert_close(fx, s.cameras.Ks[:, 0, 0] * 69 / 550)


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/data/nersemble_samples not present")
def test_real_samples_as_dataset():
    ds = SubjectDataset(SAMPLES, "all", width=55)
    assert ds.subject_ids == ["306", "369"]
    s = ds[1]
    assert (s.width, s.height) == (55, 80) and s.mask_coverage().min() > 0.9


def test_thin_points_keeps_an_even_subset_in_order():
    s = make_subject(num_points=300)
    t = s.thin_points(100)
    assert t.num_points == 100 and t.images is s.images
    torch.testing.assert_close(t.points[0], s.points[0])
    torch.testing.assert_close(t.points[-1], s.points[-1])
    idx = torch.cdist(t.points, s.points).argmin(1)
    assert (idx.diff() == 3).float().mean() > 0.95  # about every third point, in index order
    assert s.thin_points(500).num_points == 300  # fewer points than asked: all of them
    with pytest.raises(ValueError, match="num_points"):
        s.thin_points(0)


# -------------------------------------------------------------------- plots
def test_plots_return_objects():
    import plotly.graph_objects as go

    from fastavatar_nb.data import plots

    s = make_subject(num_points=300)
    fig = plots.rig_figure(s, max_points=100)
    assert isinstance(fig, go.Figure) and len(fig.data[0].x) == 100
    centres = [t for t in fig.data if t.name and t.name.endswith("(centres)")][0]
    np.testing.assert_allclose(np.stack([centres.x, centres.y, centres.z], -1), s.cameras.centers.numpy(), atol=1e-5)
    grid = plots.view_grid(s, views=[0, 8], masks=True, cols=2)
    assert isinstance(grid, Image.Image) and grid.width > 2 * s.width
    assert isinstance(plots.points_overlay(s, views=[3]), Image.Image)
    assert isinstance(plots.subjects_grid([s, make_subject(seed=1, subject_id="s1")]), Image.Image)


def test_rays_side_view_draws_the_rays_in_the_mid_plane_slice():
    from fastavatar_nb.data import plots

    origins = torch.tensor([[0.0, 0.0, 0.6], [0.005, 0.6, 0.0], [0.0, -0.15, 0.3], [0.2, 0.0, 0.3]])
    points = torch.tensor([[0.0, 0.0, 0.09], [0.005, 0.12, 0.0], [0.0, -0.15, 0.01], [0.08, 0.0, 0.0]])
    groups = {"head": torch.tensor([True, True, False, True]), "neck": torch.tensor([False, False, True, False])}
    fig = plots.rays_side_view(origins, points, groups, slice_width=0.01)
    assert [t.name for t in fig.data] == ["head", "points (head)", "neck", "points (neck)"]
    # ray 3 (x = 0.08) lies outside the slice; each drawn ray is origin -> point (z, y), then a gap
    head_lines = np.asarray(fig.data[0].x, dtype=float), np.asarray(fig.data[0].y, dtype=float)
    np.testing.assert_allclose(head_lines[0], [0.6, 0.09, np.nan, 0.0, 0.0, np.nan])
    np.testing.assert_allclose(head_lines[1], [0.0, 0.0, np.nan, 0.6, 0.12, np.nan])
    assert list(fig.data[3].customdata) == [2]
    np.testing.assert_allclose(fig.data[3].x, [0.01])
    with pytest.raises(ValueError, match="origins and points"):
        plots.rays_side_view(origins[:2], points)


@pytest.mark.gpu
def test_subject_on_cuda_matches_cpu():
    s = make_subject(width=64, height=94)
    g = s.to("cuda")
    assert g.device.type == "cuda" and g.cameras.device.type == "cuda"
    r, rg = s.resize(32, 47), g.resize(32, 47)
    torch.testing.assert_close(rg.images.cpu(), r.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(rg.cameras.Ks.cpu(), r.cameras.Ks)
    torch.testing.assert_close(g.mask_coverage().cpu(), s.mask_coverage())
    assert g.view(3).images.device.type == "cuda"
