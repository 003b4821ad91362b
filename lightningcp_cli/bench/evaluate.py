"""``lcp eval``: how good the generated talking heads are (not how fast).

Two kinds of check:

- **held-out corpus clips** (:func:`eval_heldout`): identities and sentences the model
  was not trained on, from the data engine's ``heldout`` split, generated from their
  reference face, audio and face mask and compared with the animated ground truth: PSNR
  and SSIM per frame, and lip sync (see :mod:`.quality`) of the generated and of the
  ground-truth frames (the latter is the ceiling the data allows);
- **any portrait + speech** (:func:`eval_portrait`): a real render through
  :func:`lightningcp_cli.api.render`, scored by lip sync, identity drift and flicker on
  the generated face crops.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DenoiseConfig, ProgressFn, RenderConfig
from ..models.bundle import TalkingHeadModel
from ..models.codec import image_to_tensor
from ..stages.motion import MouthTrack
from .audio_use import AudioUseConfig
from .metrics import video_fidelity
from .quality import (
    correlation,
    flicker,
    identity_drift,
    lip_sync_score,
    mouth_motion,
    mouth_openings,
    speech_envelope,
)


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation; the sampler defaults are the model's (25 steps, CFG)."""

    # Held-out corpus clips.  Per-clip lip sync spreads widely: on the shipped weights
    # (before the change blur) the first 8 clips scored 0.36 and all 32 0.57 +- 0.08
    # (95 %), so the default is 32.
    clips: int = 32
    frames: int = 48  # frames per clip (2 s at 24 fps)
    seed: int = 0  # which held-out clips (and their faces) are drawn
    denoise: DenoiseConfig = DenoiseConfig()
    accel: str = "none"
    audio_use: AudioUseConfig | None = None  # also probe the network (needs a corpus)

    def __post_init__(self) -> None:
        if self.clips < 1 or self.frames < 3:
            raise ValueError("eval needs >= 1 clip of >= 3 frames")


def _finite(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([r[key] for r in rows if np.isfinite(r[key])], dtype=np.float64)


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float:
    values = _finite(rows, key)
    return float(values.mean()) if len(values) else float("nan")


def _ci95(rows: Sequence[dict[str, Any]], key: str) -> float:
    """Half-width of the 95 % confidence interval of the mean over clips (Student's t).

    Why: per-clip lip sync spreads from about -0.3 to 0.8, so two draws of 8 clips from
    the same split can differ by 0.3 in their mean; a mean without its interval misleads.
    """
    from scipy import stats

    values = _finite(rows, key)
    if len(values) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(values) - 1) * stats.sem(values))


def identity_kind(identity: str) -> str:
    """``procedural-439`` -> ``procedural``; a portrait's name (or morph) stays itself."""
    return identity.split("-", 1)[0]


def generate_clip(
    model: TalkingHeadModel,
    reference: np.ndarray,
    face_mask: np.ndarray,
    tokens: torch.Tensor,
    denoise_config: DenoiseConfig,
    accel: str = "none",
    track: MouthTrack | None = None,
) -> list[np.ndarray]:
    """Face-crop frames (uint8) generated from a reference crop, its face-locator mask
    (``res x res`` 0/1) and audio tokens ``[F, N, D]`` (and the speech's mouth track for a
    model with one): the render pipeline minus the face and audio stages, for inputs that
    are already crops and tokens."""
    from ..accel import build_sampler
    from ..api import face_feature, resolve_denoise
    from ..stages.decode import model_frames
    from ..stages.denoise import denoise

    spec = model.spec
    cfg = resolve_denoise(RenderConfig(model=spec.name, denoise=denoise_config), spec)
    with torch.inference_mode():
        ref_latents = model.codec.encode(image_to_tensor(reference, model.device, model.dtype))
        bank = model.reference_net(ref_latents)
        with build_sampler(accel, model) as sampler:  # no face analysis: no DFA here
            latents = denoise(
                model.denoiser,
                tokens.to(model.device, model.dtype),
                face_feature(model, face_mask, track, reference),
                bank,
                cfg,
                tuple(ref_latents.shape[1:]),
                dtype=model.dtype,
                device=model.device,
                sampler=sampler,
            )
        return list(model_frames(model, latents, ref_latents))


def heldout_samples(
    corpus: Path, config: EvalConfig, window_position: float = 0.0
) -> list[dict[str, Any]]:
    """``config.clips`` held-out clips of ``config.frames`` frames, with the speech
    envelope (``envelope``) and the mouth track (``track``, its opening made from the
    stored speech as a render makes it) of their frames; audio tokens for a model whose spec has
    ``audio_window_position = window_position``."""
    from ..stages.motion import mouth_opening
    from ..train.dataset import SynthesisConfig, TalkingFaceDataset
    from ..train.speech import SAMPLE_RATE, frame_envelope

    synth = SynthesisConfig(num_frames=config.frames)
    data = TalkingFaceDataset.from_folder(
        corpus,
        "heldout",
        config=synth,
        seed=config.seed,
        length=config.clips,
        window_position=window_position,
    )
    samples = []
    for i in range(config.clips):
        s = data.sample_arrays(i)
        u = data.utterance(s["utterance"])
        audio = u.samples.astype(np.float64) / 32768.0
        env = frame_envelope(audio, synth.fps, SAMPLE_RATE)
        env = np.pad(env, (0, max(0, s["offset"] + config.frames - len(env))))
        s["envelope"] = env[s["offset"] : s["offset"] + config.frames]
        opening = mouth_opening(audio, SAMPLE_RATE, synth.fps, s["offset"] + config.frames)
        s["track"] = MouthTrack(s["mouth_mask"], s["mouth_geometry"], opening[s["offset"] :])
        samples.append(s)
    return samples


