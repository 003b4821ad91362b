"""Quality of a generated talking head without a ground-truth video.

- **lip sync**: mediapipe's inner-lip gap (face-mesh points 13 and 14) over the face
  height (points 10 and 152), per frame, correlated (Pearson) with the speech envelope of
  the same frames (:func:`~lightningcp_cli.train.speech.frame_envelope`);
- **identity drift**: PSNR of the frames against the reference, outside the mouth box;
- **flicker**: mean absolute change between consecutive frames outside the mouth box
  (0-255 units; a still image is 0);
- **mouth motion sync**: correlation of the mouth box's mean absolute difference from
  the reference with the speech envelope.  It needs no landmarks, so it still sees a
  mouth that moves with the speech when face mesh cannot place blurry lips.

Frames are uint8 ``[H, W, 3]``.  Small face crops are upscaled before face-mesh runs:
mediapipe misses lips on faces under ~150 px.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from .metrics import psnr

#: Face-mesh points: inner upper / lower lip, forehead top, chin bottom.
LIP_UPPER, LIP_LOWER, FOREHEAD, CHIN = 13, 14, 10, 152

#: Faces are measured at least this large (pixels, the longer side).
MESH_MIN_SIDE = 512


def face_meshes(frames: Sequence[np.ndarray]) -> list[np.ndarray | None]:
    """The face mesh (478x3, the frame's pixel coordinates) of each frame, None where
    mediapipe finds no face."""
    from ..stages.face import mesh_landmarks

    meshes: list[np.ndarray | None] = []
    for frame in frames:
        scale = max(1.0, MESH_MIN_SIDE / max(frame.shape[:2]))
        if scale > 1:
            frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        lm = mesh_landmarks(frame)
        meshes.append(None if lm is None else lm / scale)
    return meshes


def _face_height(lm: np.ndarray) -> float:
    return float(np.linalg.norm(lm[CHIN, :2] - lm[FOREHEAD, :2]))


def mouth_openings(frames: Sequence[np.ndarray]) -> np.ndarray:
    """Inner-lip gap over face height for each frame; NaN where no face mesh is found."""
    return openings_of(face_meshes(frames))


def openings_of(meshes: Sequence[np.ndarray | None]) -> np.ndarray:
    out = np.full(len(meshes), np.nan)
    for i, lm in enumerate(meshes):
        if lm is not None and _face_height(lm) > 0:
            out[i] = np.linalg.norm(lm[LIP_LOWER, :2] - lm[LIP_UPPER, :2]) / _face_height(lm)
    return out


def mouth_landmark_distance(
    meshes: Sequence[np.ndarray | None], reference: Sequence[np.ndarray | None]
) -> float:
    """Mean distance of the lip landmarks (mediapipe's 40 lip points) between two renders
    of the same frames, in % of the face height; NaN when no frame has a face in both."""
    from ..stages.face import lip_indices

    lips = lip_indices()
    values = [
        np.linalg.norm(a[lips, :2] - b[lips, :2], axis=1).mean() / _face_height(b) * 100
        for a, b in zip(meshes, reference, strict=True)
        if a is not None and b is not None and _face_height(b) > 0
    ]
    return float(np.mean(values)) if values else float("nan")


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over the entries finite in both; NaN when fewer than 3 remain
    or either side is constant there (no signal to correlate)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"lengths differ: {a.shape} vs {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def speech_envelope(audio: str | Path, fps: float) -> np.ndarray:
    """The speech envelope of an audio file, one value per video frame."""
    from ..stages.audio import load_audio
    from ..train.speech import SAMPLE_RATE, frame_envelope

    sound = load_audio(audio, SAMPLE_RATE)
    return frame_envelope(sound.samples, fps, SAMPLE_RATE)


def lip_sync_score(frames: Sequence[np.ndarray], envelope: np.ndarray) -> float:
    """Correlation of the measured mouth opening with the speech envelope, frame by frame."""
    if len(frames) != len(envelope):
        raise ValueError(f"{len(frames)} frames but an envelope of {len(envelope)}")
    return correlation(mouth_openings(frames), envelope)


def mouth_motion(
    frames: Sequence[np.ndarray], reference: np.ndarray, mouth_mask: np.ndarray
) -> np.ndarray:
    """Per frame: mean absolute difference (0-255) from ``reference`` inside the mouth mask."""
    inside = ~_outside(mouth_mask, reference.shape)
    ref = reference[inside].astype(np.float64)
    return np.array([np.abs(f[inside].astype(np.float64) - ref).mean() for f in frames])


def _outside(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean ``[H, W]``: True where the mask is 0 (outside the mouth); all True for None."""
    if mask is None:
        return np.ones(shape[:2], bool)
    m = np.asarray(mask)
    if m.shape[:2] != shape[:2]:
        raise ValueError(f"mask {m.shape[:2]} does not match the frames {shape[:2]}")
    return m.reshape(shape[:2]) < 0.5


def identity_drift(
    frames: Sequence[np.ndarray], reference: np.ndarray, mouth_mask: np.ndarray | None = None
) -> float:
    """PSNR (dB) of the frames against ``reference`` outside the mouth mask, from the
    squared error averaged over all frames (one bad frame is not hidden by still ones)."""
    if not len(frames):
        raise ValueError("no frames")
    keep = _outside(mouth_mask, reference.shape)
    outside = np.stack([f[keep] for f in frames])
    return psnr(np.broadcast_to(reference[keep], outside.shape), outside)


def flicker(frames: Sequence[np.ndarray], mouth_mask: np.ndarray | None = None) -> float:
    """Mean absolute change (0-255) between consecutive frames outside the mouth mask."""
    if len(frames) < 2:
        return 0.0
    keep = _outside(mouth_mask, frames[0].shape)
    diffs = [
        np.mean(np.abs(b[keep].astype(np.int16) - a[keep].astype(np.int16)))
        for a, b in zip(frames[:-1], frames[1:], strict=True)
    ]
    return float(np.mean(diffs))
