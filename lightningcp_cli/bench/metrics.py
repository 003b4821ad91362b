"""Fidelity metrics between two renders of the same inputs (uint8 RGB frames)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

# PSNR of identical frames is infinite; report this instead so JSON stays valid.
PSNR_IDENTICAL = 100.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    if np.array_equal(a, b):
        return PSNR_IDENTICAL
    return float(min(PSNR_IDENTICAL, peak_signal_noise_ratio(a, b, data_range=255)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(a, b, channel_axis=-1, data_range=255))


def video_fidelity(ref: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM over frames; the videos must have the same frame count."""
    if len(ref) != len(test):
        raise ValueError(f"frame counts differ: {len(ref)} vs {len(test)}")
    if not ref:
        raise ValueError("no frames to compare")
    return {
        "psnr": float(np.mean([psnr(a, b) for a, b in zip(ref, test, strict=True)])),
        "ssim": float(np.mean([ssim(a, b) for a, b in zip(ref, test, strict=True)])),
    }
