"""The library entry point: what the CLI, batch jobs and tests call.

``render(RenderRequest(face, audio, output, RenderConfig(...)))`` runs the stages in
order (face -> audio -> reference -> denoise -> decode -> mux) and returns a
:class:`RenderResult` with per-stage timings.  Progress goes to an optional plain
``on_progress(stage, done, total)`` callback; nothing here prints.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .accel import build_sampler
from .bench.memory import PeakMemory
from .cache import FeatureCache
from .config import DenoiseConfig, ProgressFn, RenderConfig
from .errors import ConfigError, InputNotFoundError, OutputError
from .models.bundle import TalkingHeadModel, load_model
from .models.codec import image_to_tensor
from .models.registry import MODELS, ModelSpec, get_model_spec
from .stages.audio import AudioFeatures, load_audio, num_video_frames, prepare_audio
from .stages.decode import model_frames, output_frame
from .stages.denoise import denoise_stream
from .stages.face import FaceAnalysis, analyze_face, load_image
from .stages.motion import LocatorTrack, MouthTrack
from .stages.mux import VideoWriter, check_output_path
from .stages.reference import compute_reference

__all__ = [
    "RenderRequest",
    "RenderResult",
    "render",
    "load_model",
    "info",
    "FeatureCache",
]

STAGES = ("load", "face", "audio", "reference", "denoise", "decode", "mux")


@dataclass(frozen=True)
class RenderRequest:
    face: Path
    audio: Path
    output: Path
    config: RenderConfig = field(default_factory=RenderConfig)


@dataclass
class RenderResult:
    output: Path
    config_path: Path
    num_frames: int
    fps: int
    duration_s: float
    stage_seconds: dict[str, float]
    total_seconds: float
    peak_memory_mb: float
    reference_cache_hit: bool
    random_weights: bool
    frames: list[np.ndarray] | None = None  # only with keep_frames=True (bench)
    crop_frames: list[np.ndarray] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("frames")
        d.pop("crop_frames")
        d["output"] = str(self.output)
        d["config_path"] = str(self.config_path)
        return d


class StageTimer:
    """Wall time per stage; synchronises the GPU so asynchronous kernels are counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    def timed(self, stage: str, items: Iterator[Any]) -> Iterator[Any]:
        """Time only the producing side of an iterator (e.g. decode, while mux consumes)."""
        it = iter(items)
        while True:
            with self(stage):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item


def resolve_denoise(cfg: RenderConfig, spec: ModelSpec) -> DenoiseConfig:
    """The sampler settings with the model's defaults filled in."""
    d = cfg.denoise
    chroma = d.chroma_guidance if d.chroma_guidance is not None else spec.chroma_guidance
    if chroma is not None and spec.chroma_channel is None:
        raise ConfigError(
            f"chroma guidance needs a model with YCbCr latents (lcp-tiny); {spec.name} "
            f"uses the {spec.codec} codec"
        )
    return replace(
        d,
        steps=d.steps if d.steps is not None else spec.steps,
        guidance=d.guidance if d.guidance is not None else spec.guidance,
        chroma_guidance=chroma,
        chroma_channel=spec.chroma_channel if chroma is not None else None,
        bank_dtype=d.bank_dtype if d.bank_dtype is not None else spec.bank_dtype,
        prediction_type=d.prediction_type or spec.prediction_type,
        epsilon_scaling=(
            d.epsilon_scaling if d.epsilon_scaling is not None else spec.epsilon_scaling
        ),
    )


def require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise InputNotFoundError(f"{path}: {what} file does not exist")
    if not path.is_file():
        raise InputNotFoundError(f"{path}: {what} is not a file")


def face_feature(
    model: TalkingHeadModel,
    face_mask: np.ndarray,
    track: MouthTrack | None = None,
    crop: np.ndarray | None = None,
) -> torch.Tensor | LocatorTrack:
    """The face locator's output for a ``res x res`` 0/1 face mask: ``[1, C0, 1, h, w]``,
    or for a model with a mouth track (``ModelSpec.mouth_track``) a :class:`LocatorTrack`
    of the frames of ``track``, reading the face crop (``res x res x 3`` uint8) too when
    the model's locator does (``ModelSpec.locator_reference``)."""

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(values, np.float32)).to(model.device, model.dtype)

    spec = model.spec
    if not spec.mouth_track:
        return model.face_locator(tensor(face_mask)[None, None, None])
    if track is None:
        raise ValueError(f"{spec.name} needs the mouth track of the speech")
    if spec.locator_reference and crop is None:
        raise ValueError(f"{spec.name}: its face locator reads the face crop")
    reference = image_to_tensor(crop, model.device, model.dtype) if spec.locator_reference else None
    return LocatorTrack(
        model.face_locator,
        tensor(face_mask)[None, None],
        tensor(track.mouth_mask)[None, None],
        tensor(track.geometry)[None],
        tensor(track.opening),
        reference,
    )


