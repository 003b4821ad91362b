"""Face stage: load the portrait, find the face, cut the model's square crop and masks.

Geometry follows EchoMimic v1's inference script: the face box is grown by
``FaceConfig.crop_dilation`` of its height/width per side and made square around its
centre to give the crop box; the face-locator mask is the face box grown by
``FaceConfig.mask_dilation`` per side.  Unlike EchoMimic, the crop box is never clipped
to the image: where it reaches past an edge the crop is padded by edge replication, so
the face stays centred and paste-back (:mod:`.decode`) is an exact inverse mapping.
A face rolled by more than ``FaceConfig.level_roll`` degrees is cut levelled (the
portrait turned about the face box's centre) and turned back when pasted.

Boxes are ``(x0, y0, x1, y1)`` integer pixel edges, ``x1``/``y1`` exclusive.  Points
(landmarks) are continuous pixel coordinates: pixel ``i`` covers ``[i, i + 1)``.

Detection uses mediapipe's legacy solutions bundled in its wheel (no download):
FaceDetection (full-range model, short-range as fallback) for boxes, FaceMesh with refined
landmarks (478 points) for the chosen face.  The mediapipe graphs are built once per
process and shared under a lock; results are deterministic for a given image.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import FaceConfig
from ..errors import ImageError, InputNotFoundError, NoFaceError
from .motion import mouth_geometry

Box = tuple[int, int, int, int]

MIN_IMAGE_SIDE = 32
MAX_IMAGE_SIDE = 16384
NUM_LANDMARKS = 478
MIN_DETECTION_CONFIDENCE = 0.5
MAX_MESH_FACES = 5

#: Names accepted by :meth:`FaceAnalysis.latent_mask` (short and field names).
MASK_NAMES = {
    "face": "face_mask",
    "mouth": "mouth_mask",
    "foreground": "foreground_mask",
    "face_mask": "face_mask",
    "mouth_mask": "mouth_mask",
    "foreground_mask": "foreground_mask",
}

# Box-only fallback (no mesh): mouth box as fractions of the face box, centred on the
# detector's mouth keypoint when there is one, else at this height in the box.
_MOUTH_W, _MOUTH_H, _MOUTH_Y = 0.40, 0.16, 0.78


# --------------------------------------------------------------------------- loading


def _to_rgb_uint8(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8 RGB; alpha is composited on white."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if mode == "F":
            arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0  # 16-bit -> 8-bit
        gray = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
        alpha = rgba[:, :, 3:4] / 255.0
        rgb = rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
        return np.clip(rgb, 0, 255).round().astype(np.uint8)
    if mode == "1":
        im = im.convert("L")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a portrait as an upright HxWx3 uint8 RGB array.

    - EXIF orientation is applied (``ImageOps.exif_transpose``); an unreadable EXIF block
      is ignored with a warning.
    - Transparency (RGBA, LA, palette with a transparent index) is composited on white:
      the model has no alpha channel, and white is what most viewers show.
    - Grayscale, palette, CMYK, 1-bit and 16-bit/float images are converted to 8-bit RGB
      (16-bit scaled by 1/257, float taken as [0, 1] when its maximum is <= 1).
    - Only the first frame of an animated image is read.

    Raises :class:`InputNotFoundError` for a missing file and :class:`ImageError` for a
    directory, a file that is not a decodable image, or one with a side under 32 px or
    over 16384 px.
    """
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{name}: file not found")
    if p.is_dir():
        raise ImageError(f"{name}: is a directory, not an image")
    try:
        with Image.open(p) as im:
            im.load()
            try:
                upright = ImageOps.exif_transpose(im)
            except Exception as exc:  # corrupt EXIF must not stop a render
                warnings.warn(f"{name}: unreadable EXIF orientation ignored ({exc})", stacklevel=2)
                upright = im
            w, h = upright.size
            if min(w, h) < MIN_IMAGE_SIDE:
                raise ImageError(
                    f"{name}: image too small ({w}x{h}; each side needs >= {MIN_IMAGE_SIDE} px)"
                )
            if max(w, h) > MAX_IMAGE_SIDE:
                raise ImageError(
                    f"{name}: image too large ({w}x{h}; each side must be <= {MAX_IMAGE_SIDE} px)"
                )
            rgb = _to_rgb_uint8(upright)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not an image (unrecognised format)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: image too large (decompression bomb guard)") from exc
    except PermissionError as exc:
        raise ImageError(f"{name}: cannot read the file (permission denied)") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageError(f"{name}: not an image ({reason})") from exc
    return np.ascontiguousarray(rgb)


