"""A user's own photo -> a 3D head: loading, the face and its landmarks, a camera, the head.

The models are trained on views of a calibrated rig on white; a photo has neither a camera nor a
white background. This module turns a photo into what the pipeline needs, using only what the
photo carries:

1. :func:`~fastavatar_nb.photo_io.load_photo` (:mod:`fastavatar_nb.photo_io`, also importable from here): a
   path, PIL image or array -> :class:`Photo`, float RGB ``[H, W, 3]`` in ``[0, 1]`` with EXIF orientation
   applied, grey-scale made RGB, transparency composited on white, very large photos downscaled; every change
   is written in ``Photo.notes``.
2. :func:`detect_face`: MTCNN's box and five landmarks (image-left eye, image-right eye, nose tip,
   image-left and image-right mouth corner) of the largest face; a warning says how many were
   found; :class:`NoFaceError` names the photo when there is none.
3. :func:`template_landmarks`: the same five landmarks on the template head, in 3D. MTCNN finds
   them in renders of the template from the 16 rig cameras; each is triangulated (linear DLT over
   the views), so the 3D points mean exactly what the detector means on a photo.
4. :func:`photo_view`: the *working view*, the photo cropped and resized to the training images'
   size so that the face sits where the template's face sits in the frontal rig view (scale and
   shift of the landmarks). Intrinsics: the focal length from the photo's EXIF 35 mm-equivalent
   focal length when it has one, else the rig's (the prior: the face seen as the rig sees it).
5. :func:`estimate_pose`: extrinsics by PnP of the five landmarks against the template's,
   Levenberg-Marquardt in torch from every rig camera as a start (no OpenCV); the result reports
   yaw, pitch, roll, distance and the reprojection error in photo pixels.
6. :func:`loss_region`: a photo is not on white, so refinement's loss sees the head area only:
   the feed-forward head's rendered alpha (eroded, so its silhouette edge never sees the
   background) united with a face ellipse from the landmarks, inside the photo. A photo whose
   border is white (a NeRSemble frame) keeps the training objective: every pixel.
7. :func:`reconstruct`: all of it, then FaceNet (on the face MTCNN found in the photo) -> encoder
   -> decoder (the feed-forward head) and optional test-time refinement; :class:`Reconstruction` holds every intermediate and each
   step's time. ``fastavatar-nb reconstruct photo.jpg`` (:mod:`fastavatar_nb.cli`) writes the
   head as PLY, a turntable GIF and a standalone HTML viewer.

Conventions: images ``[H, W, 3]`` float in ``[0, 1]``; pixel coordinates are continuous with pixel
``(i, j)`` covering ``[j, j + 1) x [i, i + 1)`` (gsplat's, centres at ``+0.5``); cameras are
:class:`~fastavatar_nb.cameras.Cameras` (OpenCV world-to-camera, head at the origin, +y up, the
face looking along +z).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .cameras import (
    Cameras,
    camera_angles,
    intrinsics,
    matrix_to_rotvec,
    rotation_error_deg,
    rotvec_to_matrix,
    triangulate,
)
from .faces import NoFaceError as _FacesNoFaceError
from .gaussians import Gaussians
from .objective import HOLDOUT_VIEW, MIN_WHITE_BORDER, WHITE_LEVEL, NotOnWhiteError, check_on_white
from .photo_io import (
    MAX_PHOTO_SIDE,
    MIN_PHOTO_SIDE,
    ImageSize,
    Photo,
    PhotoError,
    as_photo,
    load_photo,
)
from .render import Backend, render

__all__ = [
    "PhotoError", "NoFaceError", "LANDMARK_NAMES", "MAX_PHOTO_SIDE", "MIN_PHOTO_SIDE", "FRONTAL_VIEW", "PHOTO_REFINE",
    "Photo", "load_photo", "FaceDetection", "detect_face", "template_landmarks", "PhotoView", "photo_view",
    "Pose", "estimate_pose", "camera_angles", "photo_refine_config", "rotation_error_deg", "face_ellipse", "loss_region", "head_region", "encoder_photo", "Reconstruction", "reconstruct",
    "draw_detection", "OUTPUT_FILES", "check_output_folder", "save_reconstruction",
]

LANDMARK_NAMES = ("left eye", "right eye", "nose", "mouth left", "mouth right")
"""MTCNN's five landmarks, in its order; left and right as seen in the image."""
FRONTAL_VIEW = HOLDOUT_VIEW
"""The rig camera whose framing the working view copies: camera 8 looks at the face from the front."""
LANDMARK_RENDER_SCALE = 2
"""Template renders for :func:`template_landmarks` are this many times the model's image size:
the triangulated points then agree with every view to about 1 pixel (1x: 1.0, 2x: 0.9, 4x: 0.9
pixels mean reprojection error over the 16 rig views of the course template)."""
REGION_ERODE_PX = 1
"""Pixels the feed-forward alpha is eroded by in :func:`loss_region` (at the working size)."""
REGION_ALPHA = 0.5
"""Rendered alpha at and above which a pixel belongs to the feed-forward head in :func:`loss_region`."""
FACE_ELLIPSE_SIZE = (1.15, 1.6)
"""Semi-axes of :func:`face_ellipse` (horizontal, vertical) in units of the eye-to-mouth distance."""
PHOTO_REFINE = {"schedule": "code", "pose_rotation_lr": 1e-2, "pose_translation_lr": 2e-3}
"""How :func:`reconstruct` refines a head on a photo (:class:`~fastavatar_nb.refine.RefineConfig`
fields; the others keep their defaults): the code ``w`` and the camera's pose. Five landmarks leave the
camera several degrees off (a face's proportions look like pitch), and a head refined to a photo from a wrong camera bends away from every other
view; refining the pose with the head brings the camera within a few degrees. The schedule was chosen on the
course checkpoint's validation subjects with its first encoder (5 subjects x cameras 8 and 3, on white and on
green, 50 steps; ``benchmarks/photo.py``, ``benchmarks/results/cpu-2core/photo.json``), mean PSNR on the 15
other views: feed-forward 15.60, code and camera 18.69, code only 17.47, the default joint schedule 12.44
(15.08 with the camera), joint with a 10x smaller decoder learning rate and the camera 18.31 dB; the camera's
rotation error 12.4 degrees from PnP, 5.4 after refinement.

A pull toward the encoder's code (``RefineConfig.code_prior_weight``) is not part of it. On the validation photos
with the shipped encoder, weight 0.3 left 2 of 20 photos below their feed-forward head on the other views (9 of 20
without it; mean 19.44 against 18.99 dB; ``photo_prior_val.json``), but on the 32 real frames of NeRSemble
subjects 306 and 369 it left 12 below (9 without it; ``photo_real.json``): there the refined camera drifts from
PnP's 5.8 degrees (median, relative to the tracked head) to 12-15 degrees, and the prior leaves the pose more of
the fit. Refining the code alone left none of the 32 real photos below feed-forward, and 14 of the 20 validation
photos. Synthetic validation photos do not stand for real ones yet (issue 31 item 3: one head frame would let
real subjects validate)."""

