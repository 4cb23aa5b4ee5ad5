"""Batched pinhole cameras in gsplat's convention.

Convention (package-wide):

- ``viewmats [..., C, 4, 4]``: OpenCV **world-to-camera** matrices (camera looks along +z,
  +x right, +y down).
- ``Ks [..., C, 3, 3]``: pixel intrinsics; pixel ``(i, j)`` (column, row) has its centre at
  ``(i + 0.5, j + 0.5)``, so resizing an image by ``s`` scales ``fx, fy, cx, cy`` by ``s``.
- NeRSemble/VHAP ``transform_matrix`` is an OpenGL **camera-to-world** (camera looks along
  -z, +y up). :func:`opengl_c2w_to_viewmat` is the one place that converts it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Cameras", "opengl_c2w_to_viewmat", "viewmat_to_opengl_c2w", "look_at_viewmat", "intrinsics", "rotvec_to_matrix",
           "matrix_to_rotvec"]

_GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


def opengl_c2w_to_viewmat(c2w: Tensor) -> Tensor:
    """OpenGL camera-to-world ``[..., 4, 4]`` -> OpenCV world-to-camera ``[..., 4, 4]``.

    ``viewmat = inverse(c2w @ diag(1, -1, -1, 1))``: flip the camera's y and z axes, then invert.
    """
    flip = _GL_TO_CV.to(c2w)
    return torch.linalg.inv(c2w @ flip)


def viewmat_to_opengl_c2w(viewmats: Tensor) -> Tensor:
    """Inverse of :func:`opengl_c2w_to_viewmat`."""
    return torch.linalg.inv(viewmats) @ _GL_TO_CV.to(viewmats)


def rotvec_to_matrix(r: Tensor) -> Tensor:
    """Rodrigues: ``[..., 3]`` axis-angle -> ``[..., 3, 3]`` (smooth at 0)."""
    theta2 = (r * r).sum(-1, keepdim=True)
    theta = theta2.clamp_min(1e-30).sqrt()
    small = theta2 < 1e-12
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp_min(1e-30))
    x, y, z = r.unbind(-1)
    zero = torch.zeros_like(x)
    Kx = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(r.shape[:-1] + (3, 3))
    eye = torch.eye(3, dtype=r.dtype, device=r.device).expand_as(Kx)
    return eye + a[..., None] * Kx + b[..., None] * (Kx @ Kx)


def matrix_to_rotvec(R: Tensor) -> Tensor:
    """Inverse of :func:`rotvec_to_matrix` for rotations below 180 degrees."""
    cos = ((R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    theta = torch.acos(cos)
    w = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    sin = torch.sin(theta)
    k = torch.where(sin.abs() < 1e-8, torch.full_like(theta, 0.5), theta / (2 * sin.clamp_min(1e-12)))
    return w * k[..., None]


def intrinsics(fx: Tensor | float, fy: Tensor | float, cx: Tensor | float, cy: Tensor | float) -> Tensor:
    """Build ``[..., 3, 3]`` pixel intrinsics from broadcastable focal lengths and principal points."""
    fx, fy, cx, cy = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float32) for v in (fx, fy, cx, cy)))
    K = torch.zeros(fx.shape + (3, 3))
    K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = fx, fy, cx, cy, 1.0
    return K


def look_at_viewmat(eye: Tensor, target: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """OpenCV world-to-camera matrices for cameras at ``eye [..., 3]`` looking at ``target``.

    ``up`` is the world up direction (default +y, NeRSemble's); image rows run against it.
    """
    eye = torch.as_tensor(eye, dtype=torch.float32)
    target = torch.zeros_like(eye) if target is None else torch.as_tensor(target, dtype=eye.dtype).expand_as(eye)
    up = torch.tensor([0.0, 1.0, 0.0]).expand_as(eye) if up is None else torch.as_tensor(up, dtype=eye.dtype).expand_as(eye)
    z = target - eye
    z = z / z.norm(dim=-1, keepdim=True)
    x = torch.linalg.cross(-up, z)  # camera +x (right) = down x forward; camera +y is down
    xn = x.norm(dim=-1, keepdim=True)
    if (xn < 1e-8).any():
        raise ValueError("look_at_viewmat: viewing direction is parallel to 'up'; choose another up vector")
    x = x / xn
    y = torch.linalg.cross(z, x)
    R = torch.stack([x, y, z], dim=-2)  # rows: camera axes in world coordinates
    V = torch.zeros(eye.shape[:-1] + (4, 4))
    V[..., :3, :3] = R
    V[..., :3, 3] = -(R @ eye[..., None])[..., 0]
    V[..., 3, 3] = 1.0
    return V


# ---------------------------------------------------------------------------------------------
# Geometry of given cameras: triangulation, angles around the head, rotation errors
# ---------------------------------------------------------------------------------------------


def triangulate(points2d: Tensor, cameras: Cameras) -> Tensor:
    """Linear (DLT) triangulation of ``P`` points seen by ``C`` cameras: ``[C, P, 2] -> [P, 3]`` (float64).

    Pixel positions use the cameras' convention (:meth:`Cameras.project`). Each point solves the
    homogeneous system ``u (P_3 X) - P_1 X = 0, v (P_3 X) - P_2 X = 0`` over the views by SVD.
    """
    P = cameras.Ks.double() @ cameras.viewmats[:, :3, :].double()              # [C, 3, 4]
    uv = points2d.double()
    rows = torch.cat([uv[..., 0, None] * P[:, None, 2] - P[:, None, 0],
                      uv[..., 1, None] * P[:, None, 2] - P[:, None, 1]], dim=0)  # [2C, P, 4]
    A = rows.permute(1, 0, 2)                                                   # [P, 2C, 4]
    X = torch.linalg.svd(A).Vh[:, -1]                                           # [P, 4]
    return X[:, :3] / X[:, 3:]


def camera_angles(camera: Cameras) -> tuple[float, float, float, float]:
    """``(yaw, pitch, roll, distance)`` of a camera of one view around the head at the origin.

    Yaw and pitch (degrees) place the camera centre as :meth:`Cameras.from_spherical` does (yaw
    positive towards +x, pitch positive from above); roll (degrees) is the turn of the image about
    the viewing axis against a camera looking at the origin with world +y up; distance in metres.
    """
    V = camera.viewmats.reshape(-1, 4, 4)[0].double().cpu()
    R, t = V[:3, :3], V[:3, 3]
    centre = -R.T @ t
    dist = float(centre.norm())
    yaw = math.degrees(math.atan2(float(centre[0]), float(centre[2])))
    pitch = math.degrees(math.asin(max(-1.0, min(1.0, float(centre[1]) / dist))))
    look = look_at_viewmat(centre.float()[None], torch.zeros(1, 3))[0, :3, :3].double()
    rel = R @ look.T
    roll = math.degrees(math.atan2(float(rel[1, 0]), float(rel[0, 0])))
    return yaw, pitch, roll, dist


def rotation_error_deg(a: Cameras, b: Cameras) -> Tensor:
    """Angle (degrees) of the rotation between the orientations of two camera batches of one shape."""
    Ra, Rb = a.viewmats[..., :3, :3].double(), b.viewmats[..., :3, :3].double()
    cos = (((Ra @ Rb.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos))


def _indices(mask: Tensor) -> str:
    """The indices where ``mask`` is true, as ``1`` or ``(0, 3)`` (a few at most)."""
    idx = torch.nonzero(mask).tolist()
    shown = [str(i[0]) if len(i) == 1 else str(tuple(i)) for i in idx[:5]]
    return ", ".join(shown) + (f" and {len(idx) - 5} more" if len(idx) > 5 else "")


@dataclass
class Cameras:
    """A batch of pinhole cameras sharing one image size.

    Attributes:
        viewmats: ``[..., C, 4, 4]`` OpenCV world-to-camera.
        Ks: ``[..., C, 3, 3]`` pixel intrinsics.
        width: image width in pixels.
        height: image height in pixels.
    """

    viewmats: Tensor
    Ks: Tensor
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("viewmats", "Ks"):
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"Cameras.{name} must be a torch.Tensor, got {type(t).__name__} (use torch.as_tensor)")
            if not t.is_floating_point():
                raise TypeError(f"Cameras.{name} must be a floating-point tensor, got {t.dtype} (use .float())")
        if self.Ks.device != self.viewmats.device:
            raise ValueError(f"Cameras.Ks is on {self.Ks.device} but viewmats on {self.viewmats.device}; move one of them")
        for name in ("width", "height"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__index__") \
                    or isinstance(v, float) and not v.is_integer():
                raise ValueError(f"Cameras.{name} must be a whole number of pixels, got {v!r}")
        if self.viewmats.ndim < 3 or self.viewmats.shape[-2:] != (4, 4):
            raise ValueError(f"Cameras.viewmats must be [..., C, 4, 4], got {tuple(self.viewmats.shape)}")
        if self.Ks.shape[:-2] != self.viewmats.shape[:-2] or self.Ks.shape[-2:] != (3, 3):
            raise ValueError(
                f"Cameras.Ks must be [..., C, 3, 3] matching viewmats {tuple(self.viewmats.shape)}, "
                f"got {tuple(self.Ks.shape)}"
            )
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f"Cameras need a positive image size, got {self.width}x{self.height}")
        self.width, self.height = int(self.width), int(self.height)
        if not (torch.isfinite(self.viewmats).all() and torch.isfinite(self.Ks).all()):
            bad = ~(torch.isfinite(self.viewmats).flatten(-2).all(-1) & torch.isfinite(self.Ks).flatten(-2).all(-1))
            raise ValueError(f"Cameras contain non-finite values (NaN or inf) in viewmats or Ks, at camera index "
                             f"{_indices(bad)}")
        # A world-to-camera matrix must be invertible with last row (0, 0, 0, 1): the renderer inverts it.
        V = self.viewmats.detach().double()
        R = V[..., :3, :3]
        det = torch.linalg.det(R) if R.numel() else R.new_zeros(R.shape[:-2])
        scale = R.flatten(-2).norm(dim=-1) / math.sqrt(3)
        last = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=V.dtype, device=V.device)
        bad = (det.abs() <= 1e-9 * scale.clamp_min(1e-30) ** 3) | ((V[..., 3, :] - last).abs() > 1e-5).any(-1)
        if bad.any():
            raise ValueError(
                f"Cameras.viewmats: camera index {_indices(bad)} has a singular or non-rigid world-to-camera matrix "
                f"(rotation part determinant {det[bad].flatten()[:3].tolist()}, last row "
                f"{V[bad][0, 3].tolist()}); expected an OpenCV world-to-camera [[R, t], [0, 0, 0, 1]] with R a "
                "rotation. Build it with look_at_viewmat or opengl_c2w_to_viewmat"
            )

    # ------------------------------------------------------------------ basics
    @property
    def batch_shape(self) -> torch.Size:
        """All leading dimensions including the camera dimension C."""
        return self.viewmats.shape[:-2]

    def __len__(self) -> int:
        return self.viewmats.shape[-3]

    @property
    def device(self) -> torch.device:
        return self.viewmats.device

    def to(self, *args, **kwargs) -> Cameras:
        return Cameras(self.viewmats.to(*args, **kwargs), self.Ks.to(*args, **kwargs), self.width, self.height)

    def __getitem__(self, index) -> Cameras:
        """Select cameras along the camera dimension C (keeps it: ``cams[3]`` is a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return Cameras(self.viewmats[..., index, :, :], self.Ks[..., index, :, :], self.width, self.height)

    @staticmethod
    def cat(items: list[Cameras]) -> Cameras:
        """Concatenate along the camera dimension (all must share the image size)."""
        sizes = {(c.width, c.height) for c in items}
        if len(sizes) != 1:
            raise ValueError(f"Cameras.cat needs one image size, got {sorted(sizes)}")
        return Cameras(torch.cat([c.viewmats for c in items], -3), torch.cat([c.Ks for c in items], -3),
                       items[0].width, items[0].height)

    @property
    def camtoworlds(self) -> Tensor:
        """``[..., C, 4, 4]`` OpenCV camera-to-world matrices."""
        return torch.linalg.inv(self.viewmats)

    @property
    def centers(self) -> Tensor:
        """``[..., C, 3]`` camera centres in world coordinates."""
        return self.camtoworlds[..., :3, 3]

    @property
    def opengl_c2w(self) -> Tensor:
        """``[..., C, 4, 4]`` OpenGL camera-to-world (NeRSemble's ``transform_matrix``)."""
        return viewmat_to_opengl_c2w(self.viewmats)

    def resize(self, width: int, height: int) -> Cameras:
        """Cameras for the same views at another image size: intrinsics scale with the image."""
        sx, sy = width / self.width, height / self.height
        K = self.Ks.clone()
        K[..., 0, :] *= sx
        K[..., 1, :] *= sy
        return Cameras(self.viewmats.clone(), K, width, height)

    def project(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Project world points ``[..., N, 3]`` into every camera.

        Returns:
            ``(pixels [..., C, N, 2], depths [..., C, N])``: pixel coordinates with centres at
            ``+0.5`` (gsplat's convention) and camera-space z.
        """
        pc = torch.einsum("...cij,...nj->...cni", self.viewmats[..., :3, :3], points) + self.viewmats[..., None, :3, 3]
        z = pc[..., 2]
        uv = torch.einsum("...cij,...cnj->...cni", self.Ks[..., :2, :], pc) / z[..., None]
        return uv, z

    # ------------------------------------------------------------- builders
    @staticmethod
    def from_opengl_c2w(c2w: Tensor, Ks: Tensor, width: int, height: int) -> Cameras:
        """From NeRSemble/VHAP OpenGL camera-to-world matrices ``[..., C, 4, 4]``."""
        c2w = torch.as_tensor(c2w, dtype=torch.float32)
        return Cameras(opengl_c2w_to_viewmat(c2w), torch.as_tensor(Ks, dtype=torch.float32), width, height)

    @staticmethod
    def nersemble_rig(width: int | None = None, height: int | None = None,
                      path: str | os.PathLike | None = None) -> Cameras:
        """The 16-camera NeRSemble rig (VHAP export of subject 306; metres, head at the origin).

        Args:
            width, height: image size (default the rig's 550x802); intrinsics are scaled to it.
                Give one of them to keep the 550:802 aspect (the other is rounded).
            path: a rig JSON (``{"width", "height", "cameras": [{"fl_x", "fl_y", "cx", "cy",
                "c2w_opengl"}, ...]}``); default the copy shipped with the package.
        """
        if path is None:
            text = resources.files("fastavatar_nb.assets").joinpath("nersemble_rig.json").read_text()
            src = "the packaged nersemble_rig.json"
        else:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"rig file {p} does not exist")
            text, src = p.read_text(), str(p)
        rig = json.loads(text)
        try:
            cams = sorted(rig["cameras"], key=lambda c: c["camera_index"])
            c2w = torch.tensor([c["c2w_opengl"] for c in cams], dtype=torch.float32)
            Ks = intrinsics(*(torch.tensor([c[k] for c in cams]) for k in ("fl_x", "fl_y", "cx", "cy")))
            W, H = int(rig["width"]), int(rig["height"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{src}: not a rig file ({e!r} missing or malformed)") from e
        out = Cameras.from_opengl_c2w(c2w, Ks, W, H)
        if width is None and height is None:
            return out
        if height is None:
            height = round(width * H / W)
        if width is None:
            width = round(height * W / H)
        return out.resize(width, height)

    @staticmethod
    def orbit(n: int, width: int, height: int, radius: float = 1.1, pitch_deg: float = 0.0,
              yaw_range_deg: tuple[float, float] = (0.0, 360.0), fov_y_deg: float = 15.0,
              target: tuple[float, float, float] = (0.0, 0.0, 0.0), endpoint: bool = False) -> Cameras:
        """``n`` cameras on a horizontal circle around ``target`` (turntable), starting in front of the face.

        Yaw 0 looks at the face from +z (NeRSemble's frontal camera); positive pitch looks down
        from above. ``fov_y_deg`` is the vertical field of view (NeRSemble's is about 22 degrees
        for 802 rows at f = 2048 px; 15 degrees frames a head at 1.1 m).
        """
        if n < 1:
            raise ValueError(f"Cameras.orbit needs n >= 1, got {n}")
        yaws = torch.linspace(math.radians(yaw_range_deg[0]), math.radians(yaw_range_deg[1]), n + (0 if endpoint else 1))
        yaws = yaws if endpoint else yaws[:-1]
        return Cameras.from_spherical(yaws, torch.full_like(yaws, math.radians(pitch_deg)), radius, width, height,
                                      fov_y_deg, target)

    @staticmethod
    def from_spherical(yaw: Tensor, pitch: Tensor, radius: float | Tensor, width: int, height: int,
                       fov_y_deg: float = 15.0, target: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Cameras:
        """Cameras at yaw/pitch (radians) and distance ``radius`` looking at ``target`` (world up +y)."""
        yaw, pitch = torch.as_tensor(yaw, dtype=torch.float32), torch.as_tensor(pitch, dtype=torch.float32)
        r = torch.as_tensor(radius, dtype=torch.float32)
        t = torch.tensor(target, dtype=torch.float32)
        eye = torch.stack([r * torch.cos(pitch) * torch.sin(yaw), r * torch.sin(pitch),
                           r * torch.cos(pitch) * torch.cos(yaw)], -1) + t
        V = look_at_viewmat(eye, t.expand_as(eye))
        f = 0.5 * height / math.tan(math.radians(fov_y_deg) / 2)
        K = intrinsics(f, f, width / 2, height / 2).expand(V.shape[:-2] + (3, 3)).clone()
        return Cameras(V, K, width, height)