# --------------------------------------------------------------------------- result


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class FaceAnalysis:
    """Everything later stages need about the portrait's face.  Arrays are read-only.

    ``landmarks`` and ``crop_landmarks`` are ``None`` when the face mesh found nothing
    although the detector found a face (box-only mode, see :func:`analyze_face`).
    ``image`` is always the portrait as given; paste-back turns a levelled crop back.
    """

    image: np.ndarray  # HxWx3 uint8: the full upright RGB portrait
    face_box: Box  # detected face, image pixels, inside the image
    crop_box: Box  # square; may reach past the image (padded by edge replication)
    crop: np.ndarray  # res x res x 3 uint8
    face_mask: np.ndarray  # res x res float32 0/1: face box grown by mask_dilation
    mouth_mask: np.ndarray  # res x res float32 0/1: lips' box grown by mouth_dilation
    foreground_mask: np.ndarray  # res x res float32 0/1: face-mesh convex hull
    landmarks: np.ndarray | None  # 478 x 3 float32: x, y image pixels; z = mediapipe z * width
    crop_landmarks: np.ndarray | None  # 478 x 2 float32, crop pixels
    num_faces: int  # faces the detector found
    # How far the face is rolled (degrees, the outer eye corners' line; 0 without
    # landmarks), and, when that exceeds ``FaceConfig.level_roll``, the 2x3 rotation
    # taking portrait points to the levelled frame in which ``face_box``, ``crop_box`` and
    # ``landmarks`` are given (the crop is cut from the portrait turned by it); else None.
    roll: float = 0.0
    level: np.ndarray | None = None

    @property
    def resolution(self) -> int:
        return int(self.crop.shape[0])

    @property
    def has_landmarks(self) -> bool:
        return self.landmarks is not None

    def mouth_geometry(self) -> np.ndarray:
        """Inner lip corners (x, y) and face height in crop pixels, ``[5]``
        (:func:`~.motion.mouth_geometry`).  Box-only: guessed from the mouth box (corners
        at 0.6 of its half-width, the default mouth dilation's inner box) and the face
        box's height."""
        if self.crop_landmarks is not None:
            return mouth_geometry(self.crop_landmarks)
        ys, xs = np.nonzero(self.mouth_mask)
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        half = 0.6 * (xs.max() + 1 - xs.min()) / 2
        height = (self.face_box[3] - self.face_box[1]) * self.crop_scale
        return np.array([cx - half, cy, cx + half, cy, height], np.float32)

    @property
    def crop_scale(self) -> float:
        """Crop pixels per image pixel."""
        return self.resolution / (self.crop_box[2] - self.crop_box[0])

    def latent_mask(
        self,
        name: str,
        factor: int,
        *,
        soft: bool = False,
        threshold: float = 0.5,
        dilate: int = 0,
    ) -> np.ndarray:
        """One mask on the latent grid ``(res/factor) x (res/factor)``, float32.

        Each latent cell is the mean of its ``factor`` x ``factor`` pixels (area average).
        ``soft`` returns that coverage in [0, 1]; otherwise cells with coverage >=
        ``threshold`` are 1 (``threshold=0`` or tiny values: any overlap counts).
        ``dilate`` then grows the mask by that many cells (max filter).  ``name`` is
        ``face``, ``mouth`` or ``foreground`` (or the field name).
        """
        if name not in MASK_NAMES:
            raise ValueError(f"unknown mask {name!r} (expected face, mouth or foreground)")
        if factor < 1 or self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of {factor}")
        if dilate < 0:
            raise ValueError(f"dilate must be >= 0, not {dilate}")
        mask = getattr(self, MASK_NAMES[name])
        g = self.resolution // factor
        cover = mask.reshape(g, factor, g, factor).mean(axis=(1, 3), dtype=np.float64)
        out = cover if soft else (cover >= max(threshold, 1e-9)).astype(np.float64)
        if dilate:
            k = 2 * dilate + 1
            out = cv2.dilate(out.astype(np.float32), np.ones((k, k), np.uint8))
        return np.ascontiguousarray(out, dtype=np.float32)