class NoFaceError(_FacesNoFaceError):
    """MTCNN found no face in a photo (also a :class:`fastavatar_nb.faces.NoFaceError`)."""

    def __init__(self, name: str, detail: str = ""):
        self.indices = [0]
        self.name = name
        ValueError.__init__(
            self, f"{name}: no face found (MTCNN){detail}. Pass a photo of one person's face, roughly frontal, "
                  f"with the face at least ~20 pixels across; a drawing, an animal or a face seen from behind "
                  f"or above is not detected")


# ---------------------------------------------------------------------------------------------
# The face
# ---------------------------------------------------------------------------------------------


@dataclass
class FaceDetection:
    """The face :func:`detect_face` uses.

    Attributes:
        box: ``[4]`` ``(x0, y0, x1, y1)`` in photo pixels.
        landmarks: ``[5, 2]`` pixel positions, in the order of :data:`LANDMARK_NAMES`.
        probability: MTCNN's face probability.
        num_faces: how many faces MTCNN found (the largest is used).
        all_boxes: ``[num_faces, 4]`` every face's box, largest first.
    """

    box: Tensor
    landmarks: Tensor
    probability: float
    num_faces: int
    all_boxes: Tensor


def detect_face(photo: Photo | Any, mtcnn=None) -> FaceDetection:
    """Find the largest face of a photo with MTCNN: its box and five landmarks.

    Args:
        photo: a :class:`Photo` or anything :func:`load_photo` takes.
        mtcnn: a detector from :func:`fastavatar_nb.faces.make_mtcnn` to reuse.

    Warns:
        UserWarning: more than one face was found (says how many; the largest is used).

    Raises:
        NoFaceError: no face, naming the photo.
    """
    from .faces import make_mtcnn, pil_images

    photo = as_photo(photo)
    mtcnn = mtcnn or make_mtcnn()
    boxes, probs, points = mtcnn.detect(pil_images(photo.image[None])[0], landmarks=True)
    if boxes is None or len(boxes) == 0:
        raise NoFaceError(photo.name, f" in its {photo.width}x{photo.height} pixels")
    boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float64))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = torch.argsort(area, descending=True)
    i = int(order[0])
    n = len(boxes)
    if n > 1:
        second = float(area[order[1]] / area[i])
        warnings.warn(f"{photo.name}: {n} faces found; using the largest (the next is {second:.0%} of its area). "
                      "Crop the photo to one person to choose another", UserWarning, stacklevel=2)
    return FaceDetection(box=boxes[i], landmarks=torch.as_tensor(np.asarray(points[i], dtype=np.float64)),
                         probability=float(probs[i]), num_faces=n, all_boxes=boxes[order])


