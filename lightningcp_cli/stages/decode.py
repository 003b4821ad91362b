"""Decode stage: latents -> crop frames (one at a time) -> full portrait frames.

Memory stays bounded for long videos: latents are decoded ``batch`` frames at a time and
each frame is pasted back and handed on before the next is decoded.  Paste-back resizes
the generated square crop to the crop box and blends it into the portrait with a mask
that ramps smoothly to 0 at the crop border, so no seam shows; parts of the crop box
outside the portrait (see :mod:`.face`) are dropped.  A crop cut from a levelled
portrait (``FaceAnalysis.level``) is turned back by the same warp that sizes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from ..models.codec import LatentCodec, tensor_to_images
from .face import FaceAnalysis, pixel_affine

if TYPE_CHECKING:
    from ..models.bundle import TalkingHeadModel


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _ramp(n: int, width: float) -> np.ndarray:
    """1-D profile: distance of each pixel centre to the nearer end, ramped over ``width``."""
    c = np.arange(n, dtype=np.float64) + 0.5
    dist = np.minimum(c, n - c)
    if width <= 0:
        return np.ones(n)
    return _smoothstep(dist / width)


def feather_mask(size: int | tuple[int, int], feather_fraction: float) -> np.ndarray:
    """``(h, w)`` float32 blend weights: 1 inside, a smooth (smoothstep) ramp to ~0 over the
    outer ``feather_fraction * min(h, w)`` pixels.  ``0`` gives all ones (hard edge).

    The mask is separable (``row_profile * col_profile``), symmetric and never exactly 0,
    so the outermost pixels still carry a trace of the generated crop.
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"feather mask size must be >= 1, got {h}x{w}")
    if not 0.0 <= feather_fraction < 0.5:
        raise ValueError(f"feather fraction must be in [0, 0.5), not {feather_fraction}")
    width = feather_fraction * min(h, w)
    return np.outer(_ramp(h, width), _ramp(w, width)).astype(np.float32)


@lru_cache(maxsize=8)
def _cached_feather(side: int, feather: float) -> np.ndarray:
    m = feather_mask(side, feather)[:, :, None]
    m.setflags(write=False)
    return m


def paste_back(crop_frame: np.ndarray, analysis: FaceAnalysis, feather: float = 0.08) -> np.ndarray:
    """Blend a generated ``res x res x 3`` uint8 crop into a copy of the full portrait.

    The crop is resized to the crop box (area filter when shrinking, cubic when enlarging)
    and mixed in with :func:`feather_mask`; pixels outside the crop box are the portrait's
    own, exactly.  Returns a new HxWx3 uint8 frame.
    """
    res = analysis.resolution
    if crop_frame.dtype != np.uint8 or crop_frame.shape != (res, res, 3):
        raise ValueError(
            f"expected a {res}x{res}x3 uint8 crop frame, got {crop_frame.dtype} {crop_frame.shape}"
        )
    if analysis.level is not None:
        return _paste_levelled(crop_frame, analysis, feather)
    image = analysis.image
    h, w = image.shape[:2]
    x0, y0, x1, y1 = analysis.crop_box
    side = x1 - x0
    if side == res:
        big = crop_frame
    else:
        interp = cv2.INTER_AREA if side < res else cv2.INTER_CUBIC
        big = cv2.resize(crop_frame, (side, side), interpolation=interp)
    # The part of the crop box inside the image, in image and in crop-box coordinates.
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    out = image.copy()
    if ix0 >= ix1 or iy0 >= iy1:
        return out
    sl_img = (slice(iy0, iy1), slice(ix0, ix1))
    sl_box = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
    m = _cached_feather(side, float(feather))[sl_box]
    src = image[sl_img].astype(np.float32)
    gen = big[sl_box].astype(np.float32)
    blended = src + (gen - src) * m
    out[sl_img] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    return out