def mouth_track(face: FaceAnalysis, audio: AudioFeatures) -> MouthTrack:
    """The mouth track of a render: the portrait's mouth, opened as the speech says."""
    return MouthTrack(face.mouth_mask, face.mouth_geometry(), audio.mouth_opening())


@torch.inference_mode()
def render(
    request: RenderRequest,
    *,
    model: TalkingHeadModel | None = None,
    on_progress: ProgressFn | None = None,
    cache: FeatureCache | None = None,
    keep_frames: bool = False,
) -> RenderResult:
    """Render one talking-head video.  ``model`` may be preloaded (batch jobs)."""
    cfg = request.config
    progress = on_progress or (lambda stage, done, total: None)
    face_path, audio_path, out = Path(request.face), Path(request.audio), Path(request.output)
    check_output_path(out, cfg.output.overwrite)
    require_file(face_path, "face image")
    require_file(audio_path, "audio")
    spec = model.spec if model is not None else get_model_spec(cfg.model)
    sampler_cfg = resolve_denoise(cfg, spec)  # before any work: a bad option fails fast
    fps = cfg.output.fps or spec.fps
    out_height = cfg.output.size

    t_start = time.perf_counter()
    device = model.device if model is not None else torch.device(cfg.device)
    timer = StageTimer(device)
    with PeakMemory(device) as mem:
        with timer("face"):
            progress("face", 0, 1)
            face = analyze_face(
                load_image(face_path), cfg.face, spec.resolution, source=str(face_path)
            )
            progress("face", 1, 1)
        with timer("audio"):
            load_audio(audio_path, cfg.audio.sample_rate)  # fail fast, before the model loads
        if model is None:
            with timer("load"):
                model = load_model(spec, cfg.weights, cfg.device, cfg.dtype, offload=cfg.offload)
        with timer("audio"):
            progress("audio", 0, 1)
            audio = prepare_audio(audio_path, model.audio_encoder, fps, cfg.audio)
            progress("audio", 1, 1)
        with timer("reference"):
            progress("reference", 0, 1)
            if cache is None and cfg.use_cache:
                cache = FeatureCache()
            ref = compute_reference(model, face, cache if cfg.use_cache else None)
            track = mouth_track(face, audio) if spec.mouth_track else None
            locator_feature = face_feature(model, face.face_mask, track, face.crop)
            progress("reference", 1, 1)
        # Long audio streams: each chunk of latents is decoded and piped to ffmpeg before
        # the next is denoised, so memory does not grow with the video's length.
        n = audio.num_frames
        frames: list[np.ndarray] | None = [] if keep_frames else None
        crops: list[np.ndarray] | None = [] if keep_frames else None
        with (
            build_sampler(cfg.accel, model, face, cfg.accel_config) as sampler,
            ExitStack() as stack,
        ):
            chunks = denoise_stream(
                model.denoiser,
                audio.windows,  # windows made per chunk: memory does not grow with length
                locator_feature,
                ref.bank,
                sampler_cfg,
                latent_shape=tuple(ref.latents.shape[1:]),
                on_progress=progress,
                dtype=model.dtype,
                device=model.device,
                sampler=sampler,
            )
            writer: VideoWriter | None = None
            done = 0
            while True:
                with timer("denoise"):
                    latents = next(chunks, None)
                if latents is None:
                    break
                crops_iter = model_frames(model, latents, ref.latents)
                for crop in timer.timed("decode", crops_iter):
                    with timer("decode"):
                        frame = output_frame(crop, face, cfg.face.feather, out_height)
                    with timer("mux"):
                        if writer is None:  # the frame size is known once the first frame is
                            writer = stack.enter_context(
                                VideoWriter(
                                    out,
                                    fps=fps,
                                    width=frame.shape[1],
                                    height=frame.shape[0],
                                    audio_path=audio_path,
                                    crf=cfg.output.crf,
                                    overwrite=cfg.output.overwrite,
                                )
                            )
                        writer.write(frame)
                    if frames is not None and crops is not None:
                        frames.append(frame)
                        crops.append(crop)
                    done += 1
                    progress("decode", done, n)
            with timer("mux"):
                stack.close()  # finishes the video: ffmpeg flush + atomic rename

    config_path = out.with_name(out.name + ".json")
    _write_json_atomic(
        config_path,
        {
            "lcp_version": __version__,
            "face": str(face_path),
            "audio": str(audio_path),
            "model": spec.name,
            "random_weights": model.random_weights,
            "fps": fps,
            "num_frames": n,
            "face_roll": {"degrees": round(face.roll, 2), "levelled": face.level is not None},
            "config": cfg.to_dict(),
            "sampler": asdict(sampler_cfg),  # the config's sampler, model defaults filled in
        },
    )
    return RenderResult(
        output=out,
        config_path=config_path,
        num_frames=n,
        fps=fps,
        duration_s=audio.audio.duration,
        stage_seconds=timer.seconds,
        total_seconds=time.perf_counter() - t_start,
        peak_memory_mb=mem.peak_mb,
        reference_cache_hit=ref.cache_hit,
        random_weights=model.random_weights,
        frames=frames,
        crop_frames=crops,
    )


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + rename: never a half-written file."""
    path = Path(path)
    check_output_path(path, overwrite=True)
    tmp = path.with_name(f".{path.name}.lcp-tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, read-only file system: a clean error
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def output_or_temp(path: Path | None, suffix: str = ".mp4") -> Iterator[Path]:
    """``path`` itself, or a temporary file removed afterwards (profile without -o)."""
    if path is not None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="lcp-") as tmp:
        yield Path(tmp) / f"out{suffix}"


def example_inputs() -> tuple[Path, Path]:
    """The bundled example portrait and speech clip (used by ``lcp bench``)."""
    assets = Path(__file__).resolve().parent / "assets"
    return assets / "face.png", assets / "speech.wav"


def expected_frames(duration_s: float, fps: int) -> int:
    return num_video_frames(duration_s, fps)


def info() -> dict[str, Any]:
    """Versions, devices, models and cache: what ``lcp info`` shows."""
    import diffusers
    import mediapipe

    from .models.bundle import bundled_weights_dir

    cache = FeatureCache()
    entries = cache.entries()
    return {
        "lcp": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "mediapipe": mediapipe.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "models": {
            name: {
                "description": spec.description,
                "resolution": spec.resolution,
                "fps": spec.fps,
                "steps": spec.steps,
                "guidance": spec.guidance,
                "chroma_guidance": spec.chroma_guidance,
                "bundled_weights": bundled_weights_dir(spec) is not None,
            }
            for name, spec in MODELS.items()
        },
        "cache": {
            "dir": str(cache.root),
            "entries": len(entries),
            "bytes": sum(e.size_bytes for e in entries),
        },
    }


def train(
    corpus: Path,
    out_dir: Path,
    *,
    config: Any = None,
    device: str = "auto",
    export_to: Path | None = None,
    heldout_speech: tuple[Path, ...] = (),
    on_progress: ProgressFn | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Build the corpus if ``corpus`` has none, train (resuming from ``out_dir``), export.

    Returns a summary: steps, seconds, final loss, the exported weight files.
    """
    from .train.dataset import build_corpus
    from .train.trainer import TrainConfig, Trainer

    corpus, out_dir = Path(corpus), Path(out_dir)
    if not (corpus / "corpus.json").is_file():
        build_corpus(corpus, heldout_clips=list(heldout_speech), progress=on_progress)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    trainer = Trainer(config or TrainConfig(), corpus, out_dir, device, log=log)
    state = trainer.fit(on_progress)
    files = trainer.export_weights(export_to or out_dir / "weights")
    return {
        "steps": state.step,
        "seconds": round(state.seconds, 1),
        "final_loss": state.losses[-1][1] if state.losses else None,
        "device": device,
        "checkpoint": str(trainer.checkpoint_path),
        "loss_curve": str(out_dir / "loss.png"),
        "weights": [str(p) for p in files],
    }


