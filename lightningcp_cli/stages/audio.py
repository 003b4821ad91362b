"""Audio stage: speech file -> per-video-frame audio tokens.

``load_audio`` decodes any common format to 16 kHz mono float32, an ``AudioEncoder``
turns it into features at 50 Hz (``[T, L, D]``), and ``audio_windows`` gives every video
frame the window of features around it, the way EchoMimic's ``feature2chunks`` does:
frame ``i`` at ``fps`` takes features ``c-4 .. c+5`` with ``c = int(i * 50 / fps)``,
clamped to the ends, flattened as ``row = index_offset * L + layer``.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import AudioConfig
from ..errors import AudioError, ConfigError, InputNotFoundError
from ..media import ffmpeg_exe, last_line, try_probe
from .motion import mouth_opening

if TYPE_CHECKING:
    from ..models.audio_encoder import AudioEncoder

__all__ = [
    "Audio",
    "AudioFeatures",
    "FrameWindows",
    "audio_windows",
    "load_audio",
    "log_mel",
    "mel_power",
    "num_video_frames",
    "prepare_audio",
]


@dataclass(frozen=True, eq=False)
class Audio:
    """Decoded mono audio."""

    samples: np.ndarray  # float32 [N], mono, nominally in [-1, 1]
    sample_rate: int
    path: Path | None = None

    @property
    def duration(self) -> float:
        """Seconds."""
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True, eq=False)
class FrameWindows:
    """The per-video-frame audio windows of :func:`audio_windows`, made on demand.

    Indexing a frame range (``windows[a:b]``) gives exactly ``audio_windows(...)[a:b]``, but
    only the features ``[T, L, D]`` are held: windows repeat every feature ``W * fps / 50``
    times, so materialising them all would cost 1.1 GB for 10 minutes of whisper-tiny
    features at 24 fps, against 0.23 GB for the features themselves.
    """

    features: torch.Tensor  # [T, L, D]
    num_frames: int
    fps: float
    cfg: AudioConfig = field(default_factory=AudioConfig)
    position: float = 0.0  # amplitude of the window-position code (see window_position_code)

    def __post_init__(self) -> None:
        if self.features.ndim != 3 or self.features.shape[0] == 0:
            raise ValueError(f"features must be [T>0, L, D], got {tuple(self.features.shape)}")
        if self.num_frames < 1 or self.fps <= 0:
            raise ValueError(f"need num_frames >= 1 and fps > 0, got {self.num_frames}, {self.fps}")

    @property
    def shape(self) -> tuple[int, int, int]:
        _, layers, dim = self.features.shape
        return (self.num_frames, self.cfg.window * layers, dim)

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, frames: slice) -> torch.Tensor:
        if not isinstance(frames, slice) or frames.step not in (None, 1):
            raise TypeError("FrameWindows takes a contiguous frame range, e.g. windows[a:b]")
        start, stop, _ = frames.indices(self.num_frames)
        # Plain Python float arithmetic on purpose: int(i * 50 / fps) exactly as EchoMimic.
        centers = [int(i * self.cfg.feature_rate / self.fps) for i in range(start, stop)]
        t = self.features.shape[0]
        offsets = torch.arange(-self.cfg.window_before, self.cfg.window_after + 1)
        idx = (torch.tensor(centers, dtype=torch.long)[:, None] + offsets[None, :]).clamp_(0, t - 1)
        rows = self.features[idx.to(self.features.device)]  # [n, W, L, D]
        if self.position:
            code = window_position_code(self.cfg.window, self.features.shape[2], self.position)
            rows = rows + code.to(rows.device, rows.dtype)[None, :, None, :]
        return rows.reshape(len(centers), *self.shape[1:])

    def materialize(self) -> torch.Tensor:
        """All windows at once, ``[F, W * L, D]``."""
        return self[:]


@dataclass(frozen=True, eq=False)
class AudioFeatures:
    """What the denoiser needs from the audio, plus the audio itself (for muxing, metrics)."""

    windows: FrameWindows  # per-video-frame windows, made per frame range on demand
    audio: Audio
    num_frames: int
    fps: float
    encoder: str = field(default="")  # name of the encoder that made the tokens

    def mouth_opening(self) -> np.ndarray:
        """The mouth opening of every video frame, from the speech
        (:func:`~.motion.mouth_opening`), ``[num_frames]``."""
        return mouth_opening(self.audio.samples, self.audio.sample_rate, self.fps, self.num_frames)

    @property
    def tokens(self) -> torch.Tensor:
        """All frames' windows ``[F, W*L, D]`` float32 (for short clips; renders slice
        :attr:`windows` per chunk instead)."""
        return self.windows.materialize()


# ---------------------------------------------------------------------------- loading


def _read_soundfile(path: Path) -> tuple[np.ndarray, int] | None:
    """``[N, C]`` float32 and the rate, or None when libsndfile cannot read the file."""
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, ValueError, TypeError, OSError):  # LibsndfileError is a RuntimeError
        return None
    return data, int(sr)


def _read_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with the ffmpeg binary to float32 PCM on a pipe."""
    info, err = try_probe(path)
    if info is None:
        raise AudioError(f"{path}: cannot decode audio ({last_line(err)})")
    stream = info.audio
    if stream is None:
        raise AudioError(f"{path}: no audio stream")
    # Ask for the stream's own rate and channel count explicitly, so the raw bytes have a
    # known layout; mixing and resampling happen below, the same for every format.
    channels = stream.channels or 1
    rate = stream.sample_rate or 16_000
    cmd = [
        ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        "-v",
        "error",
        "-i",
        str(path),
        "-map",
        f"0:{stream.index}",
        "-vn",
        "-f",
        "f32le",
        "-acodec",
        "pcm_f32le",
        "-ac",
        str(channels),
        "-ar",
        str(rate),
        "pipe:1",
    ]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if proc.returncode != 0:
        raise AudioError(f"{path}: cannot decode audio ({last_line(proc.stderr)})")
    raw = np.frombuffer(proc.stdout, dtype="<f4")
    usable = len(raw) - len(raw) % channels
    return raw[:usable].reshape(-1, channels).astype(np.float32), rate


