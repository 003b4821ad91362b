"""Whisper's audio encoder, the way EchoMimic v1 uses it (whisper-tiny: 384 wide, 4 blocks).

EchoMimic does not use whisper's final output: it keeps the hidden state after the
conv/positional stem and after each residual block (``ln_post`` is not applied to them),
``n_layer + 1`` tensors per 20 ms feature frame.  Its audio front end, reproduced here:

* the log-mel spectrogram of the WHOLE utterance (16 kHz, 400-point Hann STFT, hop 160,
  the last STFT frame dropped, librosa's Slaney mel filters, ``log10`` floored at 1e-10
  and at 8 decades below the utterance's maximum, then ``(x + 4) / 4``), 100 frames/s;
* cut into consecutive 30 s segments of 3000 mel frames (``2 * n_audio_ctx``); the last
  one is padded with zeros *in the log-mel domain* to the full 3000 frames and the
  encoder always runs on full segments;
* of each segment's 1500 feature frames only ``mel_frames_in_segment // 2`` are kept,
  and the segments are concatenated: ``T = sum(frames // 2)``, about 50 per second.

Parameter names are OpenAI's (``encoder.conv1.weight``, ``encoder.blocks.0.attn.query.weight``,
...), so ``whisper_tiny.pt`` (``{"dims": ..., "model_state_dict": ...}``) loads strictly.
As in whisper, layer norms and the positional embedding are computed in float32 whatever
the compute dtype (fp16 on GPU, like EchoMimic's ``transcribe`` default).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError
from ..stages.audio import log_mel
from .loading import _first_line, load_state_file, load_strict

__all__ = [
    "WhisperAudioEncoder",
    "WhisperDims",
    "WhisperEncoder",
    "load_whisper_encoder",
    "log_mel_spectrogram",
    "sinusoids",
    "whisper_dims_metadata",
    "whisper_state_dict",
]

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160  # 100 mel frames per second; conv2's stride 2 makes the 50 Hz features
_PREFIX = "encoder."
_POS_KEY = "positional_embedding"
_HEAD_WIDTH = 64  # every released whisper size has 64-wide heads (tiny: 384 / 6)


@dataclass(frozen=True)
class WhisperDims:
    """The audio side of whisper's ``ModelDimensions`` (defaults: tiny)."""

    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 384
    n_audio_head: int = 6
    n_audio_layer: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"whisper dims: {f.name} must be a positive int, not {value!r}")
        if self.n_audio_state % self.n_audio_head or (self.n_audio_state // 2) < 2:
            raise ValueError(
                f"whisper dims: n_audio_state {self.n_audio_state} must split into "
                f"{self.n_audio_head} heads and be at least 4"
            )

    @classmethod
    def from_dict(cls, dims: Mapping[str, object]) -> WhisperDims:
        """From a checkpoint's ``dims`` (text-side keys such as ``n_vocab`` are ignored)."""
        names = [f.name for f in fields(cls)]
        absent = [n for n in names if n not in dims]
        if absent:
            raise ValueError(f"dims lack {', '.join(absent)}")
        return cls(**{n: dims[n] for n in names})  # type: ignore[arg-type]

    @property
    def n_segment_frames(self) -> int:
        """Mel frames of one encoder input (3000 = 30 s for every released size)."""
        return 2 * self.n_audio_ctx


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> torch.Tensor:
    """Whisper's fixed positional embedding ``[length, channels]``: sines then cosines."""
    half = channels // 2
    rates = torch.exp(-math.log(max_timescale) / (half - 1) * torch.arange(half))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * rates[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


# ---------------------------------------------------------------------------- network


class _LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32, result in the input's dtype (as whisper does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class _SelfAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    """Pre-norm residual block: self-attention, then a 4x GELU MLP."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = _SelfAttention(n_state, n_head)
        self.attn_ln = _LayerNorm(n_state)
        self.mlp = nn.Sequential(
            nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state)
        )
        self.mlp_ln = _LayerNorm(n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class WhisperEncoder(nn.Module):
    """Whisper's ``AudioEncoder`` returning EchoMimic's hidden states.

    ``forward(mel [B, n_mels, 2 * n_audio_ctx])`` -> ``[B, n_audio_ctx, n_audio_layer + 1,
    n_audio_state]``: the stem output (``gelu(conv1)``, ``gelu(conv2)``, + positional
    embedding), then each block's output.  ``ln_post`` exists (its weights are in the
    checkpoints) but EchoMimic does not use its output, so neither does ``forward``.
    """

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        self.dims = dims
        d = dims.n_audio_state
        self.conv1 = nn.Conv1d(dims.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer(_POS_KEY, sinusoids(dims.n_audio_ctx, d))
        self.blocks = nn.ModuleList(
            [_Block(d, dims.n_audio_head) for _ in range(dims.n_audio_layer)]
        )
        self.ln_post = _LayerNorm(d)

    positional_embedding: torch.Tensor

    def set_compute_dtype(self, dtype: torch.dtype) -> WhisperEncoder:
        """Linear and conv weights in ``dtype``; layer norms and positions stay float32."""
        self.float()
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d)):
                m.to(dtype)
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        expected = (self.dims.n_mels, self.dims.n_segment_frames)
        if mel.ndim != 3 or tuple(mel.shape[1:]) != expected:
            raise ValueError(f"whisper encoder input must be [B, {expected[0]}, {expected[1]}]")
        x = mel.to(self.compute_dtype)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [B, n_ctx, D]
        x = (x.float() + self.positional_embedding.float()).to(x.dtype)
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return torch.stack(states, dim=2)


# --------------------------------------------------------------------------- front end


def log_mel_spectrogram(samples_16k: np.ndarray | torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Whisper's log-mel ``[n_mels, N // 160]`` (at least one frame) of 16 kHz audio, float32.

    Centred 400-point Hann STFT with reflect padding, hop 160, power of every frame but
    the last, librosa's mel filters, ``log10`` floored at 1e-10 and at the maximum minus
    8, then ``(x + 4) / 4``.
    """
    if torch.is_tensor(samples_16k):
        samples_16k = samples_16k.detach().cpu().float().numpy()
    return log_mel(samples_16k, SAMPLE_RATE, n_mels=n_mels, hop=HOP_LENGTH, n_fft=N_FFT).T


class WhisperAudioEncoder:
    """:class:`~lightningcp_cli.models.audio_encoder.AudioEncoder` over a whisper encoder.

    ``encode`` follows EchoMimic's ``Audio2Feature.audio2feat`` (see the module
    docstring): ``[T, n_layer + 1, n_state]`` float32 on CPU, ``T = sum over 30 s
    segments of mel_frames // 2`` (at least 1), i.e. ``int(duration * 50)`` for audio
    shorter than 30 s.  ``batch`` segments run through the network at a time.
    """

    def __init__(self, model: WhisperEncoder, *, name: str | None = None, batch: int = 8) -> None:
        dims = model.dims
        tiny = dims == WhisperDims()
        self.model = model.eval()
        self.dims = dims
        default = "whisper-tiny" if tiny else f"whisper-{dims.n_audio_state}x{dims.n_audio_layer}"
        self.name = name or default
        self.layers = dims.n_audio_layer + 1
        self.dim = dims.n_audio_state
        self.feature_rate = 50
        self.sample_rate = SAMPLE_RATE
        self.batch = max(1, int(batch))

    @property
    def device(self) -> torch.device:
        return self.model.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    def __repr__(self) -> str:
        return f"WhisperAudioEncoder({self.name}, device={self.device}, dtype={self.dtype})"

    def segments(self, mel: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """``mel [n_mels, F]`` -> zero-padded 30 s segments ``[S, n_mels, 2 * n_ctx]`` and
        the number of feature frames kept from each."""
        seg = self.dims.n_segment_frames
        total = mel.shape[1]
        starts = list(range(0, max(total, 1), seg))
        out = mel.new_zeros(len(starts), mel.shape[0], seg)
        keep = []
        for i, s in enumerate(starts):
            piece = mel[:, s : s + seg]
            out[i, :, : piece.shape[1]] = piece
            keep.append(piece.shape[1] // 2)
        if sum(keep) == 0:  # under 20 ms of audio: still one frame
            keep[0] = 1
        return out, keep

    @torch.inference_mode()
    def encode(self, samples_16k: np.ndarray) -> torch.Tensor:
        mel = log_mel_spectrogram(samples_16k, self.dims.n_mels)
        segs, keep = self.segments(mel)
        parts = []
        for i in range(0, segs.shape[0], self.batch):
            x = segs[i : i + self.batch].to(self.device)
            hidden = self.model(x).float().cpu()  # [b, n_ctx, L, D]
            parts.extend(h[:k] for h, k in zip(hidden, keep[i : i + self.batch], strict=True))
        return torch.cat(parts, dim=0).contiguous()


# ----------------------------------------------------------------------------- loading


def _infer_dims(state: Mapping[str, torch.Tensor], path: Path) -> WhisperDims:
    """Dims from tensor shapes (heads: whisper's 64-wide heads; context: 1500 if absent)."""
    conv1 = state.get(_PREFIX + "conv1.weight")
    if conv1 is None or conv1.ndim != 3:
        raise ModelLoadError(f"{path}: no {_PREFIX}conv1.weight [state, n_mels, 3] to size it")
    n_state, n_mels = int(conv1.shape[0]), int(conv1.shape[1])
    pos = state.get(_PREFIX + _POS_KEY)
    n_ctx = int(pos.shape[0]) if pos is not None and pos.ndim == 2 else 1500
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.blocks\.(\d+)\.", k))}
    n_layer = max(blocks) + 1 if blocks else 0
    try:
        return WhisperDims(n_mels, n_ctx, n_state, max(1, n_state // _HEAD_WIDTH), n_layer)
    except ValueError as e:
        raise ModelLoadError(f"{path}: cannot size the encoder from its shapes ({e})") from None


def read_whisper_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The state dict and the ``dims`` dict (None when the file has none)."""
    if path.suffix.lower() == ".safetensors":
        state = load_state_file(path)
        dims = None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if "dims" in meta:
                dims = json.loads(meta["dims"])
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read its dims metadata ({_first_line(e)})") from e
        return state, dims
    if not path.is_file():
        raise ModelLoadError(f"{path}: weights file does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read weights ({_first_line(e)})") from e
    dims = None
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        dims = obj.get("dims")
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ModelLoadError(f"{path}: not a whisper checkpoint (expected dims + model_state_dict)")
    if dims is not None and not isinstance(dims, Mapping):
        raise ModelLoadError(f"{path}: 'dims' is not a mapping")
    return dict(obj), None if dims is None else dict(dims)


def load_whisper_encoder(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WhisperAudioEncoder:
    """Read whisper's encoder from ``whisper_tiny.pt`` or a ``.safetensors`` state dict.

    ``.pt``/``.pth``: OpenAI's ``{"dims": {...}, "model_state_dict": {...}}`` (read with
    ``weights_only=True``) or a bare state dict.  ``.safetensors``: a state dict, with the
    dims as JSON in the ``"dims"`` metadata entry or inferred from the shapes.  Every
    ``encoder.*`` key must land on a tensor of the same shape and every encoder tensor must
    be covered (``encoder.positional_embedding`` may be absent: it is recomputed);
    ``decoder.*`` keys are ignored.  Raises :class:`ModelLoadError` naming the file, the
    keys and the shapes.
    """
    path = Path(path)
    state, dims_dict = read_whisper_checkpoint(path)
    if dims_dict is None:
        dims = _infer_dims(state, path)
    else:
        try:
            dims = WhisperDims.from_dict(dims_dict)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{path}: bad whisper dims ({e})") from None
    encoder_state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    if not any(k.startswith(_PREFIX) for k in encoder_state):
        raise ModelLoadError(f"{path}: no {_PREFIX}* keys (not a whisper checkpoint)")

    with torch.device("meta"):
        holder = nn.ModuleDict({"encoder": WhisperEncoder(dims)})
    keys = [
        k
        for k in holder.state_dict(keep_vars=True)
        if k != _PREFIX + _POS_KEY or k in encoder_state
    ]
    load_strict(holder, encoder_state, str(path), keys=keys, assign=True)
    encoder: WhisperEncoder = holder["encoder"]  # type: ignore[assignment]
    if encoder.positional_embedding.is_meta:
        encoder.positional_embedding = sinusoids(dims.n_audio_ctx, dims.n_audio_state)
    encoder.to(device=torch.device(device)).set_compute_dtype(dtype)
    return WhisperAudioEncoder(encoder.eval())


def whisper_state_dict(encoder: WhisperEncoder) -> dict[str, torch.Tensor]:
    """``encoder.*`` state dict of ``encoder`` (for writing test checkpoints)."""
    return {_PREFIX + k: v for k, v in encoder.state_dict().items()}


def whisper_dims_metadata(dims: WhisperDims) -> dict[str, str]:
    """safetensors metadata that records ``dims``."""
    return {"dims": json.dumps(asdict(dims))}