# ---------------------------------------------------------------------------------------------
# The template's landmarks
# ---------------------------------------------------------------------------------------------


def template_landmarks(template: Gaussians, width: int, height: int, mtcnn=None, backend: Backend = "auto",
                       sh_degree: int = 3, scale: int = LANDMARK_RENDER_SCALE) -> tuple[Tensor, Tensor]:
    """The five MTCNN landmarks on a template head, in 3D: triangulated from renders of the rig.

    Args:
        template: the template head ``[K]``.
        width, height: the model's image size (the rig is rendered at ``scale`` times it).
        mtcnn: a detector to reuse.

    Returns:
        ``(points [5, 3], error [C])``: float64 world positions (metres), and each rig view's mean
        reprojection error in pixels at ``width`` x ``height`` (NaN where no face was found).

    Raises:
        ValueError: fewer than 3 rig views show a face (the template is not face-like).
    """
    from .faces import make_mtcnn, pil_images

    mtcnn = mtcnn or make_mtcnn()
    cams = Cameras.nersemble_rig(width * scale, height * scale).to(template.device)
    with torch.no_grad():
        imgs = render(template, cams, background=1.0, backend=backend, sh_degree=sh_degree).colors.clamp(0, 1)
    found, lms = [], []
    for c, im in enumerate(pil_images(imgs)):
        _, _, pts = mtcnn.detect(im, landmarks=True)
        if pts is not None:
            found.append(c)
            lms.append(torch.as_tensor(np.asarray(pts[0], dtype=np.float64)))
    if len(found) < 3:
        raise ValueError(f"template_landmarks: MTCNN found a face in {len(found)} of {len(cams)} rig renders of the "
                         "template; it needs at least 3 to triangulate (is this a trained template of faces?)")
    seen = cams.to("cpu")[found]
    X = triangulate(torch.stack(lms), seen)
    uv, _ = seen.project(X.float())
    error = torch.full((len(cams),), float("nan"), dtype=torch.float64)
    error[found] = (uv.double() - torch.stack(lms)).norm(dim=-1).mean(-1) / scale
    return X, error


# ---------------------------------------------------------------------------------------------
# The working view and its camera
# ---------------------------------------------------------------------------------------------


@dataclass
class PhotoView(ImageSize):
    """The photo as the model sees it: cropped and resized to the training image size.

    Attributes:
        image: ``[H, W, 3]`` the working view (white where the crop leaves the photo).
        inside: ``[H, W]`` 1 where the working view shows the photo, 0 on the white padding.
        landmarks: ``[5, 2]`` the landmarks in working-view pixels.
        box: ``[4]`` the face box in working-view pixels.
        crop: ``(x0, y0, x1, y1)`` the photo region the working view shows (photo pixels).
        scale: working pixels per photo pixel.
        Ks: ``[3, 3]`` intrinsics of the working view.
        focal_source: ``"exif"``, ``"argument"`` or ``"prior"`` (the rig's framing).
    """

    image: Tensor
    inside: Tensor
    landmarks: Tensor
    box: Tensor
    crop: tuple[float, float, float, float]
    scale: float
    Ks: Tensor
    focal_source: str


def _frontal_camera(width: int, height: int) -> Cameras:
    return Cameras.nersemble_rig(width, height)[[FRONTAL_VIEW]]


def _resample(image: Tensor, crop: tuple[float, float, float, float], width: int, height: int) -> tuple[Tensor, Tensor]:
    """The region ``crop`` of ``image`` ``[H, W, 3]`` resized to ``width`` x ``height`` (antialiased),
    white outside the image; and the ``[height, width]`` share of each pixel inside it."""
    H, W = image.shape[:2]
    x0, y0, x1, y1 = crop
    ix0, iy0, ix1, iy1 = math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)
    pad = (max(0, -ix0), max(0, ix1 - W), max(0, -iy0), max(0, iy1 - H))      # left, right, top, bottom
    chw = torch.cat([image.permute(2, 0, 1), torch.ones(1, H, W)], 0)[None]     # RGB + inside
    chw = F.pad(chw, (pad[0], pad[1], pad[2], pad[3]), value=0.0)
    chw[:, :3] += (1 - chw[:, 3:])                                               # white padding
    sub = chw[:, :, iy0 + pad[2]: iy1 + pad[2], ix0 + pad[0]: ix1 + pad[0]]
    # sub-pixel crop: resize the integer box, then the fractional offsets are below one source pixel
    out = F.interpolate(sub, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]
    return out[:3].permute(1, 2, 0).clamp(0, 1).contiguous(), out[3].clamp(0, 1)