def load_audio(path: str | os.PathLike, sample_rate: int = 16_000) -> Audio:
    """Decode an audio file (wav, flac, ogg, mp3, m4a, ... or a video's audio) to mono.

    libsndfile reads what it can; everything else goes through the bundled ffmpeg.
    Channels are averaged; the rate is converted with ``librosa.resample`` when it differs.
    Silent audio is valid; a file with no samples is not.

    Raises InputNotFoundError (missing file) or AudioError (unreadable, undecodable, empty).
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: file not found")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, not {sample_rate}")

    read = _read_soundfile(path)
    data, sr = read if read is not None else _read_ffmpeg(path)
    if data.size == 0:
        raise AudioError(f"{path}: no audio samples (zero length)")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")

    samples = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if sr != sample_rate:
        import librosa

        samples = librosa.resample(samples, orig_sr=sr, target_sr=sample_rate)
        if samples.size == 0:
            raise AudioError(f"{path}: no audio samples (too short to resample)")
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    return Audio(samples=samples, sample_rate=sample_rate, path=path)


def num_video_frames(duration: float, fps: float) -> int:
    """Frames needed so the video covers the whole audio (at least one)."""
    return max(1, math.ceil(duration * fps - 1e-6))


# --------------------------------------------------------------------------- features


@functools.lru_cache(maxsize=8)
def _mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    import librosa

    # librosa's defaults (Slaney scale and area normalisation) are the filters whisper uses.
    fb = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)
    return torch.from_numpy(fb).float()


def mel_power(
    samples: np.ndarray,
    sample_rate: int,
    n_mels: int = 80,
    hop: int | None = None,
    n_fft: int = 400,
) -> torch.Tensor:
    """Mel power spectrogram ``[T, n_mels]`` with ``T = max(1, N // hop)``.

    Hann window, centred frames with reflect padding (like whisper's ``torch.stft``); the
    frame that starts past the end is dropped, so ``hop = sample_rate // 50`` gives exactly
    50 frames per second.
    """
    hop = hop or sample_rate // 50
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32)).flatten()
    if x.numel() == 0:
        raise ValueError("mel_power: no samples")
    pad_mode = "reflect" if x.numel() > n_fft // 2 else "constant"
    spec = torch.stft(
        x,
        n_fft,
        hop,
        window=torch.hann_window(n_fft),
        center=True,
        pad_mode=pad_mode,
        return_complex=True,
    )
    power = spec.abs() ** 2  # [n_fft // 2 + 1, frames]
    frames = max(1, x.numel() // hop)
    mel = _mel_filters(sample_rate, n_fft, n_mels) @ power[:, :frames]
    return mel.T.contiguous()


def log_mel(
    samples: np.ndarray,
    sample_rate: int,
    n_mels: int = 80,
    hop: int | None = None,
    n_fft: int = 400,
) -> torch.Tensor:
    """Whisper-style log-mel ``[T, n_mels]`` at ``sample_rate / hop`` (50 Hz by default).

    ``log10`` of the mel power floored at 1e-10, then at 8 decades below the utterance's
    maximum, then ``(x + 4) / 4``.
    """
    x = torch.clamp(mel_power(samples, sample_rate, n_mels, hop, n_fft), min=1e-10).log10()
    x = torch.maximum(x, x.max() - 8.0)
    return (x + 4.0) / 4.0


def window_position_code(window: int, dim: int, amplitude: float) -> torch.Tensor:
    """``[window, dim]``: ``amplitude`` times whisper's sinusoids of the offsets 0..window-1.

    Cross-attention treats a frame's audio window as an unordered set of rows, so rows
    that carry no time of their own (log-mel frames, unlike whisper's contextual states)
    cannot tell the frame's own instant from its neighbours 100 ms away.  Adding a code
    of the row's offset to each row tells them apart; a model trained with it (lcp-tiny:
    ``ModelSpec.audio_window_position``) gets it at inference too.  All-zero windows (the
    unconditional half of CFG) stay all zero: the code goes onto real audio rows only.
    """
    from ..models.whisper import sinusoids

    return amplitude * sinusoids(window, dim, max_timescale=window * 10.0)


def audio_windows(
    features: torch.Tensor,
    num_frames: int,
    fps: float,
    cfg: AudioConfig | None = None,
    position: float = 0.0,
) -> torch.Tensor:
    """Per-video-frame windows of audio features.

    ``features`` is ``[T, L, D]`` at ``cfg.feature_rate``.  Frame ``i`` takes feature
    indices ``c - window_before .. c + window_after`` (``c = int(i * feature_rate / fps)``),
    each clamped to ``[0, T - 1]``.  Returns ``[num_frames, W * L, D]`` with row
    ``index_offset * L + layer``.  :class:`FrameWindows` makes them per frame range.
    """
    return FrameWindows(features, num_frames, fps, cfg or AudioConfig(), position).materialize()


def prepare_audio(
    path: str | os.PathLike,
    encoder: AudioEncoder,
    fps: float,
    cfg: AudioConfig | None = None,
) -> AudioFeatures:
    """Load, encode and window the speech of one render.

    The number of frames is ``num_video_frames(duration, fps)``, so the video covers the
    whole audio.
    """
    cfg = cfg or AudioConfig()
    if encoder.feature_rate != cfg.feature_rate:
        raise ConfigError(
            f"audio encoder {encoder.name} makes {encoder.feature_rate} features/s, "
            f"config expects {cfg.feature_rate}"
        )
    enc_rate = getattr(encoder, "sample_rate", 16_000)
    if enc_rate != cfg.sample_rate:
        raise ConfigError(
            f"audio encoder {encoder.name} needs {enc_rate} Hz audio, config says "
            f"{cfg.sample_rate} Hz"
        )
    audio = load_audio(path, cfg.sample_rate)
    features = encoder.encode(audio.samples)
    num_frames = num_video_frames(audio.duration, fps)
    position = float(getattr(encoder, "window_position", 0.0))
    windows = FrameWindows(features, num_frames, fps, cfg, position)
    return AudioFeatures(
        windows=windows, audio=audio, num_frames=num_frames, fps=fps, encoder=encoder.name
    )
