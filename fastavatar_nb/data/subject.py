"""``MultiViewSubject``: the one in-memory form of a multi-view subject, whatever its source.

A *subject* is one person (or one synthetic head) seen by ``C`` calibrated cameras at one
instant. Its images are composited on a white background (NeRSemble's convention), its masks
are soft foreground alphas, and ``points`` are the ``K`` corresponded initialisation points
(point ``k`` is the same place on every subject's head; NeRSemble's ``points3d.ply``).

Conventions (package-wide, see :mod:`fastavatar_nb.cameras`):

- ``images [C, H, W, 3]`` float32 in [0, 1], ``masks [C, H, W]`` float32 in [0, 1].
- ``cameras``: ``C`` OpenCV world-to-camera cameras of size ``W x H``; pixel centres at
  ``+0.5``, so resizing an image by ``s`` scales the intrinsics by ``s`` (:meth:`Cameras.resize`).
- Units are metres, head at the origin, world +y up, the face looks towards +z.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import Cameras

if TYPE_CHECKING:
    from ..gaussians import Gaussians

__all__ = ["AttributeValue", "MultiViewSubject", "resize_images", "stack_subjects", "target_size"]

AttributeValue = float | int | bool | str
"""Type of one per-subject attribute (the labels the SVM notebook learns directions from)."""


def target_size(width: int | None, height: int | None, src_width: int, src_height: int) -> tuple[int, int]:
    """Resolve a requested image size against a source size.

    Both ``None``: the source size. One ``None``: computed from the other keeping the source
    aspect ratio (rounded, at least 1 pixel). Raises ``ValueError`` on non-positive sizes.
    """
    if width is None and height is None:
        return src_width, src_height
    if width is None:
        width = max(1, round(int(height) * src_width / src_height))
    if height is None:
        height = max(1, round(int(width) * src_height / src_width))
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return width, height


def resize_images(x: Tensor, width: int, height: int) -> Tensor:
    """Antialiased resize of channel-last images.

    Args:
        x: ``[..., H, W, Ch]`` float images (any leading dims).
        width, height: output size.

    Returns:
        ``[..., height, width, Ch]``. Downsampling is area-like (bilinear with antialiasing,
        i.e. a triangle filter as wide as the scale factor), upsampling is bilinear; pixel
        centres map as ``(i + 0.5) * scale`` (``align_corners=False``), the same convention
        as :meth:`Cameras.resize`. Values stay in the input's range.
    """
    if x.ndim < 3:
        raise ValueError(f"resize_images expects [..., H, W, Ch], got {tuple(x.shape)}")
    H, W, ch = x.shape[-3:]
    if (W, H) == (width, height):
        return x.clone()
    lead = x.shape[:-3]
    flat = x.reshape(-1, H, W, ch).permute(0, 3, 1, 2)
    out = F.interpolate(flat, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    out = out.clamp(float(x.min()), float(x.max())) if x.numel() else out
    return out.permute(0, 2, 3, 1).reshape(*lead, height, width, ch).contiguous()


@dataclass
class MultiViewSubject:
    """One subject seen from ``C`` calibrated views.

    Attributes:
        subject_id: a name unique within its dataset (the folder name for data on disk).
        images: ``[C, H, W, 3]`` float32 RGB in [0, 1], composited on white.
        masks: ``[C, H, W]`` float32 soft foreground alpha in [0, 1].
        cameras: ``C`` cameras (``viewmats [C, 4, 4]``, ``Ks [C, 3, 3]``), ``width = W``,
            ``height = H``.
        points: ``[K, 3]`` corresponded initialisation points (metres).
        attributes: per-subject labels, ``str -> float | int | bool | str`` (may be empty).
        camera_ids: ``C`` camera names (NeRSemble serials such as ``"222200042"``, or
            ``"00".."15"`` for synthetic data).

    The constructor validates shapes, dtypes, devices and value ranges and raises
    ``ValueError``/``TypeError`` naming the offending field and its shape.
    """

    subject_id: str
    images: Tensor
    masks: Tensor
    cameras: Cameras
    points: Tensor
    attributes: dict[str, AttributeValue] = field(default_factory=dict)
    camera_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.camera_ids and isinstance(self.images, Tensor) and self.images.ndim == 4:
            self.camera_ids = [f"{i:02d}" for i in range(self.images.shape[0])]
        self.validate()

    # ---------------------------------------------------------------- checks
    def validate(self) -> MultiViewSubject:
        """Check every field (called by the constructor); returns ``self``."""
        sid = self.subject_id
        if not isinstance(sid, str) or not sid:
            raise TypeError(f"MultiViewSubject.subject_id must be a non-empty str, got {sid!r}")
        where = f"MultiViewSubject {sid!r}"
        for name in ("images", "masks", "points"):
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.float32:
                raise TypeError(f"{where}: {name} must be float32, got {t.dtype}")
        im, mk, pts = self.images, self.masks, self.points
        if im.ndim != 4 or im.shape[-1] != 3:
            raise ValueError(f"{where}: images must be [C, H, W, 3], got {tuple(im.shape)}")
        C, H, W = im.shape[:3]
        if C == 0 or H == 0 or W == 0:
            raise ValueError(f"{where}: images must be non-empty, got {tuple(im.shape)}")
        if tuple(mk.shape) != (C, H, W):
            raise ValueError(f"{where}: masks must be [C, H, W] = {(C, H, W)} to match images "
                             f"{tuple(im.shape)}, got {tuple(mk.shape)}")
        if pts.ndim != 2 or pts.shape[-1] != 3 or pts.shape[0] == 0:
            raise ValueError(f"{where}: points must be [K, 3] with K >= 1, got {tuple(pts.shape)}")
        cams = self.cameras
        if not isinstance(cams, Cameras):
            raise TypeError(f"{where}: cameras must be a Cameras, got {type(cams).__name__}")
        if tuple(cams.batch_shape) != (C,):
            raise ValueError(f"{where}: cameras must be a batch of C = {C} cameras (viewmats [C, 4, 4]) to "
                             f"match images {tuple(im.shape)}, got viewmats {tuple(cams.viewmats.shape)}")
        if (cams.width, cams.height) != (W, H):
            raise ValueError(f"{where}: cameras are {cams.width}x{cams.height} (WxH) but images are "
                             f"{W}x{H} (images {tuple(im.shape)}); use cameras.resize({W}, {H})")
        devices = {t.device for t in (im, mk, pts, cams.viewmats, cams.Ks)}
        if len(devices) != 1:
            raise ValueError(f"{where}: images, masks, points and cameras must share a device, got "
                             f"{sorted(str(d) for d in devices)}")
        for name, t in (("images", im), ("masks", mk)):
            lo, hi = float(t.amin()), float(t.amax())
            if not (0.0 <= lo and hi <= 1.0):  # also false for NaN
                raise ValueError(f"{where}: {name} must lie in [0, 1], got values in [{lo}, {hi}]")
        if not bool(torch.isfinite(pts).all()):
            raise ValueError(f"{where}: points {tuple(pts.shape)} contain non-finite values")
        if not isinstance(self.camera_ids, list) or len(self.camera_ids) != C or \
                not all(isinstance(c, str) for c in self.camera_ids):
            raise ValueError(f"{where}: camera_ids must be a list of C = {C} str, got {self.camera_ids!r}")
        if len(set(self.camera_ids)) != C:
            raise ValueError(f"{where}: camera_ids must be unique, got {self.camera_ids}")
        if not isinstance(self.attributes, dict):
            raise TypeError(f"{where}: attributes must be a dict, got {type(self.attributes).__name__}")
        for k, v in self.attributes.items():
            if not isinstance(k, str) or not isinstance(v, (float, int, bool, str)):
                raise TypeError(f"{where}: attribute {k!r} = {v!r}: keys must be str and values "
                                "float, int, bool or str")
        return self

    # ----------------------------------------------------------------- sizes
    @property
    def num_views(self) -> int:
        """C, the number of views (cameras)."""
        return self.images.shape[0]

    @property
    def height(self) -> int:
        """H, image height in pixels."""
        return self.images.shape[1]

    @property
    def width(self) -> int:
        """W, image width in pixels."""
        return self.images.shape[2]

    @property
    def num_points(self) -> int:
        """K, the number of initialisation points."""
        return self.points.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __repr__(self) -> str:
        return (f"MultiViewSubject({self.subject_id!r}, views={self.num_views}, size={self.width}x{self.height}, "
                f"K={self.num_points}, attributes={self.attributes}, device={self.device})")

    # ------------------------------------------------------------ transforms
    def _replace(self, **kw) -> MultiViewSubject:
        d = dict(subject_id=self.subject_id, images=self.images, masks=self.masks, cameras=self.cameras,
                 points=self.points, attributes=dict(self.attributes), camera_ids=list(self.camera_ids))
        d.update(kw)
        return MultiViewSubject(**d)

    def resize(self, width: int | None = None, height: int | None = None) -> MultiViewSubject:
        """The same subject at another image size.

        Images and masks are resized with :func:`resize_images` (antialiased); cameras with
        :meth:`Cameras.resize` (intrinsics scale with the image). Give one of ``width``/``height``
        to keep the aspect ratio. Points and attributes are unchanged.
        """
        width, height = target_size(width, height, self.width, self.height)
        if (width, height) == (self.width, self.height):
            return self._replace()
        images = resize_images(self.images, width, height)
        masks = resize_images(self.masks[..., None], width, height)[..., 0]
        return self._replace(images=images, masks=masks, cameras=self.cameras.resize(width, height))

    def to(self, *args, **kwargs) -> MultiViewSubject:
        """Move every tensor (like ``Tensor.to``; dtype changes are not allowed, images stay float32)."""
        return self._replace(images=self.images.to(*args, **kwargs), masks=self.masks.to(*args, **kwargs),
                             points=self.points.to(*args, **kwargs), cameras=self.cameras.to(*args, **kwargs))

    def select_views(self, indices: Sequence[int] | Tensor) -> MultiViewSubject:
        """A subject with only the given views (in the given order), e.g. the 15 evaluation views."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
        if not idx:
            raise ValueError(f"select_views on {self.subject_id!r}: no views selected")
        bad = [i for i in idx if not -self.num_views <= i < self.num_views]
        if bad:
            raise IndexError(f"select_views on {self.subject_id!r}: view indices {bad} out of range for "
                             f"{self.num_views} views")
        idx = [i % self.num_views for i in idx]
        t = torch.tensor(idx, device=self.device)
        cams = Cameras(self.cameras.viewmats[t], self.cameras.Ks[t], self.width, self.height)
        return self._replace(images=self.images[t], masks=self.masks[t], cameras=cams,
                             camera_ids=[self.camera_ids[i] for i in idx])

    def thin_points(self, num_points: int) -> MultiViewSubject:
        """A subject with ``num_points`` of its points, evenly spaced in index order (all when it has
        no more than that), e.g. NeRSemble's 10,144 FLAME points at a small preset's ``K``.

        Keeping every ``K/num_points``-th index breaks the correspondence with subjects thinned to
        another count: use it for single-subject demos, not for data that gets averaged.
        """
        if num_points < 1:
            raise ValueError(f"thin_points on {self.subject_id!r}: num_points must be >= 1, got {num_points}")
        if self.num_points <= num_points:
            return self._replace()
        keep = torch.linspace(0, self.num_points - 1, num_points, device=self.device).round().long()
        return self._replace(points=self.points[keep].contiguous())

    def view(self, i: int) -> MultiViewSubject:
        """View ``i`` as a one-view subject (``images [1, H, W, 3]``; keeps the view dim like ``cams[i]``)."""
        return self.select_views([i])

    def point_gaussians(self, opacity: float = 0.95) -> Gaussians:
        """The subject's ``K`` points as Gaussians, each coloured from the view that faces it most directly.

        A picture of the subject's 3D shape from its ground truth (its points and all its views), to
        show beside a reconstruction. It is made for looking and scoring only: nothing at test time
        may use it (a single photo carries neither the points nor the other views). Each point's
        colour is the pixel it projects to in the camera most aligned with its outward direction
        from the points' centre (occlusion is not checked); its scale is the mean distance to its 3
        nearest neighbours (:meth:`Gaussians.from_points`).
        """
        from ..gaussians import Gaussians

        points = self.points
        uv, _ = self.cameras.project(points)  # [C, K, 2]
        outward = F.normalize(points - points.mean(0), dim=-1)
        to_cam = F.normalize(self.cameras.centers[:, None] - points, dim=-1)  # [C, K, 3]
        cam = (to_cam * outward).sum(-1).argmax(0)  # [K]
        k = torch.arange(len(points), device=points.device)
        u = uv[cam, k, 0].long().clamp(0, self.width - 1)
        v = uv[cam, k, 1].long().clamp(0, self.height - 1)
        return Gaussians.from_points(points, self.images[cam, v, u], opacity=opacity)

    # --------------------------------------------------------------- checks
    def mask_coverage(self, points: Tensor | None = None, threshold: float = 0.5) -> Tensor:
        """Fraction of points that project inside each view's foreground mask.

        Args:
            points: ``[N, 3]`` world points (default ``self.points``).
            threshold: a pixel is foreground when ``mask > threshold``.

        Returns:
            ``[C]`` fractions in [0, 1]. A point counts as inside when it is in front of the
            camera, lands inside the image, and the pixel containing it (``floor(u), floor(v)``;
            pixel centres at ``+0.5``) is foreground. A well-calibrated subject scores ~1 in every view.
        """
        pts = self.points if points is None else points.to(self.device, torch.float32)
        uv, z = self.cameras.project(pts)  # [C, N, 2], [C, N]
        col, row = uv[..., 0].floor().long(), uv[..., 1].floor().long()
        ok = (z > 0) & (col >= 0) & (col < self.width) & (row >= 0) & (row < self.height)
        c_idx = torch.arange(self.num_views, device=self.device)[:, None].expand_as(col)
        vals = self.masks[c_idx, row.clamp(0, self.height - 1), col.clamp(0, self.width - 1)]
        return ((vals > threshold) & ok).float().mean(-1)


def stack_subjects(subjects: Sequence[MultiViewSubject]) -> tuple[Tensor, Tensor, Cameras, Tensor]:
    """Stack S subjects with equal views, size and K for batched fitting.

    Returns:
        ``(images [S, C, H, W, 3], masks [S, C, H, W], cameras [S, C], points [S, K, 3])``.
    """
    if not subjects:
        raise ValueError("stack_subjects needs at least one subject")
    shapes = {(s.num_views, s.height, s.width, s.num_points) for s in subjects}
    if len(shapes) != 1:
        raise ValueError(f"stack_subjects needs equal (views, H, W, K); got {sorted(shapes)} for "
                         f"{[s.subject_id for s in subjects]}")
    s0 = subjects[0]
    cams = Cameras(torch.stack([s.cameras.viewmats for s in subjects]), torch.stack([s.cameras.Ks for s in subjects]),
                   s0.width, s0.height)
    return (torch.stack([s.images for s in subjects]), torch.stack([s.masks for s in subjects]), cams,
            torch.stack([s.points for s in subjects]))