def photo_view(photo: Photo, detection: FaceDetection, landmarks3d: Tensor, width: int, height: int,
               focal_px: float | None = None) -> PhotoView:
    """Crop and resize the photo to the model's image size, framed like the frontal rig view.

    The scale ``s`` and shift ``t`` that map the photo's landmarks closest (least squares) onto the
    template's landmarks seen by the frontal rig camera (:data:`FRONTAL_VIEW`) define the crop:
    working pixel = ``s * photo pixel + t``. The intrinsics follow the same map: focal ``s * f``
    and principal point ``s * c + t``, where ``f`` is ``focal_px`` if given, else the photo's EXIF
    35 mm-equivalent focal length, else the prior ``f_rig / s`` (the rig's focal length at the
    working size: the face is then seen as the rig sees it), and ``c`` is the photo's centre.

    Args:
        photo, detection: from :func:`load_photo` and :func:`detect_face`.
        landmarks3d: ``[5, 3]`` from :func:`template_landmarks`.
        width, height: the model's image size.
        focal_px: the photo's focal length in its own pixels, when known.
    """
    front = _frontal_camera(width, height)
    q, _ = front.project(landmarks3d.float()[None].to(front.device))            # [1, 1, 5, 2]
    q = q[0, 0].double().cpu()
    p = detection.landmarks.double()
    p_mean, q_mean = p.mean(0), q.mean(0)
    dp, dq = p - p_mean, q - q_mean
    s = float((dp * dq).sum() / (dp * dp).sum())
    if not math.isfinite(s) or s <= 0:
        raise NoFaceError(photo.name, ": its landmarks are degenerate (all in one place or mirrored)")
    t = q_mean - s * p_mean
    crop = (float(-t[0] / s), float(-t[1] / s), float((width - t[0]) / s), float((height - t[1]) / s))
    image, inside = _resample(photo.image, crop, width, height)
    f_rig = float(front.Ks[0, 0, 0])
    if focal_px is not None:
        if not (math.isfinite(focal_px) and focal_px > 0):
            raise ValueError(f"photo_view: focal_px must be a positive number of pixels, got {focal_px!r}")
        f, source = focal_px, "argument"
    elif photo.focal_px() is not None:
        f, source = photo.focal_px(), "exif"
    else:
        f, source = f_rig / s, "prior"
    cx, cy = photo.width / 2, photo.height / 2
    Ks = intrinsics(s * f, s * f, s * cx + float(t[0]), s * cy + float(t[1])).float()
    return PhotoView(image=image, inside=inside, landmarks=(s * p + t).float(),
                     box=(s * detection.box.double() + t.repeat(2)).float(), crop=crop, scale=s, Ks=Ks,
                     focal_source=source)


# ---------------------------------------------------------------------------------------------
# PnP
# ---------------------------------------------------------------------------------------------


def _reprojection(params: Tensor, X: Tensor, K: Tensor) -> Tensor:
    """Pixels ``[..., P, 2]`` of points ``X [P, 3]`` for poses ``params [..., 6]`` (rotvec, translation)."""
    R = rotvec_to_matrix(params[..., :3])
    pc = torch.einsum("...ij,pj->...pi", R, X) + params[..., None, 3:]
    uvw = torch.einsum("ij,...pj->...pi", K, pc)
    return uvw[..., :2] / uvw[..., 2:]


@dataclass
class Pose:
    """The photo's camera found by :func:`estimate_pose`.

    Attributes:
        camera: :class:`Cameras` ``[1]`` of the working view (its ``Ks`` and the PnP extrinsics).
        yaw_deg, pitch_deg, roll_deg: where the camera sits around the head: yaw positive towards
            the head's left (+x), pitch positive from above (the conventions of
            :meth:`Cameras.from_spherical`); roll about the viewing axis.
        distance: camera centre to the head's origin, metres.
        reprojection_px: RMS distance of the five landmarks to their reprojections, photo pixels.
        residuals_px: ``[5]`` each landmark's distance, photo pixels.
    """

    camera: Cameras
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    distance: float
    reprojection_px: float
    residuals_px: Tensor

    def summary(self) -> dict[str, float]:
        return {"yaw_deg": round(self.yaw_deg, 2), "pitch_deg": round(self.pitch_deg, 2),
                "roll_deg": round(self.roll_deg, 2), "distance_m": round(self.distance, 4),
                "reprojection_px": round(self.reprojection_px, 3)}


