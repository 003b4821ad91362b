"""DFA over whole transformers: the last layer's spatial and temporal transformers run on
the foreground tokens only at non-key steps, not just their attention.

Attention is only part of a transformer's cost; its projections and GEGLU feed-forward
are per token and cost as much again.  With ``DFAConfig.whole_blocks`` the forward of
each :class:`~lightningcp_cli.models.unet.SpatialTransformer` and
:class:`~lightningcp_cli.models.motion.TemporalTransformer` covered by DFA is wrapped:

- ``record`` (key step): the original forward; its output is kept per window slot;
- ``reuse`` (non-key step): GroupNorm on the whole grid (its statistics span every
  token), then gather the foreground tokens and run the rest of the transformer on them
  alone; the background tokens take the kept output.  The attention processors inside see
  an :class:`~.processors.AccelCall` without DFA and ``token_index`` set, so they neither
  gather again nor keep anything (the reference bank is cut to the same tokens).

Everything after the norm is per token except attention, which attends among the
gathered tokens exactly like per-attention DFA does: with a mask that covers the whole
grid the result equals the unwrapped model.  :func:`wrap_transformers` installs the
wrappers (a no-op without a DFA call in the context) and returns the undo function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.motion import TemporalTransformer
from ..models.unet import SpatialTransformer, UNetContext
from .dfa import BackgroundStore
from .processors import ACCEL_EXTRAS_KEY, accel_call


class _Wrapped:
    """One wrapped transformer: its original forward, layer name and background store."""

    def __init__(self, module: nn.Module, layer: str) -> None:
        self.module, self.layer = module, layer
        self.original = module.forward
        self.store = BackgroundStore()

    def run(
        self,
        ctx: UNetContext | None,
        grid_tokens: int,
        full: Callable[[], torch.Tensor],
        foreground: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``full()`` unless DFA covers this transformer in this call; then record its
        output (key step) or return ``foreground(index, background)`` (non-key step)."""
        call = accel_call(ctx)
        if call is None or call.dfa is None or not call.dfa.whole_blocks:
            return full()
        action = call.dfa_action(self.layer + ".", "whole_blocks")
        if action is None:
            return full()
        index = call.foreground.get(grid_tokens) if action == "reuse" else None
        # the attention processors inside see no DFA (and, when gathered, the tokens kept)
        ctx.extras[ACCEL_EXTRAS_KEY] = dataclasses.replace(call, dfa_mode=None, token_index=index)
        try:
            if index is None:
                out = full()
                if action == "record":
                    self.store.store(call.slot, out, ctx.batch_size)
                return out
            background = self.store.background(call.slot, ctx.batch_size, call.repeat, self.layer)
            return foreground(index, background)
        finally:
            ctx.extras[ACCEL_EXTRAS_KEY] = call


def _spatial(w: _Wrapped) -> Callable[..., torch.Tensor]:
    mod: SpatialTransformer = w.module  # type: ignore[assignment]

    def forward(x: torch.Tensor, ctx: UNetContext | None = None, audio=None) -> torch.Tensor:
        n, c, h, wd = x.shape

        def foreground(index: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
            tokens = mod.norm(x).flatten(2).index_select(2, index).transpose(1, 2)
            tokens = F.linear(tokens, mod.proj_in.weight.flatten(1), mod.proj_in.bias)
            for block in mod.transformer_blocks:
                tokens = block(tokens, ctx, audio)
            tokens = F.linear(tokens, mod.proj_out.weight.flatten(1), mod.proj_out.bias)
            fg = tokens.transpose(1, 2) + x.flatten(2).index_select(2, index)
            return bg.flatten(2).index_copy(2, index, fg.to(bg.dtype)).view(n, c, h, wd)

        return w.run(ctx, h * wd, lambda: w.original(x, ctx, audio), foreground)

    return forward


def _temporal(w: _Wrapped) -> Callable[..., torch.Tensor]:
    mod: TemporalTransformer = w.module  # type: ignore[assignment]

    def forward(x: torch.Tensor, num_frames: int, ctx: UNetContext | None = None) -> torch.Tensor:
        bf, c, h, wd = x.shape
        b = bf // num_frames

        def foreground(index: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
            n = index.numel()
            t = mod.norm(x).view(b, num_frames, c, h * wd).index_select(3, index)
            t = t.permute(0, 3, 1, 2).reshape(b * n, num_frames, c)  # [(B n), F, C]
            t = mod.proj_in(t)
            for block in mod.transformer_blocks:
                t = block(t, ctx)
            t = mod.proj_out(t).view(b, n, num_frames, c).permute(0, 2, 3, 1)
            fg = t + x.view(b, num_frames, c, h * wd).index_select(3, index)
            bg = bg.reshape(b, num_frames, c, h * wd)
            return bg.index_copy(3, index, fg.to(bg.dtype)).view(bf, c, h, wd)

        return w.run(ctx, h * wd, lambda: w.original(x, num_frames, ctx), foreground)

    return forward


def wrap_transformers(model: nn.Module, prefixes: tuple[str, ...]) -> tuple[Callable, list]:
    """Wrap every spatial/temporal transformer under ``prefixes``; returns (undo, stores)."""
    wrapped: list[_Wrapped] = []
    for name, module in model.named_modules():
        if not (name + ".").startswith(prefixes):
            continue
        if isinstance(module, SpatialTransformer):
            w = _Wrapped(module, name)
            module.forward = _spatial(w)
        elif isinstance(module, TemporalTransformer):
            w = _Wrapped(module, name)
            module.forward = _temporal(w)
        else:
            continue
        wrapped.append(w)

    def undo() -> None:
        for w in wrapped:
            del w.module.forward  # back to the class's forward

    return undo, [w.store for w in wrapped]
