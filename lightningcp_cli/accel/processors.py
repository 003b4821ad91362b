"""Attention processors of the accelerations; they behave by a per-call context.

:func:`apply_accel_processors` swaps, on a :class:`~lightningcp_cli.models.unet.VideoUNet`:

* every ``attn1`` (reference attention) for :class:`AccelReferenceAttnProcessor`,
* every ``attn2`` (audio cross-attention) for :class:`AccelAudioAttnProcessor`,
* every motion-module attention for :class:`AccelTemporalAttnProcessor` (wrapping the
  original processor).

Without an :class:`AccelCall` in ``ctx.extras[ACCEL_EXTRAS_KEY]`` each one runs exactly
the original processor's code path, so installing them changes nothing by itself.  With
one, the call says what to do: use the static-feature cache (reference and audio
keys/values, :mod:`.static_cache`), and DFA ``record`` (key step: full attention, keep the
output per window slot) or ``reuse`` (non-key step: foreground tokens only, background
from the kept output, :mod:`.dfa`).  :func:`remove_accel_processors` (or the name
:data:`ACCEL_PROCESSORS`) restores the original processor objects.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_processor import Attention

from ..config import DFAConfig
from ..errors import AccelerationError
from ..models.motion import TemporalAttention
from ..models.unet import (
    AudioAttnProcessor,
    ReferenceAttnProcessor,
    UNetContext,
    VideoUNet,
    _attend,
    _no_mask,
)
from . import hooks
from .dfa import BackgroundStore, gather_tokens, scatter_tokens
from .static_cache import StaticFeatures

#: Name of the processor swap in the model's accel registry.
ACCEL_PROCESSORS = "lcp.accel_processors"
#: Key of the per-call :class:`AccelCall` in ``UNetContext.extras``.
ACCEL_EXTRAS_KEY = "lcp.accel"

DFA_MODES = (None, "record", "reuse")


@dataclass(eq=False)
class AccelCall:
    """What the accel processors do in one denoiser call.

    ``static``/``audio_rows``: take reference keys/values from ``static`` and audio
    keys/values from its tables, row ``audio_rows[i]`` for folded row ``i`` (see
    :func:`.static_cache.audio_row_index`).  ``dfa_mode``: None, ``record`` or
    ``reuse``; ``dfa_layers``: module-path prefixes DFA applies to (empty: every layer);
    ``slot``: the window cache key; ``repeat``: steps batched in this call (rows ordered
    batch row of the key step, then step); ``foreground``: token count of a layer grid ->
    foreground token indices (None: full attention there).  ``token_index``: the hidden
    states hold only these tokens of their grid (a whole transformer running on the
    foreground, :mod:`.dfa_blocks`); the reference bank is cut to them too.
    """

    static: StaticFeatures | None = None
    audio_rows: torch.Tensor | None = None
    dfa: DFAConfig | None = None
    dfa_mode: str | None = None
    dfa_layers: tuple[str, ...] = ()
    slot: Hashable = 0
    repeat: int = 1
    foreground: Mapping[int, torch.Tensor | None] = field(default_factory=dict)
    token_index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.dfa_mode not in DFA_MODES:
            raise ValueError(f"dfa_mode must be one of {DFA_MODES}, not {self.dfa_mode!r}")
        if self.repeat < 1:
            raise ValueError("repeat must be >= 1")

    def dfa_action(self, layer: str, kind: str) -> str | None:
        """``record``/``reuse`` when DFA covers ``kind`` (config switch) in ``layer``."""
        if self.dfa_mode is None or self.dfa is None or not getattr(self.dfa, kind):
            return None
        if self.dfa_layers and not layer.startswith(self.dfa_layers):
            return None
        return self.dfa_mode


def accel_call(ctx: UNetContext | None) -> AccelCall | None:
    if ctx is None:
        return None
    return ctx.extras.get(ACCEL_EXTRAS_KEY)


class _DFAMixin:
    layer: str
    store: BackgroundStore

    def _foreground(self, call: AccelCall, tokens: int) -> torch.Tensor | None:
        return call.foreground.get(tokens)

    def _reuse(
        self, call: AccelCall, batch: int, values: torch.Tensor, index: torch.Tensor, dim: int
    ) -> torch.Tensor:
        background = self.store.background(call.slot, batch, call.repeat, self.layer)
        return scatter_tokens(background, index, values, dim)


class AccelReferenceAttnProcessor(_DFAMixin, ReferenceAttnProcessor):
    """Reference attention with cached bank keys/values and DFA (kind ``spatial``).

    DFA reuse: queries, keys and values of the foreground tokens only; the bank's tokens
    are cut to the same foreground when ``DFAConfig.reference`` (and the bank has the
    layer's grid), else all of them are kept.
    """

    accepts_context = True

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.layer = name
        self.store = BackgroundStore()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        ctx: UNetContext | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        call = accel_call(ctx)
        if call is None:
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, ctx=ctx, **kwargs
            )
        _no_mask(attention_mask)
        kb = vb = None
        bank = (
            ctx.bank.get(self.name) if ctx.bank is not None and ctx.ref_select is not None else None
        )
        if bank is not None:
            dtype = hidden_states.dtype
            if call.static is not None:
                kb, vb = call.static.reference_kv(self.name, attn, bank, dtype)
            else:
                tokens = bank.to(device=hidden_states.device, dtype=dtype)
                kb, vb = attn.to_k(tokens), attn.to_v(tokens)
            if kb.shape[0] != 1:
                kb, vb = kb[ctx.ref_batch_select], vb[ctx.ref_batch_select]
            cut = call.token_index
            if cut is not None and call.dfa is not None and call.dfa.reference:
                kb, vb = gather_tokens(kb, cut), gather_tokens(vb, cut)
        action = call.dfa_action(self.layer, "spatial")
        tokens = hidden_states.shape[1]
        index = self._foreground(call, tokens) if action == "reuse" else None
        if index is None:
            out = self.attend(attn, hidden_states, kb, vb, ctx)
            if action == "record":
                self.store.store(call.slot, out, ctx.batch_size)
            return out
        x = gather_tokens(hidden_states, index)
        if kb is not None and call.dfa.reference and kb.shape[1] == tokens:
            kb, vb = gather_tokens(kb, index), gather_tokens(vb, index)
        out = self.attend(attn, x, kb, vb, ctx)
        return self._reuse(call, ctx.batch_size, out, index, 1)


class AccelAudioAttnProcessor(_DFAMixin, AudioAttnProcessor):
    """Audio cross-attention with keys/values from the static tables and DFA (``audio``)."""

    accepts_context = True

    def __init__(self, scale: float, layer: str) -> None:
        super().__init__(scale)
        self.layer = layer
        self.store = BackgroundStore()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        ctx: UNetContext | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        call = accel_call(ctx)
        if call is None:
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs
            )
        _no_mask(attention_mask)
        if call.static is not None and call.audio_rows is not None:
            if call.audio_rows.numel() != hidden_states.shape[0]:
                raise AccelerationError(
                    f"{self.layer}: {call.audio_rows.numel()} audio rows for "
                    f"{hidden_states.shape[0]} token rows"
                )
            k_table, v_table = call.static.audio_kv(self.layer, attn, hidden_states.dtype)
            k = k_table.index_select(0, call.audio_rows)
            v = v_table.index_select(0, call.audio_rows)
        else:
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            k, v = attn.to_k(context), attn.to_v(context)
        action = call.dfa_action(self.layer, "audio")
        index = self._foreground(call, hidden_states.shape[1]) if action == "reuse" else None
        x = hidden_states if index is None else gather_tokens(hidden_states, index)
        out = _attend(attn, attn.to_q(x), k, v)
        out = attn.to_out[1](attn.to_out[0](out)) * self.scale
        if index is not None:
            return self._reuse(call, ctx.batch_size, out, index, 1)
        if action == "record":
            self.store.store(call.slot, out, ctx.batch_size)
        return out


class AccelTemporalAttnProcessor(_DFAMixin):
    """Wraps a motion-module attention's processor; DFA (``temporal``) computes only the
    foreground spatial positions' rows of ``[(B H W), F, C]``."""

    accepts_context = True

    def __init__(self, inner: Any, layer: str) -> None:
        self.inner = inner
        self.layer = layer
        self.store = BackgroundStore()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        ctx: UNetContext | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        def run(x: torch.Tensor) -> torch.Tensor:
            if getattr(self.inner, "accepts_context", False):
                kwargs["ctx"] = ctx
            return self.inner(
                attn,
                x,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )

        call = accel_call(ctx)
        action = None if call is None else call.dfa_action(self.layer, "temporal")
        if action is None:
            return run(hidden_states)
        batch = ctx.batch_size
        positions = hidden_states.shape[0] // batch
        index = self._foreground(call, positions) if action == "reuse" else None
        if index is None:
            out = run(hidden_states)
            if action == "record":
                self.store.store(call.slot, out, batch)
            return out
        base = torch.arange(batch, device=index.device).unsqueeze(1) * positions
        rows = (base + index.unsqueeze(0)).reshape(-1)
        out = run(gather_tokens(hidden_states, rows, 0))
        return self._reuse(call, batch, out, rows, 0)


AccelProcessor = AccelReferenceAttnProcessor | AccelAudioAttnProcessor | AccelTemporalAttnProcessor


def _accel_processors(model: VideoUNet, current: Mapping[str, Any]) -> dict[str, Any]:
    modules = dict(model.named_modules())
    new: dict[str, Any] = {}
    for key, proc in current.items():
        path = key[: -len(".processor")]
        parent = path.rpartition(".")[0]
        if type(proc) is ReferenceAttnProcessor:
            new[key] = AccelReferenceAttnProcessor(proc.name)
        elif type(proc) is AudioAttnProcessor:
            new[key] = AccelAudioAttnProcessor(proc.scale, parent)
        elif isinstance(modules[path], TemporalAttention):
            new[key] = AccelTemporalAttnProcessor(proc, path)
        else:
            new[key] = proc
    return new


def apply_accel_processors(model: VideoUNet, owner: object) -> dict[str, Any]:
    """Install the accel processors (no-op if ``owner`` did already); returns them by key."""

    def do():
        original = dict(model.attn_processors)
        new = _accel_processors(model, original)
        model.set_attn_processor(new)

        def undo() -> None:
            current = model.attn_processors
            model.set_attn_processor(
                {k: original[k] if current[k] is new[k] else current[k] for k in current}
            )

        return undo, new

    return hooks.install(model, ACCEL_PROCESSORS, owner, do).value


def remove_accel_processors(model: VideoUNet, owner: object | None = None) -> bool:
    """Put the original processor objects back (only those still ours)."""
    return hooks.uninstall(model, ACCEL_PROCESSORS, owner)


def reset_accel_processors(processors: Mapping[str, Any]) -> None:
    """Drop every DFA background kept by these processors."""
    for proc in processors.values():
        store = getattr(proc, "store", None)
        if isinstance(store, BackgroundStore):
            store.reset()
