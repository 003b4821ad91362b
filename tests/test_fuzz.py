"""Property-based bad input (hypothesis): malformed images, audio, job files, weight files
and configs reach the library and the CLI, and only the documented errors come out.

Every property says: the call either succeeds or raises an :class:`LcpError` subclass
(its message names the file); never another exception, never a traceback from the CLI.
The cases tried are listed in the README ("Bad input, systematically").
"""

from __future__ import annotations

import io
import json
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from lightningcp_cli.batch import BadLine, Job, parse_jobs
from lightningcp_cli.config import (
    AudioConfig,
    DenoiseConfig,
    DFAConfig,
    FaceConfig,
    LightningCPConfig,
    OutputConfig,
    RenderConfig,
)
from lightningcp_cli.errors import (
    AudioError,
    ConfigError,
    ImageError,
    ModelLoadError,
    NoFaceError,
)
from lightningcp_cli.stages.audio import load_audio
from lightningcp_cli.stages.face import analyze_face, load_image

from .cli_util import FACE, FAST, SPEECH, run_lcp

FUZZ = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- images ---------------------------------------------------------------------------------

_PNG = FACE.read_bytes()


@st.composite
def damaged_images(draw) -> bytes:
    """Random bytes, a real PNG cut short or with flipped bytes, or a real but odd image."""
    kind = draw(st.sampled_from(["bytes", "truncated", "flipped", "odd"]))
    if kind == "bytes":
        return draw(st.binary(min_size=0, max_size=2048))
    if kind == "truncated":
        return _PNG[: draw(st.integers(0, len(_PNG) - 1))]
    if kind == "flipped":
        data = bytearray(_PNG)
        for pos in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=20)):
            data[pos] ^= 0xFF
        return bytes(data)
    w = draw(st.integers(1, 300))
    h = draw(st.integers(1, 300))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "I;16", "F", "1", "P", "CMYK"]))
    fmt = draw(st.sampled_from(["PNG", "TIFF", "BMP", "WEBP"]))
    if mode == "CMYK" and fmt in ("PNG", "BMP", "WEBP") or mode in ("I;16", "F") and fmt != "TIFF":
        fmt = "TIFF"
    seed = draw(st.integers(0, 2**16))
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


@FUZZ
@given(data=damaged_images())
def test_damaged_images_give_image_errors_only(tmp_path, data):
    path = _write(tmp_path, "face.png", data)
    try:
        image = load_image(path)
    except ImageError as e:
        assert str(path) in str(e)
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    try:
        analyze_face(image, FaceConfig(), 128, source=str(path))
    except (NoFaceError, ImageError) as e:
        assert str(path) in str(e)


# --- audio ----------------------------------------------------------------------------------


def _wav(samples: np.ndarray, rate: int, width: int, channels: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


@st.composite
def damaged_audio(draw) -> bytes:
    """Random bytes, a real WAV cut short or with a lying header, or a real but odd WAV
    (1 sample, 8-bit, 6 channels, 1 Hz or 384 kHz, float NaN/inf)."""
    kind = draw(st.sampled_from(["bytes", "truncated", "header", "odd", "float"]))
    real = SPEECH.read_bytes()
    if kind == "bytes":
        return b"RIFF" + draw(st.binary(min_size=0, max_size=1024))
    if kind == "truncated":
        return real[: draw(st.integers(0, 200))]
    if kind == "header":
        data = bytearray(real[:4096])
        field = draw(st.sampled_from([4, 22, 24, 34, 40]))  # sizes, channels, rate, width
        data[field : field + 4] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
        return bytes(data)
    if kind == "odd":
        n = draw(st.integers(0, 64))
        channels = draw(st.integers(1, 6))
        width = draw(st.sampled_from([1, 2, 4]))
        rate = draw(st.sampled_from([1, 8000, 16000, 384000]))
        dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
        samples = np.random.default_rng(n).integers(0, 100, n * channels).astype(dtype)
        return _wav(samples, rate, width, channels)
    values = draw(st.lists(st.sampled_from([0.0, 0.5, np.nan, np.inf, -np.inf]), max_size=32))
    import soundfile

    buf = io.BytesIO()
    soundfile.write(
        buf, np.array(values or [0.0], np.float32), 16000, format="WAV", subtype="FLOAT"
    )
    return buf.getvalue()


@FUZZ
@given(data=damaged_audio())
def test_damaged_audio_gives_audio_errors_only(tmp_path, data):
    path = _write(tmp_path, "speech.wav", data)
    try:
        audio = load_audio(path)
    except AudioError as e:
        assert str(path) in str(e)
        return
    assert audio.samples.ndim == 1 and audio.samples.size > 0
    assert np.isfinite(audio.samples).all()


# --- job files (lcp batch) ------------------------------------------------------------------

_KEYS = ["face", "audio", "output", "steps", "cfg", "seed", "fps", "size", "accel", "model"]
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
)


