"""Peer accelerations that LightningCP is compared against, on the same model and loop.

Each peer is a frozen ``@dataclass`` config (validated in ``__post_init__``; the "off"
setting gives the exact unaccelerated output), an ``apply_<peer>(unet, config)`` /
``remove_<peer>(unet)`` pair that installs and removes it by a name constant, and a
:class:`~lightningcp_cli.stages.denoise.Sampler` subclass that drives it from the
denoising loop (step index, timestep and window position come from ``StepContext``,
never from globals or timestep look-ups).  Samplers have DeepCache's facade:
``enable()`` (harmless twice), ``disable()`` (restores the original forwards and
processors exactly), ``set_params(**fields)``, plus ``reset()``/``close()`` and ``with``.
A sampler installs itself on ``reset()`` (the start of every ``denoise`` run) and removes
itself after the last step; its hooks only act inside its own ``predict`` calls, so a
run that dies half-way leaves inert pass-through hooks behind (removed on the next
``apply_``/``remove_``).

Peers (``PEERS`` maps the registry name to a sampler factory):

``deepcache``
    DeepCache (Ma et al. 2023) as its ``DeepCacheSDHelper`` does it: every
    ``cache_interval``-th step (step index % interval == 0) runs the whole UNet and
    caches module outputs; the other steps run only the shallow branch ``cache_branch_id``
    = (block ``b // L``, layer ``b % L``), ``L`` = layers per down block incl. the
    downsampler (3 in SD; ``layers_per_block + 1`` here): down-path modules at or after
    that (block, layer), the mid block, and up-path modules deeper than the mirrored
    position return their cached outputs, so the up path restarts from the cached deep
    feature with fresh shallow skips.  The skip rule is :func:`deepcache_skips` (a pure
    predicate).  Not the pip package: ``DeepCache`` (PyPI 0.1.1, not installed here) patches
    ``pipe.unet`` of diffusers pipelines, finds the step by looking the timestep up in
    ``pipe.scheduler.timesteps``, iterates ``block.attentions`` (None in our attention-free
    blocks), does not know motion modules (it would re-run them on cached inputs) and keeps
    one cache per module, which would mix the sliding context windows.  This is a faithful
    re-implementation with diffusers ``ModelHook``s on our ``VideoUNet``; motion modules
    are treated like the attention of their layer, and caches are keyed by
    ``StepContext.window_index`` (never shared across windows).

``tome``
    Token Merging for SD (Bolya & Hoffman 2023, ``tomesd`` with its defaults: ratio 0.5,
    ``sx = sy = 2``, ``max_downsample = 1``, self-attention only, ``use_rand=False``).
    ``tomesd`` is not installed and would not patch our blocks (it swaps the class of
    diffusers ``BasicTransformerBlock``s), so this is an adapter written from the paper's
    algorithm: per frame, tokens are split into destination tokens (the top-left token of
    every 2x2 cell, deterministic) and source tokens; the ``r = int(N * ratio)`` source
    tokens most cosine-similar (on the block's input, as tomesd) to a destination are
    averaged into it before ``attn1``, and ``attn1``'s output is copied back to the merged
    tokens after it.  It is an attention processor wrapping the model's own
    ``ReferenceAttnProcessor`` (a forward pre-hook on the transformer block hands it the
    block input as the similarity metric), so queries and own keys/values are the merged
    tokens and the reference bank's tokens are appended unmerged.  Stateless across steps.

``pab``
    Pyramid Attention Broadcast (Zhao et al. 2024) through diffusers' own hook
    (``apply_pyramid_attention_broadcast``), with identifiers for our module names
    (spatial = ``attn1``, cross = audio ``attn2``, temporal = motion-module attention;
    diffusers' defaults would classify the motion modules' ``transformer_blocks`` as
    spatial).  Defaults follow the PAB reference config (VideoSys): spatial every 2nd,
    temporal every 3rd, cross every 5th call recomputed inside timesteps (100, 800) /
    (100, 800) / (100, 900).  The timestep callback reads the sampler's current
    ``StepContext``.  diffusers' hook keeps ONE state per module (its ``cache_context``
    does not key PAB state), which would broadcast window A's attention into window B, so
    the sampler swaps a per-window ``PyramidAttentionBroadcastState`` into every hook
    before each window's call: each window position keeps its own iteration count and
    cache.

``fewer-steps``
    Not a sampler: the baseline with fewer DDIM steps, chosen by ``lcp bench`` to take
    the same denoise time as another method (see :func:`parse_fewer_steps` and
    :func:`matched_steps`; ``bench/runner.py`` runs it last).

Window positions rotate by two frames per step (``context_windows``), so a cache kept per
window position holds features of frames shifted by two frames per step since it was
filled.  The loop can hold a layout over a step group (``Sampler.next_group``), which is
what LightningCP's key steps get: DeepCache holds it from each full step through its
cached steps (``align_windows``, default on); PAB's per-type periods (2/3/5) have no
common group, so it rotates as the baseline unless ``hold_windows`` > 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import AccelerationError
from ..models.unet import TransformerBlock, VideoUNet
from ..stages.denoise import Bank, Denoiser, Sampler, StepContext, StepGroup

__all__ = [
    "DEEPCACHE_HOOK",
    "FEWER_STEPS",
    "PAB_HOOK",
    "PEERS",
    "DeepCacheConfig",
    "DeepCacheSampler",
    "PABConfig",
    "PABSampler",
    "PeerSampler",
    "ToMeAttnProcessor",
    "ToMeConfig",
    "ToMeSampler",
    "apply_deepcache",
    "apply_pab",
    "apply_tome",
    "bipartite_soft_matching_2d",
    "build_deepcache",
    "build_pab",
    "build_tome",
    "deepcache_branch",
    "deepcache_skips",
    "make_peer_sampler",
    "matched_steps",
    "parse_fewer_steps",
    "remove_deepcache",
    "remove_pab",
    "remove_tome",
]

#: Hook names (diffusers ``HookRegistry``) under which the hook peers are installed.
DEEPCACHE_HOOK = "lcp_deepcache"
PAB_HOOK = "pyramid_attention_broadcast"  # diffusers' own constant for its PAB hook
#: Bench method name of the "fewer DDIM steps at the same wall time" peer.
FEWER_STEPS = "fewer-steps"


def _video_unet(denoiser: Any) -> VideoUNet:
    if not isinstance(denoiser, VideoUNet):
        raise AccelerationError(
            f"peer accelerations wrap a VideoUNet, got {type(denoiser).__name__}"
        )
    return denoiser


# --------------------------------------------------------------------------- hook plumbing


def _hooks() -> tuple[type, type]:
    try:
        from diffusers.hooks import HookRegistry, ModelHook
    except ImportError as err:  # pragma: no cover - diffusers < 0.33
        raise AccelerationError(f"this acceleration needs diffusers >= 0.33 ({err})") from None
    return HookRegistry, ModelHook


def _remove_named_hook(root: nn.Module, name: str) -> int:
    """Remove hook ``name`` from every module under ``root``; drop emptied registries and
    the instance ``forward`` diffusers leaves behind, so the modules are as built."""
    removed = 0
    for module in root.modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is None:
            continue
        if name in registry.hooks:
            registry.remove_hook(name, recurse=False)
            removed += 1
        if not registry.hooks:
            del module._diffusers_hook
            fwd = module.__dict__.get("forward")
            if getattr(fwd, "__self__", None) is module and getattr(
                fwd, "__func__", None
            ) is getattr(type(module).forward, "__func__", type(module).forward):
                del module.forward
    return removed


def _first_shape(args: tuple[Any, ...]) -> tuple[int, ...] | None:
    return tuple(args[0].shape) if args and torch.is_tensor(args[0]) else None


# --------------------------------------------------------------------------- the facade


class PeerSampler(Sampler):
    """A :class:`Sampler` that installs a peer on its denoiser (a ``VideoUNet``).

    DeepCache-style facade: :meth:`enable`/:meth:`disable`/:meth:`set_params`.  Subclasses
    implement ``_install``/``_uninstall``/``_clear`` and may wrap the model call in
    ``_window`` (a context manager around one window's ``predict``).
    """

    name: ClassVar[str] = ""

    def __init__(self, denoiser: Denoiser, config: Any) -> None:
        super().__init__(denoiser)
        self.unet = _video_unet(denoiser)
        self.config = config
        self.enabled = False
        self._num_steps: int | None = None

    # facade ------------------------------------------------------------------------
    def enable(self) -> PeerSampler:
        if not self.enabled:
            self._install()
            self.enabled = True
        return self

    def disable(self) -> None:
        if self.enabled:
            self._uninstall()
            self.enabled = False
        self._clear()

    def set_params(self, **changes: Any) -> None:
        """Replace config fields (validated); re-installs when enabled."""
        was = self.enabled
        self.disable()
        self.config = replace(self.config, **changes)
        if was:
            self.enable()

    close = disable

    # Sampler seam ----------------------------------------------------------------------
    def reset(self) -> None:
        self._clear()
        self._num_steps = None
        self.enable()

    def next_group(self, step_index: int, num_steps: int) -> StepGroup:
        """Steps that share one window layout (windows rotate only at a group's start)."""
        size = max(1, min(self._hold(step_index), num_steps - step_index))
        return StepGroup(step_index, size)

    def on_step_end(self, step_index: int, timestep: int, latents: torch.Tensor) -> None:
        if self._num_steps is not None and step_index >= self._num_steps - 1:
            self.disable()  # leave the shared model as built after the run

    def predict(
        self,
        latents: torch.Tensor,
        ctx: StepContext,
        audio: torch.Tensor,
        face_feature: torch.Tensor | None,
        bank: Bank | None,
    ) -> torch.Tensor:
        self.enable()
        self._num_steps = ctx.num_steps
        with self._window(ctx):
            return super().predict(latents, ctx, audio, face_feature, bank)

    # subclass API ------------------------------------------------------------------------
    def _install(self) -> None:
        raise NotImplementedError

    def _uninstall(self) -> None:
        raise NotImplementedError

    def _clear(self) -> None:
        """Drop per-run caches."""

    def _hold(self, step_index: int) -> int:
        """How many steps from ``step_index`` on keep its window layout (1: rotate as usual)."""
        return 1

    def _window(self, ctx: StepContext):  # a context manager
        return _Active(self, ctx)


class _Active:
    """Marks a sampler's run state active for one model call (hooks act only then)."""

    def __init__(self, sampler: PeerSampler, ctx: StepContext) -> None:
        self.run = getattr(sampler, "run", None)
        self.ctx = ctx

    def __enter__(self) -> None:
        if self.run is not None:
            self.run.begin(self.ctx)

    def __exit__(self, *exc: object) -> None:
        if self.run is not None:
            self.run.end()


# --------------------------------------------------------------------------- DeepCache


@dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache's ``set_params``: ``cache_interval`` N (a full step every N steps; 1 = off)
    and ``cache_branch_id`` (the shallow branch kept live at cached steps; 0 = shallowest).
    Defaults: DeepCache's SD example (3, 0).  Only the "uniform" skip mode exists.

    ``align_windows``: hold the context-window layout from each full step through the
    cached steps after it (the loop's step groups, as LightningCP's key steps get), so a
    window's cached features belong to the same frames; False rotates the windows every
    step as the baseline does (the cache then lags two frames per step)."""

    cache_interval: int = 3
    cache_branch_id: int = 0
    align_windows: bool = True

    def __post_init__(self) -> None:
        if self.cache_interval < 1:
            raise ValueError(f"cache_interval must be >= 1, not {self.cache_interval}")
        if self.cache_branch_id < 0:
            raise ValueError(f"cache_branch_id must be >= 0, not {self.cache_branch_id}")


def deepcache_branch(branch_id: int, layers_per_block: int, num_blocks: int) -> tuple[int, int]:
    """Branch id -> (block, layer): ``divmod(branch_id, layers_per_block + 1)`` (SD: ``% 3``)."""
    per_block = layers_per_block + 1
    if not 0 <= branch_id < num_blocks * per_block:
        raise ValueError(
            f"cache_branch_id must be in [0, {num_blocks * per_block}) for this UNet, "
            f"not {branch_id}"
        )
    return divmod(branch_id, per_block)


def deepcache_skips(
    step_index: int,
    blocktype: str,
    block_i: int,
    layer_i: int,
    cache_interval: int,
    cache_block: int,
    cache_layer: int,
) -> bool:
    """DeepCache's ``is_skip_step``: does the module at (``blocktype``, block, layer) return
    its cached output at ``step_index``?  Full steps are ``step_index % interval == 0``.
    Down path: skipped from (cache_block, cache_layer) on; mid block: always; up path
    (block/layer counted from the output end): skipped deeper than (cache_block, cache_layer).
    """
    if step_index % cache_interval == 0:
        return False
    if blocktype == "mid" or block_i > cache_block:
        return True
    if block_i < cache_block:
        return False
    return layer_i >= cache_layer if blocktype == "down" else layer_i > cache_layer


@dataclass(frozen=True)
class _Position:
    path: str  # module path inside the UNet (cache key)
    blocktype: str  # "down" | "mid" | "up"
    block: int
    layer: int
    parent: tuple[str, int, int] | None  # the enclosing block wrapper's position


@dataclass(eq=False)
class _DeepCacheRun:
    """Shared state of the DeepCache hooks of one UNet."""

    config: DeepCacheConfig
    cache_block: int
    cache_layer: int
    active: bool = False
    step_index: int = 0
    window_index: int = 0
    cache: dict[tuple[int, str], tuple[tuple[int, ...] | None, Any]] = field(default_factory=dict)
    computed: int = 0  # hooked module calls that ran
    reused: int = 0  # hooked module calls answered from the cache

    def begin(self, ctx: StepContext) -> None:
        self.active, self.step_index, self.window_index = True, ctx.step_index, ctx.window_index

    def end(self) -> None:
        self.active = False

    def skips(self, blocktype: str, block: int, layer: int, step_index: int | None = None) -> bool:
        step = self.step_index if step_index is None else step_index
        return deepcache_skips(
            step,
            blocktype,
            block,
            layer,
            self.config.cache_interval,
            self.cache_block,
            self.cache_layer,
        )

    def clear(self) -> None:
        self.cache.clear()
        self.computed = self.reused = 0


def _deepcache_hook_class() -> type:
    _, ModelHook = _hooks()

    class DeepCacheHook(ModelHook):
        """Returns the module's cached output (for this window) at a cached step."""

        _is_stateful = True

        def __init__(self, run: _DeepCacheRun, pos: _Position) -> None:
            super().__init__()
            self.run, self.pos = run, pos
            # store only where the cached steps cut in: skippable, parent not skipped
            probe = 1 if run.config.cache_interval > 1 else 0
            skippable = run.skips(pos.blocktype, pos.block, pos.layer, probe)
            parent = pos.parent is not None and run.skips(*pos.parent, probe)
            self.store = skippable and not parent

        def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            run, pos = self.run, self.pos
            if not run.active:
                return self.fn_ref.original_forward(*args, **kwargs)
            key = (run.window_index, pos.path)
            shape = _first_shape(args)
            if run.skips(pos.blocktype, pos.block, pos.layer):
                hit = run.cache.get(key)
                if hit is not None and hit[0] == shape:
                    run.reused += 1
                    return hit[1]
            out = self.fn_ref.original_forward(*args, **kwargs)
            run.computed += 1
            if self.store:
                run.cache[key] = (shape, out)
            return out

        def reset_state(self, module: nn.Module) -> nn.Module:
            self.run.clear()
            return module

    return DeepCacheHook


def _deepcache_positions(unet: VideoUNet) -> Iterator[tuple[nn.Module, _Position]]:
    """The modules DeepCacheSDHelper wraps, with its (blocktype, block, layer) numbering;
    motion modules share their layer's position."""
    for i, block in enumerate(unet.down_blocks):
        parent = ("down", i, 0)
        for j in range(len(block.resnets)):
            for kind in ("resnets", "attentions", "motion_modules"):
                mods = getattr(block, kind)
                if mods is not None:
                    yield mods[j], _Position(f"down_blocks.{i}.{kind}.{j}", "down", i, j, parent)
        if block.downsamplers is not None:
            pos = _Position(
                f"down_blocks.{i}.downsamplers.0", "down", i, len(block.resnets), parent
            )
            yield block.downsamplers[0], pos
        yield block, _Position(f"down_blocks.{i}", "down", i, 0, None)
    yield unet.mid_block, _Position("mid_block", "mid", 0, 0, None)
    n = len(unet.up_blocks)
    for k, block in enumerate(unet.up_blocks):
        i, layers = n - 1 - k, block.num_layers
        parent = ("up", i, 0)
        for j in range(layers):
            for kind in ("resnets", "attentions", "motion_modules"):
                mods = getattr(block, kind)
                if mods is not None:
                    pos = _Position(f"up_blocks.{k}.{kind}.{j}", "up", i, layers - 1 - j, parent)
                    yield mods[j], pos
        if block.upsamplers is not None:
            yield block.upsamplers[0], _Position(f"up_blocks.{k}.upsamplers.0", "up", i, 0, parent)
        yield block, _Position(f"up_blocks.{k}", "up", i, 0, None)


def apply_deepcache(unet: VideoUNet, config: DeepCacheConfig) -> _DeepCacheRun:
    """Install DeepCache hooks (name :data:`DEEPCACHE_HOOK`); returns their shared state.
    The hooks pass through unless the state is ``active`` (set per call by the sampler)."""
    unet = _video_unet(unet)
    HookRegistry, _ = _hooks()
    block, layer = deepcache_branch(
        config.cache_branch_id, unet.config.layers_per_block, unet.config.num_blocks
    )
    remove_deepcache(unet)
    run = _DeepCacheRun(config, block, layer)
    hook_cls = _deepcache_hook_class()
    for module, pos in _deepcache_positions(unet):
        HookRegistry.check_if_exists_or_initialize(module).register_hook(
            hook_cls(run, pos), DEEPCACHE_HOOK
        )
    return run


def remove_deepcache(unet: nn.Module) -> None:
    _remove_named_hook(unet, DEEPCACHE_HOOK)


class DeepCacheSampler(PeerSampler):
    """DeepCache on the denoising loop; caches per window position (see module doc)."""

    name = "deepcache"

    def __init__(self, denoiser: Denoiser, config: DeepCacheConfig | None = None) -> None:
        super().__init__(denoiser, config or DeepCacheConfig())
        self.run: _DeepCacheRun | None = None

    def _install(self) -> None:
        self.run = apply_deepcache(self.unet, self.config)

    def _hold(self, step_index: int) -> int:
        n = self.config.cache_interval
        return n if self.config.align_windows and step_index % n == 0 else 1

    def _uninstall(self) -> None:
        remove_deepcache(self.unet)

    def _clear(self) -> None:
        if self.run is not None:
            self.run.clear()


# --------------------------------------------------------------------------- ToMe


@dataclass(frozen=True)
class ToMeConfig:
    """tomesd's ``apply_patch`` arguments that apply here (defaults: tomesd's).

    ``ratio``: fraction of a layer's tokens removed by merging (0 = off; at most
    ``1 - 1/(sx*sy)`` take effect).  ``max_downsample``: only layers whose token grid is
    at most this much smaller than the latent (1 = full-resolution layers only).  Random
    destination choice is off (tomesd ``use_rand=False``): the top-left of every cell.
    """

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ToMe ratio must be in [0, 1), not {self.ratio}")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"max_downsample must be 1, 2, 4 or 8, not {self.max_downsample}")
        if self.sx < 1 or self.sy < 1:
            raise ValueError("ToMe strides sx, sy must be >= 1")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def bipartite_soft_matching_2d(
    metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """ToMe's bipartite soft matching on ``[B, h*w, C]`` tokens (raster order).

    Destination set: the top-left token of every complete ``sy x sx`` cell; all other
    tokens are sources.  Each source is matched to its most cosine-similar destination;
    the ``r`` best-matched sources are averaged into their destinations (unweighted mean,
    destination included).  Returns ``merge(x) -> [B, N - r, C]`` (kept sources, then
    destinations) and ``unmerge(y) -> [B, N, C]`` (merged tokens get their destination's
    value).  ``r <= 0`` gives identities.
    """
    b, n, _ = metric.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not form a {h}x{w} grid")
    if r <= 0:
        return _identity, _identity
    device = metric.device
    is_dst = torch.zeros(h, w, dtype=torch.bool, device=device)
    is_dst[: (h // sy) * sy : sy, : (w // sx) * sx : sx] = True
    is_dst = is_dst.flatten()
    dst_pos = is_dst.nonzero().squeeze(1)
    src_pos = (~is_dst).nonzero().squeeze(1)
    n_src = src_pos.numel()
    r = min(r, n_src)
    if r <= 0:
        return _identity, _identity
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scores = unit[:, src_pos] @ unit[:, dst_pos].transpose(1, 2)  # [B, n_src, n_dst]
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        merged, kept = order[:, :r], order[:, r:]  # indices into the source set
        into = best_dst.gather(1, merged)  # destination of each merged source

    def expand(idx: torch.Tensor, c: int) -> torch.Tensor:
        return idx.unsqueeze(-1).expand(-1, -1, c)

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        src, dst = x[:, src_pos], x[:, dst_pos]
        moving = src.gather(1, expand(merged, c))
        dst = dst.scatter_reduce(1, expand(into, c), moving, reduce="mean", include_self=True)
        return torch.cat([src.gather(1, expand(kept, c)), dst], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        c = y.shape[-1]
        n_kept = n_src - r
        kept_out, dst_out = y[:, :n_kept], y[:, n_kept:]
        src_out = y.new_empty(b, n_src, c)
        src_out.scatter_(1, expand(kept, c), kept_out)
        src_out.scatter_(1, expand(merged, c), dst_out.gather(1, expand(into, c)))
        out = y.new_empty(b, n, c)
        out[:, dst_pos] = dst_out
        out[:, src_pos] = src_out
        return out

    return merge, unmerge


@dataclass(eq=False)
class _ToMeRun:
    config: ToMeConfig
    active: bool = False
    merged_calls: int = 0

    def begin(self, ctx: StepContext) -> None:
        self.active = True

    def end(self) -> None:
        self.active = False


class ToMeAttnProcessor:
    """Wraps a block's ``attn1`` processor: merge -> inner processor -> unmerge.

    The inner processor (the model's ``ReferenceAttnProcessor``) sees the merged tokens
    as queries and own keys/values and appends the reference bank itself.  ``metric`` is
    the transformer block's input, handed over by a forward pre-hook (``handle``).
    """

    accepts_context = True

    def __init__(self, inner: Any, run: _ToMeRun) -> None:
        self.inner = inner
        self.run = run
        self.metric: torch.Tensor | None = None
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def capture(self, block: nn.Module, args: tuple[Any, ...]) -> None:
        self.metric = args[0] if self.run.active and args else None

    def _call_inner(self, attn, hidden_states, encoder_hidden_states, attention_mask, ctx, kw):
        if getattr(self.inner, "accepts_context", False):
            kw = {**kw, "ctx": ctx}
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        ctx: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        metric, self.metric = self.metric, None
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, ctx, kwargs)
        cfg = self.run.config
        if not self.run.active or metric is None or cfg.ratio <= 0 or ctx is None:
            return self._call_inner(*args)
        n = hidden_states.shape[1]
        height, width = ctx.height, ctx.width
        if metric.shape != hidden_states.shape or not height or not width or n > height * width:
            return self._call_inner(*args)
        down = int(math.ceil(math.sqrt(height * width // n)))
        h, w = math.ceil(height / down), math.ceil(width / down)
        if down > cfg.max_downsample or h * w != n:
            return self._call_inner(*args)
        merge, unmerge = bipartite_soft_matching_2d(
            metric, h, w, cfg.sx, cfg.sy, int(n * cfg.ratio)
        )
        self.run.merged_calls += 1
        merged = merge(hidden_states)
        return unmerge(self._call_inner(attn, merged, *args[2:]))


def apply_tome(unet: VideoUNet, config: ToMeConfig) -> _ToMeRun:
    """Wrap every transformer block's ``attn1`` processor with :class:`ToMeAttnProcessor`."""
    unet = _video_unet(unet)
    remove_tome(unet)
    run = _ToMeRun(config)
    for block in unet.modules():
        if isinstance(block, TransformerBlock) and block.attn1 is not None:
            proc = ToMeAttnProcessor(block.attn1.processor, run)
            block.attn1.set_processor(proc)
            proc.handle = block.register_forward_pre_hook(proc.capture)
    return run


def remove_tome(unet: nn.Module) -> None:
    """Put the wrapped processors back and drop the pre-hooks."""
    for module in unet.modules():
        proc = getattr(module, "processor", None)
        while isinstance(proc, ToMeAttnProcessor):
            if proc.handle is not None:
                proc.handle.remove()
            module.set_processor(proc.inner)
            proc = module.processor


class ToMeSampler(PeerSampler):
    """ToMe on the denoiser's spatial self-attention (see module doc)."""

    name = "tome"

    def __init__(self, denoiser: Denoiser, config: ToMeConfig | None = None) -> None:
        super().__init__(denoiser, config or ToMeConfig())
        self.run: _ToMeRun | None = None

    def _install(self) -> None:
        self.run = apply_tome(self.unet, self.config)

    def _uninstall(self) -> None:
        remove_tome(self.unet)


# --------------------------------------------------------------------------- PAB

#: Our module names (``VideoUNet.named_modules``), as regexes for diffusers' PAB matcher.
PAB_SPATIAL_IDENTIFIERS = (r"attentions\.\d+\.transformer_blocks\.\d+\.attn1$",)
PAB_CROSS_IDENTIFIERS = (r"attentions\.\d+\.transformer_blocks\.\d+\.attn2$",)
PAB_TEMPORAL_IDENTIFIERS = (
    r"motion_modules\.\d+\.temporal_transformer\.transformer_blocks\.\d+\.attention_blocks\.\d+$",
)


@dataclass(frozen=True)
class PABConfig:
    """Pyramid Attention Broadcast: recompute an attention every N-th call inside its
    timestep range, reuse the last output otherwise (N = 1: off; None: not applied)."""

    spatial_skip_range: int | None = 2
    temporal_skip_range: int | None = 3
    cross_skip_range: int | None = 5
    spatial_timestep_range: tuple[int, int] = (100, 800)
    temporal_timestep_range: tuple[int, int] = (100, 800)
    cross_timestep_range: tuple[int, int] = (100, 900)
    hold_windows: int = 1  # steps per window layout (step groups from step 0); 1 = baseline

    def __post_init__(self) -> None:
        if self.hold_windows < 1:
            raise ValueError("hold_windows must be >= 1")
        ranges = (self.spatial_skip_range, self.temporal_skip_range, self.cross_skip_range)
        if all(r is None for r in ranges):
            raise ValueError("PAB needs at least one of the spatial/temporal/cross skip ranges")
        if any(r is not None and r < 1 for r in ranges):
            raise ValueError("PAB skip ranges must be >= 1")
        for name in ("spatial_timestep_range", "temporal_timestep_range", "cross_timestep_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"PAB {name} must be (low, high), got {(lo, hi)}")
            object.__setattr__(self, name, (int(lo), int(hi)))

    @classmethod
    def off(cls) -> PABConfig:
        return cls(1, 1, 1)


def apply_pab(unet: VideoUNet, config: PABConfig, current_timestep: Callable[[], int]) -> list[Any]:
    """diffusers' ``apply_pyramid_attention_broadcast`` on our attention modules; returns
    the installed hooks (their ``state`` may be swapped per window)."""
    unet = _video_unet(unet)
    try:
        from diffusers.hooks import (
            PyramidAttentionBroadcastConfig,
            apply_pyramid_attention_broadcast,
        )
    except ImportError as err:  # pragma: no cover - diffusers < 0.33
        raise AccelerationError(f"PAB needs diffusers >= 0.33 ({err})") from None
    remove_pab(unet)
    apply_pyramid_attention_broadcast(
        unet,
        PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=config.spatial_skip_range,
            temporal_attention_block_skip_range=config.temporal_skip_range,
            cross_attention_block_skip_range=config.cross_skip_range,
            spatial_attention_timestep_skip_range=config.spatial_timestep_range,
            temporal_attention_timestep_skip_range=config.temporal_timestep_range,
            cross_attention_timestep_skip_range=config.cross_timestep_range,
            spatial_attention_block_identifiers=PAB_SPATIAL_IDENTIFIERS,
            temporal_attention_block_identifiers=PAB_TEMPORAL_IDENTIFIERS,
            cross_attention_block_identifiers=PAB_CROSS_IDENTIFIERS,
            current_timestep_callback=current_timestep,
        ),
    )
    hooks = []
    for module in unet.modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None and registry.get_hook(PAB_HOOK) is not None:
            hooks.append(registry.get_hook(PAB_HOOK))
    if not hooks:
        raise AccelerationError("PAB matched no attention module of this UNet")
    return hooks


def remove_pab(unet: nn.Module) -> None:
    _remove_named_hook(unet, PAB_HOOK)


#: A timestep outside every PAB range: hooks always compute (used outside ``predict``).
_NO_TIMESTEP = -(10**9)


@dataclass(eq=False)
class _PABRun:
    hooks: list[Any]
    active: bool = False
    timestep: int = _NO_TIMESTEP
    states: dict[int, list[Any]] = field(default_factory=dict)
    idle: list[Any] = field(default_factory=list)

    def current_timestep(self) -> int:
        return self.timestep if self.active else _NO_TIMESTEP

    def _swap(self, states: list[Any]) -> None:
        for hook, state in zip(self.hooks, states, strict=True):
            hook.state = state

    def _fresh(self) -> list[Any]:
        from diffusers.hooks.pyramid_attention_broadcast import PyramidAttentionBroadcastState

        return [PyramidAttentionBroadcastState() for _ in self.hooks]

    def begin(self, ctx: StepContext) -> None:
        if ctx.window_index not in self.states:
            self.states[ctx.window_index] = self._fresh()
        self._swap(self.states[ctx.window_index])
        self.timestep, self.active = ctx.timestep, True

    def end(self) -> None:
        self.active = False
        if not self.idle:
            self.idle = self._fresh()
        for state in self.idle:
            state.reset()
        self._swap(self.idle)  # calls outside predict never touch a window's state

    def clear(self) -> None:
        self.states.clear()
        self.timestep = _NO_TIMESTEP


class PABSampler(PeerSampler):
    """PAB through diffusers' hooks, one hook state per window position (module doc)."""

    name = "pab"

    def __init__(self, denoiser: Denoiser, config: PABConfig | None = None) -> None:
        super().__init__(denoiser, config or PABConfig())
        self.run: _PABRun | None = None

    def _hold(self, step_index: int) -> int:
        n = self.config.hold_windows
        return n if step_index % n == 0 else 1

    def _install(self) -> None:
        run = _PABRun(hooks=[])
        run.hooks = apply_pab(self.unet, self.config, run.current_timestep)
        run.end()
        self.run = run

    def _uninstall(self) -> None:
        remove_pab(self.unet)

    def _clear(self) -> None:
        if self.run is not None:
            self.run.clear()


# --------------------------------------------------------------------------- fewer steps

_FEWER_RE = re.compile(rf"^{re.escape(FEWER_STEPS)}(?:@(.+))?$")


def parse_fewer_steps(method: str) -> tuple[bool, int | str | None]:
    """``"fewer-steps"`` -> (True, None) (match the bench's default target);
    ``"fewer-steps@8"`` -> (True, 8); ``"fewer-steps@full"`` -> (True, "full") (match that
    method's denoise time); anything else -> (False, None)."""
    m = _FEWER_RE.match(method)
    if m is None:
        return False, None
    arg = m.group(1)
    if arg is None:
        return True, None
    if arg.isdigit():
        if int(arg) < 1:
            raise ValueError(f"{method}: the step count must be >= 1")
        return True, int(arg)
    return True, arg


def matched_steps(steps: int, baseline_s: float, target_s: float) -> int:
    """``round(steps / target_speedup)`` with ``target_speedup = baseline_s / target_s``:
    the DDIM step count whose denoise time matches ``target_s`` (time ~ steps); >= 1."""
    if baseline_s <= 0 or target_s <= 0:
        raise ValueError("denoise times must be > 0")
    return max(1, min(steps, round(steps * target_s / baseline_s)))


# --------------------------------------------------------------------------- registry

#: Peer name -> sampler class (``cls(denoiser, config=None)``).
PEERS: dict[str, Callable[..., PeerSampler]] = {
    DeepCacheSampler.name: DeepCacheSampler,
    ToMeSampler.name: ToMeSampler,
    PABSampler.name: PABSampler,
}


def make_peer_sampler(name: str, denoiser: Denoiser, config: Any = None) -> PeerSampler:
    """The sampler of peer ``name`` (``config`` None: the peer's defaults)."""
    try:
        factory = PEERS[name]
    except KeyError:
        raise AccelerationError(
            f"unknown peer {name!r}; peers: {', '.join(sorted(PEERS))}"
        ) from None
    return factory(denoiser, config)


# Factories in the accel registry's signature ``factory(model, face, accel_config)``.
# A peer's settings are read from ``accel_config.<peer>`` when that field exists (e.g. a
# ``DeepCacheConfig``), else the peer's defaults.  They are listed in
# ``accel.ACCEL_FACTORIES``; "fewer-steps" is a bench-only method (bench/runner.py).


def build_deepcache(model: Any, face: Any, config: Any) -> DeepCacheSampler:
    interval = getattr(config, "deepcache_interval", DeepCacheConfig.cache_interval)
    return DeepCacheSampler(model.denoiser, DeepCacheConfig(cache_interval=interval))


def build_tome(model: Any, face: Any, config: Any) -> ToMeSampler:
    return ToMeSampler(model.denoiser, getattr(config, "tome", None))


def build_pab(model: Any, face: Any, config: Any) -> PABSampler:
    return PABSampler(model.denoiser, getattr(config, "pab", None))