def estimate_pose(view: PhotoView, landmarks3d: Tensor, iterations: int = 60, photo_scale: float | None = None) -> Pose:
    """Extrinsics of the working view by PnP: the template's 3D landmarks onto the photo's 2D ones.

    Minimises the squared reprojection error over rotation (axis-angle) and translation with
    Levenberg-Marquardt (Jacobians by autograd), started from each of the 16 rig cameras at once;
    the start ending with the lowest error wins (five points have mirror solutions; the rig's
    starts all lie in front of the face). Pure torch, float64, a few milliseconds.

    Args:
        view: from :func:`photo_view` (its intrinsics and landmarks).
        landmarks3d: ``[5, 3]`` from :func:`template_landmarks`.
        iterations: LM iterations per start.
        photo_scale: working pixels per photo pixel for the reported errors (default ``view.scale``).
    """
    X = landmarks3d.double().cpu()
    K = view.Ks.double().cpu()
    u = view.landmarks.double().cpu()
    rig = Cameras.nersemble_rig(view.width, view.height)
    R0, t0 = rig.viewmats[:, :3, :3].double(), rig.viewmats[:, :3, 3].double()
    params = torch.cat([matrix_to_rotvec(R0), t0], -1)                       # [S, 6]
    lam = torch.full((params.shape[0],), 1e-3, dtype=torch.float64)

    def residual(p: Tensor) -> Tensor:
        return (_reprojection(p, X, K) - u).reshape(-1)

    jac = torch.func.vmap(torch.func.jacrev(residual))
    r = torch.func.vmap(residual)(params)
    cost = (r * r).sum(-1)
    eye = torch.eye(6, dtype=torch.float64)
    for _ in range(iterations):
        J = jac(params)                                                        # [S, 10, 6]
        JtJ = J.transpose(1, 2) @ J
        g = (J.transpose(1, 2) @ r[..., None])[..., 0]
        A = JtJ + lam[:, None, None] * (JtJ.diagonal(dim1=1, dim2=2)[..., None] * eye + 1e-9 * eye)
        step = torch.linalg.solve(A, -g)
        cand = params + step
        rc = torch.func.vmap(residual)(cand)
        cc = (rc * rc).sum(-1)
        # a valid pose keeps every landmark in front of the camera
        Rc = rotvec_to_matrix(cand[:, :3])
        zc = torch.einsum("sij,pj->spi", Rc, X)[..., 2] + cand[:, None, 5]
        better = (cc < cost) & (zc > 0).all(-1) & torch.isfinite(cc)
        params = torch.where(better[:, None], cand, params)
        r = torch.where(better[:, None], rc, r)
        cost = torch.where(better, cc, cost)
        lam = torch.where(better, lam / 3, lam * 4).clamp(1e-9, 1e9)
    best = int(torch.argmin(cost))
    p = params[best]
    R, t = rotvec_to_matrix(p[:3]), p[3:]
    V = torch.eye(4, dtype=torch.float64)
    V[:3, :3], V[:3, 3] = R, t
    cam = Cameras(V[None].float(), view.Ks[None].float(), view.width, view.height)
    yaw, pitch, roll, dist = camera_angles(cam)
    res = (_reprojection(p, X, K) - u).norm(dim=-1) / (photo_scale or view.scale)
    return Pose(camera=cam, yaw_deg=yaw, pitch_deg=pitch, roll_deg=roll, distance=dist,
                reprojection_px=float(res.pow(2).mean().sqrt()), residuals_px=res.float())


# ---------------------------------------------------------------------------------------------
# The loss region of a photo that is not on white
# ---------------------------------------------------------------------------------------------


def face_ellipse(landmarks: Tensor, width: int, height: int, size: tuple[float, float] = FACE_ELLIPSE_SIZE) -> Tensor:
    """``[H, W]`` 1 inside an ellipse around the face of five landmarks ``[5, 2]`` (pixels).

    Centred on the nose, axes along the eyes' line and across it, semi-axes ``size`` times the
    distance from the eyes' midpoint to the mouth's midpoint: forehead to chin, cheek to cheek.
    """
    lm = landmarks.double().cpu()
    eyes, mouth, nose = lm[:2].mean(0), lm[3:].mean(0), lm[2]
    d = float((mouth - eyes).norm())
    across = lm[1] - lm[0]
    ax = across / across.norm().clamp_min(1e-9)
    ay = torch.stack([-ax[1], ax[0]])
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    dx, dy = xs - nose[0], ys - nose[1]
    u = (dx * ax[0] + dy * ax[1]) / (size[0] * d)
    v = (dx * ay[0] + dy * ay[1]) / (size[1] * d)
    return ((u * u + v * v) <= 1).float()


def loss_region(view: PhotoView, alpha: Tensor, erode: int = REGION_ERODE_PX, threshold: float = REGION_ALPHA) -> Tensor:
    """``[H, W]`` weights of refinement's loss for a photo that is not on white.

    The head area: the feed-forward head's rendered ``alpha`` ``[H, W]`` at or above ``threshold``,
    eroded by ``erode`` pixels (the silhouette's edge would see the photo's background), united with
    :func:`face_ellipse`, and only where the working view shows the photo (not its white padding).
    """
    head = (alpha.detach().cpu() >= threshold).float()
    if erode > 0:
        k = 2 * erode + 1
        head = 1 - F.max_pool2d((1 - head)[None, None], k, stride=1, padding=erode)[0, 0]
    region = torch.maximum(head, face_ellipse(view.landmarks, view.width, view.height))
    return region * (view.inside.cpu() > 0.99).float()


