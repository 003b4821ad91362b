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

from .accel import ACCEL_METHODS  # the registry's names; accel/__init__ imports nothing heavy
from .errors import ConfigError

#: Progress callback handed down by the CLI: ``(stage, done, total)``.  Stages and the
#: denoising loop call only this, never rich or tqdm.
ProgressFn = Callable[[str, int, int], None]

__all__ = [
    "ACCEL_METHODS",  # acceleration methods --accel accepts ("none" = the model's own pipeline)
    "AccelConfig",
    "AudioConfig",
    "DFAConfig",
    "DenoiseConfig",
    "FaceConfig",
    "LightningCPConfig",
    "OutputConfig",
    "ProgressFn",
    "RenderConfig",
]


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
    # A face rolled by more than this many degrees (the line through the outer eye
    # corners) is cropped levelled and turned back when pasted: models are trained on
    # upright faces (lcp-tiny's lip sync on a portrait rolled 8 degrees: 0.44 -> 0.62
    # levelled).  180 never levels.
    level_roll: float = 3.0

    def __post_init__(self) -> None:
        _check(0.0 <= self.level_roll <= 180.0, "face levelling threshold must be in [0, 180]")
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
    # The same for the latent's colour channels (YCbCr DCT codec only); None = the model's
    # (lcp-tiny 3.0; models without one use ``guidance`` for every channel).
    chroma_guidance: float | None = None
    # First latent channel that carries colour, resolved from the model's codec
    # (``api.resolve_denoise``); channels from it on take ``chroma_guidance``.
    chroma_channel: int | None = None
    context_frames: int = 12  # sliding window length (frames)
    context_overlap: int = 3
    seed: int = 420
    noise_clamp: float = 1.5  # initial noise clamped to +-this (EchoMimic)
    bank_dtype: str | None = None  # reference bank storage dtype; None = model dtype
    prediction_type: str | None = None  # what the denoiser outputs; None = the model's
    # DDIM noise direction divided by 1 + k * t / 1000 against exposure bias (None = the
    # model's; 0 = plain DDIM; stages.denoise.EpsilonScaledDDIMScheduler)
    epsilon_scaling: float | None = None
    # Long audio: videos over chunk_frames are denoised chunk by chunk (overlapping by
    # chunk_overlap frames, cross-faded), so memory does not grow with the length.
    chunk_frames: int = 240
    chunk_overlap: int = 24

    def __post_init__(self) -> None:
        _check(self.steps is None or 1 <= self.steps <= 1000, "steps must be in [1, 1000]")
        _check(
            1 <= self.chunk_overlap < self.chunk_frames,
            "chunk overlap must be in [1, chunk frames)",
        )
        _check(self.guidance is None or self.guidance >= 0, "guidance must be >= 0")
        _check(
            self.chroma_guidance is None or self.chroma_guidance >= 0,
            "chroma guidance must be >= 0",
        )
        _check(self.context_frames >= 1, "context frames must be >= 1")
        _check(
            0 <= self.context_overlap < self.context_frames,
            "context overlap must be in [0, context frames)",
        )
        _check(self.noise_clamp > 0, "noise clamp must be > 0")
        _check(
            self.epsilon_scaling is None or 0 <= self.epsilon_scaling <= 1,
            "epsilon scaling must be in [0, 1]",
        )


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


KEY_SCHEDULES = ("uniform", "list", "adaptive")


def parse_key_steps(text: str, name: str = "key steps") -> tuple[int, ...]:
    """``"0,2,5"`` (``--key-steps``, a job file's ``key_steps``) -> ``(0, 2, 5)``; errors
    name the setting as ``name``."""
    try:
        steps = tuple(int(s) for s in str(text).split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"{name} {text!r}: expected integers like 0,2,5") from None
    if not steps:
        raise ConfigError(f"{name} {text!r}: expected at least one step, like 0,2,5")
    return steps