# --------------------------------------------------------------------------- geometry


def grow_box(box: tuple[float, float, float, float], ratio: float) -> tuple[float, ...]:
    """Grow ``box`` by ``ratio`` of its width (left/right) and height (top/bottom) per side."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * ratio, (y1 - y0) * ratio
    return (x0 - dx, y0 - dy, x1 + dx, y1 + dy)


def square_crop_box(face_box: Box, dilation: float) -> Box:
    """Face box grown by ``dilation`` per side, then squared (longer side) on its centre."""
    x0, y0, x1, y1 = grow_box(face_box, dilation)
    side = max(2, int(math.ceil(max(x1 - x0, y1 - y0))))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left = int(math.floor(cx - side / 2.0 + 0.5))
    top = int(math.floor(cy - side / 2.0 + 0.5))
    return (left, top, left + side, top + side)


def crop_square(image: np.ndarray, box: Box, resolution: int) -> np.ndarray:
    """Cut ``box`` out of ``image`` (edge-replicating past the borders), resize to
    ``resolution`` x ``resolution``.  Area filter when shrinking, cubic when enlarging."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    ix0, iy0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    ix1, iy1 = max(min(x1, w), ix0 + 1), max(min(y1, h), iy0 + 1)
    region = image[iy0:iy1, ix0:ix1]
    pad = ((iy0 - y0, y1 - iy1), (ix0 - x0, x1 - ix1), (0, 0))
    if any(p for pair in pad for p in pair):
        region = np.pad(region, pad[: image.ndim], mode="edge")
    side = x1 - x0
    if side == resolution and y1 - y0 == resolution:
        return np.ascontiguousarray(region)
    interp = cv2.INTER_AREA if side > resolution else cv2.INTER_CUBIC
    return cv2.resize(region, (resolution, resolution), interpolation=interp)


def _to_crop(points: np.ndarray, crop_box: Box, resolution: int) -> np.ndarray:
    s = resolution / (crop_box[2] - crop_box[0])
    return (points - np.array(crop_box[:2], dtype=np.float64)) * s


def _rect_mask(box: tuple[float, ...], crop_box: Box, resolution: int) -> np.ndarray:
    """0/1 mask of the pixels whose centres lie in ``box`` (image coords) in crop space."""
    (x0, y0), (x1, y1) = _to_crop(
        np.array([box[:2], box[2:]], dtype=np.float64), crop_box, resolution
    )
    c = np.arange(resolution) + 0.5
    cols = (c >= x0) & (c < x1)
    rows = (c >= y0) & (c < y1)
    return (rows[:, None] & cols[None, :]).astype(np.float32)


def _hull_mask(points_crop: np.ndarray, resolution: int) -> np.ndarray:
    mask = np.zeros((resolution, resolution), np.uint8)
    shift = 4
    pts = np.round((points_crop - 0.5) * (1 << shift)).astype(np.int32)
    hull = cv2.convexHull(pts.reshape(-1, 1, 2))
    cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=shift)
    return mask.astype(np.float32)


def _ellipse_mask(box: Box, crop_box: Box, resolution: int) -> np.ndarray:
    (x0, y0), (x1, y1) = _to_crop(
        np.array([box[:2], box[2:]], dtype=np.float64), crop_box, resolution
    )
    c = np.arange(resolution) + 0.5
    cx, cy, rx, ry = (
        (x0 + x1) / 2,
        (y0 + y1) / 2,
        max((x1 - x0) / 2, 1e-6),
        max((y1 - y0) / 2, 1e-6),
    )
    d = ((c[None, :] - cx) / rx) ** 2 + ((c[:, None] - cy) / ry) ** 2
    return (d <= 1.0).astype(np.float32)


#: mediapipe face-mesh indices of the outer eye corners (the subject's right, then left).
EYE_CORNERS = (33, 263)


