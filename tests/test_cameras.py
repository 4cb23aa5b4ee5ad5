"""Cameras: OpenGL<->OpenCV, the NeRSemble rig, resizing and projection."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastavatar_nb.cameras import (
    Cameras,
    intrinsics,
    look_at_viewmat,
    opengl_c2w_to_viewmat,
    viewmat_to_opengl_c2w,
)
from fastavatar_nb.gaussians import read_points_ply


def test_opengl_conversion_round_trip_and_axes():
    # an OpenGL camera at (0, 0, 2) looking down -z at the origin, +y up
    c2w = torch.eye(4)
    c2w[2, 3] = 2.0
    V = opengl_c2w_to_viewmat(c2w)
    p = V @ torch.tensor([0.0, 0.1, 0.0, 1.0])  # a point above the origin
    assert p[2] == pytest.approx(2.0)  # in front: positive OpenCV depth
    assert p[1] < 0  # above in the world = up in the image = negative OpenCV y
    torch.testing.assert_close(viewmat_to_opengl_c2w(V), c2w)


def test_rig_matches_reference_geometry():
    cams = Cameras.nersemble_rig()
    assert len(cams) == 16 and (cams.width, cams.height) == (550, 802)
    d = cams.centers.norm(dim=-1)
    assert d.min() > 1.0 and d.max() < 1.3
    uv, z = cams.project(torch.zeros(1, 3))
    assert (z > 1.0).all()
    # every camera looks at the head: the origin lands near the image centre
    assert ((uv[:, 0, 0] - 275).abs() < 80).all() and ((uv[:, 0, 1] - 401).abs() < 120).all()
    yaw = torch.rad2deg(torch.atan2(cams.centers[:, 0], cams.centers[:, 2]))
    assert yaw.min() < -40 and yaw.max() > 40


def test_rig_matches_subject_transforms(shared_dir):
    folder = shared_dir / "data/nersemble_samples/306"
    meta = json.loads((folder / "transforms.json").read_text())
    frames = sorted(meta["frames"], key=lambda f: f["camera_index"])
    c2w = torch.tensor([f["transform_matrix"] for f in frames], dtype=torch.float32)
    torch.testing.assert_close(Cameras.nersemble_rig().opengl_c2w, c2w, atol=1e-4, rtol=0)


def test_resize_scales_intrinsics_with_the_image():
    cams = Cameras.nersemble_rig()
    small = cams.resize(275, 401)
    pts = torch.randn(20, 3) * 0.05
    uv, _ = cams.project(pts)
    uv2, _ = small.project(pts)
    torch.testing.assert_close(uv2[..., 0], uv[..., 0] * 275 / 550, atol=1e-3, rtol=0)
    torch.testing.assert_close(uv2[..., 1], uv[..., 1] * 401 / 802, atol=1e-3, rtol=0)
    assert Cameras.nersemble_rig(width=69).height == 101


def test_orbit_and_look_at():
    cams = Cameras.orbit(8, 64, 48, radius=1.2, pitch_deg=10)
    uv, z = cams.project(torch.zeros(1, 3))
    torch.testing.assert_close(uv[:, 0], torch.tensor([32.0, 24.0]).expand(8, 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(z[:, 0], torch.full((8,), 1.2), atol=1e-5, rtol=0)
    # yaw 0 sits on +z (in front of the face); a point above the origin appears above the centre
    torch.testing.assert_close(cams.centers[0], torch.tensor([0.0, 1.2 * math.sin(math.radians(10)),
                                                              1.2 * math.cos(math.radians(10))]), atol=1e-5, rtol=0)
    uv, _ = cams[0].project(torch.tensor([[0.0, 0.1, 0.0], [0.1, 0.0, 0.0]]))
    assert uv[0, 0, 1] < 24  # up is up
    assert uv[0, 1, 0] > 32  # the face looks at +z, so world +x is image right from the front
    with pytest.raises(ValueError, match="parallel"):
        look_at_viewmat(torch.tensor([0.0, 2.0, 0.0]))


def test_bad_cameras_raise():
    with pytest.raises(ValueError, match="viewmats"):
        Cameras(torch.eye(3)[None], intrinsics(1, 1, 1, 1)[None], 10, 10)
    with pytest.raises(ValueError, match="Ks"):
        Cameras(torch.eye(4)[None], intrinsics(1, 1, 1, 1)[None].expand(2, 3, 3), 10, 10)
    with pytest.raises(ValueError, match="positive image size"):
        Cameras(torch.eye(4)[None], intrinsics(1, 1, 1, 1)[None], 0, 10)
    V = torch.eye(4)[None].clone()
    V[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        Cameras(V, intrinsics(1, 1, 1, 1)[None], 10, 10)
    with pytest.raises(FileNotFoundError):
        Cameras.nersemble_rig(path="/nonexistent/rig.json")


@pytest.mark.parametrize("subject", ["306", "369"])
def test_nersemble_points_project_inside_foreground_masks(shared_dir, subject):
    folder = shared_dir / "data/nersemble_samples" / subject
    meta = json.loads((folder / "transforms.json").read_text())
    frames = sorted(meta["frames"], key=lambda f: f["camera_index"])
    c2w = torch.tensor([f["transform_matrix"] for f in frames], dtype=torch.float32)
    Ks = intrinsics(*(torch.tensor([f[k] for f in frames]) for k in ("fl_x", "fl_y", "cx", "cy")))
    cams = Cameras.from_opengl_c2w(c2w, Ks, int(frames[0]["w"]), int(frames[0]["h"]))
    pts, _, _ = read_points_ply(folder / "points3d.ply")
    uv, z = cams.project(pts)
    assert (z > 0).all()
    for c, f in enumerate(frames):
        mask = np.asarray(Image.open(folder / f["fg_mask_path"]).convert("L"), dtype=np.float32) / 255
        col = uv[c, :, 0].floor().long().clamp(0, mask.shape[1] - 1).numpy()
        row = uv[c, :, 1].floor().long().clamp(0, mask.shape[0] - 1).numpy()
        inside = (mask[row, col] > 0.5).mean()
        assert inside >= 0.95, f"camera {c}: only {inside:.1%} of points inside the mask"


def test_singular_and_malformed_cameras_name_the_camera():
    K3 = intrinsics(40.0, 40.0, 16.0, 12.0)[None].expand(3, 3, 3)
    V = torch.eye(4)[None].repeat(3, 1, 1)
    V[1, :3, :3] = 0.0
    with pytest.raises(ValueError, match=r"camera index 1 has a singular"):
        Cameras(V, K3, 32, 24)
    V = torch.eye(4)[None].repeat(3, 1, 1)
    V[2, 3, 3] = 0.0
    with pytest.raises(ValueError, match=r"camera index 2 .*last row"):
        Cameras(V, K3, 32, 24)
    V = torch.eye(4)[None].repeat(3, 1, 1)
    V[0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite.*camera index 0"):
        Cameras(V, K3, 32, 24)
    with pytest.raises(TypeError, match="viewmats must be a torch.Tensor"):
        Cameras(torch.eye(4)[None].numpy(), K3[:1], 32, 24)
    with pytest.raises(TypeError, match="floating-point"):
        Cameras(torch.eye(4, dtype=torch.long)[None], K3[:1], 32, 24)
    with pytest.raises(ValueError, match="whole number of pixels"):
        Cameras(torch.eye(4)[None], K3[:1], 32.5, 24)
    with pytest.raises(ValueError, match="Ks"):
        Cameras(torch.eye(4)[None], torch.zeros(1, 3, 4), 32, 24)
    assert Cameras(torch.eye(4)[None], K3[:1], 32.0, 24).width == 32