@dataclass(frozen=True)
class LightningCPConfig:
    """LightningCP: which steps are key steps and how the others are predicted.

    ``schedule``: ``uniform`` (a key step every ``interval`` steps from step 0), ``list``
    (exactly ``key_steps``; step 0 is always added) or ``adaptive`` (after each key step
    the next interval is ``threshold / feature change``, clamped to ``[1,
    max_interval]``; the change is the relative L2 distance between the cached features
    of the last two key steps).  ``warmup`` leading steps are always key steps.
    ``parallel``: the non-key steps of a group run as one batched call (else one by one,
    each on its real latents); ``estimate``: their input latents are estimated by
    stepping the scheduler with the key step's guided prediction (else all of them take
    the latents right after the key step).  ``static_cache``: reference and audio
    keys/values computed once per video.  ``batch_limit``: at most this many non-key
    steps per batched call (0: all of a group); the result is the same, the memory is
    not (at 512 px, 7 batched steps of a 12-frame window with CFG are 168 images
    through the last decoder layer).  ``interval=1`` gives the uncached output.
    """

    schedule: str = "uniform"
    interval: int = 8  # measured: 4.3x at 47 dB, 2.6 dB above plain steps at equal time
    key_steps: tuple[int, ...] = ()
    warmup: int = 0
    threshold: float = 0.3
    max_interval: int = 5
    parallel: bool = True
    estimate: bool = True
    batch_limit: int = 0
    static_cache: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_steps", tuple(int(k) for k in self.key_steps))
        _check(self.schedule in KEY_SCHEDULES, f"key schedule must be one of {KEY_SCHEDULES}")
        _check(1 <= self.interval <= 100, "key interval must be in [1, 100]")
        _check(all(k >= 0 for k in self.key_steps), "key steps must be >= 0")
        _check(
            self.schedule != "list" or len(self.key_steps) > 0,
            "the 'list' key schedule needs key_steps",
        )
        _check(self.warmup >= 0, "warmup must be >= 0")
        _check(self.threshold > 0, "adaptive threshold must be > 0")
        _check(1 <= self.max_interval <= 100, "max interval must be in [1, 100]")
        _check(self.batch_limit >= 0, "batch limit must be >= 0 (0: no limit)")


@dataclass(frozen=True)
class DFAConfig:
    """Decoupled foreground attention at non-key steps.

    The foreground is the face stage's ``foreground_mask`` on each layer's token grid:
    cells covered at least ``threshold`` (0: any overlap), grown by ``dilate`` x the grid
    side (rounded up to whole cells).  A mask covering less than ``min_fraction`` or more
    than ``max_fraction`` of the grid means full attention in that layer.  Switches:
    ``spatial`` self-attention (queries and keys: foreground tokens only), ``reference``
    (the reference bank's tokens cut to the foreground too; else all of them),
    ``audio`` cross-attention and ``temporal`` attention (foreground queries only).
    ``whole_blocks``: in the last layer (the one non-key steps run), the whole spatial and
    temporal transformers (projections and feed-forwards too, everything after the
    GroupNorm) run on the foreground tokens; the per-attention switches then apply only
    where it does not (:mod:`lightningcp_cli.accel.dfa_blocks`).
    """

    threshold: float = 0.0
    dilate: float = 0.0  # cells touching the mask already pad it by < 1 cell (measured)
    min_fraction: float = 0.0
    max_fraction: float = 0.9
    spatial: bool = True
    reference: bool = True
    audio: bool = False
    temporal: bool = False
    whole_blocks: bool = True

    def __post_init__(self) -> None:
        _check(0.0 <= self.threshold <= 1.0, "DFA threshold must be in [0, 1]")
        _check(0.0 <= self.dilate <= 1.0, "DFA dilation must be in [0, 1]")
        _check(
            0.0 <= self.min_fraction <= self.max_fraction <= 1.0,
            "DFA fractions must satisfy 0 <= min_fraction <= max_fraction <= 1",
        )


@dataclass(frozen=True)
class AccelConfig:
    """Settings of the acceleration methods; ``RenderConfig.accel`` picks the method.

    ``drop_reference``: denoiser blocks (bank keys, e.g. ``up_blocks.3.attentions.2.
    transformer_blocks.0``) that run without the reference bank under ``full``.  Empty
    until the ablation on a trained model picks layers (``benchmarks/ablate_reference.py``).
    """

    lightningcp: LightningCPConfig = field(default_factory=LightningCPConfig)
    dfa: DFAConfig = field(default_factory=DFAConfig)
    drop_reference: tuple[str, ...] = ()
    deepcache_interval: int = 3  # the DeepCache peer: a full step every N (its SD default)

    def __post_init__(self) -> None:
        object.__setattr__(self, "drop_reference", tuple(self.drop_reference))
        _check(
            all(isinstance(k, str) and k for k in self.drop_reference),
            "drop_reference must list block paths",
        )
        _check(self.deepcache_interval >= 1, "DeepCache interval must be >= 1")


@dataclass(frozen=True)
class RenderConfig:
    """Everything one render needs besides the input files."""

    model: str = "lcp-tiny"
    weights: Path | None = None  # folder (or file) of weights; None: bundled / random
    device: str = "cpu"
    dtype: str | None = None  # float32 | float16 | bfloat16; None: fp32 on CPU, fp16 on GPU
    offload: bool = False  # networks wait in CPU memory, one on the GPU at a time
    accel: str = "none"  # one of ACCEL_METHODS
    accel_config: AccelConfig = field(default_factory=AccelConfig)
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
