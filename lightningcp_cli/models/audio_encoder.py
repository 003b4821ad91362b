"""Audio encoders: 16 kHz mono waveform -> features ``[T, L, D]`` at 50 Hz.

EchoMimic uses whisper-tiny's encoder (L = 5 hidden states, D = 384).  ``MelAudioEncoder``
is the weight-free stand-in of the same shape contract (L = 1, D = n_mels), used by the
bundled tiny model and by tests.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..stages.audio import mel_power

__all__ = ["AudioEncoder", "MelAudioEncoder"]


@runtime_checkable
class AudioEncoder(Protocol):
    """What the audio stage needs from an encoder."""

    name: str
    layers: int  # L: hidden states kept per feature frame
    dim: int  # D: width of each
    feature_rate: int  # feature frames per second (50)

    def encode(self, samples_16k: np.ndarray) -> torch.Tensor:
        """``[T, L, D]`` float32 on CPU, ``T ~= duration * feature_rate``."""
        ...


class MelAudioEncoder:
    """Weight-free encoder: log-mel at 50 Hz (hop 320, window 400), loudness-normalised.

    Per utterance, ``log10`` mel power is referred to its loudest bin: that maps to +1 and
    ``RANGE`` decades (80 dB) below it to -1, lower values clamp at -1.  The reference
    never drops below ``FLOOR`` (an absolute level a little under that of full-scale
    speech's peaks), so digital silence encodes as exactly -1 everywhere and faint noise
    stays low instead of being amplified into speech-like values, while any speech
    recording of ordinary level spans the full [-1, 1] whatever its gain.
    """

    RANGE = 8.0  # decades of mel power between +1 and -1
    FLOOR = -1.0  # lowest reference level, log10 of mel power (speech peaks sit near +1.4)

    def __init__(self, n_mels: int = 80, window_position: float = 0.0) -> None:
        if n_mels < 1:
            raise ValueError(f"n_mels must be >= 1, not {n_mels}")
        self.name = f"mel{n_mels}"
        self.n_mels = n_mels
        # amplitude of the offset code the audio stage adds to each window row (log-mel
        # rows carry no time of their own; see stages.audio.window_position_code)
        self.window_position = float(window_position)
        self.layers = 1
        self.dim = n_mels
        self.feature_rate = 50
        self.sample_rate = 16_000

    def __repr__(self) -> str:
        return f"MelAudioEncoder(n_mels={self.n_mels}, window_position={self.window_position})"

    def encode(self, samples_16k: np.ndarray) -> torch.Tensor:
        power = mel_power(
            samples_16k,
            self.sample_rate,
            n_mels=self.n_mels,
            hop=self.sample_rate // self.feature_rate,
            n_fft=400,
        )
        x = torch.clamp(power, min=1e-10).log10()
        ref = max(float(x.max()), self.FLOOR)
        x = torch.clamp(x, min=ref - self.RANGE)
        x = (x - ref) * (2.0 / self.RANGE) + 1.0
        return x.float().unsqueeze(1)  # [T, 1, n_mels]
