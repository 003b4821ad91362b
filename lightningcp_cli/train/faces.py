"""Identity bank of the data engine: many faces from five portraits and a face generator.

Two halves with different dependencies:

- Build time (mediapipe, scipy; :func:`build_face_bank`): each committed portrait
  (``assets/portraits/``) is analysed once with the face stage
  (:func:`~lightningcp_cli.stages.face.analyze_face`, as a render would) and selfie
  segmentation; its *context crop* (a square 1.6x the side of the render's crop box, on the
  same centre, at 256 px) is stored with the foreground mask and the :class:`FaceRig`.
  Texture morphs of every ordered pair of training portraits (B's face warped piecewise
  affinely onto A's 478 landmarks and blended inside A's face) add more base faces.
- Run time (numpy + OpenCV only; :func:`make_identity`): a base face or a procedurally
  drawn one (:func:`procedural_source`) becomes one 128-px training identity through a
  random flip, scale/rotation/shift, background replacement, colour, relighting and
  degradation.  Identities are a pure function of (source, seed).

The bank is one safetensors file (``images``, ``masks``, ``rigs``) plus JSON metadata.
Split: ``echomimic_e`` and procedural seeds with ``seed % 8 == 7`` are held out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .animate import RIG_POINTS, FaceRig

__all__ = [
    "ASSET_PORTRAITS",
    "CONTEXT_SCALE",
    "CONTEXT_SIZE",
    "HELDOUT_PORTRAITS",
    "AugmentConfig",
    "FaceBank",
    "Identity",
    "IdentitySource",
    "analyze_portrait",
    "build_face_bank",
    "is_heldout_procedural",
    "make_identity",
    "morph_sources",
    "procedural_source",
    "random_background",
]

ASSET_PORTRAITS = Path(__file__).parent / "assets" / "portraits"
#: Portraits never used for training (evaluation identities).
HELDOUT_PORTRAITS: tuple[str, ...] = ("echomimic_e",)
#: Side of the stored context crop, and its size relative to the render's crop box.
CONTEXT_SIZE = 256
CONTEXT_SCALE = 1.6
SPLITS = ("train", "heldout")


def is_heldout_procedural(seed: int) -> bool:
    """Procedural faces whose seed is 7 mod 8 are held out; the rest are training faces."""
    return int(seed) % 8 == 7


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, eq=False)
class IdentitySource:
    """One base face: its context crop, foreground mask and rig (context pixels)."""

    name: str
    split: str  # "train" | "heldout"
    kind: str  # "portrait" | "morph" | "procedural"
    image: np.ndarray  # CONTEXT_SIZE^2 x 3 uint8 RGB
    mask: np.ndarray  # CONTEXT_SIZE^2 uint8, 255 = person (foreground)
    rig: FaceRig


@dataclass(frozen=True, eq=False)
class Identity:
    """One training identity at the model's resolution, framed like a render's crop."""

    name: str
    image: np.ndarray  # res x res x 3 uint8: the reference (mouth as in the source)
    rig: FaceRig  # crop pixels
    mask: np.ndarray  # res x res uint8 foreground

    @property
    def face_box(self) -> tuple[float, float, float, float]:
        return self.rig.face_box


@dataclass(frozen=True)
class AugmentConfig:
    """How hard :func:`make_identity` augments.  ``AugmentConfig.none()`` = no change."""

    flip: float = 0.5  # probability of a left-right mirror
    scale: tuple[float, float] = (0.92, 1.1)
    rotation: float = 7.0  # degrees, +-
    shift: float = 0.04  # fraction of the crop side, +-
    background: float = 0.5  # probability of replacing a portrait's background
    hue: float = 10.0  # degrees (OpenCV hue units are 2 degrees), +-
    saturation: tuple[float, float] = (0.65, 1.35)
    brightness: tuple[float, float] = (0.75, 1.2)
    gamma: tuple[float, float] = (0.8, 1.25)
    white_balance: float = 0.08  # per-channel gain, +-
    relight: float = 0.35  # strength of the smooth light gradient, +-
    gray: float = 0.04  # probability of a grayscale identity
    blur: float = 0.25  # probability of a slight blur
    noise: float = 0.3  # probability of sensor noise
    jpeg: float = 0.2  # probability of JPEG artefacts

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(
            flip=0.0,
            scale=(1.0, 1.0),
            rotation=0.0,
            shift=0.0,
            background=0.0,
            hue=0.0,
            saturation=(1.0, 1.0),
            brightness=(1.0, 1.0),
            gamma=(1.0, 1.0),
            white_balance=0.0,
            relight=0.0,
            gray=0.0,
            blur=0.0,
            noise=0.0,
            jpeg=0.0,
        )


# --------------------------------------------------------------------------- bank


class FaceBank:
    """Base faces (portraits and morphs), loadable with numpy + safetensors only."""

    def __init__(self, sources: Sequence[IdentitySource], meta: dict | None = None) -> None:
        self.sources = list(sources)
        self.meta = dict(meta or {})
        for s in self.sources:
            if s.split not in SPLITS:
                raise ValueError(f"{s.name}: split must be one of {SPLITS}")

    def __len__(self) -> int:
        return len(self.sources)

    def names(self, split: str | None = None) -> list[str]:
        return [s.name for s in self.sources if split is None or s.split == split]

    def split_sources(self, split: str) -> list[IdentitySource]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return [s for s in self.sources if s.split == split]

    def get(self, name: str) -> IdentitySource:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors) and ``path.with_suffix('.json')``."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        n = len(self.sources)
        images = (
            np.stack([s.image for s in self.sources]) if n else np.zeros((0, 1, 1, 3), np.uint8)
        )
        masks = np.stack([s.mask for s in self.sources]) if n else np.zeros((0, 1, 1), np.uint8)
        rigs = (
            np.stack([s.rig.points for s in self.sources])
            if n
            else np.zeros((0, RIG_POINTS, 2), np.float32)
        )
        entries = [{"name": s.name, "split": s.split, "kind": s.kind} for s in self.sources]
        manifest = {"format": "lcp-face-bank/1", "sources": entries, **self.meta}
        text = json.dumps(manifest, indent=1, sort_keys=True)
        save_file(
            {
                "images": np.ascontiguousarray(images),
                "masks": np.ascontiguousarray(masks),
                "rigs": np.ascontiguousarray(rigs.astype(np.float32)),
            },
            str(path),
            metadata={"manifest": text},
        )
        path.with_suffix(".json").write_text(text + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> FaceBank:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        path = Path(path)
        arrays = load_file(str(path))
        with safe_open(str(path), framework="numpy") as f:
            manifest = json.loads((f.metadata() or {})["manifest"])
        sources = []
        for i, e in enumerate(manifest["sources"]):
            sources.append(
                IdentitySource(
                    name=e["name"],
                    split=e["split"],
                    kind=e["kind"],
                    image=arrays["images"][i],
                    mask=arrays["masks"][i],
                    rig=FaceRig(arrays["rigs"][i]),
                )
            )
        meta = {k: v for k, v in manifest.items() if k not in ("sources", "format")}
        return cls(sources, meta)


# --------------------------------------------------------------------------- build time


def _selfie_mask(image: np.ndarray) -> np.ndarray:
    """mediapipe selfie segmentation (general model) of an RGB image: float32 [0, 1]."""
    import mediapipe as mp

    from ..stages.face import _native_logs_silenced

    with (
        _native_logs_silenced(),
        mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as seg,
    ):
        result = seg.process(np.ascontiguousarray(image))
    mask = result.segmentation_mask
    if mask is None:
        return np.ones(image.shape[:2], np.float32)
    return np.clip(mask.astype(np.float32), 0.0, 1.0)


def _context_box(crop_box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = crop_box
    side = int(round((x1 - x0) * CONTEXT_SCALE))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left, top = int(math.floor(cx - side / 2 + 0.5)), int(math.floor(cy - side / 2 + 0.5))
    return (left, top, left + side, top + side)


def analyze_portrait(
    image: np.ndarray, name: str, split: str = "train"
) -> tuple[IdentitySource, np.ndarray]:
    """A portrait (HxWx3 uint8 RGB) as a base face, plus its 478 landmarks in context
    pixels (for morphing).  Uses mediapipe; raises NoFaceError when there is no mesh."""
    from ..config import FaceConfig
    from ..errors import NoFaceError
    from ..stages.face import analyze_face, crop_square

    # Not levelled: the rig is built on the portrait as it is (rolls are augmented).
    fa = analyze_face(image, FaceConfig(level_roll=180.0), 128, source=name)
    if fa.landmarks is None:
        raise NoFaceError(f"{name}: the face mesh found no landmarks")
    box = _context_box(fa.crop_box)
    side = box[2] - box[0]
    ctx = crop_square(image, box, CONTEXT_SIZE)
    seg = _selfie_mask(image)
    mask = crop_square(seg, box, CONTEXT_SIZE)
    mask = np.clip(mask * 255.0 + 0.5, 0, 255).astype(np.uint8)
    s = CONTEXT_SIZE / side
    offset = np.array(box[:2], np.float64)
    lm = (fa.landmarks[:, :2].astype(np.float64) - offset) * s
    fb = np.array(fa.face_box, np.float64).reshape(2, 2)
    fb = (fb - offset) * s
    rig = FaceRig.from_mesh(lm, (fb[0, 0], fb[0, 1], fb[1, 0], fb[1, 1]))
    src = IdentitySource(name=name, split=split, kind="portrait", image=ctx, mask=mask, rig=rig)
    return src, lm.astype(np.float32)


def _face_hull_mask(lm: np.ndarray, size: int, erode: float, feather: float) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    hull = cv2.convexHull(np.round(lm * 16).astype(np.int32).reshape(-1, 1, 2))
    cv2.fillConvexPoly(mask, hull, 255, cv2.LINE_AA, shift=4)
    m = mask.astype(np.float32) / 255.0
    if erode > 0:
        k = int(2 * round(erode) + 1)
        m = cv2.erode(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    if feather > 0:
        m = cv2.GaussianBlur(m, (0, 0), feather)
    return np.clip(m, 0.0, 1.0)


def _piecewise_affine_map(dst: np.ndarray, src: np.ndarray, size: int) -> np.ndarray:
    """For each pixel centre of a ``size`` x ``size`` image, its position under the
    piecewise-affine map (Delaunay triangles of ``dst``) taking ``dst`` points to ``src``
    points; NaN outside the triangulation.  ``[size, size, 2]`` float64."""
    from scipy.spatial import Delaunay

    tri = Delaunay(dst.astype(np.float64)).simplices
    ids = np.full((size, size), -1, np.int32)
    for k, t in enumerate(tri):
        poly = np.round((dst[t] - 0.5) * 16).astype(np.int32)
        cv2.fillConvexPoly(ids, poly, int(k), cv2.LINE_8, shift=4)
    # Affine matrix of each triangle: [x_src, y_src] = M @ [x_dst, y_dst, 1].
    a = np.concatenate([dst[tri], np.ones((len(tri), 3, 1))], axis=2)  # [K, 3, 3]
    b = src[tri]  # [K, 3, 2]
    mats = np.linalg.solve(a, b)  # [K, 3, 2]
    gy, gx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    out = np.full((size, size, 2), np.nan)
    sel = ids >= 0
    m = mats[ids[sel]]
    p = np.stack([gx[sel], gy[sel], np.ones(sel.sum())], axis=1)
    out[sel] = np.einsum("ni,nij->nj", p, m)
    return out


def morph_sources(
    a: IdentitySource, lm_a: np.ndarray, b: IdentitySource, lm_b: np.ndarray, weight: float
) -> IdentitySource:
    """B's face texture warped piecewise affinely onto A's landmarks and blended into A's
    face with ``weight`` (0: A, 1: B's texture); geometry, rig, hair and background are
    A's.  Build time only (scipy's Delaunay triangulation)."""
    size = a.image.shape[0]
    src = _piecewise_affine_map(lm_a.astype(np.float64), lm_b.astype(np.float64), size)
    valid = np.isfinite(src[..., 0])
    src[~valid] = 0.0
    mapx = (src[..., 0] - 0.5).astype(np.float32)
    mapy = (src[..., 1] - 0.5).astype(np.float32)
    warped = cv2.remap(b.image, mapx, mapy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    face_h = a.rig.face_height
    alpha = _face_hull_mask(lm_a, size, erode=0.06 * face_h, feather=0.05 * face_h)
    alpha *= valid
    alpha = (alpha * float(weight))[..., None]
    out = a.image.astype(np.float32) * (1 - alpha) + warped.astype(np.float32) * alpha
    img = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    name = f"{a.name}+{b.name}@{weight:.2f}"
    return IdentitySource(name=name, split=a.split, kind="morph", image=img, mask=a.mask, rig=a.rig)


def build_face_bank(
    portraits_dir: str | Path | None = None,
    *,
    seed: int = 0,
    heldout: Sequence[str] = HELDOUT_PORTRAITS,
    morphs: bool = True,
    progress=None,
) -> FaceBank:
    """Analyse every ``*.jpg``/``*.png`` portrait in ``portraits_dir`` (default: the
    committed assets) and add the texture morphs of every ordered pair of training
    portraits (blend weight uniform in [0.35, 0.65] from ``seed``).  Deterministic."""
    from ..stages.face import load_image

    folder = Path(portraits_dir) if portraits_dir is not None else ASSET_PORTRAITS
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no portraits (*.jpg, *.png)")
    sources: list[IdentitySource] = []
    meshes: dict[str, np.ndarray] = {}
    total = len(paths)
    for i, p in enumerate(paths):
        split = "heldout" if p.stem in heldout else "train"
        src, lm = analyze_portrait(load_image(p), p.stem, split)
        sources.append(src)
        meshes[p.stem] = lm
        if progress:
            progress("faces", i + 1, total)
    if morphs:
        rng = np.random.default_rng([int(seed), 0xFACE])
        train = [s for s in sources if s.split == "train"]
        for a in train:
            for b in train:
                if a is b:
                    continue
                w = float(rng.uniform(0.35, 0.65))
                sources.append(morph_sources(a, meshes[a.name], b, meshes[b.name], w))
    meta = {"portraits": [p.name for p in paths], "heldout": list(heldout), "seed": int(seed)}
    return FaceBank(sources, meta)


# --------------------------------------------------------------------------- backgrounds


def random_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random studio-like background: linear or radial gradient of two colours, plus
    sometimes blurred noise texture, soft blobs or stripes.  ``size^2 x 3`` uint8."""
    c1 = rng.uniform(0, 255, 3)
    c1 = c1.mean() + (c1 - c1.mean()) * rng.uniform(0.15, 1.0)  # mostly muted colours
    c2 = np.clip(c1 + rng.normal(0, 50, 3), 0, 255)
    g = (np.arange(size, dtype=np.float32) + 0.5) / size
    gx, gy = np.meshgrid(g, g)
    if rng.random() < 0.6:
        a = rng.uniform(0, 2 * np.pi)
        t = (gx - 0.5) * np.cos(a) + (gy - 0.5) * np.sin(a) + 0.5
    else:
        cx, cy = rng.uniform(0.2, 0.8, 2)
        t = np.sqrt((gx - cx) ** 2 + (gy - cy) ** 2) * 1.4
    t = np.clip(t, 0, 1)[..., None]
    img = c1 * (1 - t) + c2 * t
    kind = rng.random()
    if kind < 0.3:
        noise = rng.standard_normal((size, size)).astype(np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), rng.uniform(2, 12))
        noise /= max(float(np.abs(noise).max()), 1e-6)
        img += noise[..., None] * rng.uniform(10, 45) * rng.uniform(0.5, 1.0, 3)
    elif kind < 0.5:
        layer = np.zeros((size, size, 3), np.float32)
        for _ in range(int(rng.integers(2, 7))):
            c = (int(rng.integers(0, size)), int(rng.integers(0, size)))
            ax = (
                int(rng.integers(size // 10, size // 2)),
                int(rng.integers(size // 10, size // 2)),
            )
            col = tuple(float(v) for v in rng.uniform(-60, 60, 3))
            cv2.ellipse(layer, c, ax, float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA)
        img += cv2.GaussianBlur(layer, (0, 0), size / 16)
    elif kind < 0.6:
        period = rng.uniform(size / 12, size / 3)
        a = rng.uniform(0, np.pi)
        wave = np.sin(((gx * np.cos(a) + gy * np.sin(a)) * size) * 2 * np.pi / period)
        img += (wave[..., None] * rng.uniform(8, 30)).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- procedural

_SKIN = np.array(
    [
        (255, 224, 196),
        (246, 206, 178),
        (236, 188, 156),
        (222, 170, 135),
        (198, 140, 104),
        (170, 112, 80),
        (135, 86, 60),
        (100, 64, 44),
        (76, 50, 36),
    ],
    np.float64,
)
_HAIR = np.array(
    [
        (25, 20, 20),
        (45, 32, 26),
        (80, 52, 34),
        (120, 82, 50),
        (170, 130, 80),
        (222, 192, 130),
        (150, 60, 30),
        (160, 160, 160),
        (235, 235, 230),
        (60, 40, 110),
        (200, 80, 140),
    ],
    np.float64,
)
_HAIR_P = np.array([0.2, 0.2, 0.15, 0.12, 0.08, 0.08, 0.06, 0.05, 0.02, 0.02, 0.02])
_IRIS = np.array(
    [(60, 35, 20), (95, 60, 35), (40, 30, 25), (70, 110, 160), (80, 120, 80), (110, 115, 120)],
    np.float64,
)


def _pts(a: np.ndarray) -> np.ndarray:
    """Float points -> int32 for OpenCV drawing with shift=4."""
    return np.round(np.asarray(a, np.float64) * 16).astype(np.int32).reshape(-1, 1, 2)


def _col(c: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.clip(c, 0, 255))


def _fill(img: np.ndarray, poly: np.ndarray, colour: np.ndarray) -> None:
    cv2.fillPoly(img, [_pts(poly)], _col(colour), cv2.LINE_AA, shift=4)


def _line(img: np.ndarray, poly: np.ndarray, colour: np.ndarray, thick: int) -> None:
    cv2.polylines(img, [_pts(poly)], False, _col(colour), thick, cv2.LINE_AA, shift=4)


def procedural_source(seed: int) -> IdentitySource:
    """A cartoon-like face drawn with OpenCV from ``seed`` (numpy + OpenCV only), framed
    like a portrait's context crop, with its rig known analytically.  Split by
    :func:`is_heldout_procedural`."""
    rng = np.random.default_rng([int(seed), 0x9F0C])
    size = CONTEXT_SIZE
    img = random_background(rng, size).astype(np.float32)
    fg = np.zeros((size, size), np.float32)

    # Geometry, context pixels: the render's crop is the central size/1.6 square and the
    # detector's face box (forehead point to chin, as wide as high) half its side.
    crop = size / CONTEXT_SCALE
    face_h = crop / 2 * rng.uniform(0.88, 1.04)  # forehead (mesh point 10) to chin
    cx = size / 2 + rng.uniform(-0.03, 0.03) * crop
    top = size / 2 - face_h / 2 + rng.uniform(-0.03, 0.03) * crop  # forehead y
    chin_y = top + face_h
    half_w = face_h * rng.uniform(0.40, 0.48)
    taper = rng.uniform(0.15, 0.4)
    egg_top = top - 0.16 * face_h
    ecy, eb = (egg_top + chin_y) / 2, (chin_y - egg_top) / 2
    th = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    ex, ey = np.cos(th), np.sin(th)
    narrow = 1 - taper * np.clip(ey, 0, None) ** 2
    outline = np.stack([cx + half_w * ex * narrow, ecy + eb * ey], 1)

    skin = _SKIN[rng.integers(len(_SKIN))] * rng.uniform(0.92, 1.06, 3)
    skin = np.clip(skin, 30, 255)
    hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)] * rng.uniform(0.85, 1.15, 3)
    cloth = rng.uniform(20, 235, 3)
    style = int(rng.integers(0, 4))  # 0 short, 1 long, 2 bun/high, 3 bald

    layer = np.zeros((size, size, 3), np.float32)
    # Hair behind the head.
    if style in (1, 2):
        back = np.stack([cx + half_w * 1.25 * ex, ecy - 0.05 * eb + eb * 1.1 * ey], 1)
        _fill(img, back, hair)
        cv2.fillPoly(fg, [_pts(back)], 1.0, cv2.LINE_AA, shift=4)
        if style == 1:
            long = np.array(
                [
                    [cx - half_w * 1.25, ecy],
                    [cx + half_w * 1.25, ecy],
                    [cx + half_w * rng.uniform(1.2, 1.6), chin_y + face_h * rng.uniform(0.4, 0.9)],
                    [cx - half_w * rng.uniform(1.2, 1.6), chin_y + face_h * rng.uniform(0.4, 0.9)],
                ]
            )
            _fill(img, long, hair * 0.9)
            cv2.fillPoly(fg, [_pts(long)], 1.0, cv2.LINE_AA, shift=4)
        else:
            bun_c = (cx + rng.uniform(-0.2, 0.2) * half_w, egg_top - 0.1 * face_h)
            bun = np.stack([bun_c[0] + 0.4 * half_w * ex, bun_c[1] + 0.3 * half_w * ey], 1)
            _fill(img, bun, hair)
            cv2.fillPoly(fg, [_pts(bun)], 1.0, cv2.LINE_AA, shift=4)
    # Shoulders and neck.
    sh_y = chin_y + face_h * rng.uniform(0.35, 0.55)
    shoulders = np.stack([cx + half_w * 3.2 * ex, sh_y + face_h * 0.9 + face_h * 0.9 * ey], 1)
    neck_w = half_w * rng.uniform(0.5, 0.7)
    neck = np.array(
        [
            [cx - neck_w, ecy],
            [cx + neck_w, ecy],
            [cx + neck_w * 1.1, sh_y + 10],
            [cx - neck_w * 1.1, sh_y + 10],
        ]
    )
    _fill(img, neck, skin * 0.82)
    _fill(img, shoulders, cloth)
    collar = np.array(
        [[cx - neck_w * 1.1, sh_y], [cx + neck_w * 1.1, sh_y], [cx, sh_y + face_h * 0.3]]
    )
    _fill(img, collar, skin * 0.8)
    for poly in (neck, shoulders):
        cv2.fillPoly(fg, [_pts(poly)], 1.0, cv2.LINE_AA, shift=4)
    # Ears.
    eye_y = top + face_h * rng.uniform(0.34, 0.4)
    for side in (-1, 1):
        ear_c = np.array([cx + side * half_w * 0.97, eye_y + 0.12 * face_h])
        ear = np.stack([ear_c[0] + 0.13 * half_w * ex, ear_c[1] + 0.2 * face_h * ey], 1)
        _fill(img, ear, skin * 0.9)
        cv2.fillPoly(fg, [_pts(ear)], 1.0, cv2.LINE_AA, shift=4)
    # Face with shading, computed in the box around the head only.
    face_mask = np.zeros((size, size), np.float32)
    cv2.fillPoly(face_mask, [_pts(outline)], 1.0, cv2.LINE_AA, shift=4)
    cv2.fillPoly(fg, [_pts(outline)], 1.0, cv2.LINE_AA, shift=4)
    hx0, hx1 = int(max(cx - 1.15 * half_w, 0)), int(min(cx + 1.15 * half_w + 1, size))
    hy0, hy1 = int(max(ecy - 1.12 * eb, 0)), int(min(ecy + 1.12 * eb + 1, size))
    fr = (slice(hy0, hy1), slice(hx0, hx1))
    yy, xx = np.mgrid[hy0:hy1, hx0:hx1].astype(np.float32) + 0.5
    rad = np.sqrt(((xx - cx) / half_w) ** 2 + ((yy - ecy) / eb) ** 2)
    shade = 1.0 - 0.22 * np.clip(rad, 0, 1) ** 3
    la = rng.uniform(0, 2 * np.pi)
    light = (xx - cx) * np.cos(la) + (yy - ecy) * np.sin(la)
    shade *= 1.0 + rng.uniform(0, 0.15) * light / half_w
    face_col = skin[None, None, :].astype(np.float32) * shade[..., None]
    blush = np.exp(
        -(((np.abs(xx - cx) - 0.55 * half_w) / (0.22 * half_w)) ** 2)
        - ((yy - (top + 0.6 * face_h)) / (0.1 * face_h)) ** 2
    )
    blush_col = np.array([220.0, 90.0, 90.0], np.float32)
    face_col += (blush_col - face_col) * (blush * rng.uniform(0, 0.25))[..., None]
    noise = rng.standard_normal(yy.shape).astype(np.float32)
    face_col += cv2.GaussianBlur(noise, (0, 0), 1.2)[..., None] * rng.uniform(1.0, 5.0)
    fm = face_mask[fr][..., None]
    img[fr] = img[fr] * (1 - fm) + face_col * fm

    # Hair on the head (not for style 3, bald): a cap above a hairline that dips at the
    # temples, with a few darker strands.
    if style != 3:
        hairline = top + face_h * rng.uniform(-0.04, 0.12)
        dip = face_h * rng.uniform(0.08, 0.3)
        part = rng.uniform(-0.5, 0.5)
        big = ((xx - cx) / (half_w * 1.08)) ** 2 + ((yy - ecy) / (eb * 1.07)) ** 2 <= 1.0
        xn = (xx - cx) / half_w
        cap = big & (yy < hairline + dip * xn**2 + 0.06 * face_h * np.abs(xn - part))
        cap &= yy < ecy + 0.05 * eb
        cap_f = cv2.GaussianBlur(cap.astype(np.float32), (0, 0), 0.8)[..., None]
        strands = np.zeros(yy.shape, np.float32)
        for _ in range(int(rng.integers(4, 12))):
            x0 = cx + rng.uniform(-1, 1) * half_w - hx0
            pts = np.array(
                [[x0, egg_top - hy0], [x0 + rng.uniform(-0.4, 0.4) * half_w, hairline - hy0]]
            )
            _line(strands, pts, np.array([1.0, 1.0, 1.0]), 1)
        dark = 1 - 0.25 * cv2.GaussianBlur(strands, (0, 0), 0.7)
        hair_img = hair[None, None, :].astype(np.float32) * dark[..., None]
        img[fr] = img[fr] * (1 - cap_f) + hair_img * cap_f
        fg[fr] = np.maximum(fg[fr], cap_f[..., 0])

    # Eyes.
    eye_dx = half_w * rng.uniform(0.4, 0.5)
    eye_hw = half_w * rng.uniform(0.2, 0.26)
    up_h, lo_h = eye_hw * rng.uniform(0.42, 0.6), eye_hw * rng.uniform(0.25, 0.38)
    tilt = rng.uniform(-0.08, 0.12)
    iris = _IRIS[rng.integers(len(_IRIS))] * rng.uniform(0.85, 1.15, 3)
    xs9 = np.linspace(-1, 1, 9)
    eyes = {}
    brow_th = int(rng.integers(2, 5))
    for side, name in ((-1, "left"), (1, "right")):
        ecx = cx + side * eye_dx
        ox = ecx + eye_hw * xs9
        slope = -side * tilt * eye_hw * xs9  # outer corners up for positive tilt
        upper = np.stack([ox, eye_y + slope - up_h * (1 - xs9**2) ** 0.8], 1)
        lower = np.stack([ox, eye_y + slope + lo_h * (1 - xs9**2) ** 0.9], 1)
        eyes[name] = (upper, lower)
        poly = np.concatenate([upper, lower[::-1]])
        ex0, ey0 = np.floor(poly.min(axis=0)).astype(int) - 2
        ex1, ey1 = np.ceil(poly.max(axis=0)).astype(int) + 3
        ex0, ey0, ex1, ey1 = max(ex0, 0), max(ey0, 0), min(ex1, size), min(ey1, size)
        er = (slice(ey0, ey1), slice(ex0, ex1))
        local = poly - np.array([ex0, ey0])
        sclera = np.zeros((ey1 - ey0, ex1 - ex0), np.float32)
        cv2.fillPoly(sclera, [_pts(local)], 1.0, cv2.LINE_AA, shift=4)
        eye_img = np.empty((ey1 - ey0, ex1 - ex0, 3), np.float32)
        eye_img[:] = np.array([238.0, 236.0, 230.0]) * rng.uniform(0.9, 1.0)
        ir = (up_h + lo_h) * rng.uniform(0.55, 0.7)
        icx = ecx + rng.uniform(-0.15, 0.15) * eye_hw - ex0
        icy = eye_y + 0.1 * (lo_h - up_h) - ey0
        centre = (int(icx * 16), int(icy * 16))
        cv2.circle(eye_img, centre, int(ir * 16), _col(iris), -1, cv2.LINE_AA, 4)
        cv2.circle(eye_img, centre, int(ir * 0.45 * 16), (15, 12, 12), -1, cv2.LINE_AA, 4)
        hl = (int((icx + ir * 0.3) * 16), int((icy - ir * 0.3) * 16))
        cv2.circle(eye_img, hl, int(max(ir * 0.18, 0.6) * 16), (250, 250, 250), -1, cv2.LINE_AA, 4)
        img[er] = img[er] * (1 - sclera[..., None]) + eye_img * sclera[..., None]
        _line(img, upper, hair * 0.4 + 10, 2)
        _line(img, lower, skin * 0.6, 1)
        brow = np.stack(
            [
                ecx + eye_hw * 1.1 * xs9,
                eye_y - up_h - eye_hw * rng.uniform(0.6, 1.0) - 0.35 * eye_hw * (1 - xs9**2),
            ],
            1,
        )
        _line(img, brow, hair * 0.9, brow_th)

    # Nose.
    nose_tip_y = top + face_h * rng.uniform(0.56, 0.62)
    nose_base_y = nose_tip_y + face_h * rng.uniform(0.025, 0.04)
    nose_w = half_w * rng.uniform(0.18, 0.26)
    side = 1 if rng.random() < 0.5 else -1
    ridge = np.array(
        [[cx + side * 0.25 * nose_w, eye_y + 0.05 * face_h], [cx + side * 0.6 * nose_w, nose_tip_y]]
    )
    _line(layer, ridge, np.array([1.0, 1.0, 1.0]) * 40, 2)
    for s in (-1, 1):
        c = (int((cx + s * 0.55 * nose_w) * 16), int(nose_base_y * 16))
        cv2.ellipse(
            layer,
            c,
            (int(0.35 * nose_w * 16), int(0.2 * nose_w * 16)),
            0,
            0,
            360,
            (70, 70, 70),
            -1,
            cv2.LINE_AA,
            4,
        )
    layer = cv2.GaussianBlur(layer, (0, 0), 1.0)
    img = img * (1 - layer / 255.0 * 1.2).clip(0.3, 1)

    # Lips: a parting line (closed mouth), outer contours with a cupid's bow.
    mouth_y = top + face_h * rng.uniform(0.74, 0.79)
    wi = half_w * rng.uniform(0.3, 0.4)  # inner half width
    wo = wi * rng.uniform(1.05, 1.12)
    curve = rng.uniform(-0.06, 0.08) * wi  # > 0: corners up (smile)
    tu, tl = face_h * rng.uniform(0.03, 0.055), face_h * rng.uniform(0.05, 0.08)
    xs11 = np.linspace(-1, 1, 11)

    def parting(xn: np.ndarray) -> np.ndarray:
        return mouth_y - curve * xn**2

    inner_x = cx + wi * xs11
    inner = np.stack([inner_x, parting(xs11 * wi / wo)], 1)
    outer_x = cx + wo * xs11
    bow = 1 - 0.3 * np.exp(-((xs11 / 0.16) ** 2))
    upper_outer = np.stack([outer_x, parting(xs11) - tu * (1 - xs11**2) ** 0.7 * bow], 1)
    lower_outer = np.stack([outer_x, parting(xs11) + tl * (1 - xs11**2) ** 0.6], 1)
    lip = skin * np.array([0.9, 0.62, 0.62]) * rng.uniform(0.8, 1.05)
    if rng.random() < 0.25:  # lipstick
        lip = np.array([rng.uniform(120, 210), rng.uniform(20, 70), rng.uniform(40, 90)])
    line = np.stack([outer_x, parting(xs11)], 1)
    _fill(img, np.concatenate([upper_outer, line[::-1]]), lip * 0.88)
    _fill(img, np.concatenate([line, lower_outer[::-1]]), lip)
    _line(img, line, lip * 0.45, 1)

    img = cv2.GaussianBlur(np.clip(img, 0, 255), (0, 0), 0.6)
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    mask = np.clip(cv2.GaussianBlur(fg, (0, 0), 0.8) * 255 + 0.5, 0, 255).astype(np.uint8)

    # Rig, analytically.
    # theta from the left (a little above the centre) under the chin (pi/2) to the right.
    jaw_t = np.linspace(np.pi + 0.25, -0.25, 21)
    jaw_narrow = 1 - taper * np.clip(np.sin(jaw_t), 0, None) ** 2
    jaw = np.stack([cx + half_w * np.cos(jaw_t) * jaw_narrow, ecy + eb * np.sin(jaw_t)], 1)
    parts = {
        "lip_upper_outer": upper_outer,
        "lip_lower_outer": lower_outer,
        "lip_upper_inner": inner,
        "lip_lower_inner": inner,
        "eye_left_upper": eyes["left"][0],
        "eye_left_lower": eyes["left"][1],
        "eye_right_upper": eyes["right"][0],
        "eye_right_lower": eyes["right"][1],
        "jaw": jaw,
        "forehead": np.array([[cx, top]]),
        "chin": np.array([[cx, chin_y]]),
        "nose_tip": np.array([[cx, nose_tip_y]]),
        "nose_base": np.array([[cx, nose_base_y]]),
        "face_box": np.array([[cx - face_h / 2, top], [cx + face_h / 2, chin_y]]),
    }
    from .animate import RIG_LAYOUT

    pts = np.concatenate([parts[name] for name, _ in RIG_LAYOUT]).astype(np.float32)
    split = "heldout" if is_heldout_procedural(seed) else "train"
    return IdentitySource(
        name=f"procedural-{int(seed)}",
        split=split,
        kind="procedural",
        image=image,
        mask=mask,
        rig=FaceRig(pts),
    )


# --------------------------------------------------------------------------- run time


def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(lo) if hi <= lo else float(rng.uniform(lo, hi))


def make_identity(
    source: IdentitySource,
    rng: np.random.Generator,
    resolution: int = 128,
    config: AugmentConfig | None = None,
) -> Identity:
    """One training identity from a base face (numpy + OpenCV only).

    Geometry first (flip, scale about the crop centre, rotation, shift; the unaugmented
    result is exactly the render's crop framing), then background replacement (always for
    procedural faces, whose background is random anyway), colour (HSV jitter, gamma, white
    balance, sometimes grayscale), a smooth relighting gradient on the person, and
    degradations (blur, noise, JPEG).  The same ``rng`` state gives the same identity.
    """
    cfg = config or AugmentConfig()
    image, mask, rig = source.image, source.mask, source.rig
    size = image.shape[0]
    if rng.random() < cfg.flip:
        image = np.ascontiguousarray(image[:, ::-1])
        mask = np.ascontiguousarray(mask[:, ::-1])
        rig = rig.flipped(size)
    crop = size / CONTEXT_SCALE
    scale = resolution / crop * _u(rng, cfg.scale)
    angle = float(rng.uniform(-cfg.rotation, cfg.rotation)) if cfg.rotation > 0 else 0.0
    shift = rng.uniform(-cfg.shift, cfg.shift, 2) * resolution if cfg.shift > 0 else np.zeros(2)
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    m[:, 2] += np.array([resolution / 2, resolution / 2]) - np.array([size / 2, size / 2]) + shift
    # cv2 maps pixel centres: x_out + 0.5 = A (x_in + 0.5) + b  ->  shift b by A*0.5 - 0.5.
    m_pix = m.copy()
    m_pix[:, 2] += m[:, :2] @ np.array([0.5, 0.5]) - 0.5
    out = cv2.warpAffine(
        image,
        m_pix,
        (resolution, resolution),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    msk = cv2.warpAffine(
        mask,
        m_pix,
        (resolution, resolution),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    rig = rig.transformed(m)
    img = out.astype(np.float32)
    alpha = msk.astype(np.float32)[..., None] / 255.0

    if source.kind == "procedural" or rng.random() < cfg.background:
        bg = random_background(rng, resolution).astype(np.float32)
        a = cv2.GaussianBlur(alpha[..., 0], (0, 0), 0.7)[..., None]
        img = img * a + bg * (1 - a)

    img = _colour(img, rng, cfg)
    if cfg.relight > 0:
        ang = rng.uniform(0, 2 * np.pi)
        k = rng.uniform(-cfg.relight, cfg.relight)
        g = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution - 0.5
        gx, gy = np.meshgrid(g, g)
        gain = 1.0 + k * (gx * np.cos(ang) + gy * np.sin(ang)) * 2.0
        gain = np.clip(gain, 0.55, 1.45)[..., None]
        img = img * (1 + (gain - 1) * alpha)
    img = np.clip(img, 0, 255)
    if rng.random() < cfg.blur:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.8))
    if rng.random() < cfg.noise:
        img = img + rng.normal(0, rng.uniform(1.0, 4.0), img.shape).astype(np.float32)
    result = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < cfg.jpeg:
        q = int(rng.integers(55, 95))
        ok, buf = cv2.imencode(".jpg", result[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        if ok:
            result = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    return Identity(name=source.name, image=result, rig=rig, mask=msk)


def _colour(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    x = np.clip(img, 0, 255) / 255.0
    hsv = cv2.cvtColor(x.astype(np.float32), cv2.COLOR_RGB2HSV)  # H in degrees for float
    if cfg.hue > 0:
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-cfg.hue, cfg.hue)) % 360.0
    hsv[..., 1] = np.clip(hsv[..., 1] * _u(rng, cfg.saturation), 0, 1)
    hsv[..., 2] = np.clip(hsv[..., 2] * _u(rng, cfg.brightness), 0, 1)
    x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    x = np.clip(x, 0, 1) ** _u(rng, cfg.gamma)
    if cfg.white_balance > 0:
        x = x * rng.uniform(1 - cfg.white_balance, 1 + cfg.white_balance, 3).astype(np.float32)
    if rng.random() < cfg.gray:
        g = x @ np.array([0.299, 0.587, 0.114], np.float32)
        x = np.repeat(g[..., None], 3, axis=2)
    return np.clip(x, 0, 1) * 255.0
