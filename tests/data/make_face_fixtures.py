"""Regenerate the face-stage test images in this folder from the shared portraits.

    python tests/data/make_face_fixtures.py [--src DIR]

DIR defaults to ``shared/data/portraits`` of the checkout, else
``/work/shared/data/portraits`` (EchoMimic ``assets/test_imgs``, Apache-2.0).  Tests read
only the committed outputs, never DIR.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
MAX_SIDE = 384
EXIF_ORIENTATION = 0x0112


def default_src() -> Path:
    local = HERE.parents[1] / "shared" / "data" / "portraits"
    return local if local.is_dir() else Path("/work/shared/data/portraits")


def fit(im: Image.Image, side: int) -> Image.Image:
    """Downscale so the longer side is ``side`` (keeps the aspect ratio)."""
    scale = side / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def save_png(im: Image.Image, name: str) -> None:
    im.save(HERE / name, optimize=True)
    print(f"wrote {name} {im.size} {im.mode}")


def save_exif_jpeg(upright: Image.Image, orientation: int, name: str) -> None:
    """Store the pixels rotated so that applying EXIF ``orientation`` shows ``upright``."""
    # EXIF 6 is shown by rotating 90 deg clockwise, EXIF 8 by 90 deg counter-clockwise.
    stored = upright.transpose(
        Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    )
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    stored.save(HERE / name, quality=92, exif=exif.tobytes())
    print(f"wrote {name} {stored.size} (EXIF orientation {orientation})")


def make(src: Path) -> None:
    a = fit(Image.open(src / "echomimic_a.png"), MAX_SIDE)
    d = fit(Image.open(src / "echomimic_d.png"), MAX_SIDE)  # 384x382: not square
    e = Image.open(src / "echomimic_e.png")
    save_png(a, "face_a.png")
    save_png(d, "face_d.png")

    # RGBA: opaque portrait inside a 24 px fully transparent border whose colour is black
    # (so dropping alpha and compositing on white give different pixels there).
    rgba = np.dstack([np.asarray(d), np.full(d.size[::-1], 255, np.uint8)])
    border = np.ones(d.size[::-1], bool)
    border[24:-24, 24:-24] = False
    rgba[border] = 0
    save_png(Image.fromarray(rgba, "RGBA"), "face_d_rgba.png")
    save_png(d.convert("L"), "face_d_gray.png")
    save_exif_jpeg(d, 6, "face_d_exif6.jpg")
    save_exif_jpeg(d, 8, "face_d_exif8.jpg")

    # Two portraits side by side, different sizes, on a light grey canvas.
    big, small = fit(a, 256), fit(e, 128)
    canvas = Image.new("RGB", (384, 256), (200, 200, 200))
    canvas.paste(big, (0, 0))
    canvas.paste(small, (256, 64))
    save_png(canvas, "two_faces.png")

    # No face: a smooth colour gradient with a low-frequency texture.
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float64) / 255.0
    tex = 0.5 + 0.5 * np.sin(6.0 * xx + 4.0 * yy) * np.cos(5.0 * yy - 3.0 * xx)
    rgb = np.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * tex, 0.8 - 0.5 * yy], axis=-1)
    save_png(Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB"), "no_face.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=default_src())
    make(parser.parse_args().src)


if __name__ == "__main__":
    main()
