"""Static-feature caching: denoiser inputs no step changes, projected once per video.

* Reference keys/values: ``to_k``/``to_v`` of each reference-attention layer applied to
  that layer's bank tokens; computed at the layer's first call of a run and reused by
  every step and window (the bank is one tensor per video).
* Audio keys/values: ``to_k``/``to_v`` of each audio cross-attention layer applied to the
  whole video's audio tokens plus one all-zero row (what the unconditional CFG rows
  see): a table ``[F + 1, N, C]`` per layer; a call picks its rows by frame index
  (:func:`audio_row_index`).
* The face locator runs once per render already (``api.render``; with a mouth track,
  once per frame per chunk of the video), and the reference bank once per video
  (``stages.reference`` with its disk cache).

The cache is a per-run state object (:meth:`StaticFeatures.reset`) that the sampler owns
and hands to the processors through the per-call context (``processors.AccelCall``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.attention_processor import Attention


def audio_row_index(
    frames: Sequence[int], conditional: Sequence[bool], zero_row: int, device=None
) -> torch.Tensor:
    """Table row of every folded ``(B f)`` row: ``frames`` for conditional batch rows,
    ``zero_row`` (the all-zero audio) for the others.  ``[len(conditional) * len(frames)]``."""
    f = torch.as_tensor(list(frames), dtype=torch.long, device=device)
    zero = torch.full_like(f, zero_row)
    return torch.cat([f if c else zero for c in conditional])


class StaticFeatures:
    """Per-run cache of projected reference and audio tokens (see module doc)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.audio: torch.Tensor | None = None  # [F, N, D]
        self._reference: dict[
            str, tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor]
        ] = {}
        self._audio_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.computed = 0  # projections computed (tests and stats)
        self.reused = 0

    def set_audio(self, audio: torch.Tensor) -> None:
        """The whole video's audio tokens, ``[F, N, D]`` or ``[1, F, N, D]``."""
        if audio.ndim == 4:
            if audio.shape[0] != 1:
                raise ValueError(f"audio must be [1, F, N, D], got {tuple(audio.shape)}")
            audio = audio[0]
        if audio.ndim != 3:
            raise ValueError(f"audio must be [F, N, D], got {tuple(audio.shape)}")
        self.audio = audio
        self._audio_kv.clear()

    @property
    def zero_row(self) -> int:
        """Table row of the all-zero audio (= number of frames)."""
        if self.audio is None:
            raise RuntimeError("StaticFeatures: set_audio() first")
        return int(self.audio.shape[0])

    def reference_kv(
        self, name: str, attn: Attention, bank: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``to_k``/``to_v`` of ``bank`` (``[1|B, L, C]``) cast to ``dtype``; cached by identity."""
        hit = self._reference.get(name)
        if hit is not None and hit[0] is bank and hit[1] == dtype:
            self.reused += 1
            return hit[2], hit[3]
        tokens = bank.to(device=attn.to_k.weight.device, dtype=dtype)
        k, v = attn.to_k(tokens), attn.to_v(tokens)
        self._reference[name] = (bank, dtype, k, v)
        self.computed += 1
        return k, v

    def audio_kv(
        self, name: str, attn: Attention, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key/value tables ``[F + 1, N, C]`` (last row: zero audio)."""
        hit = self._audio_kv.get(name)
        if hit is not None and hit[0].dtype == dtype:
            self.reused += 1
            return hit
        if self.audio is None:
            raise RuntimeError("StaticFeatures: set_audio() first")
        audio = self.audio.to(device=attn.to_k.weight.device, dtype=dtype)
        tokens = torch.cat([audio, torch.zeros_like(audio[:1])])
        kv = (attn.to_k(tokens), attn.to_v(tokens))
        self._audio_kv[name] = kv
        self.computed += 1
        return kv
