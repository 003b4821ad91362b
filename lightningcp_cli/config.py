"""Typed configuration: one frozen dataclass per concern, one place for each knob.

CLI flags only override fields of these; the resolved config is saved next to every
output video (``out.mp4.json``).  ``None`` in a field means "the model's default"
(see :mod:`lightningcp_cli.models.registry`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: Progress callback handed down by the CLI: ``(stage, done, total)``.  Stages and the
#: denoising loop call only this, never rich or tqdm.
ProgressFn = Callable[[str, int, int], None]

#: Acceleration methods ``--accel`` accepts ("none" = the model's own pipeline).
ACCEL_METHODS: tuple[str, ...] = ("none",)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class FaceConfig:
    """Face detection, crop and masks (EchoMimic v1 defaults)."""

    crop_dilation: float = 0.5  # crop box = face box grown by this ratio per side, squared
    mask_dilation: float = 0.1  # face-locator mask = face box grown by this ratio per side
    mouth_dilation: float = 0.3  # mouth mask = lip landmarks' box grown by this ratio
    feather: float = 0.08  # paste-back feather width, fraction of the crop side

    def __post_init__(self) -> None:
        _check(0.0 <= self.crop_dilation <= 2.0, "face crop dilation must be in [0, 2]")
        _check(0.0 <= self.mask_dilation <= 1.0, "face mask dilation must be in [0, 1]")
        _check(0.0 <= self.mouth_dilation <= 2.0, "mouth mask dilation must be in [0, 2]")
        _check(0.0 <= self.feather < 0.5, "paste-back feather must be in [0, 0.5)")


@dataclass(frozen=True)
class AudioConfig:
    """Audio front end: 16 kHz mono, features at 50 Hz, a 10-feature window per frame."""

    sample_rate: int = 16_000
    feature_rate: int = 50  # feature frames per second (whisper's 20 ms hop)
    window_before: int = 4  # frame i takes features c-4 .. c+5 with c = int(i * 50 / fps)
    window_after: int = 5

    def __post_init__(self) -> None:
        _check(self.sample_rate > 0 and self.feature_rate > 0, "audio rates must be > 0")
        _check(self.window_before >= 0 and self.window_after >= 0, "audio window must be >= 0")

    @property
    def window(self) -> int:
        return self.window_before + 1 + self.window_after


@dataclass(frozen=True)
class DenoiseConfig:
    """Sampler settings.  ``None`` takes the model's default."""

    steps: int | None = None
    guidance: float | None = None  # classifier-free guidance scale; <= 1 disables CFG
    context_frames: int = 12  # sliding window length (frames)
    context_overlap: int = 3
    seed: int = 420
    noise_clamp: float = 1.5  # initial noise clamped to +-this (EchoMimic)
    bank_dtype: str | None = None  # reference bank storage dtype; None = model dtype

    def __post_init__(self) -> None:
        _check(self.steps is None or 1 <= self.steps <= 1000, "steps must be in [1, 1000]")
        _check(self.guidance is None or self.guidance >= 0, "guidance must be >= 0")
        _check(self.context_frames >= 1, "context frames must be >= 1")
        _check(
            0 <= self.context_overlap < self.context_frames,
            "context overlap must be in [0, context frames)",
        )
        _check(self.noise_clamp > 0, "noise clamp must be > 0")


@dataclass(frozen=True)
class OutputConfig:
    fps: int | None = None  # None: the model's default
    size: int | None = None  # output height in pixels (width keeps the aspect); None: input size
    crf: int = 18
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check(self.fps is None or 1 <= self.fps <= 120, "fps must be in [1, 120]")
        _check(self.size is None or 16 <= self.size <= 4096, "size must be in [16, 4096]")
        _check(0 <= self.crf <= 51, "crf must be in [0, 51]")


@dataclass(frozen=True)
class RenderConfig:
    """Everything one render needs besides the input files."""

    model: str = "lcp-tiny"
    weights: Path | None = None  # folder (or file) of weights; None: bundled / random
    device: str = "cpu"
    dtype: str | None = None  # float32 | float16 | bfloat16; None: fp32 on CPU, fp16 on GPU
    accel: str = "none"
    use_cache: bool = True  # static-feature (reference bank) disk cache
    face: FaceConfig = field(default_factory=FaceConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        _check(
            self.dtype in (None, "float32", "float16", "bfloat16"),
            f"dtype must be float32, float16 or bfloat16, not {self.dtype!r}",
        )
        _check(
            self.accel in ACCEL_METHODS,
            f"unknown acceleration {self.accel!r}; choose one of: {', '.join(ACCEL_METHODS)}",
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"] = str(self.weights) if self.weights else None
        return d