def eval_heldout(
    model: TalkingHeadModel,
    corpus: Path,
    config: EvalConfig = EvalConfig(),
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Scores on held-out corpus clips: per-clip rows and their means."""
    progress = on_progress or (lambda stage, done, total: None)
    rows = []
    samples = heldout_samples(corpus, config, model.spec.audio_window_position)
    for i, s in enumerate(samples):
        frames = generate_clip(
            model,
            s["reference"],
            s["face_mask"],
            s["tokens"],
            config.denoise,
            config.accel,
            s["track"],
        )
        truth = list(s["frames"])
        fid = video_fidelity(truth, frames)
        opening, opening_truth = mouth_openings(frames), mouth_openings(truth)
        rows.append(
            {
                "utterance": s["utterance"],
                "identity": s["identity"],
                "offset": s["offset"],
                "psnr": fid["psnr"],
                "ssim": fid["ssim"],
                "lip_sync": correlation(opening, s["envelope"]),
                "lip_sync_truth": correlation(opening_truth, s["envelope"]),
                "opening_vs_truth": correlation(opening, opening_truth),
                "mouth_motion_sync": correlation(
                    mouth_motion(frames, s["reference"], s["mouth_mask"]), s["envelope"]
                ),
            }
        )
        progress("eval", i + 1, len(samples))
    keys = (
        "psnr",
        "ssim",
        "lip_sync",
        "lip_sync_truth",
        "opening_vs_truth",
        "mouth_motion_sync",
    )
    kinds = sorted({identity_kind(r["identity"]) for r in rows})
    by_kind = {}
    for kind in kinds:
        group = [r for r in rows if identity_kind(r["identity"]) == kind]
        by_kind[kind] = {"clips": len(group), **{k: _mean(group, k) for k in keys}}
    return {
        "clips": rows,
        "mean": {k: _mean(rows, k) for k in keys},
        "ci95": {k: _ci95(rows, k) for k in keys},
        "by_identity": by_kind,
    }


def eval_portrait(
    model: TalkingHeadModel,
    face: Path,
    audio: Path,
    config: EvalConfig = EvalConfig(),
    *,
    video: Path | None = None,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Render ``face`` speaking ``audio`` and score the face crops: lip sync against the
    speech envelope, identity drift vs the portrait's crop and flicker, both outside the
    mouth box.  The video is kept at ``video`` when given."""
    from ..api import RenderRequest, render
    from ..config import OutputConfig
    from ..stages.face import analyze_face, load_image

    spec = model.spec
    cfg = RenderConfig(
        model=spec.name,
        accel=config.accel,
        denoise=config.denoise,
        output=OutputConfig(overwrite=True),
    )
    with tempfile.TemporaryDirectory(prefix="lcp-eval-") as tmp:
        out = video or Path(tmp) / "eval.mp4"
        request = RenderRequest(face, audio, out, cfg)
        result = render(request, model=model, keep_frames=True, on_progress=on_progress)
    crops = result.crop_frames or []
    analysis = analyze_face(load_image(face), cfg.face, spec.resolution, source=str(face))
    env = speech_envelope(audio, result.fps)[: len(crops)]
    return {
        "face": str(face),
        "audio": str(audio),
        "frames": len(crops),
        "lip_sync": lip_sync_score(crops, env),
        "mouth_motion_sync": correlation(
            mouth_motion(crops, analysis.crop, analysis.mouth_mask), env
        ),
        "identity_drift_db": identity_drift(crops, analysis.crop, analysis.mouth_mask),
        "flicker": flicker(crops, analysis.mouth_mask),
        "render_seconds": result.total_seconds,
    }


def with_sampler(
    config: EvalConfig,
    steps: int | None,
    guidance: float | None,
    epsilon_scaling: float | None = None,
    chroma_guidance: float | None = None,
) -> EvalConfig:
    """``config`` with the sampler's steps / guidance / epsilon scaling / chroma guidance
    overridden where given."""
    d = config.denoise
    return replace(
        config,
        denoise=replace(
            d,
            steps=steps if steps is not None else d.steps,
            guidance=guidance if guidance is not None else d.guidance,
            epsilon_scaling=epsilon_scaling if epsilon_scaling is not None else d.epsilon_scaling,
            chroma_guidance=chroma_guidance if chroma_guidance is not None else d.chroma_guidance,
        ),
    )
