"""Mouth animator of the data engine: one face image + per-frame mouth values -> frames.

Everything here runs with numpy and OpenCV only (no mediapipe, no librosa), because the
trainer synthesises clips on the fly, possibly on a machine where only torch, numpy,
opencv-python-headless, scikit-image and scipy are installed.  Landmarks come precomputed
as a :class:`FaceRig`.

How a frame is made (:meth:`MouthAnimator.render`), all as ONE backward map for
``cv2.remap`` plus a small composite:

1. Head motion: a forward 2x3 affine ``M`` (sub-pixel, see :func:`head_motion`); every
   output pixel ``p`` first looks up ``q = M^-1 p`` in the "animated" face.
2. Mouth: in a frame attached to the mouth (origin between the inner lip corners, x along
   the corners, y down) the lower lip, chin and jaw move down and the upper lip up; the
   split follows the lips' parting line, so the two lips separate instead of stretching.
   Horizontally the motion has a lens profile at the lips (zero at the corners) that
   widens into the jaw's profile below the lower lip; below the chin it fades out over the
   neck, above the upper lip it fades out before the nose.  A width value moves the mouth
   corners out (spread, "ee") or in (rounded, "oo").  The displacement is inverted with
   two fixed-point steps.
3. The gap between the displaced inner lip contours is filled with a mouth cavity: a dark
   colour derived from the lips, a band of upper teeth when it is open enough, a hint of
   lower teeth when wide open; anti-aliased 1-D coverage across the gap.
4. Blinks: the upper lid slides down to the lower lid (skin above it stretched down, the
   visible eye compressed under it).

Opening 0, width 0, blink 0 and no motion give the input image exactly (a copy).
Coordinates are continuous pixel coordinates of the image (pixel ``i`` covers
``[i, i + 1)``); ``cv2.remap`` samples pixel centres, so maps are built on ``i + 0.5`` and
shifted back by 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ..stages.motion import MAX_OPEN, UPPER_SHARE

__all__ = [
    "MESH_INDICES",
    "RIG_LAYOUT",
    "RIG_POINTS",
    "AnimationConfig",
    "FaceRig",
    "MouthAnimator",
    "blink_track",
    "head_motion",
]

#: Named point groups of a :class:`FaceRig`, in storage order: (name, number of points).
#: Contours run from the image's left to its right; ``eye_left`` is the eye on the image's
#: left (the person's right eye).  ``face_box`` is two points: (x0, y0) and (x1, y1) of the
#: face detector's box (the box the face stage grows into the crop and the face mask).
RIG_LAYOUT: tuple[tuple[str, int], ...] = (
    ("lip_upper_outer", 11),
    ("lip_lower_outer", 11),
    ("lip_upper_inner", 11),
    ("lip_lower_inner", 11),
    ("eye_left_upper", 9),
    ("eye_left_lower", 9),
    ("eye_right_upper", 9),
    ("eye_right_lower", 9),
    ("jaw", 21),
    ("forehead", 1),
    ("chin", 1),
    ("nose_tip", 1),
    ("nose_base", 1),
    ("face_box", 2),
)
RIG_POINTS: int = sum(n for _, n in RIG_LAYOUT)

_SLICES: dict[str, slice] = {}
_start = 0
for _name, _n in RIG_LAYOUT:
    _SLICES[_name] = slice(_start, _start + _n)
    _start += _n
del _start, _name, _n

#: mediapipe face-mesh (478 points) indices of every rig group except ``face_box``.
MESH_INDICES: dict[str, tuple[int, ...]] = {
    "lip_upper_outer": (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291),
    "lip_lower_outer": (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291),
    "lip_upper_inner": (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308),
    "lip_lower_inner": (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308),
    "eye_left_upper": (33, 246, 161, 160, 159, 158, 157, 173, 133),
    "eye_left_lower": (33, 7, 163, 144, 145, 153, 154, 155, 133),
    "eye_right_upper": (362, 398, 384, 385, 386, 387, 388, 466, 263),
    "eye_right_lower": (362, 382, 381, 380, 374, 373, 390, 249, 263),
    "jaw": (
        234,
        93,
        132,
        58,
        172,
        136,
        150,
        149,
        176,
        148,
        152,
        377,
        400,
        378,
        379,
        365,
        397,
        288,
        361,
        323,
        454,
    ),  # fmt: skip
    "forehead": (10,),
    "chin": (152,),
    "nose_tip": (1,),
    "nose_base": (2,),
}

# Groups whose mirror image is the same group reversed; the eyes swap sides.
_MIRROR_SWAP = {
    "eye_left_upper": "eye_right_upper",
    "eye_left_lower": "eye_right_lower",
    "eye_right_upper": "eye_left_upper",
    "eye_right_lower": "eye_left_lower",
}


# --------------------------------------------------------------------------- rig


@dataclass(frozen=True, eq=False)
class FaceRig:
    """The landmarks the animator needs, ``[RIG_POINTS, 2]`` float32 pixel coordinates.

    Build one from a 478-point mediapipe mesh with :meth:`from_mesh`, or directly (the
    procedural faces know theirs analytically).  Read groups with :meth:`part`.
    """

    points: np.ndarray

    def __post_init__(self) -> None:
        pts = np.asarray(self.points, dtype=np.float32)
        if pts.shape != (RIG_POINTS, 2):
            raise ValueError(f"a face rig has {RIG_POINTS}x2 points, got {pts.shape}")
        if not np.isfinite(pts).all():
            raise ValueError("face rig points must be finite")
        pts = np.ascontiguousarray(pts)
        pts.setflags(write=False)
        object.__setattr__(self, "points", pts)

    @classmethod
    def from_mesh(
        cls, landmarks: np.ndarray, face_box: tuple[float, float, float, float]
    ) -> FaceRig:
        """Rig from mediapipe's 478 landmarks (``[478, 2+]``, same pixel frame as the box)."""
        lm = np.asarray(landmarks, dtype=np.float64)
        if lm.ndim != 2 or lm.shape[0] != 478 or lm.shape[1] < 2:
            raise ValueError(f"expected 478x2 (or 478x3) landmarks, got {lm.shape}")
        pts = np.zeros((RIG_POINTS, 2), np.float64)
        for name, idx in MESH_INDICES.items():
            pts[_SLICES[name]] = lm[list(idx), :2]
        x0, y0, x1, y1 = (float(v) for v in face_box)
        pts[_SLICES["face_box"]] = [[x0, y0], [x1, y1]]
        return cls(pts.astype(np.float32))

    def part(self, name: str) -> np.ndarray:
        """Points of one group (``RIG_LAYOUT`` name), ``[n, 2]`` float32 (read-only view)."""
        try:
            return self.points[_SLICES[name]]
        except KeyError:
            raise ValueError(f"unknown rig part {name!r}") from None

    def point(self, name: str) -> np.ndarray:
        """A one-point group as ``[2]`` float64."""
        return self.part(name)[0].astype(np.float64)

    @property
    def face_box(self) -> tuple[float, float, float, float]:
        (x0, y0), (x1, y1) = self.part("face_box").astype(np.float64)
        return (float(x0), float(y0), float(x1), float(y1))

    @property
    def face_height(self) -> float:
        """Forehead-to-chin distance (mediapipe points 10 and 152), pixels."""
        return float(np.linalg.norm(self.point("chin") - self.point("forehead")))

    def lip_box(self) -> tuple[float, float, float, float]:
        lips = np.concatenate([self.part("lip_upper_outer"), self.part("lip_lower_outer")])
        (x0, y0), (x1, y1) = lips.min(axis=0), lips.max(axis=0)
        return (float(x0), float(y0), float(x1), float(y1))

    def transformed(self, matrix: np.ndarray) -> FaceRig:
        """Rig under a 2x3 affine (similarity) map.  The face box keeps its axis-aligned
        shape: its centre is mapped and its sides scaled by ``sqrt(|det|)``, as a detector
        would box a slightly rotated face."""
        m = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
        pts = self.points.astype(np.float64)
        out = pts @ m[:, :2].T + m[:, 2]
        (x0, y0), (x1, y1) = pts[_SLICES["face_box"]]
        c = np.array([(x0 + x1) / 2, (y0 + y1) / 2]) @ m[:, :2].T + m[:, 2]
        s = math.sqrt(abs(float(np.linalg.det(m[:, :2]))))
        hw, hh = (x1 - x0) / 2 * s, (y1 - y0) / 2 * s
        out[_SLICES["face_box"]] = [[c[0] - hw, c[1] - hh], [c[0] + hw, c[1] + hh]]
        return FaceRig(out.astype(np.float32))

    def flipped(self, width: float) -> FaceRig:
        """Rig of the image mirrored left-right (``x -> width - x``)."""
        pts = self.points.astype(np.float64)
        out = np.empty_like(pts)
        for name, _ in RIG_LAYOUT:
            src = pts[_SLICES[_MIRROR_SWAP.get(name, name)]].copy()
            src[:, 0] = width - src[:, 0]
            if name == "face_box":
                out[_SLICES[name]] = [[src[1, 0], src[0, 1]], [src[0, 0], src[1, 1]]]
            else:
                out[_SLICES[name]] = src[::-1]
        return FaceRig(out.astype(np.float32))


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AnimationConfig:
    """Strength of each motion.  Validated on creation (``ValueError``)."""

    max_open: float = MAX_OPEN  # inner-lip gap added at opening 1, share of the face height
    upper_share: float = UPPER_SHARE  # part of that gap made by the upper lip moving up
    max_width: float = 0.16  # corner shift at |width| 1, fraction of the inner half-width
    teeth: float = 1.0  # opacity of the teeth (0: a plain dark cavity)
    blink_close: float = 0.92  # how far the upper lid travels at blink 1 (1 = to the lower lid)

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_open <= 0.4:
            raise ValueError("max_open must be in [0, 0.4]")
        if not 0.0 <= self.upper_share <= 0.6:
            raise ValueError("upper_share must be in [0, 0.6]")
        if not 0.0 <= self.max_width <= 0.5:
            raise ValueError("max_width must be in [0, 0.5]")
        if not 0.0 <= self.teeth <= 1.0:
            raise ValueError("teeth must be in [0, 1]")
        if not 0.0 <= self.blink_close < 1.0:
            raise ValueError("blink_close must be in [0, 1)")