def head_region(view: PhotoView, head: Gaussians, camera: Cameras, sh_degree: int, backend: Backend = "auto") -> Tensor:
    """``[H, W]`` :func:`loss_region` of ``head`` rendered at ``camera`` (its alpha) in the working view."""
    with torch.no_grad():
        alpha = render(head, camera, background=1.0, backend=backend, sh_degree=sh_degree).alphas[0]
    return loss_region(view, alpha)


def encoder_photo(view: PhotoView, avatars: Any, camera: Cameras, on_white: bool, backend: Backend = "auto") -> Tensor:
    """``[H, W, 3]`` the working view as an encoder that reads the photo's colours sees it: on white, as
    the training views are. A photo on white is the working view itself; for one that is not, only
    :func:`head_region` of the *template* at the PnP ``camera`` (the photo's own head is not known before
    the encoder runs) keeps the photo's colours, and everything else turns white."""
    if on_white:
        return view.image
    keep = head_region(view, avatars.template, camera, avatars.config.sh_degree, backend)[..., None]
    keep = keep.to(view.image.device)
    return view.image * keep + (1 - keep)


# ---------------------------------------------------------------------------------------------
# All of it
# ---------------------------------------------------------------------------------------------


@dataclass
class Reconstruction:
    """Everything :func:`reconstruct` made from one photo.

    Attributes:
        photo, detection, view, pose: the loaded photo, its face, the working view, its camera.
        landmarks3d: ``[5, 3]`` the template's landmarks the pose was solved against.
        on_white: the photo's border is white (the loss then covers every pixel, as in training).
        weights: ``[H, W]`` refinement's loss region (``None`` on white: every pixel).
        embedding: ``[512]`` FaceNet's; code: ``[latent_dim]`` the encoder's ``w``.
        feed_forward: the decoded head ``[K]`` (one pass).
        refined: the :class:`~fastavatar_nb.refine.RefineResult`, when refinement ran.
        times: seconds of each step, in order.
        notes: what loading changed and what to know about the result.
    """

    photo: Photo
    detection: FaceDetection
    view: PhotoView
    pose: Pose
    landmarks3d: Tensor
    on_white: bool
    weights: Tensor | None
    embedding: Tensor
    code: Tensor
    feed_forward: Gaussians
    refined: Any = None
    times: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def head(self) -> Gaussians:
        """The final head: refined when refinement ran, else the feed-forward one."""
        return self.refined.head if self.refined is not None else self.feed_forward

    @property
    def camera(self) -> Cameras:
        """The photo's camera: refined with the head when refinement ran (and refined the pose), else PnP's."""
        if self.refined is not None and self.refined.camera is not None:
            return self.refined.camera
        return self.pose.camera

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the photo, face, camera, steps' times and the result's fit to the photo."""
        out: dict[str, Any] = {
            "photo": self.photo.name, "photo_size": [self.photo.width, self.photo.height],
            "notes": list(self.photo.notes) + list(self.notes),
            "faces_found": self.detection.num_faces, "face_probability": round(self.detection.probability, 4),
            "face_box": [round(float(v), 1) for v in self.detection.box],
            "landmarks": {n: [round(float(x), 1) for x in xy] for n, xy in zip(LANDMARK_NAMES, self.detection.landmarks,
                                                                               strict=True)},
            "working_view": [self.view.width, self.view.height], "focal_source": self.view.focal_source,
            "camera": self.pose.summary(), "on_white": self.on_white,
            "camera_refined": None if self.refined is None or not self.refined.config.refines_pose else dict(
                zip(("yaw_deg", "pitch_deg", "roll_deg", "distance_m"),
                    (round(v, 3) for v in camera_angles(self.refined.camera)), strict=True)),
            "loss_region_share": None if self.weights is None else round(float(self.weights.mean()), 4),
            "num_gaussians": int(self.head.num_gaussians),
            "refine_steps": 0 if self.refined is None else int(self.refined.config.steps),
            "times_s": {k: round(v, 3) for k, v in self.times.items()},
        }
        if self.refined is not None:
            hist = self.refined.psnr_history
            out["refine_psnr_first"] = round(float(hist[0]), 3) if len(hist) else None
            out["refine_psnr_final"] = round(float(self.refined.final_psnr), 3)
        return out


def photo_refine_config(steps: int, **overrides: Any):
    """The :class:`~fastavatar_nb.refine.RefineConfig` for a photo: :data:`PHOTO_REFINE` with ``steps``."""
    from .refine import RefineConfig

    return RefineConfig(**{**PHOTO_REFINE, "steps": int(steps), **overrides}).validate()


def reconstruct(photo: Photo | Any, avatars, encoder, width: int, height: int, *, refine_steps: int = 0,
                refine_config=None, focal_px: float | None = None, landmarks3d: Tensor | None = None,
                net: torch.nn.Module | None = None, mtcnn=None, backend: Backend = "auto", progress: bool = True,
                on_step: Callable[[str, float], None] | None = None) -> Reconstruction:
    """One photo -> a 3D head: load, face, camera, FaceNet -> encoder -> decoder, optional refinement.

    Only the photo is used: no 3D points, masks or other views of the person.

    Args:
        photo: a :class:`Photo` or anything :func:`load_photo` takes.
        avatars: the trained :class:`~fastavatar_nb.decoder.DecoderResult`; encoder: the
            :class:`~fastavatar_nb.encoder.EncoderResult` (e.g. ``checkpoints.load("course")``'s).
        width, height: the image size the models were trained at (the working view's).
        refine_steps: test-time refinement steps (0: the feed-forward head only).
        refine_config: a :class:`~fastavatar_nb.refine.RefineConfig` (its ``steps`` is replaced by
            ``refine_steps``); default: :func:`photo_refine_config`.
        focal_px: the photo's focal length in its pixels, when known (else EXIF, else the rig prior).
        landmarks3d: ``[5, 3]`` the template's landmarks (computed when ``None``: pass them when
            reconstructing many photos with one model).
        net, mtcnn: FaceNet and MTCNN to reuse.
        on_step: called with ``(step name, seconds)`` after each step (the CLI prints them).

    Raises:
        PhotoError, FileNotFoundError: the photo cannot be read. NoFaceError: no face in it.
    """
    from .faces import embed_boxes, load_facenet, make_mtcnn
    from .refine import refine

    times: dict[str, float] = {}
    t = time.perf_counter()

    def done(step: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[step] = now - t
        if on_step is not None:
            on_step(step, times[step])
        t = time.perf_counter()

    photo = as_photo(photo)
    done("load photo")
    if mtcnn is None or net is None:
        mtcnn, net = mtcnn or make_mtcnn(), net or load_facenet()
        done("load MTCNN and FaceNet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detection = detect_face(photo, mtcnn)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    notes = [str(w.message) for w in caught]
    done("detect face")
    dev = avatars.template.device
    sh_degree = avatars.config.sh_degree
    if landmarks3d is None:
        landmarks3d, _ = template_landmarks(avatars.template, width, height, mtcnn, backend, sh_degree)
        done("template landmarks")
    view = photo_view(photo, detection, landmarks3d, width, height, focal_px)
    pose = estimate_pose(view, landmarks3d)
    done("camera (PnP)")
    # the face as MTCNN found it in the photo itself (what notebook 04's route embeds); the working
    # view, resampled once more, embeds worse: 15.34 against 16.08 dB on the other views of the
    # course checkpoint's validation subjects (4 subjects x 2 views x 1x/4x photos; dataset route 16.11)
    with torch.no_grad():
        emb = embed_boxes(photo.image[None], detection.box.double()[None], net, mtcnn.margin, mtcnn.image_size, 1)[0]
    done("FaceNet embedding")
    try:
        check_on_white(photo.image, photo.name)
        on_white = True
    except NotOnWhiteError:
        on_white = False
    cam = pose.camera.to(dev)
    enc_dev = next(encoder.model.parameters()).device
    seen = encoder_photo(view, avatars, cam, on_white, backend) if encoder.reads_photos else None
    code = encoder.encode(emb[None].to(enc_dev), None if seen is None else seen[None].to(enc_dev))[0].to(dev)
    head = avatars.decode(code)
    done("encoder + decoder")
    weights = None
    if not on_white:
        weights = head_region(view, head, cam, sh_degree, backend)
        notes.append(f"not on white ({MIN_WHITE_BORDER:.0%} of the border must be >= {WHITE_LEVEL}): refinement's "
                     f"loss sees the head area only ({float(weights.mean()):.0%} of the working view)")
    elif float(view.inside.min()) < 0.99:
        weights = (view.inside > 0.99).float()
    refined = None
    if refine_steps > 0:
        cfg = photo_refine_config(refine_steps) if refine_config is None else \
            dataclasses.replace(refine_config, steps=int(refine_steps))
        refined = refine(avatars, code, view.image.to(dev), cam, None if weights is None else weights.to(dev), cfg,
                         backend, progress=progress)
        done("refinement")
    return Reconstruction(photo=photo, detection=detection, view=view, pose=pose, landmarks3d=landmarks3d,
                          on_white=on_white, weights=weights, embedding=emb.cpu(), code=code, feed_forward=head,
                          refined=refined, times=times, notes=notes)


# ---------------------------------------------------------------------------------------------
# Pictures and files
# ---------------------------------------------------------------------------------------------

OUTPUT_FILES = ("head.ply", "turntable.gif", "viewer.html", "detection.png", "summary.json")
"""What :func:`save_reconstruction` writes into its folder."""
_LANDMARK_COLOURS = ((230, 60, 60), (60, 120, 230), (250, 200, 40), (60, 190, 90), (190, 80, 200))


def draw_detection(photo: Photo, detection: FaceDetection, max_side: int = 480):
    """The photo (at most ``max_side`` pixels) with every face box (the used one thick) and the five
    landmarks, as a PIL image."""
    from PIL import Image, ImageDraw

    from .images import to_uint8

    img = Image.fromarray(to_uint8(photo.image))
    k = min(1.0, max_side / max(img.size))
    if k < 1:
        img = img.resize((max(1, round(img.width * k)), max(1, round(img.height * k))), Image.LANCZOS)
    draw = ImageDraw.Draw(img)
    lw = max(1, round(max(img.size) / 160))
    for j, box in enumerate(detection.all_boxes):
        draw.rectangle([float(v) * k for v in box], outline=(40, 200, 80) if j == 0 else (200, 200, 200),
                       width=2 * lw if j == 0 else lw)
    r = max(2, 1.5 * lw)
    for (x, y), colour in zip(detection.landmarks.tolist(), _LANDMARK_COLOURS, strict=True):
        draw.ellipse([x * k - r, y * k - r, x * k + r, y * k + r], fill=colour, outline=(0, 0, 0))
    return img


def check_output_folder(folder: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse a ``folder`` for :func:`save_reconstruction` that is a file, or that holds an earlier
    reconstruction's :data:`OUTPUT_FILES` unless ``overwrite`` (the CLI checks before any work).

    Raises:
        FileExistsError: naming the folder and the files found.
    """
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; pass a folder for the outputs")
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)} from an earlier reconstruction; choose "
                              "another folder or pass overwrite=True (--overwrite) to replace them")