@st.composite
def job_lines(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["json", "text", "blank"]))
        if kind == "json":
            keys = draw(st.lists(st.sampled_from(_KEYS), max_size=6, unique=True))
            lines.append(json.dumps({k: draw(_VALUES) for k in keys}))
        elif kind == "text":
            lines.append(draw(st.text(max_size=40)).replace("\n", " "))
        else:
            lines.append("")
    return "\n".join(lines)


@FUZZ
@given(text=job_lines(), fmt=st.sampled_from(["jsonl", "csv"]))
def test_malformed_job_files_become_bad_lines_or_config_errors(tmp_path, text, fmt):
    try:
        entries = parse_jobs(text, tmp_path, fmt=fmt, source="jobs")
    except ConfigError as e:  # a whole-file problem (e.g. a CSV header) is one clear error
        assert "jobs" in str(e)
        return
    for entry in entries:
        assert isinstance(entry, (Job, BadLine))
        if isinstance(entry, BadLine):
            assert entry.reason and entry.line >= 1


# --- configs --------------------------------------------------------------------------------

_CONFIGS = {
    DenoiseConfig: ["steps", "guidance", "context_frames", "noise_clamp", "chunk_overlap"],
    LightningCPConfig: ["interval", "warmup", "threshold", "max_interval", "schedule"],
    DFAConfig: ["threshold", "dilate", "min_fraction", "max_fraction"],
    OutputConfig: ["fps", "size", "crf"],
    AudioConfig: ["sample_rate", "feature_rate"],
    FaceConfig: ["crop_dilation", "mask_dilation"],
}
_NUMBERS = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["adaptive", "", "x"]),
)


@FUZZ
@given(
    cls=st.sampled_from(sorted(_CONFIGS, key=lambda c: c.__name__)),
    data=st.data(),
)
def test_config_values_are_validated_with_config_errors(cls, data):
    fields = [f for f in _CONFIGS[cls] if f in cls.__dataclass_fields__]
    assume(fields)
    name = data.draw(st.sampled_from(fields))
    value = data.draw(_NUMBERS)
    try:
        cls(**{name: value})
    except ConfigError:
        return
    except (TypeError, ValueError) as e:  # only for values of the wrong type
        assert not isinstance(value, (int, float)) or isinstance(value, bool), (name, value, e)


@FUZZ
@given(accel=st.text(max_size=20), dtype=st.one_of(st.none(), st.text(max_size=10)))
def test_render_config_rejects_unknown_names(accel, dtype):
    try:
        RenderConfig(accel=accel, dtype=dtype)
    except ConfigError as e:
        assert str(e)


# --- weight files ---------------------------------------------------------------------------


@FUZZ
@given(cut=st.integers(0, 4096), flips=st.lists(st.integers(0, 4095), max_size=8))
def test_damaged_weight_files_give_model_load_errors(tmp_path_factory, cut, flips):
    from lightningcp_cli.models.bundle import load_model

    src = Path(__file__).parents[1] / "lightningcp_cli" / "weights" / "lcp-tiny"
    folder = tmp_path_factory.mktemp("w")
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    victim = folder / "face_locator.safetensors"  # the smallest file: fast to damage
    data = bytearray(victim.read_bytes())
    data = data[: len(data) - cut] if cut else data
    for pos in flips:
        if pos < len(data):
            data[pos] ^= 0x5A
    victim.write_bytes(bytes(data))
    try:
        load_model("lcp-tiny", folder)
    except ModelLoadError as e:
        assert "face_locator" in str(e)


# --- the CLI --------------------------------------------------------------------------------


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(image=damaged_images(), audio=damaged_audio())
def test_cli_on_damaged_files_prints_one_line_and_a_documented_code(tmp_path, image, audio):
    face = _write(tmp_path, "face.png", image)
    speech = _write(tmp_path, "speech.wav", audio)
    out = tmp_path / "out.mp4"
    proc = run_lcp("render", face, speech, "-o", out, "--overwrite", *FAST, cache_dir=tmp_path)
    assert "Traceback" not in proc.stderr
    if proc.returncode == 0:
        assert out.is_file()
        return
    assert proc.returncode in (10, 11, 12, 13), proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "warning" not in ln]
    assert len(lines) == 1 and lines[0].startswith("lcp: error: "), proc.stderr
    assert not out.exists()


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