def face_roll(landmarks: np.ndarray) -> float:
    """Degrees the face is rolled: the angle of the line through the outer eye corners
    (positive: the subject's left eye, on the image's right, is lower)."""
    (x0, y0), (x1, y1) = np.asarray(landmarks, np.float64)[list(EYE_CORNERS), :2]
    return math.degrees(math.atan2(y1 - y0, x1 - x0))


def pixel_affine(m: np.ndarray) -> np.ndarray:
    """The affine ``m`` of continuous points (pixel ``i`` covers ``[i, i + 1)``) as
    OpenCV's warps read it, on pixel indices (pixel ``i``'s centre is ``i``)."""
    m = np.asarray(m, np.float64)
    return np.concatenate([m[:, :2], m[:, 2:] + 0.5 * m[:, :2].sum(1, keepdims=True) - 0.5], 1)


@cache
def lip_indices() -> np.ndarray:
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_LIPS

    return np.array(sorted({i for edge in FACEMESH_LIPS for i in edge}), dtype=np.int64)


def build_analysis(
    image: np.ndarray,
    face_box: Box,
    cfg: FaceConfig,
    resolution: int,
    landmarks: np.ndarray | None = None,
    *,
    num_faces: int = 1,
    mouth_center: tuple[float, float] | None = None,
) -> FaceAnalysis:
    """Crop and masks from a known face box (and optional 478x3 landmarks, image pixels).

    Without landmarks, the mouth mask is a box of typical size centred on ``mouth_center``
    (or at 78% of the face box's height) and the foreground mask is the ellipse inscribed
    in the face box.  With landmarks, a face rolled by more than ``cfg.level_roll``
    degrees is levelled: the crop is cut from the portrait turned about the face box's
    centre, and the landmarks are turned with it (``FaceAnalysis.level``).
    """
    _check_image(image)
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, not {resolution}")
    h, w = image.shape[:2]
    fx0, fy0, fx1, fy1 = (int(v) for v in face_box)
    if not (0 <= fx0 < fx1 <= w and 0 <= fy0 < fy1 <= h):
        raise ValueError(f"face box {face_box} is empty or outside the {w}x{h} image")
    face_box = (fx0, fy0, fx1, fy1)
    crop_box = square_crop_box(face_box, cfg.crop_dilation)
    roll, level, source = 0.0, None, image
    if landmarks is not None:
        landmarks = np.asarray(landmarks, dtype=np.float32)
        if landmarks.shape != (NUM_LANDMARKS, 3):
            raise ValueError(f"expected {NUM_LANDMARKS}x3 landmarks, got {landmarks.shape}")
        roll = face_roll(landmarks)
        if abs(roll) > cfg.level_roll:
            # Turn the portrait by the roll (counter-clockwise for a positive one) about
            # the face box's centre: the upright face then fits the same box, and the crop
            # is cut from the turned portrait.  The matrix maps continuous points.
            level = cv2.getRotationMatrix2D(((fx0 + fx1) / 2, (fy0 + fy1) / 2), roll, 1.0)
            source = cv2.warpAffine(
                image, pixel_affine(level), (w, h),
                flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE,
            )  # fmt: skip
            points = landmarks[:, :2].astype(np.float64) @ level[:, :2].T + level[:, 2]
            landmarks = np.concatenate([points, landmarks[:, 2:]], 1).astype(np.float32)
    crop = crop_square(source, crop_box, resolution)
    face_mask = _rect_mask(grow_box(face_box, cfg.mask_dilation), crop_box, resolution)

    crop_lm = None
    if landmarks is not None:
        crop_lm = _to_crop(landmarks[:, :2].astype(np.float64), crop_box, resolution)
        lips = landmarks[lip_indices(), :2]
        lip_box = (*lips.min(axis=0), *lips.max(axis=0))
        mouth_mask = _rect_mask(grow_box(lip_box, cfg.mouth_dilation), crop_box, resolution)
        foreground = _hull_mask(crop_lm, resolution)
        crop_lm = crop_lm.astype(np.float32)
    else:
        fw, fh = fx1 - fx0, fy1 - fy0
        mx, my = (
            mouth_center if mouth_center is not None else ((fx0 + fx1) / 2, fy0 + _MOUTH_Y * fh)
        )
        half_w, half_h = _MOUTH_W * fw / 2, _MOUTH_H * fh / 2
        mouth_box = (mx - half_w, my - half_h, mx + half_w, my + half_h)
        mouth_mask = _rect_mask(grow_box(mouth_box, cfg.mouth_dilation), crop_box, resolution)
        foreground = _ellipse_mask(face_box, crop_box, resolution)

    return FaceAnalysis(
        image=_frozen(image),
        face_box=face_box,
        crop_box=crop_box,
        crop=_frozen(crop),
        face_mask=_frozen(face_mask),
        mouth_mask=_frozen(mouth_mask),
        foreground_mask=_frozen(foreground),
        landmarks=None if landmarks is None else _frozen(landmarks),
        crop_landmarks=None if crop_lm is None else _frozen(crop_lm),
        num_faces=int(num_faces),
        roll=float(roll),
        level=None if level is None else _frozen(level),
    )


