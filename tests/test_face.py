"""Face stage on real portraits with the real mediapipe models (no mocks)."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from lightningcp_cli.config import FaceConfig
from lightningcp_cli.errors import ConfigError, ImageError, InputNotFoundError, NoFaceError
from lightningcp_cli.stages.face import (
    EYE_CORNERS,
    NUM_LANDMARKS,
    FaceAnalysis,
    analyze_face,
    build_analysis,
    face_roll,
    load_image,
)

DATA = Path(__file__).parent / "data"
RES = 256
CFG = FaceConfig()


def _analyze(name: str, cfg: FaceConfig = CFG, res: int = RES) -> FaceAnalysis:
    return analyze_face(load_image(DATA / name), cfg, res, source=name)


@pytest.fixture(scope="module")
def face_d() -> FaceAnalysis:
    return _analyze("face_d.png")


@pytest.fixture(scope="module")
def face_a() -> FaceAnalysis:
    return _analyze("face_a.png")


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


# ------------------------------------------------------------------ load_image


def test_load_png_is_rgb_uint8() -> None:
    img = load_image(DATA / "face_d.png")
    assert img.dtype == np.uint8
    assert img.shape == (382, 384, 3)
    assert img.flags.c_contiguous


def test_load_rgba_composites_on_white() -> None:
    rgba = load_image(DATA / "face_d_rgba.png")
    rgb = load_image(DATA / "face_d.png")
    assert rgba.shape == rgb.shape
    assert (rgba[:24] == 255).all() and (rgba[:, -24:] == 255).all()  # transparent border
    np.testing.assert_array_equal(rgba[24:-24, 24:-24], rgb[24:-24, 24:-24])


def test_load_gray_gives_three_equal_channels() -> None:
    img = load_image(DATA / "face_d_gray.png")
    assert img.shape == (382, 384, 3)
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()


def test_load_16bit_gray_scaled_to_8bit(tmp_path: Path) -> None:
    gray = np.asarray(Image.open(DATA / "face_d_gray.png"))
    path = tmp_path / "gray16.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(path)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    np.testing.assert_array_equal(load_image(path)[..., 0], gray)


@pytest.mark.parametrize("name", ["face_d_exif6.jpg", "face_d_exif8.jpg"])
def test_load_applies_exif_orientation(name: str) -> None:
    with Image.open(DATA / name) as raw:
        assert raw.size == (382, 384)  # stored sideways
    img = load_image(DATA / name)
    assert img.shape == (382, 384, 3)  # upright, as face_d.png
    upright = load_image(DATA / "face_d.png").astype(np.int16)
    assert np.abs(img.astype(np.int16) - upright).mean() < 4  # same picture (JPEG noise)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="nope.png: file not found"):
        load_image(tmp_path / "nope.png")


def test_load_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_text("hello, I am text\n")
    with pytest.raises(ImageError, match=r"x\.png: not an image \(") as err:
        load_image(path)
    assert "\n" not in str(err.value)


def test_load_truncated_image(tmp_path: Path) -> None:
    data = (DATA / "face_a.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: not an image"):
        load_image(path)


def test_load_tiny_image_and_directory(tmp_path: Path) -> None:
    path = tmp_path / "tiny.png"
    Image.new("RGB", (16, 40)).save(path)
    with pytest.raises(ImageError, match=r"tiny\.png: image too small \(16x40"):
        load_image(path)
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


# ------------------------------------------------------------------ analyze_face


@pytest.mark.parametrize("name", ["face_a.png", "face_d.png"])
def test_real_portrait_geometry(name: str) -> None:
    a = _analyze(name)
    h, w = a.image.shape[:2]
    x0, y0, x1, y1 = a.face_box
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert 0.25 * w < x1 - x0 < 0.9 * w  # these portraits are close-ups
    cx0, cy0, cx1, cy1 = a.crop_box
    assert cx1 - cx0 == cy1 - cy0  # square
    assert cx0 <= x0 and cy0 <= y0 and cx1 >= x1 and cy1 >= y1  # contains the face
    side = max(x1 - x0, y1 - y0) * (1 + 2 * CFG.crop_dilation)
    assert abs((cx1 - cx0) - side) <= 2
    assert a.crop.shape == (RES, RES, 3) and a.crop.dtype == np.uint8
    assert a.resolution == RES
    assert a.num_faces == 1


def test_masks_are_binary_nonempty_and_nested(face_d: FaceAnalysis) -> None:
    a = face_d
    for m in (a.face_mask, a.mouth_mask, a.foreground_mask):
        assert m.shape == (RES, RES) and m.dtype == np.float32
        assert set(np.unique(m)) == {0.0, 1.0}
    assert a.mouth_mask.sum() < a.foreground_mask.sum() < a.face_mask.sum() * 1.2
    mouth = a.mouth_mask > 0
    assert (a.face_mask[mouth] > 0).mean() > 0.95  # mouth within the face box
    assert (a.foreground_mask[mouth] > 0).mean() > 0.9  # and within the face oval
    # the face-locator mask: face box grown 10%, centred in the crop (face box centred)
    ys, xs = np.nonzero(a.face_mask)
    assert abs((xs.min() + xs.max()) / 2 - RES / 2) < 4
    assert abs((ys.min() + ys.max()) / 2 - RES / 2) < 4
    assert 0.25 < a.face_mask.mean() < 0.5  # (1.2 / 2) ** 2 = 0.36
    # mouth in the lower part of the face
    my = np.nonzero(a.mouth_mask)[0].mean()
    assert RES / 2 < my < ys.max()


def test_landmarks(face_d: FaceAnalysis) -> None:
    a = face_d
    h, w = a.image.shape[:2]
    assert a.has_landmarks
    assert a.landmarks.shape == (NUM_LANDMARKS, 3) and a.landmarks.dtype == np.float32
    xy = a.landmarks[:, :2]
    assert (xy >= 0).all() and (xy[:, 0] <= w).all() and (xy[:, 1] <= h).all()
    # inside the (slightly grown) face box
    x0, y0, x1, y1 = a.face_box
    pad = 0.15 * (x1 - x0)
    assert (xy[:, 0] > x0 - pad).all() and (xy[:, 0] < x1 + pad).all()
    assert (xy[:, 1] > y0 - pad).all() and (xy[:, 1] < y1 + pad).all()
    # crop landmarks are the same points in crop pixels
    s = RES / (a.crop_box[2] - a.crop_box[0])
    np.testing.assert_allclose(a.crop_landmarks, (xy - a.crop_box[:2]) * s, atol=1e-3)
    cl = a.crop_landmarks.round().astype(int).clip(0, RES - 1)
    assert a.foreground_mask[cl[:, 1], cl[:, 0]].mean() > 0.95  # hull holds the points
    # landmark 13 (upper inner lip) lies in the mouth mask
    assert a.mouth_mask[cl[13, 1], cl[13, 0]] == 1.0


@pytest.mark.parametrize(
    "name", ["face_d_rgba.png", "face_d_gray.png", "face_d_exif6.jpg", "face_d_exif8.jpg"]
)
def test_variants_give_the_same_face_box(face_d: FaceAnalysis, name: str) -> None:
    a = _analyze(name)
    assert _iou(a.face_box, face_d.face_box) > 0.9
    assert max(abs(p - q) for p, q in zip(a.face_box, face_d.face_box, strict=True)) <= 8
    assert a.image.shape == face_d.image.shape


def test_two_faces_uses_the_largest_with_warning() -> None:
    with pytest.warns(UserWarning, match=r"two_faces\.png: 2 faces found, using the largest"):
        a = _analyze("two_faces.png")
    assert a.num_faces == 2
    x0, y0, x1, y1 = a.face_box
    assert x1 <= 256 + 8  # the big portrait fills the left 256 px
    assert x1 - x0 > 100
    assert a.has_landmarks
    assert a.landmarks[:, 0].max() < 260  # the mesh of the chosen (left) face


def test_single_face_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _analyze("face_a.png")


def test_no_face_raises_with_file_name() -> None:
    with pytest.raises(NoFaceError, match=r"^no_face\.png: no face found$"):
        _analyze("no_face.png")


def test_small_face_in_large_image_uses_crop_mesh() -> None:
    # A 96 px portrait in a 1200 px canvas: the full-image mesh misses it, so the mesh
    # runs again on the crop around the detected box.
    small = cv2.resize(load_image(DATA / "face_a.png"), (96, 96), interpolation=cv2.INTER_AREA)
    canvas = np.full((1200, 1200, 3), 200, np.uint8)
    canvas[300:396, 500:596] = small
    a = analyze_face(canvas, CFG, 128)
    x0, y0, x1, y1 = a.face_box
    assert 500 <= x0 < x1 <= 596 and 300 <= y0 < y1 <= 396
    assert a.has_landmarks
    xy = a.landmarks[:, :2]
    assert (xy[:, 0] > 495).all() and (xy[:, 0] < 600).all()
    assert (xy[:, 1] > 295).all() and (xy[:, 1] < 400).all()


def test_deterministic(face_a: FaceAnalysis) -> None:
    _analyze("face_d.png")  # another image in between must not change anything
    b = _analyze("face_a.png")
    assert b.face_box == face_a.face_box and b.crop_box == face_a.crop_box
    for field in ("crop", "face_mask", "mouth_mask", "foreground_mask", "landmarks"):
        np.testing.assert_array_equal(getattr(b, field), getattr(face_a, field))


def test_arrays_are_read_only(face_a: FaceAnalysis) -> None:
    with pytest.raises(ValueError):
        face_a.crop[0, 0, 0] = 1
    with pytest.raises(ValueError):
        face_a.face_mask[0, 0] = 0.5


def test_crop_past_the_image_is_edge_padded(face_a: FaceAnalysis) -> None:
    a = _analyze("face_a.png", FaceConfig(crop_dilation=2.0), 128)
    h, w = a.image.shape[:2]
    x0, y0, x1, y1 = a.crop_box
    assert x0 < 0 and y0 < 0 and x1 > w and y1 > h
    # left of the image the crop repeats the image's first column: constant along rows
    s = 128 / (x1 - x0)
    k = int(-x0 * s) - 2
    left = a.crop[:, :k].astype(np.int16)
    assert k > 10 and np.abs(np.diff(left, axis=1)).max() <= 2
    assert a.crop.min() > 0  # padded by replication, not with black
    assert a.face_box == face_a.face_box


def test_latent_mask(face_d: FaceAnalysis) -> None:
    soft = face_d.latent_mask("face", 8, soft=True)
    hard = face_d.latent_mask("face_mask", 8)
    assert soft.shape == hard.shape == (RES // 8, RES // 8)
    assert soft.dtype == hard.dtype == np.float32
    assert soft.min() >= 0.0 and soft.max() <= 1.0
    assert abs(soft.mean() - face_d.face_mask.mean()) < 1e-6  # area average keeps the mean
    assert set(np.unique(hard)) <= {0.0, 1.0}
    any_overlap = face_d.latent_mask("mouth", 8, threshold=0.0)
    assert any_overlap.sum() >= face_d.latent_mask("mouth", 8).sum() > 0
    grown = face_d.latent_mask("foreground", 8, dilate=1)
    assert grown.sum() > face_d.latent_mask("foreground", 8).sum()
    with pytest.raises(ValueError, match="multiple"):
        face_d.latent_mask("face", 7)
    with pytest.raises(ValueError, match="unknown mask"):
        face_d.latent_mask("hair", 8)


# ------------------------------------------------------------------ levelling


def _tilt(points: np.ndarray, i: int, j: int) -> float:
    (x0, y0), (x1, y1) = np.asarray(points, np.float64)[[i, j], :2]
    return float(np.degrees(np.arctan2(y1 - y0, x1 - x0)))


def test_rolled_face_is_cut_levelled(face_d: FaceAnalysis) -> None:
    # face_d is rolled ~8 degrees (its eye and lip lines); cut levelled by default
    assert 6 < face_d.roll < 11 and face_d.level is not None
    assert abs(_tilt(face_d.crop_landmarks, *EYE_CORNERS)) < 0.5
    assert abs(_tilt(face_d.crop_landmarks, 78, 308)) < 2  # the inner lip corners too
    assert abs(face_roll(face_d.landmarks)) < 0.5  # landmarks are in the levelled frame
    # the mouth geometry the locator draws is level as well
    left_y, right_y = face_d.mouth_geometry()[[1, 3]]
    assert abs(left_y - right_y) < 0.05 * RES
    as_is = _analyze("face_d.png", FaceConfig(level_roll=180.0))
    assert as_is.level is None and as_is.roll == pytest.approx(face_d.roll)
    assert abs(_tilt(as_is.crop_landmarks, *EYE_CORNERS) - face_d.roll) < 0.5


def test_upright_face_is_cut_as_before(face_a: FaceAnalysis) -> None:
    assert abs(face_a.roll) < CFG.level_roll and face_a.level is None
    as_is = _analyze("face_a.png", FaceConfig(level_roll=180.0))
    np.testing.assert_array_equal(face_a.crop, as_is.crop)  # bit for bit
    always = _analyze("face_a.png", FaceConfig(level_roll=0.0))
    assert always.level is not None  # 0 levels every face, however slightly rolled


@pytest.mark.parametrize("degrees", [-15.0, 12.0])
def test_turned_portrait_comes_out_upright(face_a: FaceAnalysis, degrees: float) -> None:
    """face_a turned by a known angle: the roll is measured back and the levelled crop
    shows the face as upright as the original's."""
    image = load_image(DATA / "face_a.png")
    h, w = image.shape[:2]
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)  # counter-clockwise
    turned = cv2.warpAffine(image, turn, (w, h), flags=cv2.INTER_CUBIC,
                            borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
    a = analyze_face(turned, CFG, RES)
    assert a.roll == pytest.approx(face_a.roll - degrees, abs=1.5)
    assert a.level is not None
    assert abs(_tilt(a.crop_landmarks, *EYE_CORNERS) - face_a.roll) < 1.0


def test_level_roll_is_validated() -> None:
    for bad in (-1.0, 181.0):
        with pytest.raises(ConfigError, match="levelling"):
            FaceConfig(level_roll=bad)


def test_box_only_analysis() -> None:
    # What analyze_face returns when the detector finds a face but the mesh does not.
    image = load_image(DATA / "face_d.png")
    a = build_analysis(image, (106, 105, 282, 281), CFG, 128)
    assert not a.has_landmarks and a.landmarks is None and a.crop_landmarks is None
    assert a.mouth_mask.sum() > 0 and a.foreground_mask.sum() > 0
    mouth = a.mouth_mask > 0
    assert (a.face_mask[mouth] > 0).all()
    assert a.foreground_mask.sum() < a.face_mask.sum()


def test_bad_arrays_rejected() -> None:
    with pytest.raises(ValueError, match="uint8"):
        analyze_face(np.zeros((64, 64, 3), np.float32), CFG, RES)
    with pytest.raises(ValueError, match="HxWx3"):
        analyze_face(np.zeros((64, 64), np.uint8), CFG, RES)
