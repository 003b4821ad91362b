"""EchoMimic-v1-structured UNets built from diffusers parts: ReferenceNet and VideoUNet.

Both share one skeleton (``conv_in`` → down blocks → mid block → up blocks), with module
names equal to the official checkpoint keys (diffusers naming), so official state dicts
load strictly.  ``VideoUNet`` is the denoiser: the same skeleton "inflated" to video by
folding frames into the batch (2-D convs and group norms run per frame), plus
AnimateDiff motion modules, audio cross-attention and reference attention.

Layout inside the denoiser: every 2-D part sees ``[(B F), C, H, W]`` (batch-major);
motion modules unfold ``F`` themselves.  Per block::

    down block i:  (resnet → [spatial transformer] → [motion module]) × layers_per_block
                   → [downsampler]
    mid block:     resnet → spatial transformer → [motion module] → resnet
    up block i:    (cat skip → resnet → [spatial transformer] → [motion module])
                   × (layers_per_block + 1) → [upsampler]

Attention behaviour lives in processors (diffusers style, ``set_processor``):
``attn1`` of every denoiser transformer block runs :class:`ReferenceAttnProcessor`
(keys/values = own tokens + the reference bank's tokens for the rows that use the
reference), ``attn2`` runs :class:`AudioAttnProcessor` (cross-attention to the audio
tokens, output × ``audio_scale``).  Per-call state (bank, rows, frame count) travels in
a :class:`UNetContext` handed down the call, never in globals.

LightningCP seam (see :class:`VideoUNet`): ``forward`` is exactly
``prepare → run_to_last_layer → last_layer_input (an nn.Identity tap) → run_last_layer
→ run_head``; an accelerator can capture the hidden state entering the last layer with
a forward hook on ``last_layer_input`` and, on non-key steps, call ``prepare``,
``run_last_layer`` and ``run_head`` itself on a cached feature.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .motion import ContextAttention, MotionModule, PositionEncoding

#: Transformer-block path (e.g. ``"down_blocks.0.attentions.0.transformer_blocks.0"``) ->
#: the input of that block's ``attn1`` in the ReferenceNet, ``[B, H*W, C]``.
ReferenceBank = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class UNetConfig:
    """Everything that shapes a ReferenceNet/denoiser pair (defaults: EchoMimic v1).

    ``attention_heads`` is the number of heads (diffusers' ``attention_head_dim`` quirk),
    head width = channels // heads.  ``attention_blocks[i]`` says whether down block ``i``
    (and the mirrored up block) has transformer layers; the mid block always has one.
    Motion modules sit in down block ``i`` when ``2**i`` is in ``motion_resolutions``, in
    up block ``i`` when ``2**(n-1-i)`` is, and in the mid block when ``motion_mid_block``.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_blocks: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    attention_heads: int = 8
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 384  # audio token width
    audio_scale: float = 3.0  # audio cross-attention output multiplier
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    motion_heads: int = 8
    motion_max_len: int = 32  # longest clip (frames) the position table covers
    motion_norm_groups: int = 32  # hard-coded 32 upstream
    motion_resolutions: tuple[int, ...] = (1, 2, 4, 8)
    motion_mid_block: bool = True

    def __post_init__(self) -> None:
        for name in ("block_out_channels", "attention_blocks", "motion_resolutions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        boc = self.block_out_channels
        if self.in_channels <= 0 or self.out_channels <= 0:
            raise ValueError("UNet in/out channels must be > 0")
        if not boc or any(c <= 0 for c in boc):
            raise ValueError("block_out_channels must be a non-empty tuple of positive ints")
        if len(self.attention_blocks) != len(boc):
            raise ValueError(
                f"attention_blocks has {len(self.attention_blocks)} entries, "
                f"block_out_channels {len(boc)}"
            )
        if self.layers_per_block < 1:
            raise ValueError("layers_per_block must be >= 1")
        for what, n in (
            ("attention_heads", self.attention_heads),
            ("norm_num_groups", self.norm_num_groups),
            ("motion_heads", self.motion_heads),
            ("motion_norm_groups", self.motion_norm_groups),
        ):
            if n < 1:
                raise ValueError(f"{what} must be >= 1")
            bad = [c for c in boc if c % n]
            if bad:
                raise ValueError(f"block_out_channels {bad} are not divisible by {what}={n}")
        if any(c % 2 for c in boc):
            raise ValueError("block_out_channels must be even (sinusoid position table)")
        if self.norm_eps <= 0:
            raise ValueError("norm_eps must be > 0")
        if self.cross_attention_dim <= 0:
            raise ValueError("cross_attention_dim must be > 0")
        if not math.isfinite(self.audio_scale):
            raise ValueError("audio_scale must be finite")
        if self.downsample_padding < 0:
            raise ValueError("downsample_padding must be >= 0")
        if self.motion_max_len < 1:
            raise ValueError("motion_max_len must be >= 1")
        if any(r < 1 for r in self.motion_resolutions):
            raise ValueError("motion_resolutions must be positive")

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def downsample_factor(self) -> int:
        """Latent pixels per pixel of the deepest feature map."""
        return 2 ** (self.num_blocks - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- context


def _row_selector(batch_rows: Sequence[int], frames: int, device) -> slice | torch.Tensor:
    """Rows ``b*F .. b*F+F-1`` of the listed batch rows: a slice when contiguous."""
    first, last = batch_rows[0], batch_rows[-1]
    if list(batch_rows) == list(range(first, last + 1)):
        return slice(first * frames, (last + 1) * frames)
    idx = [b * frames + f for b in batch_rows for f in range(frames)]
    return torch.tensor(idx, dtype=torch.long, device=device)


@dataclass(eq=False)
class UNetContext:
    """Per-call state handed to blocks, motion modules and attention processors.

    ``bank``/``ref_rows`` as given to :meth:`VideoUNet.forward`; ``bank_out`` collects
    the ReferenceNet's bank.  Derived selectors (over the folded ``(B F)`` rows):
    ``ref_select`` rows that attend to the bank (None: none), ``plain_select`` rows
    doing plain self-attention (None: none), ``ref_batch_select`` the batch rows of
    the bank to use when the bank has one row per batch row.  ``extras`` is free for
    accelerators (e.g. a step index or a foreground mask) and never read by the model.
    """

    batch_size: int
    num_frames: int
    bank: Mapping[str, torch.Tensor] | None = None
    ref_rows: torch.Tensor | None = None
    bank_out: dict[str, torch.Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    device: torch.device | str | None = None
    height: int = 0  # latent grid of the call (a layer's grid follows from its token count)
    width: int = 0
    ref_select: slice | torch.Tensor | None = field(init=False, default=None)
    plain_select: slice | torch.Tensor | None = field(init=False, default=None)
    ref_batch_select: slice | torch.Tensor = field(init=False, default_factory=lambda: slice(None))

    def __post_init__(self) -> None:
        b, f = self.batch_size, self.num_frames
        if self.ref_rows is None:
            rows = [True] * b
        else:
            flat = torch.as_tensor(self.ref_rows).reshape(-1)
            if flat.numel() != b:
                raise ValueError(f"ref_rows has {flat.numel()} entries for a batch of {b}")
            rows = [bool(r) for r in flat.tolist()]
        if self.bank is None or not any(rows):
            self.ref_select, self.plain_select = None, slice(None)
        elif all(rows):
            self.ref_select, self.plain_select = slice(None), None
        else:
            ref = [i for i, r in enumerate(rows) if r]
            plain = [i for i, r in enumerate(rows) if not r]
            self.ref_select = _row_selector(ref, f, self.device)
            self.plain_select = _row_selector(plain, f, self.device)
            self.ref_batch_select = _row_selector(ref, 1, self.device)


# --------------------------------------------------------------------------- processors


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head SDPA on projected tokens ``[N, L, C]`` -> ``[N, Lq, C]`` (before to_out)."""
    n, lq, c = q.shape
    h = attn.heads
    d = c // h
    q = q.view(n, lq, h, d).transpose(1, 2)
    k = k.view(n, -1, h, d).transpose(1, 2)
    v = v.view(n, -1, h, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    return out.transpose(1, 2).reshape(n, lq, c)


def _no_mask(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None:
        raise ValueError("attention masks are not supported by this processor")


class ReferenceAttnProcessor:
    """Self-attention whose keys/values also hold the reference bank's tokens.

    For the rows in ``ctx.ref_select`` keys/values are ``[own tokens, bank tokens]``
    (the bank row repeated over frames); the other rows do plain self-attention (the
    unconditional CFG half).  A bank without an entry for ``name`` (or no bank) means
    plain self-attention for every row, which also lets the bank be dropped per layer.
    The bank is cast to the activations' dtype (the official code keeps it in fp16 and
    lets ``torch.cat`` promote it).  Installed on ``attn1`` of every denoiser block,
    ``name`` = the block's path (the bank key).
    """

    accepts_context = True

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        ctx: UNetContext | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        _no_mask(attention_mask)
        kb = vb = None
        if ctx is not None and ctx.bank is not None and ctx.ref_select is not None:
            bank = ctx.bank.get(self.name)
            if bank is not None:
                bank = bank.to(device=hidden_states.device, dtype=hidden_states.dtype)
                if bank.shape[0] != 1:
                    bank = bank[ctx.ref_batch_select]
                kb, vb = attn.to_k(bank), attn.to_v(bank)
        return self.attend(attn, hidden_states, kb, vb, ctx)

    @staticmethod
    def attend(
        attn: Attention,
        x: torch.Tensor,
        kb: torch.Tensor | None,
        vb: torch.Tensor | None,
        ctx: UNetContext | None,
    ) -> torch.Tensor:
        """The attention math given the bank's keys/values (None: plain self-attention);
        accelerations call it with cached or foreground-cut keys/values."""
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        if kb is None or ctx is None:
            out = _attend(attn, q, k, v)
        elif ctx.plain_select is None:
            out = ReferenceAttnProcessor._with_bank(attn, q, k, v, kb, vb, ctx.num_frames)
        else:
            rs, ps = ctx.ref_select, ctx.plain_select
            out = torch.empty_like(q)
            out[ps] = _attend(attn, q[ps], k[ps], v[ps])
            out[rs] = ReferenceAttnProcessor._with_bank(
                attn, q[rs], k[rs], v[rs], kb, vb, ctx.num_frames
            )
        return attn.to_out[1](attn.to_out[0](out))

    @staticmethod
    def _with_bank(attn, q, k, v, kb, vb, frames: int) -> torch.Tensor:
        n = q.shape[0]
        if kb.shape[0] == 1:
            kb, vb = kb.expand(n, -1, -1), vb.expand(n, -1, -1)
        else:
            kb, vb = kb.repeat_interleave(frames, 0), vb.repeat_interleave(frames, 0)
        return _attend(attn, q, torch.cat([k, kb], dim=1), torch.cat([v, vb], dim=1))


class AudioAttnProcessor:
    """Cross-attention to the audio tokens, output multiplied by ``scale`` (EchoMimic: 3).

    A replacement processor for ``attn2`` must keep that factor (read it from here).
    """

    def __init__(self, scale: float = 3.0) -> None:
        self.scale = float(scale)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        _no_mask(attention_mask)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = _attend(attn, attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))
        out = attn.to_out[1](attn.to_out[0](out))
        return out * self.scale


# --------------------------------------------------------------------------- blocks


class TransformerBlock(nn.Module):
    """diffusers-named transformer block: ``norm1/attn1``, [``norm2/attn2``], ``norm3/ff``.

    Without ``cross_attention_dim`` (ReferenceNet) there is no ``attn2``/``norm2``.  When
    ``ctx.bank_out`` is a dict the ``attn1`` input is stored there under ``bank_key``.
    Registration order follows the official state dicts.
    """

    def __init__(
        self, dim: int, heads: int, cross_attention_dim: int | None, audio_scale: float
    ) -> None:
        super().__init__()
        self.bank_key = ""  # set by the UNet: this block's path

        def self_attention() -> ContextAttention:
            return ContextAttention(query_dim=dim, heads=heads, dim_head=dim // heads)

        if cross_attention_dim is None:
            self.norm1 = nn.LayerNorm(dim)
            self.attn1 = self_attention()
            self.attn2 = self.norm2 = None
            self.norm3 = nn.LayerNorm(dim)
            self.ff = FeedForward(dim, activation_fn="geglu")
        else:
            self.attn1 = self_attention()
            self.norm1 = nn.LayerNorm(dim)
            self.attn2 = ContextAttention(
                query_dim=dim,
                cross_attention_dim=cross_attention_dim,
                heads=heads,
                dim_head=dim // heads,
                processor=AudioAttnProcessor(audio_scale),
            )
            self.norm2 = nn.LayerNorm(dim)
            self.ff = FeedForward(dim, activation_fn="geglu")
            self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        ctx: UNetContext | None = None,
        audio: torch.Tensor | None = None,
    ) -> torch.Tensor:
        normed = self.norm1(hidden_states)
        if ctx is not None and ctx.bank_out is not None:
            ctx.bank_out[self.bank_key] = normed
        hidden_states = self.attn1(normed, ctx=ctx) + hidden_states
        if self.attn2 is not None:
            if audio is None:
                raise ValueError("the denoiser needs audio tokens")
            normed = self.norm2(hidden_states)
            hidden_states = self.attn2(normed, encoder_hidden_states=audio, ctx=ctx) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states

    def record(self, hidden_states: torch.Tensor, ctx: UNetContext) -> None:
        """Store only the bank entry (the ``attn1`` input); the rest would feed nothing."""
        ctx.bank_out[self.bank_key] = self.norm1(hidden_states)


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6) → 1x1 conv → transformer block(s) on ``H*W`` tokens → 1x1 conv
    → + input; per frame (frames are in the batch)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        norm_groups: int,
        cross_attention_dim: int | None,
        audio_scale: float,
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, cross_attention_dim, audio_scale)]
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(n, h * w, c)

    def forward(
        self, x: torch.Tensor, ctx: UNetContext | None = None, audio: torch.Tensor | None = None
    ) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self._tokens(x)
        for block in self.transformer_blocks:
            tokens = block(tokens, ctx, audio)
        tokens = tokens.view(n, h, w, c).permute(0, 3, 1, 2).contiguous()
        return self.proj_out(tokens) + x

    def record_bank(self, x: torch.Tensor, ctx: UNetContext) -> None:
        tokens = self._tokens(x)
        for block in self.transformer_blocks[:-1]:
            tokens = block(tokens, ctx)
        self.transformer_blocks[-1].record(tokens, ctx)


def _resnet(cfg: UNetConfig, c_in: int, c_out: int) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=c_in,
        out_channels=c_out,
        temb_channels=cfg.time_embed_dim,
        eps=cfg.norm_eps,
        groups=cfg.norm_num_groups,
        non_linearity="swish",
        output_scale_factor=1.0,
    )


def _transformers(cfg: UNetConfig, channels: int, n: int, video: bool) -> nn.ModuleList:
    cross = cfg.cross_attention_dim if video else None
    return nn.ModuleList(
        [
            SpatialTransformer(
                channels, cfg.attention_heads, cfg.norm_num_groups, cross, cfg.audio_scale
            )
            for _ in range(n)
        ]
    )


def _motions(cfg: UNetConfig, channels: int, n: int) -> nn.ModuleList:
    return nn.ModuleList(
        [
            MotionModule(channels, cfg.motion_heads, cfg.motion_max_len, cfg.motion_norm_groups)
            for _ in range(n)
        ]
    )


class DownBlock(nn.Module):
    def __init__(
        self,
        cfg: UNetConfig,
        c_in: int,
        c_out: int,
        *,
        attention: bool,
        motion: bool,
        downsample: bool,
        video: bool,
    ) -> None:
        super().__init__()
        n = cfg.layers_per_block
        self.attentions = _transformers(cfg, c_out, n, video) if attention else None
        self.resnets = nn.ModuleList(
            [_resnet(cfg, c_in if j == 0 else c_out, c_out) for j in range(n)]
        )
        self.motion_modules = _motions(cfg, c_out, n) if motion else None
        self.downsamplers = (
            nn.ModuleList(
                [
                    Downsample2D(
                        c_out,
                        use_conv=True,
                        out_channels=c_out,
                        padding=cfg.downsample_padding,
                        name="op",
                    )
                ]
            )
            if downsample
            else None
        )

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor, ctx: UNetContext, audio: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[j](h, ctx, audio)
            if self.motion_modules is not None:
                h = self.motion_modules[j](h, ctx.num_frames, ctx)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, channels: int, *, motion: bool, video: bool) -> None:
        super().__init__()
        self.attentions = _transformers(cfg, channels, 1, video)
        self.resnets = nn.ModuleList([_resnet(cfg, channels, channels) for _ in range(2)])
        self.motion_modules = _motions(cfg, channels, 1) if motion else None

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor, ctx: UNetContext, audio: torch.Tensor | None
    ) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, ctx, audio)
        if self.motion_modules is not None:
            h = self.motion_modules[0](h, ctx.num_frames, ctx)
        return self.resnets[1](h, temb)


class UpBlock(nn.Module):
    def __init__(
        self,
        cfg: UNetConfig,
        c_in: int,
        c_out: int,
        c_prev: int,
        *,
        attention: bool,
        motion: bool,
        upsample: bool,
        video: bool,
    ) -> None:
        super().__init__()
        n = cfg.layers_per_block + 1
        self.attentions = _transformers(cfg, c_out, n, video) if attention else None
        resnets = []
        for j in range(n):
            skip = c_in if j == n - 1 else c_out
            resnets.append(_resnet(cfg, (c_prev if j == 0 else c_out) + skip, c_out))
        self.resnets = nn.ModuleList(resnets)
        self.motion_modules = _motions(cfg, c_out, n) if motion else None
        self.upsamplers = (
            nn.ModuleList([Upsample2D(c_out, use_conv=True, out_channels=c_out)])
            if upsample
            else None
        )

    @property
    def num_layers(self) -> int:
        return len(self.resnets)

    def layer(
        self,
        j: int,
        h: torch.Tensor,
        skip: torch.Tensor,
        temb: torch.Tensor,
        ctx: UNetContext,
        audio: torch.Tensor | None,
    ) -> torch.Tensor:
        """Layer ``j``: concat the skip, resnet, [spatial transformer], [motion module]."""
        h = self.resnets[j](torch.cat([h, skip], dim=1), temb)
        if self.attentions is not None:
            h = self.attentions[j](h, ctx, audio)
        if self.motion_modules is not None:
            h = self.motion_modules[j](h, ctx.num_frames, ctx)
        return h

    def forward(
        self,
        h: torch.Tensor,
        skips: Sequence[torch.Tensor],
        temb: torch.Tensor,
        ctx: UNetContext,
        audio: torch.Tensor | None,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``skips`` are this block's skip tensors in down order; layer j takes skips[-1-j]."""
        for j in range(self.num_layers):
            h = self.layer(j, h, skips[-1 - j], temb, ctx, audio)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h


# --------------------------------------------------------------------------- UNets


class _UNetSkeleton(nn.Module):
    """Shared skeleton; ``video`` adds motion modules, audio attention and the output head."""

    def __init__(self, config: UNetConfig, video: bool) -> None:
        super().__init__()
        self.config = cfg = config
        self._video = video
        boc = cfg.block_out_channels
        n = cfg.num_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, boc[0], 3, padding=1)
        self.time_proj = Timesteps(boc[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(boc[0], cfg.time_embed_dim)

        self.down_blocks = nn.ModuleList()
        c_out = boc[0]
        for i in range(n):
            c_in, c_out = c_out, boc[i]
            self.down_blocks.append(
                DownBlock(
                    cfg,
                    c_in,
                    c_out,
                    attention=cfg.attention_blocks[i],
                    motion=video and 2**i in cfg.motion_resolutions,
                    downsample=i < n - 1,
                    video=video,
                )
            )
        self.up_blocks = nn.ModuleList()
        rev = boc[::-1]
        c_out = rev[0]
        for i in range(n):
            c_prev, c_out = c_out, rev[i]
            self.up_blocks.append(
                UpBlock(
                    cfg,
                    rev[min(i + 1, n - 1)],
                    c_out,
                    c_prev,
                    attention=cfg.attention_blocks[n - 1 - i],
                    motion=video and 2 ** (n - 1 - i) in cfg.motion_resolutions,
                    upsample=i < n - 1,
                    video=video,
                )
            )
        self.mid_block = MidBlock(cfg, boc[-1], motion=video and cfg.motion_mid_block, video=video)

        blocks = [(name, m) for name, m in self.named_modules() if isinstance(m, TransformerBlock)]
        for name, block in blocks:
            block.bank_key = name
        #: paths of the transformer blocks, in state-dict order (= the bank keys)
        self.bank_keys: tuple[str, ...] = tuple(name for name, _ in blocks)

    # ---------------------------------------------------------------- helpers

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def time_embedding_for(self, timestep: Any, batch: int, device, dtype) -> torch.Tensor:
        """``[batch, 4*C0]`` from an int/float, a 0-d tensor or a ``[1]``/``[batch]`` tensor."""
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep])
        t = t.to(device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        elif t.numel() != batch:
            raise ValueError(f"{t.numel()} timesteps for a batch of {batch}")
        return self.time_embedding(self.time_proj(t).to(dtype))

    # ---------------------------------------------------------------- processors

    @property
    def attn_processors(self) -> dict[str, Any]:
        """Processors by dotted path (``<module path>.processor``), diffusers style."""
        return {
            f"{name}.processor": m.processor
            for name, m in self.named_modules()
            if isinstance(m, Attention)
        }

    def set_attn_processor(self, processor: Any | Mapping[str, Any]) -> None:
        """One processor for every attention, or a dict keyed like :attr:`attn_processors`."""
        targets = {
            f"{name}.processor": m for name, m in self.named_modules() if isinstance(m, Attention)
        }
        if isinstance(processor, Mapping):
            if set(processor) != set(targets):
                missing = sorted(set(targets) - set(processor))[:3]
                extra = sorted(set(processor) - set(targets))[:3]
                raise ValueError(
                    f"processor dict has {len(processor)} entries for {len(targets)} attention "
                    f"layers (missing e.g. {missing}, unknown e.g. {extra})"
                )
            for key, module in targets.items():
                module.set_processor(processor[key])
        else:
            for module in targets.values():
                module.set_processor(processor)

    def default_attn_processors(self) -> dict[str, Any]:
        """Fresh instances of this model's own processors, keyed like :attr:`attn_processors`:
        reference/audio processors on the denoiser's ``attn1``/``attn2``, diffusers'
        ``AttnProcessor2_0`` elsewhere."""
        out = {}
        for name, m in self.named_modules():
            if not isinstance(m, Attention):
                continue
            parent, _, leaf = name.rpartition(".")
            processor: Any = AttnProcessor2_0()
            if self._video and isinstance(self.get_submodule(parent), TransformerBlock):
                if leaf == "attn1":
                    processor = ReferenceAttnProcessor(parent)
                elif leaf == "attn2":
                    processor = AudioAttnProcessor(self.config.audio_scale)
            out[f"{name}.processor"] = processor
        return out

    def reset_attn_processors(self) -> None:
        self.set_attn_processor(self.default_attn_processors())

    def reset_position_encodings(self, device=None, dtype=None) -> None:
        """Recompute every motion-module position table (after meta init / a file without it)."""
        for m in self.modules():
            if isinstance(m, PositionEncoding):
                m.reset(device, dtype)


class ReferenceNet(_UNetSkeleton):
    """2-D UNet run once on the reference latent; returns its feature bank.

    Transformer blocks have self-attention and feed-forward only; there is no output
    head (EchoMimic's ``reference_unet.pth`` has none).  ``forward`` stops as soon as the
    last bank entry is computed.  ``bank_dtype`` (attribute, or per call) is the storage
    dtype of the bank; None keeps the model dtype (EchoMimic rounds it to float16).
    """

    def __init__(self, config: UNetConfig | None = None, bank_dtype: torch.dtype | None = None):
        super().__init__(config or UNetConfig(), video=False)
        self.bank_dtype = bank_dtype
        self.reset_attn_processors()

    def forward(
        self,
        latents: torch.Tensor,
        timestep: Any = 0,
        *,
        bank_dtype: torch.dtype | None = None,
    ) -> ReferenceBank:
        if latents.ndim != 4 or latents.shape[1] != self.config.in_channels:
            raise ValueError(
                f"ReferenceNet expects latents [B, {self.config.in_channels}, H, W], "
                f"got {tuple(latents.shape)}"
            )
        b, _, height, width = latents.shape
        ctx = UNetContext(batch_size=b, num_frames=1, bank_out={}, height=height, width=width)
        temb = self.time_embedding_for(timestep, b, latents.device, self.dtype)
        h = self.conv_in(latents.to(self.dtype))
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, temb, ctx, None)
            skips.extend(s)
        h = self.mid_block(h, temb, ctx, None)

        with_attention = [i for i, blk in enumerate(self.up_blocks) if blk.attentions is not None]
        stop = with_attention[-1] if with_attention else -1
        forward_size = (
            height % self.config.downsample_factor or width % self.config.downsample_factor
        )
        for i, block in enumerate(self.up_blocks[: stop + 1]):
            n = block.num_layers
            res = skips[-n:]
            del skips[-n:]
            if i < stop:
                size = tuple(skips[-1].shape[-2:]) if forward_size else None
                h = block(h, res, temb, ctx, None, size)
                continue
            for j in range(n - 1):
                h = block.layer(j, h, res[-1 - j], temb, ctx, None)
            h = block.resnets[n - 1](torch.cat([h, res[0]], dim=1), temb)
            block.attentions[n - 1].record_bank(h, ctx)

        dtype = bank_dtype if bank_dtype is not None else self.bank_dtype
        bank = ctx.bank_out
        return {k: bank[k] if dtype is None else bank[k].to(dtype) for k in self.bank_keys}


@dataclass(eq=False)
class UNetState:
    """One prepared denoiser call (see :meth:`VideoUNet.prepare`); tensors are folded
    ``[(B F), …]``.  ``stem`` = conv_in output (+ face feature), the last layer's skip."""

    ctx: UNetContext
    temb: torch.Tensor
    audio: torch.Tensor
    stem: torch.Tensor
    batch_size: int
    num_frames: int
    height: int
    width: int


class VideoUNet(_UNetSkeleton):
    """The denoiser.  ``forward(sample[B,C,F,H,W], timestep, audio[B,F,N,D],
    face_feature=None, bank=None, ref_rows=None) -> [B,C,F,H,W]``.

    * ``timestep``: int/float, 0-d tensor, or ``[B]`` tensor (one timestep per row).
    * ``audio``: per-frame audio tokens; the unconditional CFG row gets zeros (caller).
    * ``face_feature``: face locator output ``[B|1, C0, 1|F, H, W]``, added right
      after ``conv_in`` (broadcast over frames).
    * ``bank``: :data:`ReferenceBank` (entries ``[1|B, L, C]``; a missing entry = no
      reference in that layer); ``ref_rows``: bool ``[B]``, True = that row attends to
      the bank (CFG: ``[False, True]``); None = every row does.
    * ``extras`` (keyword only): a dict handed to processors as ``ctx.extras`` (e.g. an
      accelerator's mask or step index); the model itself ignores it.

    LightningCP seam.  ``forward`` runs, in order:

    1. ``state = prepare(...)``: checks, time embedding, audio folding, ``conv_in`` (+ face
       feature) → ``state.stem``, and the per-call :class:`UNetContext`;
    2. ``h = run_to_last_layer(state)``: down blocks, mid block, up blocks except the
       last layer of the last up block; ``h`` is the hidden state entering that layer
       (``[(B F), C, H, W]``, before the skip concat);
    3. ``h = last_layer_input(h)``: an ``nn.Identity`` tap — a forward hook on it sees
       (and may replace) the feature to cache;
    4. ``h = run_last_layer(state, h)``: cat(h, ``state.stem``) → last resnet → spatial
       transformer (reference + audio attention) → motion module;
    5. ``run_head(state, h)``: ``conv_norm_out`` → SiLU → ``conv_out`` → ``[B,C,F,H,W]``.

    A non-key step is ``run_head(s, run_last_layer(s, cached))`` with ``s = prepare(...)``
    (``prepare`` only runs ``conv_in``), which gives the fresh skip from ``conv_in``.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__(config or UNetConfig(), video=True)
        c0 = self.config.block_out_channels[0]
        self.conv_norm_out = nn.GroupNorm(
            self.config.norm_num_groups, c0, eps=self.config.norm_eps, affine=True
        )
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(c0, self.config.out_channels, 3, padding=1)
        self.last_layer_input = nn.Identity()
        self.reset_attn_processors()

    # ---------------------------------------------------------------- call stages

    def prepare(
        self,
        sample: torch.Tensor,
        timestep: Any,
        audio: torch.Tensor,
        face_feature: torch.Tensor | None = None,
        bank: Mapping[str, torch.Tensor] | None = None,
        ref_rows: torch.Tensor | Sequence[bool] | None = None,
        *,
        extras: dict[str, Any] | None = None,
    ) -> UNetState:
        cfg = self.config
        if sample.ndim != 5 or sample.shape[1] != cfg.in_channels:
            raise ValueError(
                f"denoiser expects sample [B, {cfg.in_channels}, F, H, W], "
                f"got {tuple(sample.shape)}"
            )
        b, c, f, height, width = sample.shape
        if f > cfg.motion_max_len:
            raise ValueError(
                f"{f} frames in one call; the motion modules allow {cfg.motion_max_len}"
            )
        if (
            audio.ndim != 4
            or tuple(audio.shape[:2]) != (b, f)
            or audio.shape[3] != cfg.cross_attention_dim
        ):
            raise ValueError(
                f"audio must be [{b}, {f}, N, {cfg.cross_attention_dim}], got {tuple(audio.shape)}"
            )
        dtype, device = self.dtype, sample.device
        if bank is not None:
            unknown = set(bank) - set(self.bank_keys)
            if unknown:
                raise ValueError(f"bank has keys this model does not have: {sorted(unknown)[:3]}")
            for key, value in bank.items():
                if value.ndim != 3 or value.shape[0] not in (1, b):
                    raise ValueError(
                        f"bank[{key!r}] must be [1 or {b}, tokens, channels], "
                        f"got {tuple(value.shape)}"
                    )
        ctx = UNetContext(
            batch_size=b,
            num_frames=f,
            bank=bank,
            ref_rows=ref_rows,
            extras={} if extras is None else extras,
            device=device,
            height=height,
            width=width,
        )

        temb = self.time_embedding_for(timestep, b, device, dtype).repeat_interleave(f, dim=0)
        stem = self.conv_in(sample.to(dtype).transpose(1, 2).reshape(b * f, c, height, width))
        if face_feature is not None:
            c0 = cfg.block_out_channels[0]
            ok = (
                face_feature.ndim == 5
                and face_feature.shape[0] in (1, b)
                and face_feature.shape[1] == c0
                and face_feature.shape[2] in (1, f)
                and tuple(face_feature.shape[3:]) == (height, width)
            )
            if not ok:
                raise ValueError(
                    f"face_feature must be [1|{b}, {c0}, 1|{f}, {height}, {width}], "
                    f"got {tuple(face_feature.shape)}"
                )
            stem = stem.view(b, f, c0, height, width) + face_feature.to(dtype).transpose(1, 2)
            stem = stem.view(b * f, c0, height, width)
        audio_tokens = audio.to(dtype).reshape(b * f, audio.shape[2], audio.shape[3])
        return UNetState(ctx, temb, audio_tokens, stem, b, f, height, width)

    def run_to_last_layer(self, state: UNetState) -> torch.Tensor:
        ctx, temb, audio = state.ctx, state.temb, state.audio
        h = state.stem
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, temb, ctx, audio)
            skips.extend(s)
        h = self.mid_block(h, temb, ctx, audio)
        factor = self.config.downsample_factor
        forward_size = state.height % factor or state.width % factor
        last = len(self.up_blocks) - 1
        for i, block in enumerate(self.up_blocks):
            n = block.num_layers
            res = skips[-n:]
            del skips[-n:]
            if i < last:
                size = tuple(skips[-1].shape[-2:]) if forward_size else None
                h = block(h, res, temb, ctx, audio, size)
            else:
                for j in range(n - 1):
                    h = block.layer(j, h, res[-1 - j], temb, ctx, audio)
        return h

    def run_last_layer(self, state: UNetState, h: torch.Tensor) -> torch.Tensor:
        block = self.up_blocks[-1]
        return block.layer(block.num_layers - 1, h, state.stem, state.temb, state.ctx, state.audio)

    def run_head(self, state: UNetState, h: torch.Tensor) -> torch.Tensor:
        out = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        b, f = state.batch_size, state.num_frames
        return out.view(b, f, *out.shape[1:]).transpose(1, 2).contiguous()

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        audio: torch.Tensor,
        face_feature: torch.Tensor | None = None,
        bank: Mapping[str, torch.Tensor] | None = None,
        ref_rows: torch.Tensor | Sequence[bool] | None = None,
        *,
        extras: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        state = self.prepare(sample, timestep, audio, face_feature, bank, ref_rows, extras=extras)
        h = self.run_to_last_layer(state)
        h = self.last_layer_input(h)
        h = self.run_last_layer(state, h)
        return self.run_head(state, h)