# --------------------------------------------------------------------------- helpers


def _frame(origin: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit x axis from a to b and its perpendicular pointing down (image y)."""
    r = b - a
    n = float(np.linalg.norm(r))
    r = np.array([1.0, 0.0]) if n < 1e-6 else r / n
    return r, np.array([-r[1], r[0]])


def _curve_table(
    pts: np.ndarray, origin: np.ndarray, r: np.ndarray, u: np.ndarray, grid: np.ndarray
) -> np.ndarray:
    """y (along u) of the polyline ``pts`` at the x (along r) values ``grid``."""
    d = pts.astype(np.float64) - origin
    x, y = d @ r, d @ u
    order = np.argsort(x, kind="stable")
    return np.interp(grid, x[order], y[order])


def _roi(corners: np.ndarray, shape: tuple[int, int], margin: float) -> tuple[slice, slice] | None:
    """Axis-aligned pixel box (rows, cols) around ``corners`` grown by margin, clipped."""
    h, w = shape
    x0 = int(math.floor(corners[:, 0].min() - margin))
    x1 = int(math.ceil(corners[:, 0].max() + margin))
    y0 = int(math.floor(corners[:, 1].min() - margin))
    y1 = int(math.ceil(corners[:, 1].max() + margin))
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    return slice(y0, y1), slice(x0, x1)


def _rect_corners(
    origin: np.ndarray,
    r: np.ndarray,
    u: np.ndarray,
    xr: tuple[float, float],
    yr: tuple[float, float],
) -> np.ndarray:
    return np.array([origin + x * r + y * u for x in xr for y in yr])


def _poly_median(image: np.ndarray, outer: np.ndarray, inner: np.ndarray | None) -> np.ndarray:
    """Median colour of the pixels inside ``outer`` (minus ``inner``); float RGB."""
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(outer * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    if inner is not None:
        cv2.fillPoly(mask, [np.round(inner * 16).astype(np.int32)], 0, cv2.LINE_8, shift=4)
    sel = image[mask.astype(bool)]
    if len(sel) < 3:
        return np.array([150.0, 70.0, 70.0])
    return np.median(sel.astype(np.float64), axis=0)


# --------------------------------------------------------------------------- animator


class _Eye:
    """Precomputed geometry of one eye for blinks."""

    def __init__(self, upper: np.ndarray, lower: np.ndarray, shape: tuple[int, int]) -> None:
        a, b = upper[0].astype(np.float64), upper[-1].astype(np.float64)
        self.origin = (a + b) / 2
        self.r, self.u = _frame(self.origin, a, b)
        self.half = max(float(np.linalg.norm(b - a)) / 2, 1.0)
        self.grid = np.linspace(-self.half, self.half, 33)
        self.up = _curve_table(upper, self.origin, self.r, self.u, self.grid)
        lo = _curve_table(lower, self.origin, self.r, self.u, self.grid)
        self.lo = np.maximum(lo, self.up)
        self.above = 0.6 * self.half  # lid skin band that stretches down
        yr = (float(self.up.min()) - self.above - 1.0, float(self.lo.max()) + 1.0)
        corners = _rect_corners(self.origin, self.r, self.u, (-self.half - 1, self.half + 1), yr)
        self.corners = corners
        self.shape = shape

    def displace(
        self, qx: np.ndarray, qy: np.ndarray, blink: float, close: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Source coordinates for points ``q`` (image px, any shape) of the animated face."""
        dx, dy = qx - self.origin[0], qy - self.origin[1]
        xe = dx * self.r[0] + dy * self.r[1]
        ye = dx * self.u[0] + dy * self.u[1]
        up = np.interp(xe, self.grid, self.up)
        lo = np.interp(xe, self.grid, self.lo)
        inside = np.abs(xe) < self.half
        travel = blink * close * (lo - up)
        new_up = up + travel
        top = up - self.above
        ys = ye.copy()
        m1 = inside & (ye >= top) & (ye < new_up)
        ys[m1] = top[m1] + (ye[m1] - top[m1]) * self.above / (new_up[m1] - top[m1])
        m2 = inside & (ye >= new_up) & (ye < lo)
        span = lo - new_up
        ok = m2 & (span > 1e-4)
        ys[ok] = up[ok] + (ye[ok] - new_up[ok]) * (lo[ok] - up[ok]) / span[ok]
        ys[m2 & ~ok] = up[m2 & ~ok]
        shift = ys - ye
        return qx + shift * self.u[0], qy + shift * self.u[1]


class MouthAnimator:
    """Renders frames of one face (``HxWx3`` uint8 RGB and its :class:`FaceRig`).

    Construction precomputes the mouth and eye geometry (a fraction of a millisecond);
    :meth:`render` makes one frame, :meth:`render_clip` many.  ``motion_margin`` (pixels)
    is how far head motion may move the face; it only sizes the regions processed.
    """

    def __init__(
        self,
        image: np.ndarray,
        rig: FaceRig,
        config: AnimationConfig | None = None,
        *,
        motion_margin: float = 4.0,
    ) -> None:
        img = np.asarray(image)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 image, got {img.dtype} {img.shape}")
        self.image = np.ascontiguousarray(img)
        self.rig = rig
        self.config = config or AnimationConfig()
        h, w = img.shape[:2]
        self.shape = (h, w)
        self._gx = np.arange(w, dtype=np.float32)[None, :].repeat(h, 0) + 0.5
        self._gy = np.arange(h, dtype=np.float32)[:, None].repeat(w, 1) + 0.5
        self._setup_mouth(float(motion_margin))
        self._eyes = [
            _Eye(rig.part("eye_left_upper"), rig.part("eye_left_lower"), self.shape),
            _Eye(rig.part("eye_right_upper"), rig.part("eye_right_lower"), self.shape),
        ]
        self._eye_rois = [_roi(e.corners, self.shape, float(motion_margin) + 1) for e in self._eyes]

    # ------------------------------------------------------------------ set-up

    def _setup_mouth(self, margin: float) -> None:
        rig = self.rig
        ui, li = rig.part("lip_upper_inner"), rig.part("lip_lower_inner")
        uo, lo = rig.part("lip_upper_outer"), rig.part("lip_lower_outer")
        left = (ui[0].astype(np.float64) + li[0]) / 2
        right = (ui[-1].astype(np.float64) + li[-1]) / 2
        m = (left + right) / 2
        r, u = _frame(m, left, right)
        half = max(float(np.linalg.norm(right - left)) / 2, 1.5)
        self._m, self._r, self._u, self._half = m, r, u, half

        # Tables over x in [-1.6, 1.6] half-widths (values outside clamp to the ends).
        tx = np.linspace(-1.6 * half, 1.6 * half, 97)
        up_in = _curve_table(ui, m, r, u, tx)
        lo_in = np.maximum(_curve_table(li, m, r, u, tx), up_in)
        mid = (up_in + lo_in) / 2
        self._tx, self._tmid = tx, mid
        self._tup = up_in - mid  # <= 0: upper inner lip relative to the parting line
        self._tlo = lo_in - mid  # >= 0
        xh = tx / half
        self._thl = np.clip(1.0 - xh**2, 0.0, 1.0) ** 0.6  # lens profile at the lips

        face_h = max(rig.face_height, 8.0)
        self._face_h = face_h
        mid0 = float(np.interp(0.0, tx, mid))
        up_out0 = float(np.interp(0.0, tx, _curve_table(uo, m, r, u, tx)))
        lo_out0 = float(np.interp(0.0, tx, _curve_table(lo, m, r, u, tx)))
        self._upper_th = max(mid0 - up_out0, 1.0)  # upper lip thickness at the centre
        self._lower_th = max(lo_out0 - mid0, 1.5)
        proj = lambda p: float((p - m) @ u) - mid0  # noqa: E731
        self._chin_s = max(proj(rig.point("chin")), self._lower_th + 2.0)
        self._nose_s = min(proj(rig.point("nose_base")), -self._upper_th - 1.0)
        jaw = rig.part("jaw").astype(np.float64) - m
        jx, jy = jaw @ r, jaw @ u
        below = jy > -0.05 * face_h
        spread = (jx[below].max() - jx[below].min()) / 2 if below.sum() >= 2 else 0.0
        self._jaw_half = float(np.clip(spread, 1.6 * half, 4.0 * half))
        self._fall = 0.22 * face_h  # fade-out of the jaw motion below the chin
        self._lip_blend = max(1.2 * self._lower_th, 2.0)  # lens -> jaw profile transition
        self._sigma_w = max(self._upper_th + self._lower_th, 3.0)  # vertical reach of width

        xr = (-max(self._jaw_half, 2.4 * half) - 1, max(self._jaw_half, 2.4 * half) + 1)
        yr = (mid0 + self._nose_s - 1, mid0 + self._chin_s + self._fall + 1)
        self._mouth_roi = _roi(_rect_corners(m, r, u, xr, yr), self.shape, margin + 1)

        # Colours of the cavity and the teeth, from the lips and the skin of this face.
        lip = _poly_median(
            self.image,
            np.concatenate([uo, lo[::-1]]).astype(np.float64),
            np.concatenate([ui, li[::-1]]).astype(np.float64),
        )
        fx0, fy0, fx1, fy1 = rig.face_box
        cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2
        hw, hh = max((fx1 - fx0) / 6, 1.0), max((fy1 - fy0) / 6, 1.0)
        box = np.array(
            [[cx - hw, cy - hh], [cx + hw, cy - hh], [cx + hw, cy + hh], [cx - hw, cy + hh]]
        )
        skin = _poly_median(self.image, box, None)
        # Teeth follow the scene light, only loosely the skin tone (dark skin, white teeth).
        light = float(np.clip(0.55 + 0.45 * skin.mean() / 170.0, 0.7, 1.1))
        self._cavity = np.clip(lip * 0.3 + np.array([6.0, 2.0, 2.0]), 0, 255).astype(np.float32)
        self._tongue = np.clip(lip * 0.62, 0, 255).astype(np.float32)
        self._teeth = (np.array([236.0, 230.0, 216.0]) * light).clip(0, 255).astype(np.float32)
        self._tooth_h = max(0.13 * 2 * half, 1.2)

    # ------------------------------------------------------------------ pieces

    def _lens(self, xs: np.ndarray) -> np.ndarray:
        return np.interp(xs, self._tx, self._thl)

    def _jaw_profile(self, xs: np.ndarray) -> np.ndarray:
        a = np.abs(xs) / self._jaw_half
        t = np.clip((a - 0.5) / 0.5, 0.0, 1.0)
        return 0.5 + 0.5 * np.cos(np.pi * t)

    def _lower_d(self, s: np.ndarray, hl: np.ndarray, hj: np.ndarray, jd: float) -> np.ndarray:
        t = np.clip(s / self._lip_blend, 0.0, 1.0)
        t = t * t * (3 - 2 * t)
        prof = hl + (hj - hl) * t
        f = np.clip((s - self._chin_s) / self._fall, 0.0, 1.0)
        return jd * prof * (0.5 + 0.5 * np.cos(np.pi * f))

    def _upper_d(self, s: np.ndarray, hl: np.ndarray, ju: float) -> np.ndarray:
        flat = -0.6 * self._upper_th
        lim = 0.9 * self._nose_s
        f = np.clip((s - flat) / (lim - flat), 0.0, 1.0)
        return ju * hl * (0.5 + 0.5 * np.cos(np.pi * f))

    def _mouth(
        self, qx: np.ndarray, qy: np.ndarray, opening: float, width: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Source coordinates for points ``q`` and the cavity (alpha [..], colour [.., 3])."""
        cfg = self.config
        m, r, u, half = self._m, self._r, self._u, self._half
        dx, dy = qx - m[0], qy - m[1]
        xf = dx * r[0] + dy * r[1]
        yf = dx * u[0] + dy * u[1]
        # Width: corners move along r; first-order inverse.
        wpx = cfg.max_width * half * width
        if wpx != 0.0:
            xh = xf / half
            ax = np.abs(xh)
            phi = np.where(ax <= 1.0, xh, np.sign(xh) * np.exp(-(((ax - 1.0) / 0.6) ** 2)))
            xs = xf - wpx * phi * np.exp(-((yf / self._sigma_w) ** 2))
        else:
            xs = xf
        mid = np.interp(xs, self._tx, self._tmid)
        s = yf - mid
        j = cfg.max_open * self._face_h * max(opening, 0.0)
        jd, ju = (1.0 - cfg.upper_share) * j, cfg.upper_share * j
        alpha = colour = None
        if j > 0.0:
            hl = self._lens(xs)
            hj = self._jaw_profile(xs)
            lower = s >= 0.0
            s_lo = s - self._lower_d(s, hl, hj, jd)
            s_lo = s - self._lower_d(np.maximum(s_lo, 0.0), hl, hj, jd)
            s_up = s + self._upper_d(s, hl, ju)
            s_up = s + self._upper_d(np.minimum(s_up, 0.0), hl, ju)
            s_src = np.where(lower, s_lo, s_up)
            alpha, colour = self._cavity_layer(xs, s, hl, jd, ju, j)
        else:
            s_src = s
        y_src = mid + s_src
        sx = m[0] + xs * r[0] + y_src * u[0]
        sy = m[1] + xs * r[1] + y_src * u[1]
        return sx, sy, alpha, colour

    def _cavity_layer(
        self, xs: np.ndarray, s: np.ndarray, hl: np.ndarray, jd: float, ju: float, j: float
    ) -> tuple[np.ndarray, np.ndarray]:
        top = np.interp(xs, self._tx, self._tup) - ju * hl
        bot = np.interp(xs, self._tx, self._tlo) + jd * hl
        cover = np.clip(np.minimum(s + 0.5, bot) - np.maximum(s - 0.5, top), 0.0, 1.0)
        cover *= min(j / 1.0, 1.0)  # fade in over the first pixel (matters for open refs)
        gap = bot - top
        v = np.clip((s - top) / np.maximum(gap, 1e-3), 0.0, 1.0)
        xh = np.abs(xs) / self._half
        shade = 1.0 - 0.35 * np.sin(np.pi * v)
        col = self._cavity[None, :] * shade[:, None]
        tongue = np.clip((v - 0.6) / 0.4, 0.0, 1.0) * np.clip((gap - 3.0) / 4.0, 0.0, 1.0)
        col += (self._tongue[None, :] - col) * (0.55 * tongue)[:, None]
        teeth = self.config.teeth
        if teeth > 0:
            side = np.clip((0.85 - xh) / 0.25, 0.0, 1.0)
            depth = s - top
            tu = np.minimum(0.42 * gap, self._tooth_h)
            a_up = np.clip(tu - depth + 0.5, 0.0, 1.0) * np.clip((gap - 1.2) / 2.0, 0.0, 1.0)
            depth_lo = bot - s
            tl = np.minimum(0.2 * gap, 0.55 * self._tooth_h)
            a_lo = np.clip(tl - depth_lo + 0.5, 0.0, 1.0) * np.clip((gap - 4.0) / 3.0, 0.0, 1.0)
            a_t = teeth * side * np.maximum(a_up, 0.8 * a_lo)
            tooth_col = self._teeth[None, :] * (1.0 - 0.3 * xh**2)[:, None]
            col += (tooth_col - col) * a_t[:, None]
        return cover, col

    # ------------------------------------------------------------------ rendering

    def render(
        self,
        opening: float,
        width: float = 0.0,
        blink: float = 0.0,
        motion: np.ndarray | None = None,
    ) -> np.ndarray:
        """One ``HxWx3`` uint8 frame.

        ``opening`` in [0, 1] (values up to 1.5 are accepted), ``width`` in [-1, 1]
        (+ spread, - rounded), ``blink`` in [0, 1], ``motion`` a forward 2x3 affine (None:
        no head motion).  Opening, width and blink 0 with no motion return a copy of the
        image.
        """
        opening = float(np.clip(opening, 0.0, 1.5))
        width = float(np.clip(width, -1.0, 1.0))
        blink = float(np.clip(blink, 0.0, 1.0))
        moving = motion is not None and not np.allclose(motion, [[1, 0, 0], [0, 1, 0]], atol=1e-9)
        mouth = opening > 0.0 or (width != 0.0 and self.config.max_width > 0)
        if not (moving or mouth or blink > 0.0):
            return self.image.copy()
        if moving:
            inv = cv2.invertAffineTransform(np.asarray(motion, np.float64).reshape(2, 3))
            qx = (inv[0, 0] * self._gx + inv[0, 1] * self._gy + inv[0, 2]).astype(np.float32)
            qy = (inv[1, 0] * self._gx + inv[1, 1] * self._gy + inv[1, 2]).astype(np.float32)
        else:
            qx, qy = self._gx, self._gy
        mapx, mapy = qx - 0.5, qy - 0.5  # new arrays: q stays untouched
        layer = None
        changed: list[tuple[slice, slice]] = []
        if mouth and self._mouth_roi is not None:
            rs = self._mouth_roi
            changed.append(rs)
            sx, sy, alpha, colour = self._mouth(
                qx[rs].astype(np.float64).ravel(), qy[rs].astype(np.float64).ravel(), opening, width
            )
            shp = mapx[rs].shape
            mapx[rs] = (sx - 0.5).reshape(shp)
            mapy[rs] = (sy - 0.5).reshape(shp)
            if alpha is not None:
                layer = (rs, alpha.reshape(shp), colour.reshape(*shp, 3))
        if blink > 0.0:
            for eye, rs in zip(self._eyes, self._eye_rois, strict=True):
                if rs is None:
                    continue
                changed.append(rs)
                ex, ey = eye.displace(
                    qx[rs].astype(np.float64),
                    qy[rs].astype(np.float64),
                    blink,
                    self.config.blink_close,
                )
                mapx[rs] = ex - 0.5
                mapy[rs] = ey - 0.5
        # Bicubic keeps a moving head as sharp as the reference (bilinear would blur it by up
        # to half a pixel).  A still head: only the changed regions are resampled.
        flags = {"interpolation": cv2.INTER_CUBIC, "borderMode": cv2.BORDER_REPLICATE}
        if moving:
            out = cv2.remap(self.image, mapx, mapy, **flags)
        else:
            out = self.image.copy()
            for rs in changed:
                mx, my = np.ascontiguousarray(mapx[rs]), np.ascontiguousarray(mapy[rs])
                out[rs] = cv2.remap(self.image, mx, my, **flags)
        if layer is not None:
            rs, alpha, colour = layer
            if alpha.max() > 0.0:
                region = out[rs].astype(np.float32)
                a = alpha.astype(np.float32)[..., None]
                region += (colour.astype(np.float32) - region) * a
                out[rs] = np.clip(region + 0.5, 0, 255).astype(np.uint8)
        return out

    def render_clip(
        self,
        openings: np.ndarray,
        widths: np.ndarray | None = None,
        blinks: np.ndarray | None = None,
        motions: np.ndarray | None = None,
    ) -> np.ndarray:
        """``[F, H, W, 3]`` uint8 frames for per-frame values (each ``[F]``; motions
        ``[F, 2, 3]``); None means zeros / no motion."""
        openings = np.asarray(openings, dtype=np.float64).ravel()
        f = len(openings)
        widths = np.zeros(f) if widths is None else np.asarray(widths, np.float64).ravel()
        blinks = np.zeros(f) if blinks is None else np.asarray(blinks, np.float64).ravel()
        if len(widths) != f or len(blinks) != f or (motions is not None and len(motions) != f):
            raise ValueError("openings, widths, blinks and motions need the same length")
        out = np.empty((f, *self.shape, 3), np.uint8)
        for i in range(f):
            out[i] = self.render(
                openings[i], widths[i], blinks[i], None if motions is None else motions[i]
            )
        return out


# --------------------------------------------------------------------------- tracks


def _smooth_walk(rng: np.random.Generator, n: int, smooth: float) -> np.ndarray:
    """A smooth random curve of length n with max |value| 1 (zero if degenerate)."""
    pad = int(3 * smooth) + 1
    x = np.cumsum(rng.standard_normal(n + 2 * pad))
    k = np.exp(-0.5 * (np.arange(-pad, pad + 1) / max(smooth, 1e-3)) ** 2)
    y = np.convolve(x - x.mean(), k / k.sum(), mode="same")[pad : pad + n]
    y = y - y.mean()
    peak = np.abs(y).max() if n else 0.0
    return y / peak if peak > 1e-9 else np.zeros(n)


def head_motion(
    num_frames: int,
    rng: np.random.Generator,
    center: tuple[float, float],
    *,
    max_shift: float = 0.5,
    max_rotation: float = 0.5,
    max_scale: float = 0.005,
    smooth: float = 4.0,
) -> np.ndarray:
    """Small smooth head motion: ``[F, 2, 3]`` forward affine maps about ``center``.

    Each of x/y shift (pixels), rotation (degrees) and scale is a smoothed random walk
    (gaussian smoothing ``smooth`` frames) whose peak is a random fraction of its maximum.
    All maxima 0 give identity matrices.
    """
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    if min(max_shift, max_rotation, max_scale) < 0:
        raise ValueError("motion maxima must be >= 0")
    amp = rng.uniform(0.0, 1.0, size=4) * np.array([max_shift, max_shift, max_rotation, max_scale])
    walks = np.stack([_smooth_walk(rng, num_frames, smooth) for _ in range(4)])
    walks *= amp[:, None]
    cx, cy = center
    out = np.empty((num_frames, 2, 3), np.float64)
    for i in range(num_frames):
        m = cv2.getRotationMatrix2D(
            (float(cx), float(cy)), float(walks[2, i]), 1.0 + float(walks[3, i])
        )
        m[0, 2] += walks[0, i]
        m[1, 2] += walks[1, i]
        out[i] = m
    return out


def blink_track(
    num_frames: int,
    fps: float,
    rng: np.random.Generator,
    *,
    interval: tuple[float, float] = (2.0, 6.0),
) -> np.ndarray:
    """Per-frame blink amount in [0, 1]: blinks of 2-4 frames, one every ``interval``
    seconds (uniform), the first at a random phase so a short clip contains a blink with
    the natural probability.  ``interval`` (0, 0) disables blinks."""
    out = np.zeros(num_frames, np.float64)
    lo, hi = interval
    if hi <= 0 or num_frames < 1:
        return out
    if not 0 < lo <= hi:
        raise ValueError("blink interval must be 0 < min <= max")
    t = rng.uniform(0.0, hi)  # seconds from the clip start to the first blink
    shapes = {
        2: (0.7, 0.9),
        3: (0.55, 1.0, 0.45),
        4: (0.45, 1.0, 0.75, 0.3),
    }
    while t * fps < num_frames:
        start = int(round(t * fps))
        dur = int(rng.integers(2, 5))
        for k, v in enumerate(shapes[dur]):
            if 0 <= start + k < num_frames:
                out[start + k] = max(out[start + k], v)
        t += rng.uniform(lo, hi)
    return out
