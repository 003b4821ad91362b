"""Decode stage and latent codecs: exact pixel codec, paste-back, output sizing."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lightningcp_cli.config import FaceConfig
from lightningcp_cli.errors import ConfigError, ModelLoadError
from lightningcp_cli.models.codec import (
    LatentCodec,
    PixelCodec,
    VaeCodec,
    image_to_tensor,
    load_codec,
    tensor_to_images,
)
from lightningcp_cli.stages.decode import (
    decode_frames,
    feather_mask,
    output_frame,
    paste_back,
    resize_output,
)
from lightningcp_cli.stages.face import FaceAnalysis, analyze_face, build_analysis, load_image

DATA = Path(__file__).parent / "data"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _smooth_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.stack([xx / w, yy / h, 0.5 + 0.4 * np.sin(xx / 17.0 + yy / 23.0)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def _face_d(cfg: FaceConfig) -> FaceAnalysis:
    return analyze_face(load_image(DATA / "face_d.png"), cfg, 512, source="face_d.png")


@pytest.fixture(scope="module")
def portrait() -> FaceAnalysis:
    """face_d cut as it is (an axis-aligned crop box), though it is rolled ~8 degrees."""
    return _face_d(FaceConfig(level_roll=180.0))


@pytest.fixture(scope="module")
def levelled() -> FaceAnalysis:
    """face_d cut levelled (the default)."""
    return _face_d(FaceConfig())


class CountingCodec(PixelCodec):
    """A real PixelCodec that records how many frames each decode call got."""

    def __init__(self, factor: int = 4) -> None:
        super().__init__(factor=factor)
        object.__setattr__(self, "calls", [])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.calls.append(latents.shape[0])
        return super().decode(latents)


# ------------------------------------------------------------------ codecs


def test_pixel_codec_round_trip_is_exact() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 32, 48, 3), dtype=np.uint8)
    for codec in (PixelCodec(), PixelCodec(factor=8, scale=0.5)):
        assert isinstance(codec, LatentCodec)
        x = image_to_tensor(images)
        z = codec.encode(x)
        f = codec.factor
        assert z.shape == (2, codec.channels, 32 // f, 48 // f)
        assert codec.channels == 3 * f * f
        assert torch.equal(codec.decode(z), x)
        np.testing.assert_array_equal(tensor_to_images(codec.decode(z)), images)
    half = PixelCodec(scale=0.5).encode(image_to_tensor(images))
    assert torch.equal(half * 2, PixelCodec().encode(image_to_tensor(images)))


def test_pixel_codec_rejects_bad_shapes() -> None:
    codec = PixelCodec()
    with pytest.raises(ValueError, match="multiple of the codec factor"):
        codec.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="latents"):
        codec.decode(torch.zeros(1, 47, 8, 8))
    with pytest.raises(ValueError):
        PixelCodec(factor=0)


def test_load_codec_pixel_and_errors(tmp_path: Path) -> None:
    codec = load_codec("pixel", 8)
    assert isinstance(codec, PixelCodec) and codec.factor == 8 and codec.channels == 192
    assert load_codec("pixel").factor == 4
    with pytest.raises(ConfigError, match="unknown codec 'jpeg'"):
        load_codec("jpeg")
    with pytest.raises(ModelLoadError, match="no VAE found"):
        load_codec("sd-vae", 8, tmp_path)
    with pytest.raises(ModelLoadError, match="no weights folder"):
        load_codec("sd-vae", 8, None)


def test_vae_codec_from_a_saved_folder(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(tmp_path / "sd-vae-ft-mse")
    codec = load_codec("sd-vae", 2, tmp_path)  # finds the sub-folder
    assert isinstance(codec, VaeCodec) and isinstance(codec, LatentCodec)
    assert codec.factor == 2 and codec.channels == 4
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 16, 16)
    assert torch.equal(z, codec.encode(x))  # posterior mean: deterministic
    expected = vae.encode(x).latent_dist.mean * 0.18215
    torch.testing.assert_close(z, expected)
    assert codec.decode(z).shape == (2, 3, 32, 32)
    with pytest.raises(ModelLoadError, match="factor is 2"):
        load_codec("sd-vae", 8, tmp_path / "sd-vae-ft-mse")


# ------------------------------------------------------------------ feather / paste back


def test_feather_mask_properties() -> None:
    m = feather_mask(100, 0.1)
    assert m.shape == (100, 100) and m.dtype == np.float32
    assert m.min() >= 0 and m.max() == 1.0
    assert (m[10:90, 10:90] == 1.0).all()  # 1 inside the 10 px ramp
    assert m[0, 50] < 0.05 and m[0, 0] < m[0, 50]  # ~0 at the border, least in corners
    row = m[50, :50]
    assert (np.diff(row) >= 0).all()  # rises monotonically towards the centre
    np.testing.assert_array_equal(m, m[::-1, ::-1])
    np.testing.assert_array_equal(m, m.T)
    assert (feather_mask((20, 30), 0.0) == 1.0).all()
    assert feather_mask((20, 30), 0.2).shape == (20, 30)
    with pytest.raises(ValueError):
        feather_mask(10, 0.5)


@pytest.mark.parametrize("name", ["portrait", "levelled"])
def test_paste_back_identity_reproduces_the_portrait(name: str, request) -> None:
    a: FaceAnalysis = request.getfixturevalue(name)
    assert (a.level is not None) == (name == "levelled")
    out = paste_back(np.array(a.crop), a, 0.08)
    assert out.shape == a.image.shape and out.dtype == np.uint8
    assert _psnr(out, a.image) > 38
    assert np.abs(out.astype(int) - a.image).mean() < 1.0


def test_paste_back_turns_a_levelled_crop_back(levelled: FaceAnalysis) -> None:
    """A line level in the crop lands along the face's roll (the eye line), and the
    portrait outside the turned crop square is untouched."""
    a, res = levelled, levelled.resolution
    white = np.full_like(a.crop, 255)
    band = white.copy()
    band[res // 2 - 2 : res // 2 + 2] = 0  # a level black band across the middle
    out = paste_back(band, a, 0.08).astype(int)
    ys, xs = np.nonzero((paste_back(white, a, 0.08) - out).sum(-1) > 300)
    assert len(xs) > res  # the band is there
    slope = np.polyfit(xs, ys, 1)[0]
    assert abs(np.degrees(np.arctan(slope)) - a.roll) < 0.5
    # pixels farther from the crop centre than its half diagonal stay the portrait's
    x0, y0, x1, y1 = a.crop_box
    centre = cv2.invertAffineTransform(a.level) @ [(x0 + x1) / 2, (y0 + y1) / 2, 1]
    yy, xx = np.mgrid[0 : out.shape[0], 0 : out.shape[1]] + 0.5
    far = np.hypot(xx - centre[0], yy - centre[1]) > (x1 - x0) / np.sqrt(2) + 2
    assert far.any()
    np.testing.assert_array_equal(out[far], a.image[far])


def test_paste_back_blends_only_inside_the_crop_box(portrait: FaceAnalysis) -> None:
    red = np.zeros_like(portrait.crop)
    red[..., 0] = 255
    out = paste_back(red, portrait, 0.08)
    x0, y0, x1, y1 = portrait.crop_box
    outside = np.ones(out.shape[:2], bool)
    outside[max(y0, 0) : y1, max(x0, 0) : x1] = False
    np.testing.assert_array_equal(out[outside], portrait.image[outside])
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    assert tuple(out[cy, cx]) == (255, 0, 0)  # centre fully replaced
    # at the crop border the portrait shows through (feathered, no hard edge)
    edge = out[cy, x0].astype(int)
    assert np.abs(edge - portrait.image[cy, x0]).max() < 30


def test_paste_back_with_crop_box_past_the_image_edges() -> None:
    image = _smooth_image(160, 200)
    # Face in the top-left corner: the square crop box starts left of / above the image.
    a = build_analysis(image, (0, 0, 60, 50), FaceConfig(), 64)
    x0, y0, x1, y1 = a.crop_box
    assert x0 < 0 and y0 < 0
    same = build_analysis(image, (0, 0, 60, 50), FaceConfig(), x1 - x0)  # no resampling
    np.testing.assert_array_equal(paste_back(np.array(same.crop), same, 0.1), image)
    out = paste_back(np.array(a.crop), a, 0.1)
    assert _psnr(out, image) > 35
    # a constant crop reaches the image corner at full strength: the ramp lies outside
    white = np.full_like(a.crop, 255)
    out = paste_back(white, a, 0.1)
    assert (out[0, 0] == 255).all()
    assert (out[y1:] == image[y1:]).all() and (out[:, x1:] == image[:, x1:]).all()
    # crop box past every edge (large dilation on a real portrait)
    real = analyze_face(load_image(DATA / "face_a.png"), FaceConfig(crop_dilation=2.0), 512)
    bx0, by0, bx1, by1 = real.crop_box
    h, w = real.image.shape[:2]
    assert bx0 < 0 and by0 < 0 and bx1 > w and by1 > h
    out = paste_back(np.array(real.crop), real, 0.08)
    assert out.shape == real.image.shape and _psnr(out, real.image) > 28
    # the same, cut levelled (face_d is rolled): the turned crop covers the whole portrait
    turned = _face_d(FaceConfig(crop_dilation=2.0))
    assert turned.level is not None
    out = paste_back(np.array(turned.crop), turned, 0.08)
    assert out.shape == turned.image.shape and _psnr(out, turned.image) > 28


def test_paste_back_rejects_wrong_crop(portrait: FaceAnalysis) -> None:
    with pytest.raises(ValueError, match="512x512x3 uint8"):
        paste_back(np.zeros((256, 256, 3), np.uint8), portrait)


# ------------------------------------------------------------------ resize_output


@pytest.mark.parametrize(
    ("shape", "height", "expected"),
    [
        ((382, 384, 3), 256, (256, 258, 3)),
        ((382, 384, 3), 255, (254, 256, 3)),
        ((383, 511, 3), None, (382, 510, 3)),
        ((100, 100, 3), None, (100, 100, 3)),
        ((101, 77, 3), 720, (720, 548, 3)),
    ],
)
def test_resize_output_even_and_aspect(shape, height, expected) -> None:
    frame = _smooth_image(*shape[:2])
    out = resize_output(frame, height)
    assert out.shape == expected and out.dtype == np.uint8
    assert out.shape[0] % 2 == 0 and out.shape[1] % 2 == 0
    assert abs(out.shape[1] / out.shape[0] - shape[1] / shape[0]) < 0.02
    if height is None:
        np.testing.assert_array_equal(out, frame[: expected[0], : expected[1]])


def test_resize_output_rejects_tiny_height() -> None:
    with pytest.raises(ValueError):
        resize_output(np.zeros((10, 10, 3), np.uint8), 1)


# ------------------------------------------------------------------ decode / render


def _latents_of(frames: np.ndarray, codec: PixelCodec) -> torch.Tensor:
    z = codec.encode(image_to_tensor(frames))  # [F, C, h, w]
    return z.permute(1, 0, 2, 3)[None]  # [1, C, F, h, w]


def test_decode_frames_is_lazy_and_ordered() -> None:
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, size=(7, 16, 24, 3), dtype=np.uint8)
    codec = CountingCodec()
    latents = _latents_of(frames, codec)
    it = decode_frames(codec, latents)
    assert codec.calls == []  # nothing decoded before it is asked for
    first = next(it)
    assert codec.calls == [1]
    np.testing.assert_array_equal(first, frames[0])
    rest = list(it)
    assert len(rest) == 6 and codec.calls == [1] * 7
    np.testing.assert_array_equal(np.stack([first, *rest]), frames)

    codec.calls.clear()
    out = list(decode_frames(codec, latents, batch=3))
    assert codec.calls == [3, 3, 1] and len(out) == 7
    assert all(f.dtype == np.uint8 and f.shape == (16, 24, 3) for f in out)


def test_decode_frames_checks_shapes_eagerly() -> None:
    with pytest.raises(ValueError, match=r"\[1, C, F, h, w\]"):
        decode_frames(PixelCodec(), torch.zeros(48, 2, 4, 4))
    with pytest.raises(ValueError, match="batch"):
        decode_frames(PixelCodec(), torch.zeros(1, 48, 2, 4, 4), batch=0)


def test_decoded_crops_become_the_portrait(portrait: FaceAnalysis) -> None:
    """Decode then :func:`output_frame` (the render's last two steps) on the portrait's
    own crop gives the portrait back, at even size or the height asked for."""
    codec = PixelCodec(factor=8)
    latents = _latents_of(np.stack([portrait.crop] * 3), codec)
    crops = list(decode_frames(codec, latents))
    frames = [output_frame(c, portrait, 0.08) for c in crops]
    assert len(frames) == 3
    h, w = portrait.image.shape[:2]
    assert frames[0].shape == (h - h % 2, w - w % 2, 3)
    assert _psnr(frames[0], portrait.image[: h - h % 2, : w - w % 2]) > 38
    small = [output_frame(c, portrait, 0.08, out_height=200) for c in crops]
    assert [f.shape for f in small] == [(200, 202, 3)] * 3
    with pytest.raises(ValueError, match="512x512x3 uint8 crop"):
        output_frame(crops[0][:256, :256], portrait)


@pytest.mark.parametrize(("color", "channels"), [("rgb", 48), ("ycbcr", 32)])
def test_dct_codec_round_trip_on_a_real_face_crop(color: str, channels: int):
    """The DCT codecs (lcp-tiny: YCbCr) keep a face crop at ~31 dB and have unit-scale
    latents; the YCbCr one, with fewer channels, keeps more luma detail."""
    from lightningcp_cli.models.codec import DctCodec, image_to_tensor

    crop = analyze_face(load_image(DATA / "face_a.png"), FaceConfig(), 128).crop
    codec = DctCodec(color=color)
    x = image_to_tensor(crop)
    z = codec.encode(x)
    assert z.shape == (1, channels, 16, 16) == (1, codec.channels, 16, 16)
    assert 0.3 < float(z[:, 1:].std()) < 3.0  # scaled like a VAE latent, not raw coefficients
    mse = float(((codec.decode(z) - x) ** 2).mean())
    psnr = 10 * np.log10(4.0 / mse)
    assert 28.0 < psnr < 45.0  # lossy (16 or 24 of 64 frequencies) but faithful

    def luma_error(c: DctCodec) -> float:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return float((((c.decode(c.encode(x)) - x) * weights).sum(1) ** 2).mean())

    if color == "ycbcr":  # 24 luma frequencies against 16 per RGB channel
        assert luma_error(codec) < 0.8 * luma_error(DctCodec(color="rgb"))
    smooth = torch.nn.functional.avg_pool2d(x, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)
    assert torch.allclose(codec.decode(codec.encode(smooth)), smooth, atol=1e-5)  # DC exact


def test_decode_adds_the_latent_origin() -> None:
    """Reference-relative latents (lcp-tiny) decode to the same frames as absolute ones."""
    from lightningcp_cli.models.codec import DctCodec

    codec = DctCodec()
    gen = torch.Generator().manual_seed(0)
    origin = torch.randn(1, codec.channels, 4, 4, generator=gen)
    latents = torch.randn(1, codec.channels, 3, 4, 4, generator=gen) * 0.1
    relative = list(decode_frames(codec, latents, origin=origin))
    absolute = list(decode_frames(codec, latents + origin[:, :, None]))
    assert all(np.array_equal(a, b) for a, b in zip(relative, absolute, strict=True))
    assert not np.array_equal(relative[0], next(decode_frames(codec, latents)))
    with pytest.raises(ValueError, match="origin"):
        decode_frames(codec, latents, origin=origin[:, :, :2])


def test_change_blur_smooths_the_change_not_the_reference() -> None:
    """``change_blur``: a frame decodes as the reference's image plus its blurred change.
    No change: the reference's image exactly.  One 8x8 block brightened: the sharp step at
    the block's edge is spread over neighbouring pixels, the change's total is kept."""
    from lightningcp_cli.models.codec import DctCodec

    codec = DctCodec(coefficients=16, color="ycbcr")
    gen = torch.Generator().manual_seed(0)
    origin = torch.randn(1, codec.channels, 4, 4, generator=gen) * 0.1  # no clipping
    still = torch.zeros(1, codec.channels, 1, 4, 4)
    (plain,) = decode_frames(codec, still, origin=origin)
    (blurred,) = decode_frames(codec, still, origin=origin, change_blur=2.0)
    assert np.array_equal(plain, blurred)

    block = torch.zeros(1, codec.channels, 1, 4, 4)
    block[0, 0, 0, 1, 1] = 1.0  # luma DC of one block: a flat brighter square
    base = plain.astype(np.float64)
    sharp = next(decode_frames(codec, block, origin=origin)).astype(np.float64) - base
    soft = next(decode_frames(codec, block, origin=origin, change_blur=2.0)) - base
    assert sharp[8:16, 8:16].min() > 20 and np.abs(sharp[:8]).max() <= 1  # a hard-edged square
    assert np.abs(np.diff(soft, axis=1)).max() < 0.5 * np.abs(np.diff(sharp, axis=1)).max()
    assert abs(soft.sum() - sharp.sum()) < 0.05 * abs(sharp.sum())  # only spread, not lost
    with pytest.raises(ValueError, match="change blur needs an origin"):
        decode_frames(codec, block, change_blur=2.0)
