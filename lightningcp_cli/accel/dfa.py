"""Decoupled foreground attention (DFA): the pure parts.

At non-key steps attention is computed only for the foreground (face) tokens, gathered
with ``index_select`` (a boolean attention mask would be slower than full attention on
CPU); the background tokens' outputs are those the same layer produced at the last key
step for the same window.  This module holds the mask -> index logic, gather/scatter and
the background store; the processors that use them live in :mod:`.processors`.

Masks: the face stage's ``foreground_mask`` averaged onto the latent grid
(``FaceAnalysis.latent_mask("foreground", codec_factor, soft=True)``) is the coverage of
every latent cell; each layer's grid (latent / 2**level) averages it further, keeps cells
with coverage above the threshold and grows them by ``dilate`` x the grid side.  A mask
that is empty or covers more than ``max_fraction`` of its grid gives ``None``: full
attention in that layer.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import torch
import torch.nn.functional as F

from ..config import DFAConfig
from ..errors import AccelerationError


def level_mask(coverage: torch.Tensor, level: int, threshold: float, dilate: float) -> torch.Tensor:
    """Boolean ``[h / 2**level, w / 2**level]`` foreground of a layer's grid.

    ``coverage`` is the latent grid's foreground coverage ``[h, w]`` in [0, 1].  Cells of
    the layer grid average their ``2**level`` x ``2**level`` latent cells; ``threshold``
    0 keeps any overlap.  ``dilate`` grows the mask by ``ceil(dilate * side)`` cells.
    """
    if coverage.ndim != 2:
        raise ValueError(f"coverage must be [h, w], got {tuple(coverage.shape)}")
    x = coverage.to(torch.float32)[None, None]
    k = 2**level
    if k > 1:
        if x.shape[-1] % k or x.shape[-2] % k:
            raise ValueError(f"grid {tuple(coverage.shape)} is not divisible by {k}")
        x = F.avg_pool2d(x, k)
    mask = x > 0 if threshold <= 0 else x >= threshold
    cells = math.ceil(dilate * max(mask.shape[-2:]))
    if cells > 0 and mask.any():
        mask = F.max_pool2d(mask.float(), 2 * cells + 1, stride=1, padding=cells) > 0
    return mask[0, 0]


def foreground_index(
    mask: torch.Tensor, min_fraction: float = 0.0, max_fraction: float = 1.0
) -> torch.Tensor | None:
    """Flat token indices (row-major) of a boolean grid mask; None = use full attention.

    None when the mask is empty, covers at most ``min_fraction`` of the grid, or covers
    more than ``max_fraction`` of it (nothing left worth skipping).
    """
    flat = mask.reshape(-1).bool()
    n = int(flat.sum())
    fraction = n / max(flat.numel(), 1)
    if n == 0 or fraction <= min_fraction or fraction > max_fraction:
        return None
    return flat.nonzero().reshape(-1)


def foreground_indices(
    coverage: torch.Tensor, levels: int, config: DFAConfig, device=None
) -> dict[int, torch.Tensor | None]:
    """Token count of each layer grid -> its foreground indices (or None: full)."""
    out: dict[int, torch.Tensor | None] = {}
    for level in range(levels):
        mask = level_mask(coverage, level, config.threshold, config.dilate)
        idx = foreground_index(mask, config.min_fraction, config.max_fraction)
        out[mask.numel()] = None if idx is None else idx.to(device)
    return out


def gather_tokens(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The tokens ``index`` along ``dim`` (a copy)."""
    return x.index_select(dim, index)


def scatter_tokens(
    background: torch.Tensor, index: torch.Tensor, values: torch.Tensor, dim: int = 1
) -> torch.Tensor:
    """A new tensor: ``background`` with the tokens ``index`` along ``dim`` set to ``values``."""
    return background.index_copy(dim, index, values.to(background.dtype))


def repeat_rows(cached: torch.Tensor, batch: int, repeat: int) -> torch.Tensor:
    """Rows of a call batched over ``repeat`` steps from rows stored for ``batch`` rows.

    ``cached`` holds ``batch`` equal-sized chunks of rows (one per batch row); the batched
    call's batch rows are ordered (batch row, step), so each chunk is repeated ``repeat``
    times in place.  A view when ``repeat == 1``.
    """
    if repeat == 1:
        return cached
    if cached.shape[0] % batch:
        raise ValueError(f"{cached.shape[0]} rows do not split into {batch} batch rows")
    chunk = cached.shape[0] // batch
    x = cached.view(batch, 1, chunk, *cached.shape[1:])
    x = x.expand(batch, repeat, chunk, *cached.shape[1:])
    return x.reshape(batch * repeat * chunk, *cached.shape[1:])


class BackgroundStore:
    """One layer's outputs at the last key step, per window slot (state with ``reset``)."""

    def __init__(self) -> None:
        self._slots: dict[Hashable, tuple[torch.Tensor, int]] = {}

    def reset(self) -> None:
        self._slots.clear()

    def __contains__(self, slot: Hashable) -> bool:
        return slot in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def store(self, slot: Hashable, output: torch.Tensor, batch: int) -> None:
        self._slots[slot] = (output, batch)

    def background(self, slot: Hashable, batch: int, repeat: int, layer: str) -> torch.Tensor:
        """The stored output laid out for a call of ``batch`` rows over ``repeat`` steps."""
        hit = self._slots.get(slot)
        if hit is None:
            raise AccelerationError(f"DFA: no key-step output of {layer} for window {slot!r}")
        output, stored = hit
        if stored * repeat != batch:
            raise AccelerationError(
                f"DFA: {layer} stored {stored} batch rows, the call has {batch} for {repeat} steps"
            )
        return repeat_rows(output, stored, repeat)
