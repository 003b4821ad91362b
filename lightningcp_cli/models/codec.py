"""Latent codecs: images in [-1, 1] <-> the latent grid the diffusion model works on.

Three kinds share one small protocol (:class:`LatentCodec`):

- :class:`PixelCodec` is weight-free and exactly invertible: latents are the image's
  ``factor`` x ``factor`` pixel blocks folded into channels (``pixel_unshuffle``).  Tests
  use it.
- :class:`DctCodec` is weight-free and JPEG-like; the bundled lcp-tiny uses it.
- :class:`VaeCodec` wraps a diffusers ``AutoencoderKL`` (EchoMimic: sd-vae-ft-mse,
  latents scaled by 0.18215).

All take and give float tensors; callers move data to the codec's device and dtype
with :func:`image_to_tensor` and back with :func:`tensor_to_images`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, ModelLoadError

if TYPE_CHECKING:  # diffusers is slow to import; only the VAE path needs it
    from diffusers import AutoencoderKL

#: Latent scale of Stable Diffusion 1.x VAEs (sd-vae-ft-mse), used by EchoMimic v1.
SD_VAE_SCALING = 0.18215

#: Sub-folders of a weights folder searched for a diffusers VAE, in order.
VAE_SUBFOLDERS = ("sd-vae-ft-mse", "vae")


@runtime_checkable
class LatentCodec(Protocol):
    """Maps images ``[N, 3, H, W]`` in [-1, 1] to latents ``[N, C, H/factor, W/factor]``."""

    @property
    def factor(self) -> int: ...

    @property
    def channels(self) -> int: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def _check_images(images: torch.Tensor, factor: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image size {w}x{h} is not a multiple of the codec factor {factor}")


def _check_latents(latents: torch.Tensor, channels: int) -> None:
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise ValueError(f"expected latents [N, {channels}, h, w], got {tuple(latents.shape)}")


@dataclass(frozen=True)
class PixelCodec:
    """Weight-free, exactly invertible codec: ``pixel_unshuffle(image) * scale``.

    ``channels`` is ``3 * factor**2`` (48 for the default factor 4).  Output of
    :meth:`decode` is not clamped, so ``decode(encode(x)) == x`` up to float rounding.
    """

    factor: int = 4
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(f"pixel codec factor must be >= 1, not {self.factor}")
        if self.scale <= 0:
            raise ValueError(f"pixel codec scale must be > 0, not {self.scale}")

    @property
    def channels(self) -> int:
        return 3 * self.factor * self.factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.factor)
        return F.pixel_unshuffle(images, self.factor) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _check_latents(latents, self.channels)
        return F.pixel_shuffle(latents / self.scale, self.factor)


def _dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D[k, i]`` (rows are basis vectors)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()


def _zigzag(n: int) -> list[tuple[int, int]]:
    """JPEG's zigzag order of the ``n x n`` frequencies (low to high)."""
    return sorted(
        ((u, v) for u in range(n) for v in range(n)),
        key=lambda p: (p[0] + p[1], p[0] if (p[0] + p[1]) % 2 else p[1]),
    )


#: Typical standard deviation of the first 16 zigzag DCT coefficients of 8x8 blocks of
#: face crops in [-1, 1] (measured once on the five bundled portraits at 128 px); dividing
#: by it gives latents of unit scale, like a VAE's scaling factor.
DCT_COEFFICIENT_STD = (
    4.2, 0.98, 0.8, 0.37, 0.38, 0.51, 0.29, 0.22, 0.22, 0.22, 0.13, 0.15, 0.16, 0.16, 0.21, 0.15
)  # fmt: skip

#: JPEG's (BT.601 full-range) RGB -> YCbCr matrix; rows Y, Cb, Cr.
YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))

#: The same for Y (24 frequencies), Cb and Cr (4 each), measured on 120 training frames
#: of the data engine's corpus (128 px).
YCBCR_COEFFICIENT_STD = (
    (3.74, 0.76, 0.65, 0.32, 0.31, 0.33, 0.19, 0.17, 0.18, 0.18, 0.10, 0.12,
     0.12, 0.11, 0.12, 0.075, 0.073, 0.08, 0.085, 0.075, 0.063, 0.043, 0.047, 0.058),
    (1.23, 0.17, 0.12, 0.051),
    (1.58, 0.22, 0.17, 0.068),
)  # fmt: skip
#: Latent channels of the YCbCr codec that carry luma; the rest (Cb, then Cr) carry colour.
YCBCR_LUMA_CHANNELS = len(YCBCR_COEFFICIENT_STD[0])