def save_reconstruction(recon: Reconstruction, folder: str | os.PathLike, *, overwrite: bool = False,
                        frames: int = 36, frame_scale: int = 2, backend: Backend = "auto", sh_degree: int = 3,
                        summary: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write a reconstruction's :data:`OUTPUT_FILES` into ``folder``.

    ``head.ply`` (the standard 3DGS layout: any splat viewer opens it), ``turntable.gif`` (``frames``
    views around the head at ``frame_scale`` times the working size), ``viewer.html`` (standalone:
    the photo, its detection, the working view and the head in a WebGL viewer, feed-forward and refined
    side by side; :mod:`fastavatar_nb.webviewer`), ``detection.png`` and
    ``summary.json`` (:meth:`Reconstruction.summary`, plus ``summary``).

    Raises:
        FileExistsError: one of the files exists and ``overwrite`` is False (names them).
    """
    import json

    from .images import save_gif
    from .orbit import turntable_frames
    from .webviewer import html_page, viewer_state

    out = Path(folder)
    check_output_folder(out, overwrite)
    paths = {name: out / name for name in OUTPUT_FILES}
    out.mkdir(parents=True, exist_ok=True)
    head = recon.head
    head.save_ply(paths["head.ply"])
    W, H = recon.view.width * frame_scale, recon.view.height * frame_scale
    fov = math.degrees(2 * math.atan(recon.view.height / 2 / float(recon.view.Ks[1, 1])))  # the working view's
    turn = turntable_frames(head, frames, W, H, radius=recon.pose.distance, fov_y_deg=fov, sh_degree=sh_degree,
                            backend=backend)
    save_gif(turn, paths["turntable.gif"])
    detection = draw_detection(recon.photo, recon.detection)
    detection.save(paths["detection.png"])
    info = dict(recon.summary(), **(summary or {}))
    with torch.no_grad():
        rendered = render(head, recon.camera.to(head.means.device), background=1.0, backend=backend,
                          sh_degree=sh_degree).colors[0].clamp(0, 1).cpu()
    view = viewer_state({"feed-forward": recon.feed_forward, "refined": head} if recon.refined is not None else
                        {"feed-forward": head}, width=W, height=H, distance=recon.pose.distance, fov_y_deg=fov)
    page = html_page(view, f"{recon.photo.name}: 3D head", info={
        "photo": f"{recon.photo.name} ({recon.photo.width}x{recon.photo.height})",
        "faces found": recon.detection.num_faces,
        "camera": ", ".join(f"{k} {v}" for k, v in recon.pose.summary().items()),
        "refinement steps": info["refine_steps"],
        "notes": "; ".join(info["notes"]) or "-",
        "steps (s)": ", ".join(f"{k} {v:.2f}" for k, v in recon.times.items()),
    }, images={"photo and the face used": detection, "working view": recon.view.image,
               "head from the photo's camera": rendered})
    paths["viewer.html"].write_text(page)
    paths["summary.json"].write_text(json.dumps(info, indent=2) + "\n")
    return paths
