"""Procedural multi-view heads: a seeded stand-in for NeRSemble (issue 3).

Each *subject* is a face-like head built as a signed-distance field (smooth unions of
ellipsoids and capsules: skull, jaw, chin, cheeks, nose, brow ridge, eye sockets and eyeballs,
lips and mouth cavity, ears, neck, hair shell, beard), with albedo fields (skin tone along a
Fitzpatrick/Monk-like ramp from very dark to very light, lips, brows, beard, sclera, iris,
pupil, teeth, hair). It is sphere-traced from the 16 NeRSemble cameras with a fixed studio
light (Lambert key + fill + hemispheric ambient, ambient occlusion, a soft view-dependent rim
and a small specular term), supersampled for soft masks, and composited on white.

The ground truth is therefore rendered by a different model (a ray-marched surface) from the
K-Gaussian model fitted to it later: fitting is a real approximation problem.

Correspondence: point ``k`` of :func:`surface_points` is where the fixed canonical ray ``k``
(:func:`canonical_rays`: rays aimed at :data:`HEAD_CENTER` over the head, horizontal rays
aimed at the neck axis over the neck) first meets the surface. Every subject uses the same
rays, so point ``k`` is the same place on every head (like FLAME's per-face points in
NeRSemble's ``points3d.ply``, which also cover the neck down to the collar).

Conventions: metres, head near the origin, world +y up, the face looks towards +z; images
``[C, H, W, 3]`` float32 in [0, 1] on white, masks ``[C, H, W]`` soft coverage.
Determinism: parameters are drawn with ``numpy.random.default_rng(seed)``; rendering is
pure elementwise float32 arithmetic, so the same seed gives identical tensors and files on
the same platform.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..cameras import Cameras
from ._sdf import capsule, ellipsoid, ray_sphere_interval, smax, smin, sphere_trace
from .bust import BUST_RAY_LENGTH, bust_rays, num_bust_points
from .subject import MultiViewSubject

__all__ = [
    "GENERATOR_VERSION", "HEAD_CENTER", "HairStyle", "Expression", "HeadParams", "sample_head_params",
    "skin_albedo", "head_sdf", "render_head", "canonical_rays", "num_neck_rays", "num_bust_points", "BUST_ANCHOR", "surface_points", "landmark_indices",
    "generate_subject", "generate_dataset", "subject_seed",
]

GENERATOR_VERSION = 3
"""Bumped whenever the same seed would give different pixels; stored in the attributes."""

HEAD_CENTER = (0.0, 0.0, -0.02)
"""Centre (metres) at which the head rays of :func:`canonical_rays` aim."""

HairStyle = Literal["bald", "buzz", "short", "medium", "long"]
Expression = Literal["neutral", "smile", "shout", "surprise", "smile_open"]

_HAIR_STYLES: tuple[str, ...] = ("bald", "buzz", "short", "medium", "long")
_HAIR_STYLE_P = (0.07, 0.10, 0.33, 0.22, 0.28)
_HAIR_LENGTH = {"bald": (0.0, 0.0), "buzz": (0.003, 0.008), "short": (0.03, 0.06), "medium": (0.07, 0.11),
                "long": (0.15, 0.30)}
_EXPRESSIONS: tuple[str, ...] = ("neutral", "smile", "shout", "surprise", "smile_open")
_EXPRESSION_P = (0.36, 0.24, 0.14, 0.14, 0.12)

# Monk-like skin swatches (sRGB), darkest first; skin_tone 0 -> first, 1 -> last.
_SKIN_RAMP = np.array([
    [0x29, 0x24, 0x20], [0x3a, 0x31, 0x2a], [0x60, 0x41, 0x34], [0x82, 0x5c, 0x43], [0xa0, 0x7e, 0x56],
    [0xd7, 0xbd, 0x96], [0xea, 0xda, 0xba], [0xf7, 0xea, 0xd0], [0xf3, 0xe7, 0xdb], [0xf6, 0xed, 0xe4],
], dtype=np.float64) / 255.0
# A slightly warm tint (less green and blue) applied to every swatch; keeps the ramp's dark-to-light order.
_SKIN_GAIN = np.array([1.0, 0.93, 0.90])

_HAIR_COLOURS = {"black": (0.035, 0.03, 0.03), "dark_brown": (0.12, 0.075, 0.05), "brown": (0.30, 0.18, 0.10),
                 "auburn": (0.42, 0.16, 0.07), "blond": (0.78, 0.62, 0.38), "grey": (0.62, 0.61, 0.60)}
_HAIR_P = (0.34, 0.24, 0.16, 0.07, 0.11, 0.08)
_EYE_COLOURS = {"dark_brown": (0.16, 0.09, 0.05), "brown": (0.36, 0.20, 0.09), "hazel": (0.45, 0.38, 0.18),
                "green": (0.30, 0.45, 0.28), "blue": (0.30, 0.48, 0.72), "grey": (0.50, 0.55, 0.60)}
_EYE_P = (0.40, 0.22, 0.10, 0.08, 0.13, 0.07)
_SHIRT_COLOURS = {"grey": (0.42, 0.45, 0.48), "navy": (0.12, 0.16, 0.32), "black": (0.08, 0.08, 0.09),
                  "green": (0.20, 0.36, 0.22), "maroon": (0.40, 0.10, 0.14), "beige": (0.70, 0.62, 0.50),
                  "teal": (0.12, 0.40, 0.42)}


@dataclass(frozen=True)
class HeadParams:
    """Identity, expression and appearance of one synthetic head.

    Shape factors are dimensionless multipliers around 1 (or amounts in [0, 1]); expression
    weights are in [0, 1]; colours are sRGB in [0, 1]. :func:`sample_head_params` draws them.
    """

    # --- identity: shape
    head_width: float = 1.0
    """Skull width factor."""
    head_height: float = 1.0
    """Skull height factor."""
    head_depth: float = 1.0
    """Skull front-to-back factor."""
    jaw_width: float = 1.0
    """Lower-face width factor."""
    jaw_taper: float = 0.5
    """How much the jaw narrows towards the chin, in [0, 1]."""
    face_length: float = 1.0
    """Lower-face height factor (chin height)."""
    chin: float = 0.5
    """Chin prominence in [0, 1]."""
    cheeks: float = 0.5
    """Cheek fullness in [0, 1]."""
    nose_length: float = 1.0
    """Nose length factor."""
    nose_width: float = 1.0
    """Nose (alae) width factor."""
    nose_projection: float = 1.0
    """How far the nose tip projects, factor."""
    brow_ridge: float = 0.5
    """Brow-ridge prominence in [0, 1]."""
    eye_spacing: float = 1.0
    """Inter-ocular distance factor."""
    eye_size: float = 1.0
    """Eyeball and opening size factor."""
    lip_fullness: float = 1.0
    """Lip thickness factor."""
    mouth_width: float = 1.0
    """Mouth width factor."""
    ear_size: float = 1.0
    """Ear size factor."""
    ear_protrusion: float = 0.5
    """How far the ears stand out, in [0, 1]."""
    neck_width: float = 1.0
    """Neck radius factor."""
    # --- identity: appearance
    skin_tone: float = 0.6
    """Position on the skin ramp, 0 = very dark, 1 = very light."""
    skin_warmth: float = 0.0
    """Undertone shift in [-1, 1] (negative cooler/pinker, positive warmer/yellower)."""
    eye_colour: str = "brown"
    """One of dark_brown, brown, hazel, green, blue, grey."""
    hair_colour: str = "dark_brown"
    """One of black, dark_brown, brown, auburn, blond, grey."""
    hair_style: str = "short"
    """One of bald, buzz, short, medium, long (:data:`HairStyle`)."""
    hair_length: float = 0.05
    """Hair length in metres (0 for bald)."""
    hairline: float = 0.5
    """Front hairline height in [0, 1] (1 = receding)."""
    beard: float = 0.0
    """Facial-hair density in [0, 1] (0 none, ~0.3 stubble, 1 full beard)."""
    shirt_colour: str = "grey"
    """One of grey, navy, black, green, maroon, beige, teal."""
    # --- expression
    expression: str = "neutral"
    """The expression class the weights were drawn from (:data:`Expression`)."""
    smile: float = 0.0
    """Smile weight in [0, 1] (lip corners up, mouth wider, cheeks raised)."""
    mouth_open: float = 0.0
    """Jaw-open weight in [0, 1] (shout)."""
    brows_raised: float = 0.0
    """Brow-raise weight in [0, 1] (surprise)."""

    def __post_init__(self) -> None:
        if self.hair_style not in _HAIR_STYLES:
            raise ValueError(f"HeadParams.hair_style must be one of {_HAIR_STYLES}, got {self.hair_style!r}")
        if self.expression not in _EXPRESSIONS:
            raise ValueError(f"HeadParams.expression must be one of {_EXPRESSIONS}, got {self.expression!r}")
        if self.hair_colour not in _HAIR_COLOURS:
            raise ValueError(f"HeadParams.hair_colour must be one of {tuple(_HAIR_COLOURS)}, got {self.hair_colour!r}")
        if self.shirt_colour not in _SHIRT_COLOURS:
            raise ValueError(f"HeadParams.shirt_colour must be one of {tuple(_SHIRT_COLOURS)}, "
                             f"got {self.shirt_colour!r}")
        if self.eye_colour not in _EYE_COLOURS:
            raise ValueError(f"HeadParams.eye_colour must be one of {tuple(_EYE_COLOURS)}, got {self.eye_colour!r}")
        for name in ("skin_tone", "smile", "mouth_open", "brows_raised", "beard", "jaw_taper", "chin", "cheeks",
                     "brow_ridge", "ear_protrusion", "hairline"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"HeadParams.{name} must be in [0, 1], got {v}")

    def attributes(self) -> dict[str, float | int | bool | str]:
        """Labels for the latent-editing notebook plus every continuous parameter.

        Booleans: ``smiling`` (smile > 0.5), ``mouth_open`` (mouth_open > 0.5), ``brows_raised``
        (> 0.5), ``long_hair`` (hair_length > 0.12 m), ``beard`` (> 0.5), ``bald``; floats:
        ``skin_tone`` and ``*_amount`` / shape factors; strings: colours, style, expression.
        """
        d: dict[str, float | int | bool | str] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = round(float(v), 6) if isinstance(v, float) else v
        # continuous weights keep their values under *_amount; the bare names become labels
        d["smile_amount"], d["mouth_open_amount"] = d.pop("smile"), d.pop("mouth_open")
        d["brows_raised_amount"], d["beard_amount"] = d.pop("brows_raised"), d.pop("beard")
        d.update(smiling=self.smile > 0.5, mouth_open=self.mouth_open > 0.5, brows_raised=self.brows_raised > 0.5,
                 long_hair=self.hair_length > 0.12, beard=self.beard > 0.5, bald=self.hair_style == "bald")
        return d


def sample_head_params(seed: int) -> HeadParams:
    """Draw a head from the generator's distribution (``numpy.random.default_rng(seed)``)."""
    rng = np.random.default_rng(int(seed))

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    def pick(options: tuple[str, ...], p: tuple[float, ...]) -> str:
        return options[int(rng.choice(len(options), p=np.asarray(p) / sum(p)))]

    shape = dict(head_width=u(0.92, 1.08), head_height=u(0.93, 1.07), head_depth=u(0.92, 1.08),
                 jaw_width=u(0.86, 1.14), jaw_taper=u(0.0, 1.0), face_length=u(0.9, 1.1), chin=u(0.0, 1.0),
                 cheeks=u(0.0, 1.0), nose_length=u(0.85, 1.2), nose_width=u(0.8, 1.3),
                 nose_projection=u(0.8, 1.2), brow_ridge=u(0.0, 1.0), eye_spacing=u(0.92, 1.08),
                 eye_size=u(0.88, 1.12), lip_fullness=u(0.7, 1.35), mouth_width=u(0.88, 1.12),
                 ear_size=u(0.85, 1.15), ear_protrusion=u(0.0, 1.0), neck_width=u(0.88, 1.15))
    skin_tone = u(0.0, 1.0)
    skin_warmth = u(-1.0, 1.0)
    eye_colour = pick(tuple(_EYE_COLOURS), _EYE_P)
    hair_colour = pick(tuple(_HAIR_COLOURS), _HAIR_P)
    hair_style = pick(_HAIR_STYLES, _HAIR_STYLE_P)
    hair_length = u(*_HAIR_LENGTH[hair_style])
    hairline = u(0.0, 1.0)
    beard = u(0.55, 1.0) if rng.uniform() < 0.25 else (u(0.15, 0.4) if rng.uniform() < 0.15 else 0.0)
    shirt_colour = pick(tuple(_SHIRT_COLOURS), (1.0,) * len(_SHIRT_COLOURS))
    expression = pick(_EXPRESSIONS, _EXPRESSION_P)
    lo = dict(smile=u(0.0, 0.15), mouth_open=u(0.0, 0.12), brows_raised=u(0.0, 0.2))
    if expression == "smile":
        lo["smile"] = u(0.6, 1.0)
    elif expression == "shout":
        lo["mouth_open"], lo["brows_raised"] = u(0.6, 1.0), u(0.0, 0.5)
    elif expression == "surprise":
        lo["brows_raised"], lo["mouth_open"] = u(0.6, 1.0), u(0.15, 0.45)
    elif expression == "smile_open":
        lo["smile"], lo["mouth_open"] = u(0.6, 1.0), u(0.55, 0.85)
    return HeadParams(**shape, skin_tone=skin_tone, skin_warmth=skin_warmth, eye_colour=eye_colour,
                      hair_colour=hair_colour, hair_style=hair_style, hair_length=hair_length, hairline=hairline,
                      beard=beard, shirt_colour=shirt_colour, expression=expression, **lo)