@lru_cache(maxsize=2)  # holds the analyses (and their portraits) alive: keep it small
def _levelled_warp(
    analysis: FaceAnalysis, feather: float
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Where a levelled crop lands in the portrait, the same for every frame of a video:
    the covered region (never empty: the crop turns about the face box's centre, which
    lies in the portrait), the crop-to-region warp (OpenCV's pixel convention) and the
    feather mask warped there."""
    res = analysis.resolution
    h, w = analysis.image.shape[:2]
    x0, y0, x1, _ = analysis.crop_box
    s = (x1 - x0) / res
    to_level = np.array([[s, 0.0, x0], [0.0, s, y0], [0.0, 0.0, 1.0]])
    back = np.vstack([cv2.invertAffineTransform(analysis.level), [0.0, 0.0, 1.0]])
    to_portrait = (back @ to_level)[:2]
    corners = np.array([[0, 0, 1], [res, 0, 1], [0, res, 1], [res, res, 1]]) @ to_portrait.T
    bx0, by0 = np.maximum(np.floor(corners.min(0)).astype(int), 0)
    bx1, by1 = np.minimum(np.ceil(corners.max(0)).astype(int), (w, h))
    m = pixel_affine(to_portrait - [[0, 0, bx0], [0, 0, by0]])
    feather_map = np.ascontiguousarray(_cached_feather(res, feather)[..., 0])
    size = (int(bx1 - bx0), int(by1 - by0))
    mask = cv2.warpAffine(feather_map, m, size, flags=cv2.INTER_LINEAR)[..., None]
    mask.setflags(write=False)
    return (slice(by0, by1), slice(bx0, bx1)), m, mask


def _paste_levelled(crop_frame: np.ndarray, analysis: FaceAnalysis, feather: float) -> np.ndarray:
    """:func:`paste_back` for a crop cut levelled: one warp takes the crop through the crop
    box and the inverse of ``analysis.level`` into the portrait, over the pixels it covers."""
    region, m, mask = _levelled_warp(analysis, float(feather))
    out = analysis.image.copy()
    size = (mask.shape[1], mask.shape[0])
    enlarging = analysis.crop_box[2] - analysis.crop_box[0] >= analysis.resolution
    interp = cv2.INTER_CUBIC if enlarging else cv2.INTER_LINEAR
    gen = cv2.warpAffine(crop_frame, m, size, flags=interp, borderMode=cv2.BORDER_REPLICATE)
    src = out[region].astype(np.float32)
    blended = src + (gen.astype(np.float32) - src) * mask
    out[region] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    return out


def _even_size(height: int, width: int, out_height: int | None) -> tuple[int, int]:
    if out_height is None:
        return max(2, height - height % 2), max(2, width - width % 2)
    oh = max(2, int(out_height) - int(out_height) % 2)
    ow = max(2, int(round(width * oh / height / 2.0)) * 2)
    return oh, ow


def resize_output(frame: np.ndarray, height: int | None) -> np.ndarray:
    """Frame with even width and height (H.264 yuv420p needs both).

    ``height`` given: scale to that height (made even, rounded down), width keeping the
    aspect ratio rounded to the nearest even number.  ``None``: keep the size, dropping
    the last row/column when odd (no resampling).
    """
    if frame.ndim != 3:
        raise ValueError(f"expected an HxWxC frame, got shape {frame.shape}")
    if height is not None and height < 2:
        raise ValueError(f"output height must be >= 2, not {height}")
    h, w = frame.shape[:2]
    oh, ow = _even_size(h, w, height)
    if height is None or (oh, ow) == (h, w):
        return np.ascontiguousarray(frame[:oh, :ow])
    interp = cv2.INTER_AREA if oh < h else cv2.INTER_CUBIC
    return cv2.resize(frame, (ow, oh), interpolation=interp)


def decode_frames(
    codec: LatentCodec,
    latents: torch.Tensor,
    batch: int = 1,
    origin: torch.Tensor | None = None,
    change_blur: float = 0.0,
) -> Iterator[np.ndarray]:
    """Yield the decoded crop frames (HxWx3 uint8) of ``latents [1, C, F, h, w]`` in order.

    ``origin`` (``[1, C, h, w]``; :func:`model_frames` passes a model's) is added to every
    frame's latent before decoding.  ``change_blur > 0`` (``ModelSpec.change_blur``, needs
    an origin and a linear codec): each frame is decoded as the origin's image plus its
    own change from it, Gaussian-blurred with this sigma (pixels), so the model's block
    errors are smoothed while the reference keeps its detail.  Lazy: ``batch`` frames
    are decoded per codec call, only when the consumer asks for them, so peak memory is
    one batch of frames whatever the video length.
    """
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise ValueError(f"expected latents [1, C, F, h, w], got {tuple(latents.shape)}")
    if batch < 1:
        raise ValueError(f"decode batch must be >= 1, not {batch}")
    if origin is not None and tuple(origin.shape) != (1, *latents.shape[1:2], *latents.shape[3:]):
        raise ValueError(f"latent origin {tuple(origin.shape)} does not fit {tuple(latents.shape)}")
    if change_blur < 0 or (change_blur > 0 and origin is None):
        raise ValueError(f"change blur needs an origin and sigma >= 0, got {change_blur}")
    return _decode_iter(codec, latents, batch, origin, change_blur)  # checks ran, decode later


def _decode_iter(
    codec: LatentCodec,
    latents: torch.Tensor,
    batch: int,
    origin: torch.Tensor | None,
    change_blur: float,
) -> Iterator[np.ndarray]:
    num_frames = latents.shape[2]
    base = None
    if origin is not None and change_blur > 0:
        with torch.inference_mode():
            base = _to_hwc(codec.decode(origin.to(latents.device, latents.dtype)))[0]
    for start in range(0, num_frames, batch):
        chunk = latents[0, :, start : start + batch].permute(1, 0, 2, 3)
        if origin is not None and base is None:
            chunk = chunk + origin.to(chunk.device, chunk.dtype)
        with torch.inference_mode():
            images = codec.decode(chunk)
        if base is not None:
            frames = [base + cv2.GaussianBlur(c, (0, 0), change_blur) for c in _to_hwc(images)]
            images = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
        yield from tensor_to_images(images)


def _to_hwc(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` -> NxHxWx3 float32 on the CPU, values as they are."""
    return images.detach().float().permute(0, 2, 3, 1).cpu().numpy()


def model_frames(
    model: TalkingHeadModel, latents: torch.Tensor, reference_latents: torch.Tensor
) -> Iterator[np.ndarray]:
    """:func:`decode_frames` as ``model``'s spec asks: relative to the encoded reference
    crop ``[1, C, h, w]`` when ``latent_origin`` is ``reference``, with its ``change_blur``."""
    spec = model.spec
    origin = reference_latents if spec.latent_origin == "reference" else None
    return decode_frames(model.codec, latents, origin=origin, change_blur=spec.change_blur)


def output_frame(
    crop: np.ndarray, analysis: FaceAnalysis, feather: float = 0.08, out_height: int | None = None
) -> np.ndarray:
    """One full-size output frame ready for the video writer: the decoded crop pasted back
    into the portrait (:func:`paste_back`), then sized (:func:`resize_output`: even width
    and height, ``out_height`` when given)."""
    return resize_output(paste_back(crop, analysis, feather), out_height)