# --------------------------------------------------------------------------- mediapipe

_LOCK = threading.Lock()
_SOLUTIONS: dict[str, Any] = {}


@contextmanager
def _native_logs_silenced() -> Iterator[None]:
    """mediapipe's C++ side (absl, TFLite) logs to file descriptor 2 directly; a CLI error
    must stay one line on stderr, so that descriptor points to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _solution(key: str) -> Any:
    """Lazily built, process-wide mediapipe graphs.  Call with ``_LOCK`` held."""
    sol = _SOLUTIONS.get(key)
    if sol is None:
        import mediapipe as mp

        if key == "mesh":
            sol = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True,
                refine_landmarks=True,
                max_num_faces=MAX_MESH_FACES,
                min_detection_confidence=MIN_DETECTION_CONFIDENCE,
            )
        else:  # "det0" (short range) / "det1" (full range)
            sol = mp.solutions.face_detection.FaceDetection(
                model_selection=int(key[-1]), min_detection_confidence=MIN_DETECTION_CONFIDENCE
            )
        _SOLUTIONS[key] = sol
    return sol


@dataclass(frozen=True)
class _Detection:
    box: Box
    score: float
    mouth: tuple[float, float] | None

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _detect(image: np.ndarray) -> list[_Detection]:
    """Face boxes, clipped to the image, duplicates (IoU > 0.5) merged, largest first."""
    h, w = image.shape[:2]
    found: list[_Detection] = []
    for key in ("det1", "det0"):
        with _LOCK, _native_logs_silenced():
            result = _solution(key).process(image)
        for det in result.detections or []:
            rb = det.location_data.relative_bounding_box
            x0 = int(round(min(max(rb.xmin, 0.0), 1.0) * w))
            y0 = int(round(min(max(rb.ymin, 0.0), 1.0) * h))
            x1 = int(round(min(max(rb.xmin + rb.width, 0.0), 1.0) * w))
            y1 = int(round(min(max(rb.ymin + rb.height, 0.0), 1.0) * h))
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            kps = det.location_data.relative_keypoints
            mouth = (kps[3].x * w, kps[3].y * h) if len(kps) > 3 else None
            found.append(_Detection((x0, y0, x1, y1), float(det.score[0]), mouth))
        if found:
            break
    found.sort(key=lambda d: (-d.area, -d.score, d.box))
    unique: list[_Detection] = []
    for d in found:
        if all(_iou(d.box, u.box) <= 0.5 for u in unique):
            unique.append(d)
    return unique


def _mesh(image: np.ndarray) -> list[np.ndarray]:
    """All meshes mediapipe finds: 478x3 float64, x/y image pixels, z * width."""
    h, w = image.shape[:2]
    with _LOCK, _native_logs_silenced():
        result = _solution("mesh").process(image)
    out = []
    for face in result.multi_face_landmarks or []:
        lm = np.array([(p.x * w, p.y * h, p.z * w) for p in face.landmark], dtype=np.float64)
        if lm.shape == (NUM_LANDMARKS, 3):
            out.append(lm)
    return out


def mesh_landmarks(image: np.ndarray) -> np.ndarray | None:
    """478x3 landmarks of the largest face mesh in an RGB uint8 image (None: no face)."""
    _check_image(image)
    meshes = _mesh(np.ascontiguousarray(image))
    if not meshes:
        return None
    return max(meshes, key=lambda lm: float(np.ptp(lm[:, 0]) * np.ptp(lm[:, 1])))


def _match_mesh(meshes: list[np.ndarray], box: Box) -> np.ndarray | None:
    """The mesh overlapping ``box`` best (IoU of its landmarks' box >= 0.3), else None."""
    best, best_iou = None, 0.3
    for lm in meshes:
        mb = (*lm[:, :2].min(axis=0), *lm[:, :2].max(axis=0))
        iou = _iou(mb, box)
        if iou >= best_iou:
            best, best_iou = lm, iou
    return best


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError("expected an HxWx3 uint8 RGB image")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape}")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise ValueError(f"image too small: {image.shape[1]}x{image.shape[0]}")


