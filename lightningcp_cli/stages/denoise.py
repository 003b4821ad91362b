"""Denoise stage: DDIM scheduler, initial noise, sliding context windows, CFG loop.

Matches EchoMimic v1's ``Audio2VideoPipeline`` (see ``shared/checkpoints/golden/README.md``):

* initial noise: ``randn`` from a CPU generator seeded with ``seed``, clamped to
  ``+-noise_clamp``, times ``init_noise_sigma``;
* context windows: the "uniform" schedule evaluated once (its step argument fixed to 0),
  then rotated by ``2 * step_index`` frames at every step;
* per step, the raw predictions of all windows are summed per frame and divided by the
  per-frame window count, then classifier-free guidance ``u + g * (c - u)`` is applied
  and the scheduler steps the whole video at once.

The model is called only through the :class:`Sampler`.  The loop runs *step groups*
(:class:`StepGroup`, asked from :meth:`Sampler.next_group`): a lead step followed by
zero or more further steps that share the lead step's window layout (windows rotate
only at a group's lead step).  The plain sampler's groups are single steps, which is
the loop described above.  An accelerated sampler (LightningCP) makes its key steps the
lead steps; with ``batched`` groups the further steps run as one call per window
(:meth:`Sampler.predict_batch`) on input latents estimated by stepping the scheduler
with the lead step's guided prediction, and are then rolled out one by one with their
own predictions.  Caches are keyed by ``ctx.window_index``, which within a group always
names the same frames.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from ..config import DenoiseConfig, ProgressFn
from ..errors import NonFiniteError

if TYPE_CHECKING:
    from .audio import FrameWindows
    from .motion import LocatorTrack

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


class EpsilonScaledDDIMScheduler(DDIMScheduler):
    """Deterministic DDIM whose noise direction is divided by ``1 + epsilon_scaling * t / T``.

    Epsilon scaling (Ning et al., "Elucidating the Exposure Bias in Diffusion Models",
    ICLR 2024) counters exposure bias: a network trained on noised *true* latents meets
    its own, slightly off, latents when sampling, and the error grows step by step.  Here
    the predicted clean latent is kept and only the ``sqrt(1 - a') * eps`` term of the
    update shrinks, which stays defined at the zero-SNR first step, where a clean latent
    cannot be recovered from a rescaled noise.  ``epsilon_scaling = 0`` is plain DDIM.
    """

    def __init__(self, epsilon_scaling: float = 0.0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if epsilon_scaling < 0:
            raise ValueError("epsilon_scaling must be >= 0")
        self.epsilon_scaling = float(epsilon_scaling)

    def step(self, model_output, timestep, sample, eta=0.0, return_dict=True, **kwargs):  # type: ignore[override]
        out = super().step(model_output, timestep, sample, eta=eta, return_dict=True, **kwargs)
        if self.epsilon_scaling:
            if eta:
                raise ValueError("epsilon scaling is defined for deterministic DDIM (eta = 0)")
            t, total = int(timestep), self.config.num_train_timesteps
            prev_t = t - total // self.num_inference_steps  # as DDIMScheduler.step
            a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
            x0 = out.pred_original_sample
            start = a_prev.to(sample.device, sample.dtype).sqrt() * x0
            scale = 1 + self.epsilon_scaling * t / total
            out = DDIMSchedulerOutput(start + (out.prev_sample - start) / scale, x0)
        return out if return_dict else (out.prev_sample, out.pred_original_sample)


def make_scheduler(
    prediction_type: str = "v_prediction", epsilon_scaling: float = 0.0, **overrides: object
) -> DDIMScheduler:
    """A fresh diffusers DDIM scheduler with EchoMimic's settings (``overrides`` win);
    with ``epsilon_scaling`` > 0 an :class:`EpsilonScaledDDIMScheduler`."""
    kwargs = {**ECHOMIMIC_SCHEDULER_KWARGS, "prediction_type": prediction_type, **overrides}
    if epsilon_scaling:
        return EpsilonScaledDDIMScheduler(epsilon_scaling, **kwargs)
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


def chunk_plan(num_frames: int, chunk_frames: int, overlap: int) -> list[tuple[int, int]]:
    """Frame ranges ``[start, end)`` denoised one after another for a long video.

    One chunk when the video fits; else chunks of ``chunk_frames`` (the last one may be
    shorter) whose neighbours share exactly ``overlap`` frames.
    """
    if num_frames < 1 or chunk_frames < 1 or not 0 < overlap < chunk_frames:
        raise ValueError(f"bad chunking: {num_frames} frames, {chunk_frames}/{overlap}")
    if num_frames <= chunk_frames:
        return [(0, num_frames)]
    stride = chunk_frames - overlap
    return [(s, min(s + chunk_frames, num_frames)) for s in range(0, num_frames - overlap, stride)]


def frame_noise(
    shape: Sequence[int],
    frames: range,
    seed: int,
    clamp: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    init_noise_sigma: float = 1.0,
) -> torch.Tensor:
    """Initial latents ``[1, C, len(frames), h, w]`` drawn per frame: frame ``f`` always gets
    the same noise (seeded by ``(seed, f)``), whichever chunk it falls in, so the two
    chunks sharing an overlap start those frames from the same noise.  ``shape`` is
    ``(C, h, w)``."""
    per_frame = []
    for f in frames:
        state = np.random.SeedSequence([int(seed), int(f)]).generate_state(2, np.uint64)
        gen = torch.Generator(device="cpu").manual_seed(int(state[0] >> np.uint64(1)))
        per_frame.append(torch.randn(tuple(shape), generator=gen, dtype=torch.float32))
    noise = torch.stack(per_frame, dim=1)[None].clamp(-clamp, clamp) * init_noise_sigma
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
    window covers, in the order the model sees them (the same for every step of a step
    group); ``group_start`` is the lead step of the step's group (see :class:`StepGroup`).
    """

    step_index: int
    num_steps: int
    timestep: int
    window_index: int
    num_windows: int
    frames: tuple[int, ...]
    cfg: bool
    group_start: int | None = None  # lead step of this step's group (None: this step)

    @property
    def is_lead(self) -> bool:
        """True for a group's lead step (always predicted on the real latents)."""
        return self.group_start is None or self.group_start == self.step_index


@dataclass(frozen=True)
class StepGroup:
    """Consecutive sampler steps ``start .. start+size-1`` run with one window layout.

    The lead step (``start``) is always predicted on the real latents.  The further
    steps are predicted one by one on their real latents, unless ``batched``: then they
    are predicted together, one :meth:`Sampler.predict_batch` call per window, on inputs
    that are *estimated*: the first one is the real latents after the lead step; with
    ``estimate`` each next one is the previous one stepped by the scheduler with the
    lead step's guided prediction (held as a noise prediction, see :func:`noise_as`),
    without it every one is the latents after the lead step.  The real latents are then
    rolled out step by step with each step's own (guided) prediction.  ``batch_limit``
    caps the steps per call (0: all of them); the inputs are estimated up front, so the
    split changes memory, not the result.
    """

    start: int
    size: int = 1
    batched: bool = False
    estimate: bool = True
    batch_limit: int = 0

    def __post_init__(self) -> None:
        if self.start < 0 or self.size < 1 or self.batch_limit < 0:
            raise ValueError(
                f"bad step group: start {self.start}, size {self.size}, "
                f"batch limit {self.batch_limit}"
            )

    @property
    def steps(self) -> range:
        return range(self.start, self.start + self.size)


@dataclass(frozen=True)
class RunInputs:
    """The inputs every step and window of one :func:`denoise` run shares (static features).

    ``audio`` ``[1, F, N, D]`` (the whole video, model dtype/device), ``face_feature``
    ``[1, C0, 1|F, h, w]`` or None, ``bank`` as handed to the model, ``timesteps`` of the
    run in order, ``cfg`` whether classifier-free guidance rows are used,
    ``latent_shape`` ``(C, h, w)``.
    """

    audio: torch.Tensor
    face_feature: torch.Tensor | None
    bank: Bank | None
    timesteps: tuple[int, ...]
    cfg: bool
    latent_shape: tuple[int, int, int]

    @property
    def num_frames(self) -> int:
        return int(self.audio.shape[1])


def _alpha(scheduler: DDIMScheduler, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    return scheduler.alphas_cumprod[int(t)].to(device=like.device, dtype=like.dtype)


def as_noise(
    scheduler: DDIMScheduler, output: torch.Tensor, t: torch.Tensor | int, sample: torch.Tensor
) -> torch.Tensor:
    """The noise (epsilon) that a model ``output`` at timestep ``t`` on ``sample`` implies."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    a = _alpha(scheduler, t, sample)
    if kind == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * sample
    if kind == "sample":
        return (sample - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"unsupported prediction type {kind!r}")


def as_clean(
    scheduler: DDIMScheduler, output: torch.Tensor, t: torch.Tensor | int, sample: torch.Tensor
) -> torch.Tensor:
    """The clean latent (x0) that a model ``output`` at timestep ``t`` on ``sample`` implies
    (for epsilon prediction undefined at zero SNR)."""
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return output
    a = _alpha(scheduler, t, sample)
    if kind == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * output
    if kind == "epsilon":
        return (sample - (1 - a).sqrt() * output) / a.sqrt()
    raise ValueError(f"unsupported prediction type {kind!r}")


def noise_as(
    scheduler: DDIMScheduler, noise: torch.Tensor, t: torch.Tensor | int, sample: torch.Tensor
) -> torch.Tensor:
    """The model output at ``t`` on ``sample`` that implies ``noise`` (inverse of :func:`as_noise`).

    Stepping the scheduler with it moves ``sample`` along the DDIM path of a held noise
    prediction: the input-latent estimate of parallel prediction.  (Holding the raw
    v-prediction instead would change the implied noise from step to step.)
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    a = _alpha(scheduler, t, sample)
    if kind == "v_prediction":
        return (noise - (1 - a).sqrt() * sample) / a.sqrt()
    if kind == "sample":
        return (sample - (1 - a).sqrt() * noise) / a.sqrt()
    raise ValueError(f"unsupported prediction type {kind!r}")


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

    :func:`denoise` calls :meth:`reset` once and :meth:`on_run_start` with the run's
    static inputs.  Then, group by group: it runs the lead step (:meth:`on_step_start`,
    :meth:`predict` once per context window, :meth:`on_step_end` with the stepped
    latents), asks :meth:`next_group` how many steps follow it in the same group, and
    runs those the same way, or, for a batched group, calls :meth:`on_step_start` for all
    of them, :meth:`predict_batch` once per window, and :meth:`on_step_end` per step as
    it rolls the latents out.
    Subclasses (accelerations) override these; the defaults run the plain model in
    groups of one step, so an unmodified ``Sampler`` gives the reference output.

    A sampler that patches the model (processors, hooks) does so in :meth:`enable` and
    undoes it in :meth:`disable`; ``with sampler:`` does both (no-ops here).
    """

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser

    def enable(self) -> Sampler:
        """Install whatever the sampler needs on the model (idempotent)."""
        return self

    def disable(self) -> None:
        """Undo :meth:`enable` exactly (idempotent)."""

    def __enter__(self) -> Sampler:
        return self.enable()

    def __exit__(self, *exc: object) -> None:
        self.disable()

    def reset(self) -> None:
        """Drop per-run state; called at the start of every :func:`denoise` run."""

    def on_run_start(self, inputs: RunInputs) -> None:
        """Called once per run after :meth:`reset`, with the inputs all steps share."""

    def next_group(self, step_index: int, num_steps: int) -> StepGroup:
        """The step group led by ``step_index`` (default: that step alone).

        Called right after the lead step was predicted and stepped (its
        :meth:`on_step_end` has run), so the plan may depend on what it produced; the
        group must start at ``step_index`` and end by ``num_steps``.
        """
        return StepGroup(step_index)

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

    def predict_batch(
        self,
        latents: torch.Tensor,
        ctxs: Sequence[StepContext],
        audio: torch.Tensor,
        face_feature: torch.Tensor | None,
        bank: Bank | None,
    ) -> torch.Tensor:
        """Raw outputs of one window for several steps at once: ``[S, B, C, f, h, w]``.

        ``latents [S, C, f, h, w]`` holds step ``ctxs[i]``'s input in row ``i``; the other
        inputs are :meth:`predict`'s.  The default calls :meth:`predict` per step; an
        accelerated sampler replaces it with one batched model call.
        """
        if latents.shape[0] != len(ctxs):
            raise ValueError(f"{latents.shape[0]} latents for {len(ctxs)} steps")
        return torch.stack(
            [
                self.predict(latents[i : i + 1], ctx, audio, face_feature, bank)
                for i, ctx in enumerate(ctxs)
            ]
        )


def denoise(
    denoiser: Denoiser,
    audio_tokens: torch.Tensor,
    face_feature: torch.Tensor | LocatorTrack | None,
    bank: Bank | None,
    cfg: DenoiseConfig,
    latent_shape: Sequence[int],
    on_progress: ProgressFn | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    scheduler: DDIMScheduler | None = None,
    sampler: Sampler | None = None,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the sampler over the whole video; returns latents ``[1, C, F, h, w]``.

    ``audio_tokens`` is ``[F, N, D]`` (F = number of video frames), ``face_feature`` the
    face locator's output ``[1, C0, 1, h, w]``, one per frame ``[1, C0, F, h, w]`` (or a
    :class:`~.motion.LocatorTrack` of F frames), or None; ``bank`` the ReferenceNet's
    feature bank, passed to the model as is (its storage dtype, e.g. EchoMimic's float16
    rounding, is the ReferenceNet's ``bank_dtype``).  ``cfg`` is a resolved ``DenoiseConfig``
    (``steps``, ``guidance``, ``context_frames``, ``context_overlap``, ``seed``,
    ``noise_clamp``, ``prediction_type``); ``latent_shape`` is ``(C, h, w)``.
    ``guidance <= 1`` runs one conditional batch row instead of classifier-free guidance.
    ``chroma_guidance`` (when set) replaces ``guidance`` on channels ``chroma_channel``
    onwards (the colour of YCbCr latents).
    ``scheduler`` defaults to :func:`make_scheduler`; ``sampler`` (wrapping ``denoiser``)
    to a plain :class:`Sampler`; ``latents`` (the initial noise) to
    :func:`initial_latents` of ``cfg.seed`` (EchoMimic's draw).

    Steps run in the groups ``sampler.next_group`` plans (see :class:`StepGroup`); the
    window layout of a group is that of its lead step.

    Unlike EchoMimic's pipeline, which divides by the per-frame window count only in its
    CFG branch, predictions are always averaged over overlapping windows; the two agree
    whenever windows do not overlap (every video of at most ``context_frames`` frames).

    Raises :class:`NonFiniteError` (naming the step) if the latents stop being finite.
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
        scheduler = make_scheduler(
            cfg.prediction_type or "v_prediction", cfg.epsilon_scaling or 0.0
        )
    elif cfg.prediction_type and scheduler.config.prediction_type != cfg.prediction_type:
        raise ValueError(
            f"denoise: the scheduler expects {scheduler.config.prediction_type}, "
            f"the model predicts {cfg.prediction_type}"
        )
    elif (cfg.epsilon_scaling or 0.0) != getattr(scheduler, "epsilon_scaling", 0.0):
        raise ValueError(
            f"denoise: the scheduler's epsilon scaling is not the config's "
            f"({cfg.epsilon_scaling or 0.0})"
        )

    num_frames = audio_tokens.shape[0]
    channels, height, width = latent_shape
    scale: float | torch.Tensor = cfg.guidance
    if cfg.chroma_guidance is not None:
        if cfg.chroma_channel is None or not 0 < cfg.chroma_channel < channels:
            raise ValueError("denoise: chroma guidance needs the first colour channel")
        scale = torch.full((channels,), float(cfg.guidance), device=device, dtype=dtype)
        scale[cfg.chroma_channel :] = cfg.chroma_guidance
        scale = scale.view(1, channels, 1, 1, 1)
    do_cfg = max(cfg.guidance, cfg.chroma_guidance or 0.0) > 1.0
    rows = 2 if do_cfg else 1

    scheduler.set_timesteps(cfg.steps, device=device)
    timesteps = scheduler.timesteps
    num_steps = len(timesteps)
    if latents is None:
        latents = initial_latents(
            (1, channels, num_frames, height, width),
            cfg.seed,
            cfg.noise_clamp,
            dtype,
            device,
            float(scheduler.init_noise_sigma),
        )
    elif tuple(latents.shape) != (1, channels, num_frames, height, width):
        raise ValueError(f"initial latents {tuple(latents.shape)} do not match the video")
    audio = audio_tokens.to(device=device, dtype=dtype).unsqueeze(0)
    if face_feature is not None:
        if not isinstance(face_feature, torch.Tensor):
            face_feature = face_feature[:]  # a LocatorTrack: one feature per frame
        if face_feature.shape[2] not in (1, num_frames):
            raise ValueError(
                f"face feature has {face_feature.shape[2]} frames, the video {num_frames}"
            )
        face_feature = face_feature.to(device=device, dtype=dtype)
    per_frame_face = face_feature is not None and face_feature.shape[2] > 1

    def face_at(idx: torch.Tensor) -> torch.Tensor | None:
        """The face feature of a window's frames."""
        return face_feature[:, :, idx] if per_frame_face else face_feature

    run = RunInputs(
        audio,
        face_feature,
        bank,
        tuple(int(t) for t in timesteps),
        do_cfg,
        (channels, height, width),
    )
    sampler.reset()
    sampler.on_run_start(run)
    if on_progress is not None:
        on_progress("denoise", 0, num_steps)

    def windows_at(layout_step: int) -> list[list[int]]:
        return context_windows(num_frames, cfg.context_frames, cfg.context_overlap, layout_step)

    def step_context(step_index: int, window_index: int, windows: list[list[int]], lead: int):
        return StepContext(
            step_index=step_index,
            num_steps=num_steps,
            timestep=run.timesteps[step_index],
            window_index=window_index,
            num_windows=len(windows),
            frames=tuple(windows[window_index]),
            cfg=do_cfg,
            group_start=lead,
        )

    def guide(pred: torch.Tensor) -> torch.Tensor:
        if not do_cfg:
            return pred
        uncond, cond = pred.chunk(2)
        return uncond + scale * (cond - uncond)

    def advance(step_index: int, guided: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        t = timesteps[step_index]
        latents = scheduler.step(guided, t, latents, eta=0.0).prev_sample
        if not torch.isfinite(latents).all():
            raise NonFiniteError(
                f"denoise: latents became NaN/inf at step {step_index + 1}/{num_steps} "
                f"(timestep {int(t)}); try float32 or another seed"
            )
        sampler.on_step_end(step_index, int(t), latents)
        if on_progress is not None:
            on_progress("denoise", step_index + 1, num_steps)
        return latents

    def one_step(step_index: int, lead: int, windows: list[list[int]], latents: torch.Tensor):
        """Predict every window of one step on ``latents``; returns the guided prediction."""
        t = timesteps[step_index]
        sampler.on_step_start(step_index, int(t))
        noise_pred = torch.zeros((rows, *latents.shape[1:]), device=device, dtype=dtype)
        counter = torch.zeros((1, 1, num_frames, 1, 1), device=device, dtype=dtype)
        for window_index, frames in enumerate(windows):
            ctx = step_context(step_index, window_index, windows, lead)
            idx = torch.tensor(frames, device=device)
            window_latents = scheduler.scale_model_input(latents[:, :, idx], t)
            pred = sampler.predict(window_latents, ctx, audio[:, idx], face_at(idx), bank)
            noise_pred[:, :, idx] += pred
            counter[:, :, idx] += 1
        return guide(noise_pred / counter)

    def batched_steps(
        steps: range, lead: int, windows: list[list[int]], inputs: list[torch.Tensor], limit: int
    ) -> list[torch.Tensor]:
        """Predict several steps at once per window, at most ``limit`` (0: all) per call;
        returns their guided predictions."""
        for s in steps:
            sampler.on_step_start(s, run.timesteps[s])
        n = len(steps)
        per_call = limit or n
        noise_pred = torch.zeros((n, rows, *inputs[0].shape[1:]), device=device, dtype=dtype)
        counter = torch.zeros((1, 1, 1, num_frames, 1, 1), device=device, dtype=dtype)
        for window_index, frames in enumerate(windows):
            idx = torch.tensor(frames, device=device)
            for lo in range(0, n, per_call):
                part = steps[lo : lo + per_call]
                ctxs = [step_context(s, window_index, windows, lead) for s in part]
                window_latents = torch.cat(
                    [
                        scheduler.scale_model_input(x[:, :, idx], timesteps[s])
                        for s, x in zip(part, inputs[lo : lo + per_call], strict=True)
                    ]
                )
                pred = sampler.predict_batch(
                    window_latents, ctxs, audio[:, idx], face_at(idx), bank
                )
                if pred.shape[:2] != (len(part), rows):
                    raise ValueError(
                        f"predict_batch returned {tuple(pred.shape)}, "
                        f"expected [{len(part)}, {rows}, ...]"
                    )
                noise_pred[lo : lo + len(part), :, :, idx] += pred
            counter[:, :, :, idx] += 1
        noise_pred = noise_pred / counter
        return [guide(noise_pred[i]) for i in range(n)]

    estimator: DDIMScheduler | None = None  # a copy: estimation must not touch run state
    with torch.no_grad():
        step_index = 0
        while step_index < num_steps:
            windows = windows_at(step_index)  # layout fixed for the whole group
            lead_input = latents
            lead_pred = one_step(step_index, step_index, windows, latents)
            latents = advance(step_index, lead_pred, latents)
            group = sampler.next_group(step_index, num_steps)  # may depend on the lead step
            if group.start != step_index or group.start + group.size > num_steps:
                raise ValueError(
                    f"sampler planned steps {group.start}..{group.start + group.size - 1} "
                    f"at step {step_index} of {num_steps}"
                )
            rest = group.steps[1:]
            if rest and not group.batched:
                for s in rest:
                    latents = advance(s, one_step(s, step_index, windows, latents), latents)
            elif rest:
                if estimator is None:
                    estimator = copy.deepcopy(scheduler)
                inputs = [latents]
                if group.estimate:
                    held = as_noise(estimator, lead_pred, timesteps[step_index], lead_input)
                for s in rest[:-1]:
                    x = inputs[-1]
                    if group.estimate:
                        t = timesteps[s]
                        x = estimator.step(noise_as(estimator, held, t, x), t, x, eta=0.0)
                        x = x.prev_sample
                    inputs.append(x)
                preds = batched_steps(rest, step_index, windows, inputs, group.batch_limit)
                for s, guided in zip(rest, preds, strict=True):
                    latents = advance(s, guided, latents)
            step_index = group.start + group.size
    return latents


def denoise_stream(
    denoiser: Denoiser,
    audio_tokens: torch.Tensor | FrameWindows,
    face_feature: torch.Tensor | LocatorTrack | None,
    bank: Bank | None,
    cfg: DenoiseConfig,
    latent_shape: Sequence[int],
    on_progress: ProgressFn | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    sampler: Sampler | None = None,
) -> Iterator[torch.Tensor]:
    """:func:`denoise` for videos of any length: yields finished latents ``[1, C, n, h, w]``
    in frame order, chunk by chunk (:func:`chunk_plan` with ``cfg.chunk_frames`` and
    ``cfg.chunk_overlap``), so only one chunk's latents live at a time.

    A video that fits one chunk is exactly :func:`denoise` (EchoMimic's noise draw).  A
    longer one starts every frame from :func:`frame_noise`; the frames two chunks share
    are cross-faded linearly from the earlier chunk's to the later one's, so there is no
    seam (both chunks denoise them from the same noise and audio).  ``audio_tokens`` may
    be :class:`~.audio.FrameWindows`, whose windows are then made one chunk at a time, and
    ``face_feature`` a :class:`~.motion.LocatorTrack`, likewise.
    """
    num_frames = audio_tokens.shape[0]
    plan = chunk_plan(num_frames, cfg.chunk_frames, cfg.chunk_overlap)

    def run(start: int, end: int, index: int, latents: torch.Tensor | None) -> torch.Tensor:
        def progress(stage: str, done: int, total: int) -> None:
            if on_progress is not None:
                on_progress(stage, index * total + done, len(plan) * total)

        face = face_feature
        if isinstance(face, torch.Tensor) and face.shape[2] > 1:
            face = face[:, :, start:end]
        elif face is not None and not isinstance(face, torch.Tensor):
            face = face[start:end]
        return denoise(
            denoiser,
            audio_tokens[start:end],
            face,
            bank,
            cfg,
            latent_shape,
            progress,
            dtype,
            device,
            sampler=sampler,
            latents=latents,
        )

    if len(plan) == 1:
        yield run(0, num_frames, 0, None)
        return
    sigma = float(make_scheduler(cfg.prediction_type or "v_prediction").init_noise_sigma)
    tail: torch.Tensor | None = None  # the previous chunk's frames from this chunk's start
    for index, (start, end) in enumerate(plan):
        noise = frame_noise(
            latent_shape, range(start, end), cfg.seed, cfg.noise_clamp, dtype, device, sigma
        )
        latents = run(start, end, index, noise)
        if tail is not None:
            n = tail.shape[2]
            ramp = torch.arange(1, n + 1, device=latents.device, dtype=latents.dtype) / (n + 1)
            ramp = ramp.view(1, 1, n, 1, 1)
            latents = torch.cat(
                [tail * (1 - ramp) + latents[:, :, :n] * ramp, latents[:, :, n:]], 2
            )
        if index + 1 < len(plan):
            keep = plan[index + 1][0] - start  # frames before the next chunk's start
            yield latents[:, :, :keep]
            tail = latents[:, :, keep:]
        else:
            yield latents
