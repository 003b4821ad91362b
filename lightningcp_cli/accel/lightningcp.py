"""LightningCP: key/non-key steps with parallel prediction, plus DFA and reference removal.

Key steps run the full denoiser; a forward hook on ``VideoUNet.last_layer_input`` keeps
the feature entering the last layer of the last up block, per context window.  Non-key
steps run only ``prepare`` (``conv_in`` + face feature: the fresh skip), that last layer
(resnet, reference + audio attention, motion module) and the output head on the kept
feature.  The non-key steps that follow a key step form one step group
(:class:`~lightningcp_cli.stages.denoise.StepGroup`): with ``parallel`` they run as ONE
batched call per window on input latents estimated with the key step's guided
prediction, and the loop then rolls the real latents out with each step's own
prediction.

Windows: the loop keeps a group's window layout (the baseline rotates windows by 2 frames
every step; here only at key steps), so a window's cached feature always belongs to
exactly its frames; the cache is keyed by window index and checked against the frames.

The sampler is the whole method (DeepCache-style facade): ``enable()`` installs the
processors (:mod:`.processors`) and the capture hook, ``disable()`` restores the model
exactly, ``set_params(...)`` changes settings; ``with sampler:`` does enable/disable.
:func:`apply_lightningcp` / :func:`remove_lightningcp` (name :data:`LIGHTNINGCP`) are the
functional spelling.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..config import AccelConfig, DFAConfig, LightningCPConfig
from ..errors import AccelerationError
from ..models.unet import VideoUNet
from ..stages.denoise import Bank, RunInputs, Sampler, StepContext, StepGroup
from . import hooks
from .dfa import foreground_indices, repeat_rows
from .dfa_blocks import wrap_transformers
from .processors import (
    ACCEL_EXTRAS_KEY,
    AccelCall,
    apply_accel_processors,
    remove_accel_processors,
    reset_accel_processors,
)
from .static_cache import StaticFeatures, audio_row_index

if TYPE_CHECKING:
    from ..models.bundle import TalkingHeadModel
    from ..stages.face import FaceAnalysis

#: Name of the LightningCP installation (capture hook) in the model's accel registry.
LIGHTNINGCP = "lcp.lightningcp"
#: Name of the whole-transformer DFA wrappers of the last layer (:mod:`.dfa_blocks`).
DFA_BLOCKS = "lcp.dfa_blocks"


# --------------------------------------------------------------------------- schedule


def is_key_step(step: int, num_steps: int, config: LightningCPConfig) -> bool:
    """Pure key-step rule of the ``uniform`` and ``list`` schedules.

    Step 0 and the first ``warmup`` steps are always key steps.  ``adaptive`` plans at run
    time (:func:`adaptive_interval`); here it only answers for those fixed steps.
    """
    if not 0 <= step < num_steps:
        raise ValueError(f"step {step} outside 0..{num_steps - 1}")
    if step == 0 or step < config.warmup:
        return True
    if config.schedule == "uniform":
        return step % config.interval == 0
    if config.schedule == "list":
        return step in config.key_steps
    return False


def key_steps(num_steps: int, config: LightningCPConfig) -> list[int]:
    """All key steps of a fixed (``uniform``/``list``) schedule."""
    if config.schedule == "adaptive":
        raise ValueError("the adaptive schedule is decided while sampling")
    return [s for s in range(num_steps) if is_key_step(s, num_steps, config)]


def adaptive_interval(change_per_step: float | None, threshold: float, max_interval: int) -> int:
    """Steps until the next key step: ``floor(threshold / change)`` in ``[1, max_interval]``.

    ``change_per_step`` is the relative feature change per step between the last two key
    steps; None (not measured yet) gives 1.
    """
    if change_per_step is None or math.isnan(change_per_step):
        return 1
    if change_per_step <= 0:
        return max_interval
    return int(min(max(math.floor(threshold / change_per_step + 1e-9), 1), max_interval))


# --------------------------------------------------------------------------- state


class FeatureCapture:
    """Forward hook on ``last_layer_input``: keeps its output while armed."""

    def __init__(self) -> None:
        self.armed = False
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.armed:
            self.value = output

    def arm(self) -> None:
        self.armed, self.value = True, None

    def take(self) -> torch.Tensor:
        self.armed = False
        value, self.value = self.value, None
        if value is None:
            raise AccelerationError("LightningCP: the key step never reached last_layer_input")
        return value

    def reset(self) -> None:
        self.armed, self.value = False, None


@dataclass(eq=False)
class WindowFeature:
    """One window's cached last-layer input: ``[(rows f), C, H, W]`` from key step ``step``."""

    frames: tuple[int, ...]
    feature: torch.Tensor
    step: int
    rows: int


