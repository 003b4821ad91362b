"""AnimateDiff-style ("Vanilla") temporal module, laid out like EchoMimic v1's checkpoints.

Keys of one module (``…motion_modules.J.`` prefix left out)::

    temporal_transformer.norm                      GroupNorm per frame (32 groups, eps 1e-6)
    temporal_transformer.proj_in                   Linear C -> C
    temporal_transformer.transformer_blocks.0.
        attention_blocks.{0,1}.{to_q,to_k,to_v,to_out.0}   temporal self-attention
        attention_blocks.{0,1}.pos_encoder.pe             sinusoid buffer [1, max_len, C]
        norms.{0,1}, ff.net.0.proj, ff.net.2, ff_norm
    temporal_transformer.proj_out                  Linear C -> C (zero-initialised upstream)

Tensors move through the module in the UNet's folded layout ``[(B F), C, H, W]``.  Every
part except the attention is per token, so the whole transformer runs on one layout,
``[(B H W), F, C]`` (rows ordered batch, y, x), that attention needs: one permute in, one
out, no per-frame loop.

:class:`ContextAttention` (a diffusers ``Attention``) is shared with :mod:`.unet`: it
forwards the per-call context ``ctx`` to processors that declare ``accepts_context =
True`` and calls stock diffusers processors (``AttnProcessor2_0`` …) without it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn


class ContextAttention(Attention):
    """diffusers ``Attention`` that hands a per-call context to processors that want it.

    A processor opts in with a class attribute ``accepts_context = True`` and a ``ctx``
    keyword; any other processor is called exactly as diffusers would call it.  (This
    also skips diffusers' per-call signature inspection, which costs time on CPU.)
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        ctx: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        processor = self.processor
        if getattr(processor, "accepts_context", False):
            kwargs["ctx"] = ctx
        return processor(
            self,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            **kwargs,
        )


def sinusoid_table(max_len: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """``[1, max_len, dim]``: sin on even channels, cos on odd ones (AnimateDiff's table)."""
    position = torch.arange(max_len, dtype=torch.float32, device=device).unsqueeze(1)
    div_term = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim)
    )
    pe = torch.zeros(1, max_len, dim, device=device)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe if dtype is None else pe.to(dtype)


class PositionEncoding(nn.Module):
    """Holds the persistent ``pe`` buffer (checkpoints carry it; it is recomputable)."""

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.dim = dim
        self.max_len = max_len
        self.register_buffer("pe", sinusoid_table(max_len, dim))

    def reset(self, device=None, dtype=None) -> None:
        """Recompute the table (after meta-device construction or a file without ``pe``)."""
        if device is None:
            device = self.pe.device if self.pe.device.type != "meta" else "cpu"
        if dtype is None:
            dtype = self.pe.dtype
        self.pe = sinusoid_table(self.max_len, self.dim, device=device, dtype=dtype)


class TemporalAttention(ContextAttention):
    """Self-attention across frames; positions are added to its input before q/k/v.

    Input ``[(B H W), F, C]``.  The position table is added here, not in the processor,
    so any standard processor (``AttnProcessor2_0`` or an accelerator's) can be swapped in.
    """

    def __init__(self, dim: int, heads: int, max_len: int) -> None:
        super().__init__(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False)
        self.pos_encoder = PositionEncoding(dim, max_len)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        ctx: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        frames = hidden_states.shape[1]
        pe = self.pos_encoder.pe
        if frames > pe.shape[1]:
            raise ValueError(
                f"motion module sees {frames} frames, its position table holds {pe.shape[1]}"
            )
        hidden_states = hidden_states + pe[:, :frames].to(hidden_states.dtype)
        return super().forward(hidden_states, encoder_hidden_states, attention_mask, ctx, **kwargs)


class TemporalTransformerBlock(nn.Module):
    """Two temporal self-attentions (pre-LayerNorm, residual) and a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, max_len: int, num_attention: int = 2) -> None:
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            [TemporalAttention(dim, heads, max_len) for _ in range(num_attention)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(num_attention)])
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, hidden_states: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms, strict=True):
            hidden_states = attention(norm(hidden_states), ctx=ctx) + hidden_states
        return self.ff(self.ff_norm(hidden_states)) + hidden_states


class TemporalTransformer(nn.Module):
    """GroupNorm per frame -> Linear -> temporal blocks -> Linear -> + input."""

    def __init__(
        self, channels: int, heads: int, max_len: int, norm_groups: int, num_blocks: int = 1
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(channels, heads, max_len) for _ in range(num_blocks)]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(
        self, hidden_states: torch.Tensor, num_frames: int, ctx: Any = None
    ) -> torch.Tensor:
        bf, c, h, w = hidden_states.shape
        b = bf // num_frames
        x = self.norm(hidden_states)
        x = x.view(b, num_frames, c, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, num_frames, c)
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, ctx)
        x = self.proj_out(x)
        x = x.view(b, h, w, num_frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, h, w)
        return x + hidden_states


class MotionModule(nn.Module):
    """AnimateDiff "Vanilla" temporal module: ``forward(x[(B F), C, H, W], num_frames)``."""

    def __init__(
        self,
        channels: int,
        heads: int = 8,
        max_len: int = 32,
        norm_groups: int = 32,
        num_blocks: int = 1,
    ) -> None:
        super().__init__()
        if channels % heads or channels % norm_groups or channels % 2:
            raise ValueError(
                f"motion module: {channels} channels must be even and divisible by "
                f"{heads} heads and {norm_groups} norm groups"
            )
        self.temporal_transformer = TemporalTransformer(
            channels, heads, max_len, norm_groups, num_blocks
        )

    def forward(
        self, hidden_states: torch.Tensor, num_frames: int, ctx: Any = None
    ) -> torch.Tensor:
        return self.temporal_transformer(hidden_states, num_frames, ctx)

    def reset_position_encodings(self, device=None, dtype=None) -> None:
        for module in self.modules():
            if isinstance(module, PositionEncoding):
                module.reset(device, dtype)
