"""Denoise stage: DDIM scheduler, initial noise, sliding context windows, CFG loop.

Matches EchoMimic v1's ``Audio2VideoPipeline`` (see ``shared/checkpoints/golden/README.md``):

* initial noise: ``randn`` from a CPU generator seeded with ``seed``, clamped to
  ``+-noise_clamp``, times ``init_noise_sigma``;
* context windows: the "uniform" schedule evaluated once (its step argument fixed to 0),
  then rotated by ``2 * step_index`` frames at every step;
* per step, the raw predictions of all windows are summed per frame and divided by the
  per-frame window count, then classifier-free guidance ``u + g * (c - u)`` is applied
  and the scheduler steps the whole video at once.

The model is called only through :meth:`Sampler.predict`, one call per (step, window).
An acceleration subclasses :class:`Sampler` (or wraps ``predict``) and keeps its caches
keyed by ``ctx.window_index``; the loop itself stays the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers import DDIMScheduler

from ..config import DenoiseConfig, ProgressFn
from ..errors import LcpError

Bank = Mapping[str, torch.Tensor]

#: EchoMimic v1's scheduler settings (``configs/inference/inference_v2.yaml``).
ECHOMIMIC_SCHEDULER_KWARGS: dict[str, object] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "clip_sample": False,
    "steps_offset": 1,
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}


def make_scheduler(prediction_type: str = "v_prediction", **overrides: object) -> DDIMScheduler:
    """A fresh diffusers ``DDIMScheduler`` with EchoMimic's settings (``overrides`` win)."""
    kwargs = {**ECHOMIMIC_SCHEDULER_KWARGS, "prediction_type": prediction_type, **overrides}
    return DDIMScheduler(**kwargs)