class LightningCPState:
    """Per-run state: window features, feature-change statistics (adaptive), counters."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.windows: dict[Hashable, WindowFeature] = {}
        self.frame_features: dict[int, torch.Tensor] = {}  # last key step's, per frame
        self.frame_step: int | None = None
        self.change_num = 0.0
        self.change_den = 0.0
        self.change_per_step: float | None = None
        self.key_calls = 0
        self.cheap_calls = 0
        self.cheap_steps = 0
        self.key_steps: list[int] = []

    def free(self) -> None:
        """Drop the cached tensors, keep the counters (``stats()`` after ``disable()``)."""
        self.windows.clear()
        self.frame_features.clear()

    def record_change(self, frames: Sequence[int], feature: torch.Tensor, rows: int, step: int):
        """Accumulate ||new - old||^2 and ||old||^2 over frames seen at the previous key step."""
        f = len(frames)
        per_frame = feature.view(rows, f, *feature.shape[1:]).transpose(0, 1)
        for j, frame in enumerate(frames):
            old = self.frame_features.get(frame)
            new = per_frame[j].float()
            if old is not None and self.frame_step is not None and self.frame_step < step:
                self.change_num += float((new - old).pow(2).sum())
                self.change_den += float(old.pow(2).sum())
            self.frame_features[frame] = new

    def close_key_step(self, step: int) -> None:
        """After all windows of key step ``step``: the per-step relative change."""
        if self.frame_step is not None and self.change_den > 0 and step > self.frame_step:
            gap = step - self.frame_step
            self.change_per_step = math.sqrt(self.change_num / self.change_den) / gap
        self.change_num = self.change_den = 0.0
        self.frame_step = step


# --------------------------------------------------------------------------- sampler


def _face_fill(face_feature: torch.Tensor | None, repeat: int, cfg: bool):
    if face_feature is None:
        return None
    face = face_feature.expand(repeat, *face_feature.shape[1:])
    return torch.cat([torch.zeros_like(face), face]) if cfg else face


class LightningCPSampler(Sampler):
    """LightningCP (+ optional DFA, reference removal, static-feature caching).

    ``denoiser``: a :class:`VideoUNet`.  ``config``: key schedule and prediction mode.
    ``dfa``: settings, or None for no DFA; ``foreground``: the foreground coverage on the
    latent grid ``[h, w]`` in [0, 1] (``FaceAnalysis.latent_mask("foreground",
    codec_factor, soft=True)``), needed for DFA (without it DFA stays off).
    ``drop_reference``: bank keys (block paths) that run without the reference bank.
    """

    def __init__(
        self,
        denoiser: VideoUNet,
        config: LightningCPConfig | None = None,
        *,
        dfa: DFAConfig | None = None,
        foreground: torch.Tensor | np.ndarray | None = None,
        drop_reference: Sequence[str] = (),
    ) -> None:
        if not isinstance(denoiser, VideoUNet):
            raise AccelerationError("LightningCP needs a VideoUNet denoiser")
        super().__init__(denoiser)
        self.model: VideoUNet = denoiser
        self.config = config or LightningCPConfig()
        self.dfa = dfa
        self.foreground = None if foreground is None else torch.as_tensor(np.asarray(foreground))
        self.drop_reference = self._check_drop(drop_reference)
        self.state = LightningCPState()
        self.static = StaticFeatures()
        self.capture = FeatureCapture()
        self._processors: dict[str, Any] | None = None
        self._block_stores: list = []
        self._indices: dict[int, torch.Tensor | None] = {}
        self._bank_in: Bank | None = None
        self._bank_out: Bank | None = None
        self._dfa_layers = self._last_layer_prefixes()

    # ---------------------------------------------------------------- facade

    @property
    def enabled(self) -> bool:
        return self._processors is not None

    def enable(self) -> LightningCPSampler:
        """Install processors and the capture hook (harmless when already enabled)."""
        if self.enabled:
            return self
        model = self.model

        def do():
            handle = model.last_layer_input.register_forward_hook(self.capture)
            return handle.remove, None

        hooks.install(model, LIGHTNINGCP, self, do)
        try:
            self._processors = apply_accel_processors(model, self)
            prefixes = self._dfa_layers
            self._block_stores = hooks.install(
                model, DFA_BLOCKS, self, lambda: wrap_transformers(model, prefixes)
            ).value
        except Exception:
            remove_accel_processors(model, self)
            hooks.uninstall(model, LIGHTNINGCP, self)
            self._processors = None
            raise
        self.reset()
        return self

    def disable(self) -> None:
        """Restore the original processors and forwards; drop all caches (keep ``stats()``)."""
        self._free()
        hooks.uninstall(self.model, DFA_BLOCKS, self)
        remove_accel_processors(self.model, self)
        hooks.uninstall(self.model, LIGHTNINGCP, self)
        self._processors = None
        self._block_stores = []

    def set_params(self, **changes: Any) -> LightningCPSampler:
        """Change settings: ``LightningCPConfig`` fields, ``dfa`` (a DFAConfig or None),
        ``drop_reference``.  Validated like the config; caches are dropped."""
        if "dfa" in changes:
            self.dfa = changes.pop("dfa")
        if "drop_reference" in changes:
            self.drop_reference = self._check_drop(changes.pop("drop_reference"))
        if changes:
            self.config = dataclasses.replace(self.config, **changes)
        self.reset()
        return self

    # ---------------------------------------------------------------- Sampler hooks

    def reset(self) -> None:
        self.state.reset()
        self._free()

    def _free(self) -> None:
        self.state.free()
        self.static.reset()
        self.capture.reset()
        if self._processors is not None:
            reset_accel_processors(self._processors)
        for store in self._block_stores:
            store.reset()
        self._indices = {}
        self._bank_in = self._bank_out = None

    def on_run_start(self, inputs: RunInputs) -> None:
        if not self.enabled:
            raise AccelerationError("LightningCP: enable() the sampler (or use `with`) first")
        if self.config.static_cache:
            self.static.set_audio(inputs.audio)
        if self.dfa is not None and self.foreground is not None:
            _, h, w = inputs.latent_shape
            if tuple(self.foreground.shape) != (h, w):
                raise AccelerationError(
                    f"DFA foreground is {tuple(self.foreground.shape)}, the latent grid {(h, w)}"
                )
            levels = self.model.config.num_blocks
            self._indices = foreground_indices(
                self.foreground, levels, self.dfa, device=inputs.audio.device
            )

    def next_group(self, step_index: int, num_steps: int) -> StepGroup:
        cfg = self.config
        if cfg.schedule == "adaptive":
            size = 1  # the next step is still a warmup key step
            if step_index + 1 >= cfg.warmup:
                size = adaptive_interval(
                    self.state.change_per_step, cfg.threshold, cfg.max_interval
                )
            size = min(size, num_steps - step_index)
        else:
            size = 1
            while step_index + size < num_steps and not is_key_step(
                step_index + size, num_steps, cfg
            ):
                size += 1
        return StepGroup(
            step_index,
            size,
            batched=cfg.parallel,
            estimate=cfg.estimate,
            batch_limit=cfg.batch_limit,
        )

    def on_step_end(self, step_index: int, timestep: int, latents: torch.Tensor) -> None:
        if step_index in self.state.key_steps and self.config.schedule == "adaptive":
            self.state.close_key_step(step_index)

    # ---------------------------------------------------------------- predictions

    def predict(
        self,
        latents: torch.Tensor,
        ctx: StepContext,
        audio: torch.Tensor,
        face_feature: torch.Tensor | None,
        bank: Bank | None,
    ) -> torch.Tensor:
        if not ctx.is_lead:
            return self.predict_batch(latents, [ctx], audio, face_feature, bank)[0]
        return self._key(latents, ctx, audio, face_feature, bank)

    def predict_batch(
        self,
        latents: torch.Tensor,
        ctxs: Sequence[StepContext],
        audio: torch.Tensor,
        face_feature: torch.Tensor | None,
        bank: Bank | None,
    ) -> torch.Tensor:
        """Non-key steps of one window in one call: ``[S, rows, C, f, h, w]``."""
        s = len(ctxs)
        if s == 0 or latents.shape[0] != s:
            raise ValueError(f"{latents.shape[0]} latents for {s} steps")
        ctx0 = ctxs[0]
        if any(c.is_lead for c in ctxs):
            raise AccelerationError("LightningCP: a key step cannot be batched")
        cached = self.state.windows.get(ctx0.window_index)
        for c in ctxs:
            if cached is None or cached.frames != c.frames or cached.step != c.group_start:
                raise AccelerationError(
                    f"LightningCP: no key-step feature for window {c.window_index} "
                    f"(frames {c.frames[:3]}…) of step group {c.group_start}"
                )
        rows = 2 if ctx0.cfg else 1
        sample, timestep, audio_in, face_in, ref_rows = self._inputs(
            latents, [c.timestep for c in ctxs], audio, face_feature, ctx0.cfg
        )
        call = self._call(ctx0, s, rows, "reuse")
        state = self.model.prepare(
            sample,
            timestep,
            audio_in,
            face_in,
            self._bank(bank),
            ref_rows,
            extras={ACCEL_EXTRAS_KEY: call},
        )
        h = repeat_rows(cached.feature, rows, s)
        out = self.model.run_head(state, self.model.run_last_layer(state, h))
        self.state.cheap_calls += 1
        self.state.cheap_steps += s
        return out.view(rows, s, *out.shape[1:]).transpose(0, 1)

    def _key(self, latents, ctx: StepContext, audio, face_feature, bank) -> torch.Tensor:
        rows = 2 if ctx.cfg else 1
        sample, timestep, audio_in, face_in, ref_rows = self._inputs(
            latents, [ctx.timestep], audio, face_feature, ctx.cfg
        )
        call = self._call(ctx, 1, rows, "record")
        self.capture.arm()
        try:
            out = self.model(
                sample,
                timestep,
                audio_in,
                face_in,
                self._bank(bank),
                ref_rows,
                extras={ACCEL_EXTRAS_KEY: call},
            )
            feature = self.capture.take()
        finally:
            self.capture.reset()
        self.state.windows[ctx.window_index] = WindowFeature(
            ctx.frames, feature, ctx.step_index, rows
        )
        if not self.state.key_steps or self.state.key_steps[-1] != ctx.step_index:
            self.state.key_steps.append(ctx.step_index)
        if self.config.schedule == "adaptive":
            self.state.record_change(ctx.frames, feature, rows, ctx.step_index)
        self.state.key_calls += 1
        return out

    # ---------------------------------------------------------------- helpers

    def _inputs(self, latents, timesteps: list[int], audio, face_feature, cfg: bool):
        """Model inputs for ``S`` steps of one window, rows ordered (CFG row, step).

        For one step this is exactly the plain :class:`Sampler`'s batch.
        """
        s = latents.shape[0]
        device = latents.device
        if s == 1:
            timestep = torch.tensor(timesteps[0], dtype=torch.long, device=device)
        else:
            timestep = torch.tensor(timesteps * (2 if cfg else 1), dtype=torch.long, device=device)
        audio_s = audio.expand(s, *audio.shape[1:])
        if not cfg:
            ref_rows = torch.tensor([True] * s, device=device)
            return latents, timestep, audio_s, _face_fill(face_feature, s, False), ref_rows
        sample = torch.cat([latents, latents])
        audio_in = torch.cat([torch.zeros_like(audio_s), audio_s])
        ref_rows = torch.tensor([False] * s + [True] * s, device=device)
        return sample, timestep, audio_in, _face_fill(face_feature, s, True), ref_rows

    def _call(self, ctx: StepContext, repeat: int, rows: int, mode: str) -> AccelCall:
        static = self.static if self.config.static_cache else None
        audio_rows = None
        if static is not None:
            conditional = [False] * repeat + [True] * repeat if rows == 2 else [True] * repeat
            audio_rows = audio_row_index(
                ctx.frames, conditional, static.zero_row, self.static.audio.device
            )
        use_dfa = self.dfa is not None and bool(self._indices)
        return AccelCall(
            static=static,
            audio_rows=audio_rows,
            dfa=self.dfa if use_dfa else None,
            dfa_mode=mode if use_dfa else None,
            dfa_layers=self._dfa_layers,
            slot=ctx.window_index,
            repeat=repeat,
            foreground=self._indices,
        )

    def _bank(self, bank: Bank | None) -> Bank | None:
        """``bank`` without the dropped layers (the same dict object per input bank)."""
        if bank is None or not self.drop_reference:
            return bank
        if self._bank_in is not bank:
            drop = set(self.drop_reference)
            self._bank_in = bank
            self._bank_out = {k: v for k, v in bank.items() if k not in drop}
        return self._bank_out

    def _check_drop(self, names: Sequence[str]) -> tuple[str, ...]:
        names = tuple(names)
        unknown = sorted(set(names) - set(self.model.bank_keys))
        if unknown:
            raise AccelerationError(
                f"drop_reference: {unknown[:3]} are not reference layers of this model"
            )
        return names

    def _last_layer_prefixes(self) -> tuple[str, ...]:
        """Module paths of the last layer (the only one that runs at non-key steps)."""
        i = len(self.model.up_blocks) - 1
        j = self.model.up_blocks[i].num_layers - 1
        return (f"up_blocks.{i}.attentions.{j}.", f"up_blocks.{i}.motion_modules.{j}.")

    def stats(self) -> dict[str, Any]:
        """Counters of the last run: key/cheap calls, key steps, adaptive change."""
        st = self.state
        return {
            "key_steps": list(st.key_steps),
            "key_calls": st.key_calls,
            "cheap_calls": st.cheap_calls,
            "cheap_steps": st.cheap_steps,
            "change_per_step": st.change_per_step,
        }


# --------------------------------------------------------------------------- functional API


def apply_lightningcp(
    model: VideoUNet, config: LightningCPConfig | None = None, **kwargs: Any
) -> LightningCPSampler:
    """Build and enable a :class:`LightningCPSampler` on ``model`` (kwargs: see the class)."""
    return LightningCPSampler(model, config, **kwargs).enable()


def remove_lightningcp(model: VideoUNet) -> bool:
    """Disable whichever LightningCP sampler is installed on ``model``."""
    entry = hooks.installed(model, LIGHTNINGCP)
    if entry is None:
        return False
    owner = entry.owner
    if isinstance(owner, LightningCPSampler):
        owner.disable()
    else:
        hooks.uninstall(model, LIGHTNINGCP)
    return True


# --------------------------------------------------------------------------- factories


def _foreground(model: TalkingHeadModel, face: FaceAnalysis | None) -> np.ndarray | None:
    if face is None:
        return None
    return face.latent_mask("foreground", model.spec.codec_factor, soft=True)


def build_lightningcp(
    model: TalkingHeadModel, face: FaceAnalysis | None, config: AccelConfig
) -> LightningCPSampler:
    return LightningCPSampler(model.denoiser, config.lightningcp)


def build_lightningcp_dfa(
    model: TalkingHeadModel, face: FaceAnalysis | None, config: AccelConfig
) -> LightningCPSampler:
    return LightningCPSampler(
        model.denoiser, config.lightningcp, dfa=config.dfa, foreground=_foreground(model, face)
    )


def build_full(
    model: TalkingHeadModel, face: FaceAnalysis | None, config: AccelConfig
) -> LightningCPSampler:
    """LightningCP + DFA + reference removal in ``config.drop_reference`` (none yet)."""
    return LightningCPSampler(
        model.denoiser,
        config.lightningcp,
        dfa=config.dfa,
        foreground=_foreground(model, face),
        drop_reference=config.drop_reference,
    )


__all__ = [
    "LIGHTNINGCP",
    "FeatureCapture",
    "LightningCPSampler",
    "LightningCPState",
    "WindowFeature",
    "adaptive_interval",
    "apply_lightningcp",
    "build_full",
    "build_lightningcp",
    "build_lightningcp_dfa",
    "is_key_step",
    "key_steps",
    "remove_lightningcp",
]