def skin_albedo(skin_tone: float, skin_warmth: float = 0.0) -> tuple[float, float, float]:
    """sRGB skin albedo at ``skin_tone`` in [0, 1] (0 very dark, 1 very light) on the Monk-like ramp."""
    s = float(np.clip(skin_tone, 0.0, 1.0)) * (len(_SKIN_RAMP) - 1)
    i = min(int(s), len(_SKIN_RAMP) - 2)
    c = (_SKIN_RAMP[i] * (i + 1 - s) + _SKIN_RAMP[i + 1] * (s - i)) * _SKIN_GAIN
    c = c * (1.0 + 0.05 * skin_warmth * np.array([1.0, 0.2, -1.0]))
    return tuple(float(v) for v in np.clip(c, 0.0, 1.0))


def _srgb_to_linear(c: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in c)


def _smoothstep(e0: float, e1: float, x: Tensor) -> Tensor:
    t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class _Head:
    """The signed-distance field and albedo of one head (derived constants precomputed)."""

    def __init__(self, p: HeadParams) -> None:
        self.p = p
        hw, hh, hd = p.head_width, p.head_height, p.head_depth
        # skull
        self.skull_c = (0.0, 0.035, -0.040)
        self.skull_r = (0.079 * hw, 0.093 * hh, 0.100 * hd)
        self.occiput_c = (0.0, 0.02, -0.085 * hd)
        self.occiput_r = (0.060 * hw, 0.070 * hh, 0.055 * hd)
        # lower face; jaw drop for the open mouth
        self.drop = 0.022 * p.mouth_open
        fl = p.face_length
        self.face_c = (0.0, -0.018 - 0.5 * self.drop, 0.0)
        self.face_r = (0.069 * p.jaw_width, 0.075 * fl + 0.5 * self.drop, 0.066)
        self.taper = 0.05 + 0.30 * p.jaw_taper
        self.gonion_c = (0.049 * p.jaw_width, -0.052 * fl - 0.6 * self.drop, -0.012)
        self.gonion_r = (0.017, 0.024, 0.030)
        self.chin_c = (0.0, -0.078 * fl - self.drop, 0.038 + 0.010 * p.chin)
        self.chin_r = (0.024, 0.017, 0.018 + 0.004 * p.chin)
        cs = 0.9 + 0.25 * p.cheeks
        self.cheek_c = (0.044 * hw, 0.002 + 0.006 * p.smile, 0.030 + 0.004 * p.cheeks)
        self.cheek_r = (0.026 * cs, 0.021 * cs, 0.026 * cs)
        # brow ridge and eyes
        self.brow_up = 0.007 * p.brows_raised
        self.browr_c = (0.0, 0.046 + 0.4 * self.brow_up, 0.046 + 0.006 * p.brow_ridge)
        self.browr_r = (0.055 * hw, 0.012, 0.016)
        es = p.eye_size
        self.eye_x = 0.031 * p.eye_spacing
        self.eye_y = 0.026
        self.eye_rad = 0.0115 * es
        self.eye_z = 0.044
        self.sock_c = (self.eye_x, self.eye_y - 0.0005 + 0.25 * self.brow_up, self.eye_z + 0.004)
        self.sock_r = (0.0155 * es, 0.0072 * es + 0.3 * self.brow_up + 0.001 * p.mouth_open, 0.016)
        # nose
        nl, nw, npj = p.nose_length, p.nose_width, p.nose_projection
        self.nose_a = (0.0, 0.030, 0.056)
        self.nose_b = (0.0, 0.030 - 0.042 * nl, 0.058 + 0.022 * npj)
        self.nose_ra, self.nose_rb = 0.0065, 0.0095 * (0.8 + 0.2 * nw)
        self.ala_c = (0.011 * nw, self.nose_b[1] - 0.003, 0.064 + 0.004 * npj)
        self.ala_r = (0.0075 * nw, 0.0065, 0.0075)
        self.nose_base_y = self.nose_b[1] - 0.008
        # mouth
        mw = p.mouth_width * (1.0 + 0.12 * p.smile)
        lf = p.lip_fullness
        self.mouth_y = self.nose_base_y - 0.016
        self.ulip_c = (0.0, self.mouth_y + 0.0045, 0.059)
        self.ulip_r = (0.024 * mw, 0.0050 * lf, 0.010)
        self.llip_c = (0.0, self.mouth_y - 0.0060 - self.drop, 0.056 - 0.3 * self.drop)
        self.llip_r = (0.021 * mw, 0.0060 * lf, 0.010)
        self.cav_c = (0.0, self.mouth_y - 0.5 * self.drop, 0.066)
        self.cav_r = (0.022 * mw, 0.0012 + 0.45 * self.drop + 0.0025 * p.smile, 0.03)
        self.teeth_c = (0.0, self.mouth_y - 0.0015, 0.050)
        self.teeth_r = (0.018 * mw, 0.0045, 0.008)
        # ears
        ez = p.ear_size
        self.ear_c = (0.070 * hw + 0.005 * p.ear_protrusion, 0.010, -0.028)
        self.ear_r = (0.009, 0.029 * ez, 0.017 * ez)
        self.concha_c = (self.ear_c[0] + 0.007, 0.008, -0.026)
        self.concha_r = (0.006, 0.016 * ez, 0.009 * ez)
        # neck
        self.neck_r = 0.050 * p.neck_width
        # hair
        self.has_hair = p.hair_style != "bald"
        L = p.hair_length
        self.hair_t = 0.0015 + 0.12 * min(L, 0.12)
        t = self.hair_t
        self.hair_r = (self.skull_r[0] + t, self.skull_r[1] + 1.5 * t, self.skull_r[2] + t)
        self.hair_front_y = 0.082 + 0.03 * p.hairline
        self.hair_side_y = 0.045 - 0.25 * min(L, 0.12)
        self.hair_back_y = -0.015 - 0.45 * min(L, 0.12)
        self.long = L > 0.12
        top = 0.09
        self.curtain_c = (0.0, top - 0.5 * L, -0.055)
        self.curtain_h = (0.080 * hw + 0.5 * t, 0.5 * L, 0.072)
        self._head_bound_c, self._head_bound_r = (0.0, 0.01, -0.025), 0.185
        # colours (linear)
        self.skin = _srgb_to_linear(skin_albedo(p.skin_tone, p.skin_warmth))
        self.hair_col = _srgb_to_linear(_HAIR_COLOURS[p.hair_colour])
        self.iris = _srgb_to_linear(_EYE_COLOURS[p.eye_colour])
        self.shirt_col = _srgb_to_linear(_SHIRT_COLOURS[p.shirt_colour])

    # -------------------------------------------------------------- geometry
    def _parts(self, x: Tensor, y: Tensor, z: Tensor) -> dict[str, Tensor]:
        """Component distances: ``skin`` (head without eyes and hair), ``eyes``, ``hair``, ``cavity``."""
        p = self.p
        # smile: lift the lip corners (evaluate the field lower where the surface moves up)
        wm = torch.exp(-(x * x) * (1.0 / 0.03 ** 2) - (y - self.mouth_y) ** 2 * (1.0 / 0.022 ** 2))
        ym = y - p.smile * 0.015 * (x * x) * (1.0 / 0.024 ** 2) * wm
        # skull and lower face
        d = ellipsoid(x, y, z, self.skull_c, self.skull_r)
        d = smin(d, ellipsoid(x, y, z, self.occiput_c, self.occiput_r), 0.03)
        below = ((self.face_c[1] - y) * (1.0 / 0.08)).clamp(0.0, 1.0)
        face = ellipsoid(x * (1.0 + self.taper * below), y, z, self.face_c, self.face_r)
        d = smin(d, face, 0.03)
        d = smin(d, ellipsoid(x, y, z, self.chin_c, self.chin_r), 0.03)
        ax = x.abs()
        d = smin(d, ellipsoid(ax, y, z, self.gonion_c, self.gonion_r), 0.03)
        d = smin(d, ellipsoid(ax, y, z, self.cheek_c, self.cheek_r), 0.02)
        d = smin(d, ellipsoid(x, y, z, self.browr_c, self.browr_r), 0.012)
        # eye sockets
        d = smax(d, -ellipsoid(ax, y, z, self.sock_c, self.sock_r), 0.004)
        # nose
        nose = capsule(x, y, z, self.nose_a, self.nose_b, self.nose_ra, self.nose_rb)
        nose = smin(nose, ellipsoid(ax, y, z, self.ala_c, self.ala_r), 0.005)
        d = smin(d, nose, 0.008)
        # lips and mouth cavity
        lips = smin(ellipsoid(x, ym, z, self.ulip_c, self.ulip_r), ellipsoid(x, ym, z, self.llip_c, self.llip_r),
                    0.003)
        if p.beard > 0:  # beard: a few millimetres of geometry (before the mouth is carved)
            d = d - 0.0025 * p.beard * self._beard_weight(x, y, z, lips)
        d = smin(d, lips, 0.005)
        cav = ellipsoid(x, ym, z, self.cav_c, self.cav_r)
        d = smax(d, -cav, 0.002)
        teeth = ellipsoid(x, ym, z, self.teeth_c, self.teeth_r)  # upper teeth, seen when the mouth opens
        d = torch.minimum(d, teeth)
        # ears (with a hollow concha)
        ear = smax(ellipsoid(ax, y, z, self.ear_c, self.ear_r), -ellipsoid(ax, y, z, self.concha_c, self.concha_r),
                   0.002)
        d = smin(d, ear, 0.006)
        # neck
        rad = torch.sqrt(x * x + (z + 0.040) ** 2) - self.neck_r
        neck = torch.maximum(rad, torch.maximum(-(y + 0.30), y + 0.02))
        d = smin(d, neck, 0.012)
        shirt = ellipsoid(x, y, z, (0.0, -0.295, -0.04), (0.21, 0.10, 0.12))
        d = smin(d, shirt, 0.03)
        eyes = torch.sqrt((ax - self.eye_x) ** 2 + (y - self.eye_y) ** 2 + (z - self.eye_z) ** 2) - self.eye_rad
        out = {"skin": d, "eyes": eyes, "lips": lips, "cavity": cav, "teeth": teeth, "shirt": shirt, "ym": ym}
        if self.has_hair:
            out["hair"] = self._hair(x, y, z)
        return out

    def _hair(self, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        cz = self.skull_c[2]
        dz = z - cz
        c = dz * torch.rsqrt(x * x + dz * dz + 1e-8)  # cos(azimuth): 1 front, -1 back
        f, s, b = self.hair_front_y, self.hair_side_y, self.hair_back_y
        boundary = s + 0.5 * (f - b) * c + 0.5 * (f + b - 2.0 * s) * c * c
        shell = ellipsoid(x, y, z, self.skull_c, self.hair_r)
        h = smax(shell, boundary - y, 0.006)
        if self.long:
            hx, hy, hz = self.curtain_h
            cx, cy, cz2 = self.curtain_c
            rb = 0.035  # rounding radius of the curtain's edges
            qx = (x.abs() - hx + rb).clamp_min(0.0)
            qy = ((y - cy).abs() - hy + rb).clamp_min(0.0)
            qz = ((z - cz2).abs() - hz + rb).clamp_min(0.0)
            box = torch.sqrt(qx * qx + qy * qy + qz * qz) - rb
            box = smax(box, z - 0.005, 0.01)
            h = smin(h, box, 0.02)
        return h

    def _beard_weight(self, x: Tensor, y: Tensor, z: Tensor, lips: Tensor) -> Tensor:
        upper = self.mouth_y - 0.008 + 0.9 * (x.abs() - 0.025).clamp(0.0, 0.04)
        below_nose = _smoothstep(upper + 0.003, upper - 0.004, y)
        above_neck = _smoothstep(-0.125 - self.drop, -0.105 - self.drop, y)
        front = _smoothstep(-0.035, -0.005, z)
        off_lips = _smoothstep(0.0015, 0.004, lips)
        return below_nose * above_neck * front * off_lips

    def _coarse(self, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        """Exact distance to a union of spheres and capsules enclosing the head (a lower bound of :meth:`sdf`
        outside them)."""
        hc = self._head_bound_c
        d = torch.sqrt(x * x + (y - hc[1]) ** 2 + (z - hc[2]) ** 2) - self._head_bound_r
        d = torch.minimum(d, capsule(x, y, z, (0.0, 0.0, -0.04), (0.0, -0.30, -0.04), 0.075, 0.075))
        d = torch.minimum(d, capsule(x, y, z, (-0.11, -0.295, -0.04), (0.11, -0.295, -0.04), 0.128, 0.128))
        if self.has_hair and self.long:
            cy, hy = self.curtain_c[1], self.curtain_h[1]
            d = torch.minimum(d, capsule(x, y, z, (0.0, cy + hy, -0.055), (0.0, cy - hy, -0.055), 0.135, 0.135))
        return d

    def sdf(self, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        """Signed distance bound ``[N]`` of points ``(x, y, z)`` (each ``[N]``) to the head surface."""
        coarse = self._coarse(x, y, z)
        near = coarse < 0.01
        if bool(near.all()):
            return self._sdf_full(x, y, z)
        idx = torch.nonzero(near).squeeze(-1)
        d = coarse.clone()
        d[idx] = self._sdf_full(x[idx], y[idx], z[idx])
        return d

    def _sdf_full(self, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        parts = self._parts(x, y, z)
        d = torch.minimum(parts["skin"], parts["eyes"])
        return torch.minimum(d, parts["hair"]) if self.has_hair else d

    # ------------------------------------------------------------ appearance
    def material(self, x: Tensor, y: Tensor, z: Tensor, footprint: float = 0.0) -> tuple[Tensor, Tensor]:
        """Linear albedo ``[N, 3]`` and specular weight ``[N]`` at surface points.

        ``footprint`` (metres per sample) fades out texture detail finer than the sampling.
        """

        def band(freq: float) -> float:  # amplitude kept for a texture of angular frequency freq (rad/m)
            return math.exp(-((freq * footprint / 4.0) ** 2))

        p = self.p
        parts = self._parts(x, y, z)
        skin_d, eyes_d = parts["skin"], parts["eyes"]
        one = torch.ones_like(x)
        col = torch.stack([one * self.skin[0], one * self.skin[1], one * self.skin[2]], -1)
        # subtle skin variation and cheek blush
        var = 1.0 + 0.04 * band(173.0) * torch.sin(173.0 * x + 1.3) * torch.sin(151.0 * y + 0.7) * torch.sin(139.0 * z + 2.1)
        col = col * var[:, None]
        ax = x.abs()
        blush = torch.exp(-((ax - 0.042) ** 2 + (y - 0.0) ** 2) * (1.0 / 0.018 ** 2)) * (z > 0.0)
        col = col * (1.0 + blush[:, None] * torch.tensor([0.06, -0.05, -0.04], device=x.device))
        # lips
        wl = _smoothstep(0.002, 0.0, parts["lips"]) * (z > 0.03)
        lipc = col * torch.tensor([0.78, 0.52, 0.52], device=x.device)
        col = col + wl[:, None] * (lipc - col)
        # eyebrows
        hair = torch.tensor(self.hair_col, device=x.device)
        brow_col = hair * 0.7 + 0.015
        by = 0.043 + self.brow_up + 0.004 * (1.0 - ((ax - self.eye_x) * (1.0 / 0.02)) ** 2)
        wb = torch.exp(-((y - by) * (1.0 / 0.0035)) ** 2) * _smoothstep(0.023, 0.017, (ax - self.eye_x - 0.002).abs())
        wb = wb * (z > 0.03) * 0.9
        col = col + wb[:, None] * (brow_col - col)
        # beard
        if p.beard > 0:
            wbe = self._beard_weight(x, y, z, parts["lips"])
            must = torch.exp(-((y - (self.mouth_y + 0.0105)) * (1.0 / 0.004)) ** 2) * _smoothstep(0.03, 0.02, ax)
            wbe = torch.maximum(wbe, must * (z > 0.03))
            tex = 0.9 + 0.1 * band(1300.0) * torch.sin(1300.0 * x + 410.0 * y + 1.1) * torch.sin(1150.0 * y - 530.0 * z + 0.4)
            amt = (wbe * min(1.0, 1.3 * p.beard) * tex).clamp(0.0, 1.0)
            col = col + amt[:, None] * (hair - col)
        spec = torch.full_like(x, 0.05) + 0.05 * wl
        # mouth cavity: dark throat, teeth on top
        in_cav = (parts["cavity"].abs() < 0.0012) & (skin_d < 0.0015) & (z > 0.02)
        teeth = (parts["teeth"] < 0.0008) & (skin_d < 0.0015)
        cav_col = torch.tensor([0.05, 0.008, 0.008], device=x.device)
        col = torch.where(in_cav[:, None], cav_col, col)
        col = torch.where(teeth[:, None], torch.tensor([0.75, 0.72, 0.62], device=x.device), col)
        # eyes: sclera, iris, pupil (looking along +z)
        on_eye = eyes_d < skin_d
        r = torch.sqrt((ax - self.eye_x) ** 2 + (y - self.eye_y) ** 2)  # distance from the gaze axis
        rho = r * (1.0 / self.eye_rad)
        iris_w = _smoothstep(0.62, 0.55, rho)
        eye_col = torch.tensor([0.78, 0.74, 0.70], device=x.device).expand_as(col)
        iris = torch.tensor(self.iris, device=x.device) * (0.7 + 0.3 * _smoothstep(0.55, 0.3, rho))[:, None]
        eye_col = eye_col + iris_w[:, None] * (iris - eye_col)
        eye_col = eye_col * (1.0 - 0.96 * _smoothstep(0.27, 0.22, rho))[:, None]
        lash = (eyes_d < 0.0018) & (y > self.eye_y - 0.002) & ~on_eye
        col = torch.where(lash[:, None], col * 0.25, col)
        col = torch.where(on_eye[:, None], eye_col, col)
        spec = torch.where(on_eye, torch.full_like(spec, 0.8), spec)
        # shirt (where the torso is the nearest part)
        on_shirt = (parts["shirt"] < 0.002) & (y < -0.16)
        col = torch.where(on_shirt[:, None], torch.tensor(self.shirt_col, device=x.device), col)
        # hair
        if self.has_hair:
            on_hair = parts["hair"] < torch.minimum(skin_d, eyes_d) + 0.0003
            strand = 0.8 + 0.2 * band(2200.0) * torch.sin(2200.0 * x + 300.0 * z) * torch.sin(1500.0 * z - 200.0 * y)
            if p.hair_style == "buzz":
                hcol = col + 0.8 * (hair - col)
            else:
                hcol = hair * strand[:, None]
            col = torch.where(on_hair[:, None], hcol, col)
            spec = torch.where(on_hair, torch.full_like(spec, 0.08), spec)
        return col.clamp(0.0, 1.0), spec


# --------------------------------------------------------------------- public API
def head_sdf(params: HeadParams, points: Tensor) -> Tensor:
    """Signed distance (bound, metres) of ``points [..., 3]`` to the head surface; returns ``[...]``."""
    head = _Head(params)
    flat = points.reshape(-1, 3)
    return head.sdf(flat[:, 0], flat[:, 1], flat[:, 2]).reshape(points.shape[:-1])


_BOUND_C = (0.0, -0.09, -0.03)
_BOUND_R = 0.34
_KEY = (0.45, 0.55, 0.70)
_FILL = (-0.75, 0.05, 0.45)


def _normalize3(v: tuple[float, float, float]) -> tuple[float, float, float]:
    n = math.sqrt(sum(c * c for c in v))
    return (v[0] / n, v[1] / n, v[2] / n)


@contextmanager
def _cpu_threads(n: int | None, device: torch.device) -> Iterator[None]:
    """Run with ``n`` intra-op CPU threads (restored afterwards); no-op for ``None`` or non-CPU devices.

    Sphere tracing is thousands of small element-wise ops: extra threads mostly spin. Measured on a
    shared 2-core machine: 2.2 s per smoke subject with 1 thread, 14 to 45 s with 2.
    """
    if n is None or device.type != "cpu":
        yield
        return
    if n < 1:
        raise ValueError(f"cpu_threads must be >= 1 or None, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _pixel_rays(cameras: Cameras, cam: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, ...]:
    """Unit rays ``(ox, oy, oz, dx, dy, dz)``, each ``[N]``, through pixel positions ``(u, v) [N]`` of cameras ``cam [N]``.

    ``(u, v)`` are continuous pixel coordinates (pixel ``(i, j)`` has its centre at ``(i + 0.5, j + 0.5)``).
    """
    K, V = cameras.Ks[cam], cameras.viewmats[cam]
    xc = (u - K[:, 0, 2]) / K[:, 0, 0]
    yc = (v - K[:, 1, 2]) / K[:, 1, 1]
    R, t = V[:, :3, :3], V[:, :3, 3]
    # R^T p = sum_i R[i, :] p_i (rows of R are the camera axes in world coordinates)
    d = [R[:, 0, i] * xc + R[:, 1, i] * yc + R[:, 2, i] for i in range(3)]
    n = torch.rsqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
    o = [-(R[:, 0, i] * t[:, 0] + R[:, 1, i] * t[:, 1] + R[:, 2, i] * t[:, 2]) for i in range(3)]
    return o[0], o[1], o[2], d[0] * n, d[1] * n, d[2] * n


def _trace_and_shade(head: _Head, rays: tuple[Tensor, ...], max_steps: int, eps: float,
                     footprint: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(rgb [N, 3] white where missed, hit [N] bool, t [N])`` for rays ``(ox, oy, oz, dx, dy, dz)``."""
    ox, oy, oz, dx, dy, dz = rays
    t0, t1 = ray_sphere_interval(ox, oy, oz, dx, dy, dz, _BOUND_C, _BOUND_R)
    t, hit = sphere_trace(head.sdf, ox, oy, oz, dx, dy, dz, t0, t1, max_steps=max_steps, eps=eps, step_scale=0.85)
    rgb = torch.ones(ox.shape[0], 3, device=ox.device)
    idx = torch.nonzero(hit).squeeze(-1)
    th = t[idx]
    rgb[idx] = _shade(head, ox[idx] + th * dx[idx], oy[idx] + th * dy[idx], oz[idx] + th * dz[idx],
                      dx[idx], dy[idx], dz[idx], footprint)
    return rgb, hit, t


def _edge_pixels(hit: Tensor, t: Tensor, depth_jump: float = 0.01) -> Tensor:
    """``[C, H, W]`` bool: pixels whose 8-neighbourhood mixes hits and misses or jumps in depth."""
    C, H, W = hit.shape
    h = torch.nn.functional.pad(hit.float()[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    tt = torch.nn.functional.pad(torch.where(hit, t, torch.full_like(t, 10.0))[:, None], (1, 1, 1, 1),
                                 mode="replicate")[:, 0]
    edge = torch.zeros_like(hit)
    for di in (0, 1, 2):
        for dj in (0, 1, 2):
            if di == 1 and dj == 1:
                continue
            hn, tn = h[:, di:di + H, dj:dj + W], tt[:, di:di + H, dj:dj + W]
            edge |= (hn != h[:, 1:-1, 1:-1]) | ((tn - tt[:, 1:-1, 1:-1]).abs() > depth_jump)
    return edge


def render_head(params: HeadParams, cameras: Cameras, supersample: int = 2, max_steps: int = 64,
                device: torch.device | str | None = None, cpu_threads: int | None = 1) -> tuple[Tensor, Tensor]:
    """Sphere-trace a head from every camera and composite it on white.

    One ray per pixel centre; pixels on a silhouette or a depth jump (an 8-neighbour differs)
    are re-rendered with ``s x s`` subpixel rays and averaged, which gives soft masks and
    antialiased edges at a fraction of the cost of supersampling every pixel.

    Args:
        params: the head.
        cameras: ``C`` cameras (``viewmats [C, 4, 4]``), image ``W x H``.
        supersample: ``s`` (1 = hard masks).
        max_steps: sphere-tracing step budget per ray.
        device: where to render (default the cameras' device); e.g. ``"cuda"``.
        cpu_threads: intra-op threads while rendering on CPU (restored afterwards; ``None`` keeps
            torch's setting). One is fastest for this many-small-ops workload.

    Returns:
        ``(images [C, H, W, 3], masks [C, H, W])`` float32 on ``device``: colour composited on
        white (premultiplied: ``mask * colour + (1 - mask)``) and coverage in [0, 1].
    """
    if cameras.viewmats.ndim != 3:
        raise ValueError(f"render_head needs one batch of cameras [C, 4, 4], got {tuple(cameras.viewmats.shape)}")
    if supersample < 1:
        raise ValueError(f"render_head: supersample must be >= 1, got {supersample}")
    dev = torch.device(device) if device is not None else cameras.device
    with _cpu_threads(cpu_threads, dev):
        return _render(params, cameras.to(dev), supersample, max_steps)


def _render(params: HeadParams, cams: Cameras, s: int, max_steps: int) -> tuple[Tensor, Tensor]:
    dev = cams.device
    head = _Head(params)
    C, H, W = len(cams), cams.height, cams.width
    # metres per pixel at the head's distance: sets the hit tolerance and the texture band limit
    footprint = 1.15 / float(cams.Ks[:, 0, 0].mean())
    eps = max(1e-5, 0.2 * footprint)  # per pass: hits within a fifth of a sample of the surface
    cam = torch.arange(C, device=dev)[:, None, None].expand(C, H, W).reshape(-1)
    v = (torch.arange(H, device=dev, dtype=torch.float32)[None, :, None] + 0.5).expand(C, H, W).reshape(-1)
    u = (torch.arange(W, device=dev, dtype=torch.float32)[None, None, :] + 0.5).expand(C, H, W).reshape(-1)
    rgb, hit, t = _trace_and_shade(head, _pixel_rays(cams, cam, u, v), max_steps, eps, footprint)
    images, masks = rgb.reshape(C, H, W, 3), hit.to(torch.float32).reshape(C, H, W)
    if s > 1:
        edge = torch.nonzero(_edge_pixels(hit.reshape(C, H, W), t.reshape(C, H, W)))  # [E, 3]
        off = (torch.arange(s, device=dev, dtype=torch.float32) + 0.5) / s
        ou, ov = off[None, :].expand(s, s).reshape(-1), off[:, None].expand(s, s).reshape(-1)
        ce = edge[:, 0, None].expand(-1, s * s).reshape(-1)
        ue = (edge[:, 2, None].float() + ou[None, :]).reshape(-1)
        ve = (edge[:, 1, None].float() + ov[None, :]).reshape(-1)
        rgb_e, hit_e, _ = _trace_and_shade(head, _pixel_rays(cams, ce, ue, ve), max_steps, eps / s, footprint / s)
        images[edge[:, 0], edge[:, 1], edge[:, 2]] = rgb_e.reshape(-1, s * s, 3).mean(1)
        masks[edge[:, 0], edge[:, 1], edge[:, 2]] = hit_e.to(torch.float32).reshape(-1, s * s).mean(1)
    return images.clamp(0.0, 1.0).contiguous(), masks.contiguous()


def _normals(sdf, x: Tensor, y: Tensor, z: Tensor, h: float = 2e-4) -> tuple[Tensor, Tensor, Tensor]:
    """Unit normals by the tetrahedral finite-difference gradient of ``sdf``."""
    a = sdf(x + h, y - h, z - h)
    b = sdf(x - h, y - h, z + h)
    c = sdf(x - h, y + h, z - h)
    d = sdf(x + h, y + h, z + h)
    nx, ny, nz = a - b - c + d, -a - b + c + d, -a + b - c + d
    inv = torch.rsqrt(nx * nx + ny * ny + nz * nz + 1e-20)
    return nx * inv, ny * inv, nz * inv


def _shade(head: _Head, x: Tensor, y: Tensor, z: Tensor, vx: Tensor, vy: Tensor, vz: Tensor,
           footprint: float) -> Tensor:
    """sRGB colour ``[N, 3]`` of surface points seen along unit view rays ``v`` (camera to point)."""
    nx, ny, nz = _normals(head.sdf, x, y, z)
    albedo, spec_w = head.material(x, y, z, footprint)
    # ambient occlusion from two probes along the normal
    occ = torch.zeros_like(x)
    for hstep, wgt in ((0.004, 1.0), (0.012, 0.5)):
        dd = head.sdf(x + hstep * nx, y + hstep * ny, z + hstep * nz)
        occ = occ + wgt * (hstep - dd).clamp_min(0.0) / hstep
    ao = (1.0 - 0.55 * occ).clamp(0.25, 1.0)
    k, f = _normalize3(_KEY), _normalize3(_FILL)
    lam_k = (nx * k[0] + ny * k[1] + nz * k[2]).clamp_min(0.0)
    lam_f = (nx * f[0] + ny * f[1] + nz * f[2]).clamp_min(0.0)
    amb = 0.30 + 0.12 * ny
    ndv = -(nx * vx + ny * vy + nz * vz)
    rim = 0.12 * (1.0 - ndv.clamp(0.0, 1.0)) ** 3
    light = (amb + 0.25 * lam_f) * ao + 0.95 * lam_k * (0.6 + 0.4 * ao)
    # Blinn-Phong highlight of the key light
    hx, hy, hz = k[0] - vx, k[1] - vy, k[2] - vz
    hn = torch.rsqrt(hx * hx + hy * hy + hz * hz + 1e-12)
    ndh = ((nx * hx + ny * hy + nz * hz) * hn).clamp_min(0.0)
    spec = spec_w * ndh ** 40 * (lam_k > 0)
    lin = albedo * light[:, None] + (rim * ao + spec)[:, None]
    lin = lin.clamp(0.0, 1.0)
    return torch.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin.clamp_min(1e-8) ** (1 / 2.4) - 0.055)


NECK_FRACTION = 0.12
"""Share of the ``K`` corresponded points on the neck band (the rest cover the head)."""

NECK_BAND_Y = (-0.19, -0.085)
"""Heights (metres) of the neck band: from the shirt's collar up to under the jaw."""

NECK_AXIS_XZ = (0.0, -0.040)
"""``(x, z)`` of the vertical neck axis the neck rays aim at."""

_RAY_LENGTH = 0.6
"""Metres from a head ray's origin to HEAD_CENTER; no canonical ray needs to march further."""

BUST_ANCHOR = (NECK_AXIS_XZ[0], NECK_BAND_Y[0], NECK_AXIS_XZ[1])
"""The synthetic neck base (metres): the anchor of the bust rays (:func:`~fastavatar_nb.data.bust.bust_rays`)."""


def num_neck_rays(num_points: int) -> int:
    """How many of :func:`canonical_rays`' ``num_points`` rays cover the neck: they are the last ones."""
    return int(round(NECK_FRACTION * num_points))


def canonical_rays(num_points: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """The ``K`` fixed rays that define the corresponded points: origins and unit directions ``[K, 3]``.

    Three groups, in this order: head, neck, bust (``K - N - B``, ``N = round(NECK_FRACTION * K)``,
    ``B = num_bust_points(K) = round(BUST_FRACTION * K)``).

    The head rays cover the head: a Fibonacci lattice of
    outward directions ``d`` over the sphere cap ``y >= -0.55``, bent towards the face
    (``d + 0.35 e_z``, renormalised) so the face gets more points than the back of the head;
    each ray starts ``_RAY_LENGTH`` (0.6 m) from :data:`HEAD_CENTER` along ``d`` and points back at it.
    The neck rays cover the neck, as FLAME's points do in
    NeRSemble: horizontal rays on a golden-angle lattice over the heights
    :data:`NECK_BAND_Y` and every azimuth, starting 0.3 m from the neck axis
    (:data:`NECK_AXIS_XZ`) and pointing at it. The bust rays cover the shoulders and upper torso
    the images show below the collar: :func:`~fastavatar_nb.data.bust.bust_rays` anchored at
    :data:`BUST_ANCHOR` (the neck base). Every ray is the same for every subject.
    """
    if num_points < 1:
        raise ValueError(f"canonical_rays: num_points must be >= 1, got {num_points}")
    num_neck = num_neck_rays(num_points)
    num_bust = num_bust_points(num_points)
    num_head = num_points - num_neck - num_bust
    if num_head < 1:
        raise ValueError(f"canonical_rays: num_points = {num_points} leaves no head rays")
    golden = math.pi * (3.0 - math.sqrt(5.0))
    # head: directions from the head centre
    i = torch.arange(num_head, dtype=torch.float64) + 0.5
    y = 1.0 - i / num_head * 1.55
    r = torch.sqrt((1.0 - y * y).clamp_min(0.0))
    phi = i * golden
    d = torch.stack([r * torch.sin(phi), y, r * torch.cos(phi)], -1)
    d[:, 2] += 0.35
    d = d / d.norm(dim=-1, keepdim=True)
    head_o = torch.tensor(HEAD_CENTER, dtype=torch.float64) + _RAY_LENGTH * d
    # neck: horizontal rays at the neck axis
    j = torch.arange(num_neck, dtype=torch.float64) + 0.5
    ny = NECK_BAND_Y[0] + (NECK_BAND_Y[1] - NECK_BAND_Y[0]) * j / max(num_neck, 1)
    az = j * golden
    out = torch.stack([torch.sin(az), torch.zeros_like(az), torch.cos(az)], -1)
    neck_o = torch.stack([NECK_AXIS_XZ[0] + 0.3 * out[:, 0], ny, NECK_AXIS_XZ[1] + 0.3 * out[:, 2]], -1)
    bust_o, bust_d = bust_rays(num_bust, BUST_ANCHOR)
    origins = torch.cat([head_o.float(), neck_o.float(), bust_o])
    dirs = torch.cat([-d.float(), -out.float(), bust_d])
    return origins.to(device=device), dirs.to(device=device)


def surface_points(params: HeadParams, num_points: int, device: torch.device | str | None = None,
                   cpu_threads: int | None = 1) -> Tensor:
    """``K`` corresponded points ``[K, 3]`` on the outer surface (skin, eyes, hair; neck; shirt on the bust).

    Point ``k`` is where :func:`canonical_rays` ray ``k`` first meets the surface (refined to
    ~1e-5 m). ``cpu_threads`` as in :func:`render_head`.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    with _cpu_threads(cpu_threads, dev):
        return _surface_points(params, num_points, dev)


def _surface_points(params: HeadParams, num_points: int, device: torch.device) -> Tensor:
    head = _Head(params)
    o, d = canonical_rays(num_points, device)
    ox, oy, oz = o.unbind(-1)
    dx, dy, dz = d.unbind(-1)
    t0 = torch.zeros_like(ox)
    t1 = torch.full_like(ox, max(_RAY_LENGTH, BUST_RAY_LENGTH))
    t, hit = sphere_trace(head.sdf, ox, oy, oz, dx, dy, dz, t0, t1, max_steps=1000, eps=1e-5,
                          step_scale=0.8)  # rays grazing under the jaw need many small steps
    if not bool(hit.all()):
        raise RuntimeError(f"surface_points: {int((~hit).sum())} of {num_points} canonical rays missed the surface "
                           f"(params {params})")
    for _ in range(3):  # polish along the ray
        t = t + head.sdf(ox + t * dx, oy + t * dy, oz + t * dz)
    return torch.stack([ox + t * dx, oy + t * dy, oz + t * dz], -1)


_LANDMARKS = {"nose_tip": (0.0, -0.012, 0.082), "right_eye": (-0.031, 0.026, 0.048),
              "left_eye": (0.031, 0.026, 0.048), "mouth": (0.0, -0.036, 0.068), "chin": (0.0, -0.095, 0.05),
              "right_ear": (-0.08, 0.01, -0.028), "left_ear": (0.08, 0.01, -0.028), "crown": (0.0, 0.15, -0.04)}


def landmark_indices(num_points: int) -> dict[str, int]:
    """Indices of the canonical points nearest some landmarks of the average head.

    Keys: nose_tip, left_eye, right_eye (subject's left is +x), mouth, chin, left_ear,
    right_ear, crown: for each, the :func:`canonical_rays` ray passing nearest to where the
    landmark sits on the average head. The same index marks the same landmark on every subject (within the
    landmark's spread over identities and the point spacing).
    """
    o, d = (t.double() for t in canonical_rays(num_points))
    out = {}
    for name, pos in _LANDMARKS.items():
        v = torch.tensor(pos, dtype=torch.float64) - o
        t = (v * d).sum(-1).clamp(0.0, _RAY_LENGTH)  # closest point on each ray's marched segment
        out[name] = int((v - t[:, None] * d).norm(dim=-1).argmin())
    return out


def subject_seed(seed: int, index: int) -> int:
    """The seed of subject ``index`` in a dataset drawn with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def generate_subject(seed: int, width: int = 69, height: int | None = None, num_points: int = 2500,
                     subject_id: str | None = None, supersample: int = 2, params: HeadParams | None = None,
                     device: torch.device | str | None = None, cpu_threads: int | None = 1) -> MultiViewSubject:
    """One synthetic subject seen by the 16 NeRSemble cameras.

    Args:
        seed: draws the head (:func:`sample_head_params`) unless ``params`` is given.
        width, height: image size; give one to keep the rig's 550:802 aspect (69 -> 69x101).
        num_points: ``K`` corresponded points (10,144 at paper scale).
        subject_id: name (default ``f"synth_seed{seed}"``).
        supersample: ``s x s`` rays per pixel (soft masks).
        params: explicit head (overrides ``seed`` for the shape; ``seed`` is still recorded).
        device: where to render (default CPU); the result lives there.
        cpu_threads: intra-op CPU threads while rendering (see :func:`render_head`).

    Returns:
        A :class:`MultiViewSubject` (camera ids ``"00".."15"``) whose ``attributes`` hold the
        labels and parameters (:meth:`HeadParams.attributes`) plus ``seed`` and
        ``generator_version``.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    params = sample_head_params(seed) if params is None else params
    cams = Cameras.nersemble_rig(width=width, height=height).to(dev)
    images, masks = render_head(params, cams, supersample=supersample, device=dev, cpu_threads=cpu_threads)
    points = surface_points(params, num_points, dev, cpu_threads=cpu_threads)
    attrs = params.attributes()
    attrs.update(seed=int(seed), generator_version=GENERATOR_VERSION, supersample=int(supersample),
                 generated_width=cams.width, generated_height=cams.height, num_points=int(num_points))
    return MultiViewSubject(subject_id or f"synth_seed{seed}", images, masks, cams, points, attrs,
                            [f"{i:02d}" for i in range(len(cams))])


def _expected_files(num_views: int) -> list[str]:
    names = ["transforms.json", "points3d.ply", "attributes.json"]
    for c in range(num_views):
        names += [f"images/00000_{c:02d}.png", f"fg_masks/00000_{c:02d}.png"]
    return names


def _expected_attributes(seed: int, width: int, height: int, num_points: int, supersample: int) -> dict:
    attrs = sample_head_params(seed).attributes()
    attrs.update(seed=int(seed), generator_version=GENERATOR_VERSION, supersample=int(supersample),
                 generated_width=int(width), generated_height=int(height), num_points=int(num_points))
    return json.loads(json.dumps(attrs))  # as it reads back from attributes.json


def generate_dataset(root: str | Path, num_subjects: int, seed: int = 0, width: int = 69, height: int | None = None,
                     num_points: int = 2500, supersample: int = 2, device: torch.device | str | None = None,
                     overwrite: bool = False, progress: bool = True, prefix: str = "synth",
                     cpu_threads: int | None = 1, indices: Sequence[int] | None = None,
                     workers: int = 1) -> list[Path]:
    """Write ``num_subjects`` synthetic subjects as NeRSemble folders ``<root>/<prefix>_000, ...``.

    Subject ``i`` is drawn with :func:`subject_seed` ``(seed, i)``, so subject ``i`` does not
    depend on ``num_subjects`` (growing a dataset keeps the subjects already there).

    Resume: a folder that already holds subject ``i`` at these settings (its
    ``attributes.json`` matches and all files are present) is skipped; the same subject with
    files missing is rewritten. A folder holding anything else raises ``FileExistsError``
    unless ``overwrite=True`` (then only a previous subject folder is replaced, see
    :func:`~fastavatar_nb.data.nersemble.write_subject`).

    Args:
        root: dataset folder (created).
        num_subjects: how many subjects.
        seed: dataset seed.
        width, height: image size (one of them keeps the rig's 550:802 aspect).
        num_points: ``K`` corresponded points per subject.
        supersample: ``s x s`` rays on edge pixels.
        device: where to render (``"cuda"`` when available is much faster).
        overwrite: replace folders holding a different subject.
        progress: show a tqdm progress bar.
        prefix: folder-name prefix.
        cpu_threads: intra-op CPU threads while rendering (see :func:`render_head`).
        indices: write only these subjects of the dataset (e.g. a shipped run's test subjects:
            :meth:`fastavatar_nb.checkpoints.Checkpoint.subjects`); each must be ``< num_subjects``.
        workers: processes generating subjects at once when ``device`` is the CPU (each with
            ``cpu_threads`` threads; the files are the same as with one); ignored on a GPU.

    Returns:
        The subject folders, in order (``num_subjects`` of them, or one per index).
    """
    from .._live import progress_bar as tqdm

    if num_subjects < 0:
        raise ValueError(f"generate_dataset: num_subjects must be >= 0, got {num_subjects}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rig = Cameras.nersemble_rig(width=width, height=height)
    W, H = rig.width, rig.height
    paths = []
    todo = list(range(num_subjects)) if indices is None else [int(i) for i in indices]
    bad = [i for i in todo if not 0 <= i < num_subjects]
    if bad:
        raise ValueError(f"generate_dataset: indices {bad[:5]} are not subjects of a dataset of {num_subjects}")
    jobs: list[tuple] = []  # the subjects to write (complete folders of the same subject are kept)
    for i in todo:
        folder = root / f"{prefix}_{i:03d}"
        sseed = subject_seed(seed, i)
        paths.append(folder)
        replace = own_partial = False
        if folder.exists() and any(folder.iterdir()):
            expected = _expected_attributes(sseed, W, H, num_points, supersample)
            attr_file = folder / "attributes.json"
            found = json.loads(attr_file.read_text()) if attr_file.is_file() else None
            if found == expected:
                if all((folder / f).is_file() for f in _expected_files(len(rig))):
                    continue  # complete: resume
                replace = own_partial = True  # the same subject, partly deleted: rewrite it
            elif not overwrite:
                diff = "no attributes.json" if found is None else \
                    f"differs in {sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))}"
                raise FileExistsError(f"generate_dataset: {folder} holds a different subject ({diff}); pass "
                                      "overwrite=True to replace it, or use another root")
            else:
                replace = True
        jobs.append((sseed, W, H, num_points, folder, supersample, device, cpu_threads, replace, own_partial))
    if workers > 1 and len(jobs) > 1 and (device is None or torch.device(device).type == "cpu"):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
            for _ in tqdm(pool.map(_write_generated, jobs), total=len(jobs), disable=not progress,
                          desc=f"synthetic subjects -> {root} ({workers} processes)"):
                pass
    else:
        for job in tqdm(jobs, desc=f"synthetic subjects -> {root}", disable=not progress):
            _write_generated(job)
    return paths


def _write_generated(job: tuple) -> None:
    """Generate one subject and write its folder (one job of :func:`generate_dataset`)."""
    from .nersemble import write_subject

    sseed, W, H, num_points, folder, supersample, device, cpu_threads, replace, own_partial = job
    subject = generate_subject(sseed, W, H, num_points, subject_id=folder.name, supersample=supersample,
                               device=device, cpu_threads=cpu_threads)
    if own_partial and not (folder / "transforms.json").is_file():
        shutil.rmtree(folder)  # our own partial subject without transforms.json (write_subject won't replace it)
    write_subject(subject, folder, overwrite=replace)
