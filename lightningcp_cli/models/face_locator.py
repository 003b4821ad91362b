"""Face locator: a small conv net that turns the face-box mask into a UNet feature.

Layout of EchoMimic v1's ``face_locator.pth``: ``conv_in``, ``blocks.0 … blocks.2n-1``
(pairs: a same-width 3x3 conv, then a stride-2 3x3 conv to the next width), ``conv_out``
(zero-initialised upstream); SiLU after every conv but the last.  Frames are folded into
the batch ("inflated" 2-D convs), so a mask of one frame gives a feature of one frame that
the denoiser broadcasts over the video.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FaceLocatorConfig:
    """EchoMimic v1: ``FaceLocator(320, conditioning_channels=1, (16, 32, 96, 256))``."""

    out_channels: int = 320  # = the denoiser's block_out_channels[0]
    conditioning_channels: int = 1
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if not self.block_out_channels or any(c <= 0 for c in self.block_out_channels):
            raise ValueError("face locator block_out_channels must be positive and non-empty")
        if self.out_channels <= 0 or self.conditioning_channels <= 0:
            raise ValueError("face locator channel counts must be > 0")

    @property
    def downsample_factor(self) -> int:
        """Mask pixels per feature pixel (one stride-2 conv per width step)."""
        return 2 ** (len(self.block_out_channels) - 1)


class FaceLocator(nn.Module):
    """``forward(mask [B, 1, H, W] or [B, 1, F, H, W]) -> [B, C0, 1|F, H/s, W/s]``."""

    def __init__(self, config: FaceLocatorConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or FaceLocatorConfig()
        widths = config.block_out_channels
        self.conv_in = nn.Conv2d(config.conditioning_channels, widths[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        if mask.ndim == 4:
            mask = mask.unsqueeze(2)
        if mask.ndim != 5 or mask.shape[1] != self.config.conditioning_channels:
            raise ValueError(
                f"face locator expects a mask [B, {self.config.conditioning_channels}, (F,) H, W], "
                f"got {tuple(mask.shape)}"
            )
        b, c, f, h, w = mask.shape
        x = mask.transpose(1, 2).reshape(b * f, c, h, w)
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        x = self.conv_out(x)
        return x.view(b, f, *x.shape[1:]).transpose(1, 2).contiguous()