@dataclass(frozen=True)
class DctCodec:
    """Weight-free JPEG-like codec: the lowest zigzag DCT frequencies of each ``factor x
    factor`` block of each colour channel, scaled to unit variance.

    ``color="rgb"`` keeps ``coefficients`` frequencies of each of R, G and B (48 latent
    channels at 16).  ``color="ycbcr"`` converts to JPEG's YCbCr first and keeps 24
    frequencies of luma but 4 of each chroma channel (32 channels): the eye, and face
    mesh, find lips by their luma edges, so the same budget goes where the mouth's detail
    is (mouth-box round trip on corpus crops: 27.9 dB against 24.6 dB for RGB x 16).

    Why not raw pixels: a pixel-unshuffled patch has ``3 * factor**2`` channels (192 at
    factor 8), and a small UNet trained with v-prediction on them never learned the
    low-noise steps (measured).  The round trip reaches ~31 dB PSNR on 128 px face crops.
    """

    factor: int = 8
    coefficients: int = 16
    color: str = "rgb"

    def __post_init__(self) -> None:
        if self.factor != 8 or not 1 <= self.coefficients <= len(DCT_COEFFICIENT_STD):
            raise ValueError("DCT codec: factor 8 and 1..16 coefficients are supported")
        if self.color not in ("rgb", "ycbcr"):
            raise ValueError(f"DCT codec: color must be 'rgb' or 'ycbcr', not {self.color!r}")

    @property
    def _stds(self) -> tuple[tuple[float, ...], ...]:
        """Per colour channel, the kept frequencies' standard deviations."""
        if self.color == "ycbcr":
            return YCBCR_COEFFICIENT_STD
        return (DCT_COEFFICIENT_STD[: self.coefficients],) * 3

    @property
    def channels(self) -> int:
        return sum(len(s) for s in self._stds)

    def _basis(self, like: torch.Tensor) -> torch.Tensor:
        d = _dct_matrix(self.factor)
        basis = torch.stack([torch.outer(d[u], d[v]).flatten() for u, v in _zigzag(self.factor)])
        return basis.to(like.device, like.dtype)  # [64, 64], zigzag order

    def _color(self, like: torch.Tensor, inverse: bool = False) -> torch.Tensor | None:
        if self.color == "rgb":
            return None
        m = torch.tensor(YCBCR, dtype=torch.float64)
        return (torch.linalg.inv(m) if inverse else m).to(like.device, like.dtype)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.factor)
        n, c, h, w = images.shape
        f = self.factor
        m = self._color(images)
        if m is not None:
            images = torch.einsum("dc,nchw->ndhw", m, images)
        blocks = F.pixel_unshuffle(images, f).view(n, c, f * f, h // f, w // f)
        coef = torch.einsum("kp,ncpij->nckij", self._basis(images), blocks)
        parts = []
        for ch, std in enumerate(self._stds):
            scale = torch.tensor(std, device=images.device, dtype=images.dtype)
            parts.append(coef[:, ch, : len(std)] / scale[None, :, None, None])
        return torch.cat(parts, dim=1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _check_latents(latents, self.channels)
        n, _, h, w = latents.shape
        f = self.factor
        coef = latents.new_zeros(n, 3, f * f, h, w)
        start = 0
        for ch, std in enumerate(self._stds):
            scale = torch.tensor(std, device=latents.device, dtype=latents.dtype)
            k = len(std)
            coef[:, ch, :k] = latents[:, start : start + k] * scale[None, :, None, None]
            start += k
        blocks = torch.einsum("kp,nckij->ncpij", self._basis(latents), coef)
        images = F.pixel_shuffle(blocks.reshape(n, 3 * f * f, h, w), f)
        m = self._color(latents, inverse=True)
        if m is not None:
            images = torch.einsum("dc,nchw->ndhw", m, images)
        return images


class VaeCodec:
    """A diffusers ``AutoencoderKL``: encode takes the posterior mean (no sampling, so it is
    deterministic) times ``scaling_factor``; decode divides by it first.

    Inputs are moved to the VAE's device and dtype; outputs stay there.
    """

    def __init__(self, vae: AutoencoderKL, scaling_factor: float = SD_VAE_SCALING) -> None:
        self.vae = vae.eval()
        self.scaling_factor = float(scaling_factor)
        self._factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._channels = int(vae.config.latent_channels)

    @property
    def factor(self) -> int:
        return self._factor

    @property
    def channels(self) -> int:
        return self._channels

    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.factor)
        p = self._param()
        dist = self.vae.encode(images.to(device=p.device, dtype=p.dtype)).latent_dist
        return dist.mean * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _check_latents(latents, self.channels)
        p = self._param()
        z = latents.to(device=p.device, dtype=p.dtype) / self.scaling_factor
        return self.vae.decode(z).sample


def image_to_tensor(
    image: np.ndarray,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """HxWx3 uint8 (or NxHxWx3) -> ``[N, 3, H, W]`` float in [-1, 1]."""
    arr = np.array(image)  # a copy: analysis arrays are read-only, torch wants writable
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 HxWx3 image(s), got {arr.dtype} {arr.shape}")
    t = torch.from_numpy(arr)
    if t.ndim == 3:
        t = t[None]
    t = t.permute(0, 3, 1, 2).to(device=device, dtype=torch.float32) / 127.5 - 1.0
    return t.to(dtype)


def encode_clip(
    codec: LatentCodec, frames: torch.Tensor, reference: torch.Tensor, latent_origin: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-side encoding of clips ``[B, F, 3, H, W]`` and their reference crops
    ``[B, 3, H, W]`` (both in [-1, 1]): ``(latents [B, C, F, h, w], reference latents
    [B, C, h, w])``, the clip's latents measured from the reference when
    ``latent_origin == "reference"`` (``ModelSpec.latent_origin``)."""
    b, f = frames.shape[:2]
    latents = codec.encode(frames.flatten(0, 1)).unflatten(0, (b, f)).transpose(1, 2)
    ref_latents = codec.encode(reference)
    if latent_origin == "reference":
        latents = latents - ref_latents[:, :, None]
    return latents, ref_latents


def tensor_to_images(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [-1, 1] -> NxHxWx3 uint8 (clamped, rounded)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
    x = ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _find_vae_folder(folder: Path) -> Path | None:
    if (folder / "config.json").is_file():
        return folder
    for sub in VAE_SUBFOLDERS:
        if (folder / sub / "config.json").is_file():
            return folder / sub
    return None


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}")
    return value


def load_codec(
    kind: str,
    factor: int | None = None,
    folder: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    scaling_factor: float = SD_VAE_SCALING,
) -> LatentCodec:
    """Build the codec named ``kind``: ``"pixel"`` or ``"sd-vae"``.

    ``pixel``: a :class:`PixelCodec` with ``factor`` (default 4); ``folder``, ``device``
    and ``dtype`` are not needed (it has no weights).

    ``sd-vae``: a diffusers ``AutoencoderKL`` read from local files only: ``folder`` itself
    when it holds ``config.json``, else its ``sd-vae-ft-mse/`` or ``vae/`` sub-folder.
    Raises :class:`ModelLoadError` when no such folder exists or it cannot be loaded, or
    when ``factor`` is given and differs from the VAE's.
    """
    if kind == "pixel":
        return PixelCodec(factor=4 if factor is None else int(factor))
    if kind in ("dct", "dct-ycbcr"):
        color = "ycbcr" if kind == "dct-ycbcr" else "rgb"
        return DctCodec(factor=8 if factor is None else int(factor), color=color)
    if kind != "sd-vae":
        raise ConfigError(
            f"unknown codec {kind!r} (expected 'pixel', 'dct', 'dct-ycbcr' or 'sd-vae')"
        )
    if folder is None:
        raise ModelLoadError("sd-vae codec: no weights folder given (it needs a VAE folder)")
    folder = Path(folder)
    vae_dir = _find_vae_folder(folder) if folder.is_dir() else None
    if vae_dir is None:
        names = ", ".join(f"{s}/" for s in VAE_SUBFOLDERS)
        raise ModelLoadError(f"{folder}: no VAE found (expected config.json in it or in {names})")
    torch_dtype = _as_dtype(dtype)
    try:
        from diffusers import AutoencoderKL
        from diffusers.utils import is_accelerate_available

        vae: Any = AutoencoderKL.from_pretrained(
            vae_dir,
            local_files_only=True,
            torch_dtype=torch_dtype,
            low_cpu_mem_usage=is_accelerate_available(),  # quiet when accelerate is absent
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{vae_dir}: cannot load the VAE ({first})") from exc
    vae = vae.to(device=device)
    codec = VaeCodec(vae, scaling_factor=scaling_factor)
    if factor is not None and int(factor) != codec.factor:
        raise ModelLoadError(
            f"{vae_dir}: VAE downsampling factor is {codec.factor}, the model expects {factor}"
        )
    return codec