def initial_latents(
    shape: Sequence[int],
    seed: int,
    clamp: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    init_noise_sigma: float = 1.0,
) -> torch.Tensor:
    """Standard normal noise clamped to ``+-clamp``, times ``init_noise_sigma``.

    Drawn in float32 from a CPU ``torch.Generator`` seeded with ``seed`` and only then
    moved/cast, so every device and dtype starts from the same numbers.  One ``randn``
    call over the whole ``[B, C, F, h, w]`` shape: this is EchoMimic's draw with
    ``generator=torch.manual_seed(seed)`` (bit-identical to the golden init latents).
    """
    if clamp <= 0:
        raise ValueError(f"noise clamp must be > 0, not {clamp}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    noise = noise.clamp(-clamp, clamp) * init_noise_sigma
    return noise.to(device=device, dtype=dtype)


def context_windows(
    num_frames: int, context_frames: int, overlap: int, step: int
) -> list[list[int]]:
    """Frame indices of each context window at sampler step index ``step``.

    EchoMimic's "uniform" schedule with its step argument fixed to 0 (closed loop,
    stride 1): windows of ``context_frames`` start every ``context_frames - overlap``
    frames from 0 while the start is ``< num_frames``, wrapping around the end; a video
    no longer than a window is one window of all frames.  Every window is then rotated
    by ``2 * step`` frames (mod ``num_frames``).  E.g. 16 frames, 12/3: step 0 gives
    ``[0..11]`` and ``[9..15, 0..4]``; 4 frames at step 1 give ``[2, 3, 0, 1]``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, not {num_frames}")
    if context_frames < 1 or not 0 <= overlap < context_frames:
        raise ValueError(
            f"need context_frames >= 1 and 0 <= overlap < context_frames, "
            f"got {context_frames} and {overlap}"
        )
    if step < 0:
        raise ValueError(f"step must be >= 0, not {step}")
    shift = 2 * step
    if num_frames <= context_frames:
        starts, length = [0], num_frames
    else:
        starts, length = list(range(0, num_frames, context_frames - overlap)), context_frames
    return [[(s + e + shift) % num_frames for e in range(length)] for s in starts]


@dataclass(frozen=True)
class StepContext:
    """What one model call is for: handed to :meth:`Sampler.predict`.

    ``step_index`` counts sampler steps from 0 (never derived from ``timestep``);
    ``window_index`` is the window's position in this step's list (stable across steps,
    so per-window caches can key on it); ``frames`` are the video frame indices the
    window covers, in the order the model sees them.
    """

    step_index: int
    num_steps: int
    timestep: int
    window_index: int
    num_windows: int
    frames: tuple[int, ...]
    cfg: bool


class Denoiser(Protocol):
    """The interface of ``models.unet.VideoUNet`` that the loop uses."""

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        audio: torch.Tensor,
        face_feature: torch.Tensor | None = None,
        bank: Bank | None = None,
        ref_rows: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class Sampler:
    """The seam between the denoising loop and the model.

    :func:`denoise` calls :meth:`reset` once, then per step :meth:`on_step_start`,
    :meth:`predict` once per context window, and :meth:`on_step_end` with the stepped
    latents.  Subclasses (accelerations) override these; the defaults run the plain
    model, so an unmodified ``Sampler`` gives the reference output.
    """

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser

    def reset(self) -> None:
        """Drop per-run state; called at the start of every :func:`denoise` run."""

    def on_step_start(self, step_index: int, timestep: int) -> None:
        """Called before the first window of a step."""

    def on_step_end(self, step_index: int, timestep: int, latents: torch.Tensor) -> None:
        """Called with the whole video's latents after the scheduler step."""

    def predict(
        self,
        latents: torch.Tensor,
        ctx: StepContext,
        audio: torch.Tensor,
        face_feature: torch.Tensor | None,
        bank: Bank | None,
    ) -> torch.Tensor:
        """Raw model output for one window: ``[B, C, f, h, w]``, rows ``[uncond, cond]``.

        Inputs are the conditional ones for the window: ``latents [1, C, f, h, w]``,
        ``audio [1, f, N, D]``, ``face_feature [1, C0, 1|f, h, w]`` or None.  With CFG the
        unconditional row gets zero audio, a zero face feature and no reference bank.
        """
        timestep = torch.tensor(ctx.timestep, dtype=torch.long, device=latents.device)
        if not ctx.cfg:
            ref_rows = torch.tensor([True], device=latents.device)
            return self.denoiser(latents, timestep, audio, face_feature, bank, ref_rows)
        sample = torch.cat([latents, latents])
        audio = torch.cat([torch.zeros_like(audio), audio])
        if face_feature is not None:
            face_feature = torch.cat([torch.zeros_like(face_feature), face_feature])
        ref_rows = torch.tensor([False, True], device=latents.device)
        return self.denoiser(sample, timestep, audio, face_feature, bank, ref_rows)


def denoise(
    denoiser: Denoiser,
    audio_tokens: torch.Tensor,
    face_feature: torch.Tensor | None,
    bank: Bank | None,
    cfg: DenoiseConfig,
    latent_shape: Sequence[int],
    on_progress: ProgressFn | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    scheduler: DDIMScheduler | None = None,
    sampler: Sampler | None = None,
) -> torch.Tensor:
    """Run the sampler over the whole video; returns latents ``[1, C, F, h, w]``.

    ``audio_tokens`` is ``[F, N, D]`` (F = number of video frames), ``face_feature`` the
    face locator's output ``[1, C0, 1, h, w]`` (or None), ``bank`` the ReferenceNet's
    feature bank, passed to the model as is (its storage dtype, e.g. EchoMimic's float16
    rounding, is the ReferenceNet's ``bank_dtype``).  ``cfg`` is a resolved ``DenoiseConfig``
    (``steps``, ``guidance``, ``context_frames``, ``context_overlap``, ``seed``,
    ``noise_clamp``); ``latent_shape`` is ``(C, h, w)``.  ``guidance <= 1`` runs one
    conditional batch row instead of classifier-free guidance.  ``scheduler`` defaults to
    :func:`make_scheduler`; ``sampler`` (wrapping ``denoiser``) to a plain
    :class:`Sampler`.

    Unlike EchoMimic's pipeline, which divides by the per-frame window count only in its
    CFG branch, predictions are always averaged over overlapping windows; the two agree
    whenever windows do not overlap (every video of at most ``context_frames`` frames).

    Raises :class:`LcpError` if the latents stop being finite.
    """
    if cfg.steps is None or cfg.guidance is None:
        raise ValueError("denoise: resolve steps and guidance (the model's defaults) first")
    if audio_tokens.ndim != 3:
        raise ValueError(f"audio tokens must be [F, N, D], got {tuple(audio_tokens.shape)}")
    if sampler is None:
        sampler = Sampler(denoiser)
    elif sampler.denoiser is not denoiser:
        raise ValueError("denoise: the sampler wraps a different denoiser")
    if scheduler is None:
        scheduler = make_scheduler()

    num_frames = audio_tokens.shape[0]
    channels, height, width = latent_shape
    do_cfg = cfg.guidance > 1.0
    rows = 2 if do_cfg else 1

    scheduler.set_timesteps(cfg.steps, device=device)
    timesteps = scheduler.timesteps
    num_steps = len(timesteps)
    latents = initial_latents(
        (1, channels, num_frames, height, width),
        cfg.seed,
        cfg.noise_clamp,
        dtype,
        device,
        float(scheduler.init_noise_sigma),
    )
    audio = audio_tokens.to(device=device, dtype=dtype).unsqueeze(0)
    if face_feature is not None:
        face_feature = face_feature.to(device=device, dtype=dtype)

    sampler.reset()
    if on_progress is not None:
        on_progress("denoise", 0, num_steps)
    with torch.no_grad():
        for step_index, t in enumerate(timesteps):
            t_int = int(t)
            sampler.on_step_start(step_index, t_int)
            windows = context_windows(
                num_frames, cfg.context_frames, cfg.context_overlap, step_index
            )
            noise_pred = torch.zeros((rows, *latents.shape[1:]), device=device, dtype=dtype)
            counter = torch.zeros((1, 1, num_frames, 1, 1), device=device, dtype=dtype)
            for window_index, frames in enumerate(windows):
                ctx = StepContext(
                    step_index=step_index,
                    num_steps=num_steps,
                    timestep=t_int,
                    window_index=window_index,
                    num_windows=len(windows),
                    frames=tuple(frames),
                    cfg=do_cfg,
                )
                idx = torch.tensor(frames, device=device)
                window_latents = scheduler.scale_model_input(latents[:, :, idx], t)
                pred = sampler.predict(window_latents, ctx, audio[:, idx], face_feature, bank)
                noise_pred[:, :, idx] += pred
                counter[:, :, idx] += 1
            noise_pred = noise_pred / counter
            if do_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + cfg.guidance * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents, eta=0.0).prev_sample
            if not torch.isfinite(latents).all():
                raise LcpError(
                    f"denoise: latents became NaN/inf at step {step_index + 1}/{num_steps} "
                    f"(timestep {t_int}); try float32 or another seed"
                )
            sampler.on_step_end(step_index, t_int, latents)
            if on_progress is not None:
                on_progress("denoise", step_index + 1, num_steps)
    return latents
