"""How much the denoiser's mouth follows the audio, per noise level (``lcp eval --audio-use``).

Lip sync measured on rendered frames (:mod:`.quality`) moves by ±0.3 from clip to clip
and mixes every sampler step into one number.  This probe looks at the network itself,
one noise level at a time: corpus clips are noised to timestep ``t``, the clean latent is
predicted, and the **temporal R²** of the mouth region is computed, i.e. how well the
predicted change of the mouth over the clip's frames matches the truth's (1: exact, 0: no
better than a still mouth), weighted by the mouth box.  It is computed twice, with each
clip's own speech and with another clip's (audio tokens, and for a model with a mouth
track the corpus's track of that speech): the gap is what the prediction owes to the
speech.  At ``t = 999`` (zero SNR) the input holds no trace of the clip, so a mouth that
moves in sync there comes from the speech alone.

48 clips at four noise levels take about half a minute on a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models.bundle import TalkingHeadModel
from ..models.codec import encode_clip
from ..stages.denoise import as_clean, make_scheduler

DEFAULT_TIMESTEPS = (999, 900, 800, 700)


@dataclass(frozen=True)
class AudioUseConfig:
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    clips: int = 48
    frames: int = 12  # one inference context window
    batch_size: int = 8
    split: str = "heldout"
    seed: int = 0  # which clips, and the noise

    def __post_init__(self) -> None:
        if self.clips < 2 or self.batch_size < 2 or self.frames < 2:
            raise ValueError("the audio-use probe needs >= 2 clips per batch of >= 2 frames")
        if not self.timesteps or any(not 0 <= t <= 999 for t in self.timesteps):
            raise ValueError("audio-use timesteps must be in [0, 999]")


@torch.inference_mode()
def audio_use(
    model: TalkingHeadModel, corpus: Path, config: AudioUseConfig = AudioUseConfig()
) -> dict[str, Any]:
    """Temporal R² of the predicted mouth with the clips' own audio (``r2``) and with
    another clip's (``r2_other_audio``), per timestep: ``{"rows": [...], ...}``."""
    from ..train.dataset import SynthesisConfig, TalkingFaceDataset, locator_input

    spec, dev, dtype = model.spec, model.device, model.dtype
    if spec.codec == "sd-vae":
        raise ValueError("the audio-use probe needs a data-engine model (weight-free codec)")
    data = TalkingFaceDataset.from_folder(
        corpus,
        config.split,
        config=SynthesisConfig(num_frames=config.frames, fps=spec.fps),
        seed=config.seed,
        length=config.clips,
        window_position=spec.audio_window_position,
    )
    scheduler = make_scheduler(spec.prediction_type)
    gen = torch.Generator().manual_seed(config.seed)
    # per timestep and audio: [weighted squared error, weighted truth variance]
    sums = {(t, own): [0.0, 0.0] for t in config.timesteps for own in (True, False)}
    used = 0
    for start in range(0, config.clips, config.batch_size):
        indices = range(start, min(start + config.batch_size, config.clips))
        if len(indices) < 2:  # "another clip's audio" needs a second clip: skip a last 1
            break
        used += len(indices)
        batch = torch.utils.data.default_collate([data[i] for i in indices])
        x0, ref_latents = encode_clip(
            model.codec,
            batch["frames"].to(dev, dtype),
            batch["reference"].to(dev, dtype),
            spec.latent_origin,
        )
        bank = model.reference_net(ref_latents)
        audio = batch["audio"].to(dev, dtype)
        faces = {  # "another clip's speech" swaps the mouth track too, for a model with one
            own: model.face_locator(locator_input(batch, spec, opening).to(dev, dtype))
            for own, opening in ((True, None), (False, batch["mouth_open"].roll(1, 0)))
        }
        keep = torch.ones(len(indices), dtype=torch.bool, device=dev)
        mouth = F.avg_pool2d(batch["mouth_mask"].to(dev, dtype), spec.codec_factor)[:, :, None]
        truth = x0 - x0.mean(2, keepdim=True)  # the mouth's change over the clip
        # one draw for every timestep: a row does not depend on which others are asked for
        noise = torch.randn(x0.shape, generator=gen).to(dev, dtype)
        for t in config.timesteps:
            timestep = torch.full((len(indices),), t, dtype=torch.long, device=dev)
            noisy = scheduler.add_noise(x0, noise, timestep)
            for own, face in faces.items():
                cond = audio if own else audio.roll(1, 0)
                out = model.denoiser(noisy, timestep, cond, face, bank, keep)
                pred = as_clean(scheduler, out, t, noisy)
                pred = pred - pred.mean(2, keepdim=True)
                s = sums[(t, own)]
                s[0] += float(((pred - truth) ** 2 * mouth).sum())
                s[1] += float((truth**2 * mouth).sum())
    rows = [
        {
            "timestep": t,
            "r2": 1 - sums[(t, True)][0] / sums[(t, True)][1],
            "r2_other_audio": 1 - sums[(t, False)][0] / sums[(t, False)][1],
        }
        for t in config.timesteps
    ]
    return {"split": config.split, "clips": used, "frames": config.frames, "rows": rows}
