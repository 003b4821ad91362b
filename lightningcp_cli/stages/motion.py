"""Mouth track: where the mouth is and how far it opens in each video frame, from the speech.

EchoMimic's face locator reads a picture per frame: the face box when driven by audio,
drawn pose landmarks in its landmark-driven modes.  lcp-tiny (``ModelSpec.mouth_track``)
gets both kinds: the face box, the mouth box, and the open mouth of each frame drawn
where the data engine's animator opens it (:func:`mouth_gap`, :func:`locator_masks`).
The opening comes from the speech by :func:`mouth_curves`, the rule that also animates
the data engine's training clips, so the model is trained and run on the same kind of
track.  Why: without it the network ignored the audio at zero SNR and the first steps'
noise decided how the mouth moved (README model card, "Where the audio acts").

lcp-tiny's locator also reads the reference crop's pixels (``ModelSpec.locator_reference``):
at zero SNR nothing else tells the denoiser, at the mouth's own position, what the closed
mouth it must open looks like.

The face locator's output per frame is made per frame range on demand
(:class:`LocatorTrack`), so a long video does not hold one feature map per frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "FEATURE_RATE",
    "SAMPLE_RATE",
    "LocatorTrack",
    "MouthTrack",
    "frame_curve",
    "locator_masks",
    "mouth_gap",
    "mouth_geometry",
    "mouth_curves",
    "mouth_opening",
]

SAMPLE_RATE = 16_000
FEATURE_RATE = 50  # curve frames per second (the audio encoders' feature rate)
HOP = SAMPLE_RATE // FEATURE_RATE


def _stft_power(x: np.ndarray, n_fft: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Power spectrum ``[T, n_fft/2+1]`` at the encoder's frames (centred, hop 320,
    ``T = max(1, N // 320)``) and the bin frequencies."""
    x = np.asarray(x, np.float64)
    frames = max(1, len(x) // HOP)
    pad = n_fft // 2
    xp = np.pad(x, (pad, pad + n_fft), mode="constant")
    idx = np.arange(frames)[:, None] * HOP + np.arange(n_fft)[None, :]
    win = np.hanning(n_fft + 1)[:-1]
    spec = np.fft.rfft(xp[idx] * win, axis=1)
    return (spec.real**2 + spec.imag**2), np.fft.rfftfreq(n_fft, 1.0 / SAMPLE_RATE)


def _attack_release(x: np.ndarray, attack: float, release: float) -> np.ndarray:
    """One-pole smoothing with separate rise/fall time constants (seconds) at 50 Hz."""
    dt = 1.0 / FEATURE_RATE
    a_up, a_dn = 1 - np.exp(-dt / attack), 1 - np.exp(-dt / release)
    y = np.zeros_like(x)
    prev = 0.0
    for i, v in enumerate(x):
        prev += (a_up if v > prev else a_dn) * (v - prev)
        y[i] = prev
    return y


def mouth_curves(
    samples: np.ndarray, *, lead: int = 1, gate_db: float = 38.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(opening, width)`` at 50 Hz (``T = max(1, N // 320)``, the encoder's frames) for
    16 kHz mono speech.  numpy only.

    - ``opening`` in [0, 1]: the band-limited (250-4000 Hz) amplitude envelope, referred
      to the loud frames, compressed (``** 0.7``), gated to exactly 0 in silence, smoothed
      with a fast attack (20 ms) and slower release (60 ms), leading the audio by ``lead``
      20 ms frames (the mouth opens a little before the sound);
    - ``width`` in [-1, 1]: lip spread (+) vs rounding (-), from the energy at 1.8-3.5 kHz
      against 250-1000 Hz, standardised over the voiced frames, weighted by the opening.
    """
    x = np.asarray(samples, np.float64).ravel()
    power, freqs = _stft_power(x)
    band = (freqs >= 250) & (freqs <= 4000)
    e = power[:, band].sum(axis=1)
    db = 10 * np.log10(e + 1e-12)
    t = len(db)
    ref = float(np.percentile(db, 95)) if t > 1 else float(db.max())
    floor = float(np.percentile(db, 10)) if t > 10 else ref - 60
    gate = max(ref - gate_db, floor + 6.0)
    amp = 10 ** ((db - ref) / 20)  # amplitude relative to the loud frames
    raw = np.clip(amp, 0, 1.25) ** 0.7
    g0 = (10 ** ((gate - ref) / 20)) ** 0.7
    raw = np.clip((raw - g0) / max(1 - g0, 1e-6), 0, 1.15)
    raw[db < gate] = 0.0
    if ref < -75:  # digital silence
        raw[:] = 0.0
    opening = _attack_release(raw, attack=0.02, release=0.06)
    if lead > 0 and t > lead:
        opening = np.concatenate([opening[lead:], np.repeat(opening[-1:], lead)])
    opening = np.clip(opening, 0, 1)
    opening[opening < 0.05] = 0.0

    hi = power[:, (freqs >= 1800) & (freqs <= 3500)].sum(axis=1)
    lo = power[:, (freqs >= 250) & (freqs <= 1000)].sum(axis=1)
    ratio = 10 * np.log10((hi + 1e-12) / (lo + 1e-12))
    voiced = opening > 0.05
    if voiced.sum() >= 3:
        med = float(np.median(ratio[voiced]))
        sd = float(ratio[voiced].std()) + 1.0
        z = np.tanh(0.8 * (ratio - med) / sd)
    else:
        z = np.zeros(t)
    width = _attack_release(z * np.clip(opening * 2, 0, 1), 0.04, 0.04)
    width = np.clip(width, -1, 1)
    width[opening == 0] = 0.0
    return opening.astype(np.float32), width.astype(np.float32)


def frame_curve(curve: np.ndarray, fps: float, start: int, num_frames: int) -> np.ndarray:
    """A 50 Hz curve at video frames ``start .. start + num_frames - 1`` (frame ``i`` at
    ``i / fps`` seconds; linear interpolation, 0 past the end), float32."""
    pos = (start + np.arange(num_frames)) * (FEATURE_RATE / fps)
    return np.interp(pos, np.arange(len(curve)), curve, right=0.0).astype(np.float32)


def mouth_opening(samples: np.ndarray, sample_rate: int, fps: float, num_frames: int) -> np.ndarray:
    """The mouth opening in [0, 1] of video frames ``0 .. num_frames - 1`` of speech
    ``samples`` (mono, ``SAMPLE_RATE`` Hz), float32 ``[num_frames]``."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"the mouth track needs {SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
    opening, _ = mouth_curves(samples)
    return frame_curve(opening, fps, 0, num_frames)


#: The data engine's mouth: at opening 1 the inner-lip gap is this share of the face
#: height (forehead to chin), the upper lip making ``UPPER_SHARE`` of it
#: (``train.animate.AnimationConfig`` defaults to these).
MAX_OPEN = 0.12
UPPER_SHARE = 0.25
#: mediapipe face-mesh indices of the inner lip corners, the forehead and the chin.
MESH_POINTS = {"corner_left": 78, "corner_right": 308, "forehead": 10, "chin": 152}


def mouth_geometry(landmarks: np.ndarray) -> np.ndarray:
    """``[x, y]`` of both inner lip corners and the face height, ``[5]`` float32, from a
    478-point face mesh in crop pixels."""
    lm = np.asarray(landmarks, np.float64)[:, :2]
    left, right = lm[MESH_POINTS["corner_left"]], lm[MESH_POINTS["corner_right"]]
    height = np.linalg.norm(lm[MESH_POINTS["chin"]] - lm[MESH_POINTS["forehead"]])
    return np.array([*left, *right, height], np.float32)


def mouth_gap(geometry: torch.Tensor, opening: torch.Tensor, resolution: int) -> torch.Tensor:
    """How much of each pixel the open mouth covers, ``[B, F, H, W]`` in [0, 1], drawn as
    the data engine's animator opens it: from the line between the inner lip corners,
    ``UPPER_SHARE`` of the gap up and the rest down, ``MAX_OPEN * face height * opening``
    tall at the centre and closing towards the corners (lens profile).  ``geometry``
    ``[B, 5]`` (:func:`mouth_geometry`), ``opening`` ``[B, F]`` in [0, 1]."""
    g = geometry.to(torch.float32)
    left, right, height = g[:, 0:2], g[:, 2:4], g[:, 4]
    centre = (left + right) / 2
    half = ((right - left).norm(dim=1) / 2).clamp_min(1.5)
    along = (right - left) / (2 * half[:, None])  # unit vector, corner to corner
    down = torch.stack([-along[:, 1], along[:, 0]], 1)
    pix = torch.arange(resolution, dtype=torch.float32, device=g.device) + 0.5
    dx = pix[None, None, :] - centre[:, 0, None, None]  # [B, 1, W]
    dy = pix[None, :, None] - centre[:, 1, None, None]  # [B, H, 1]
    x = dx * along[:, 0, None, None] + dy * along[:, 1, None, None]  # [B, H, W]
    y = dx * down[:, 0, None, None] + dy * down[:, 1, None, None]
    lens = (1 - (x / half[:, None, None]) ** 2).clamp(0, 1) ** 0.6
    gap = (MAX_OPEN * height)[:, None, None, None] * opening.to(g)[:, :, None, None]
    gap = gap * lens[:, None]  # [B, F, H, W]
    top, bottom = -UPPER_SHARE * gap, (1 - UPPER_SHARE) * gap
    y = y[:, None]
    return (torch.minimum(y + 0.5, bottom) - torch.maximum(y - 0.5, top)).clamp(0, 1)


def locator_masks(
    face_mask: torch.Tensor,
    mouth_mask: torch.Tensor,
    gap: torch.Tensor,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """The face locator's input per frame, ``[B, 1|4, F, H, W]``: the face box 1, the mouth
    box 1 more (a closed mouth is still marked), the open mouth (:func:`mouth_gap`) up to
    1 more; then, for a model whose locator reads it (``ModelSpec.locator_reference``), the
    reference crop's RGB in [-1, 1], the same in every frame.  ``face_mask``,
    ``mouth_mask`` ``[B, 1, H, W]`` 0/1, ``gap`` ``[B, F, H, W]``, ``reference``
    ``[B, 3, H, W]``."""
    masks = (face_mask + mouth_mask)[:, :, None] + gap[:, None].to(face_mask.dtype)
    if reference is None:
        return masks
    pixels = reference.to(masks.dtype)[:, :, None].expand(-1, -1, masks.shape[2], -1, -1)
    return torch.cat([masks, pixels], dim=1)


@dataclass(frozen=True, eq=False)
class MouthTrack:
    """What a render draws into the face locator's mask: where the mouth is (``res x res``
    0/1 ``mouth_mask``, ``geometry`` ``[5]``) and how far it opens in each frame
    (``opening`` ``[F]``)."""

    mouth_mask: np.ndarray
    geometry: np.ndarray
    opening: np.ndarray


@dataclass(frozen=True, eq=False)
class LocatorTrack:
    """The face locator's output for each video frame of a mouth track, made on demand:
    ``track[a:b]`` is ``[1, C0, b - a, h, w]``.  Masks ``[1, 1, H, W]`` on the locator's
    device and dtype, ``geometry`` ``[1, 5]`` (:func:`mouth_geometry`), ``opening [F]``,
    ``reference`` the crop ``[1, 3, H, W]`` in [-1, 1] if the locator reads it."""

    face_locator: nn.Module
    face_mask: torch.Tensor
    mouth_mask: torch.Tensor
    geometry: torch.Tensor
    opening: torch.Tensor
    reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.opening.shape[0])

    def __getitem__(self, frames: slice) -> torch.Tensor:
        if not isinstance(frames, slice) or frames.step not in (None, 1):
            raise TypeError("LocatorTrack takes a contiguous frame range, e.g. track[a:b]")
        start, stop, _ = frames.indices(len(self))
        gap = mouth_gap(self.geometry, self.opening[start:stop][None], self.face_mask.shape[-1])
        return self.face_locator(
            locator_masks(self.face_mask, self.mouth_mask, gap, self.reference)
        )