def evaluate(
    *,
    corpus: Path | None = None,
    portraits: Sequence[tuple[Path, Path]] = (),
    config: Any = None,
    model: str = "lcp-tiny",
    weights: Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    videos: Path | None = None,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Quality scores (``lcp eval``): held-out ``corpus`` clips and/or ``portraits``
    (``(face, speech)`` pairs).  ``videos``: folder to keep the portrait renders in.

    Returns ``{"model", "weights", "config", "heldout": {...} | None, "audio_use": {...} |
    None, "portraits": [...]}`` (``audio_use``: ``config.audio_use`` set and a corpus given).
    """
    from .bench.audio_use import audio_use
    from .bench.evaluate import EvalConfig, eval_heldout, eval_portrait

    cfg = config or EvalConfig()
    m = load_model(model, weights, device, dtype)
    for face, speech in portraits:
        require_file(Path(face), "face image")
        require_file(Path(speech), "audio")
    heldout = probe = None
    if corpus is not None:
        corpus = Path(corpus)
        if not (corpus / "corpus.json").is_file():
            raise InputNotFoundError(
                f"{corpus}: no corpus here "
                f"(build it: python -m lightningcp_cli.train.corpus {corpus})"
            )
        heldout = eval_heldout(m, corpus, cfg, on_progress)
        if cfg.audio_use is not None:
            probe = audio_use(m, corpus, cfg.audio_use)
    rows = []
    for i, (face, speech) in enumerate(portraits):
        video = None
        if videos is not None:
            Path(videos).mkdir(parents=True, exist_ok=True)
            video = Path(videos) / f"{i:02d}_{Path(face).stem}_{Path(speech).stem}.mp4"
        rows.append(eval_portrait(m, Path(face), Path(speech), cfg, video=video))
    return {
        "model": m.spec.name,
        "weights": "random" if m.random_weights else m.weights_id,
        "config": asdict(cfg),
        "heldout": heldout,
        "audio_use": probe,
        "portraits": rows,
    }