def analyze_face(
    image: np.ndarray, cfg: FaceConfig, resolution: int, source: str = "image"
) -> FaceAnalysis:
    """Find the portrait's face and build the crop, masks and landmarks.

    ``image`` is HxWx3 uint8 RGB (:func:`load_image`); ``source`` names it in messages.

    1. mediapipe FaceDetection (full-range model; the short-range one if that finds
       nothing) gives face boxes.  Several faces: the largest is used, with a warning.
    2. FaceMesh (478 refined landmarks) runs on the whole image; the mesh overlapping the
       chosen box best is taken.  If none matches (e.g. a small face in a large image), it
       runs again on the square crop around the face.
    3. If the detector found a face but the mesh still finds none, the result is
       box-only: ``landmarks``/``crop_landmarks`` are ``None``, the mouth mask is a box of
       typical size at the detector's mouth keypoint, the foreground mask the ellipse in
       the face box.
    4. If the detector finds nothing but the mesh does, the face box is the box of the
       landmarks.  Neither: :class:`NoFaceError` ``"<source>: no face found"``.
    """
    _check_image(image)
    image = np.ascontiguousarray(image)
    detections = _detect(image)
    meshes = _mesh(image)
    num_faces = len(detections) if detections else len(meshes)
    if not detections and not meshes:
        raise NoFaceError(f"{source}: no face found")
    if num_faces > 1:
        warnings.warn(f"{source}: {num_faces} faces found, using the largest", stacklevel=2)

    if detections:
        chosen = detections[0]
        face_box, mouth = chosen.box, chosen.mouth
        landmarks = _match_mesh(meshes, face_box)
        if landmarks is None:
            landmarks = _mesh_in_crop(image, face_box, cfg)
    else:  # mesh only: the largest mesh defines the face box
        h, w = image.shape[:2]

        def extent(lm: np.ndarray) -> float:
            return float(np.prod(lm[:, :2].max(axis=0) - lm[:, :2].min(axis=0)))

        landmarks = max(meshes, key=extent)
        lo = np.floor(landmarks[:, :2].min(axis=0)).astype(int)
        hi = np.ceil(landmarks[:, :2].max(axis=0)).astype(int)
        face_box = (
            max(int(lo[0]), 0),
            max(int(lo[1]), 0),
            min(int(hi[0]), w),
            min(int(hi[1]), h),
        )
        mouth = None
    return build_analysis(
        image,
        face_box,
        cfg,
        resolution,
        landmarks,
        num_faces=num_faces,
        mouth_center=mouth,
    )


def _mesh_in_crop(image: np.ndarray, face_box: Box, cfg: FaceConfig) -> np.ndarray | None:
    """Run the mesh on the square crop around ``face_box`` (at most 512 px), map back."""
    crop_box = square_crop_box(face_box, max(cfg.crop_dilation, 0.25))
    side = crop_box[2] - crop_box[0]
    size = min(side, 512)
    crop = crop_square(image, crop_box, size)
    meshes = _mesh(crop)
    scale = side / size
    mapped = []
    for lm in meshes:
        m = lm * scale
        m[:, 0] += crop_box[0]
        m[:, 1] += crop_box[1]
        mapped.append(m)
    return _match_mesh(mapped, face_box)
