"""Bad input: one clear stderr line naming the file, a distinct exit code, no output left."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import wave

import pytest

from .cli_util import FACE, FAST, LCP, SPEECH, run_lcp

NO_FACE = FACE.parent / "no_face.png"


def _assert_clean_failure(proc, code: int, must_mention: str, out_dir):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lcp: error: ")
    assert must_mention in lines[0]
    assert "Traceback" not in proc.stderr
    assert not [
        p for p in out_dir.iterdir() if p.suffix in (".mp4", ".json") or "lcp-tmp" in p.name
    ]


def _render(tmp_path, face, audio, out=None, *extra):
    out = out or tmp_path / "out" / "video.mp4"
    out.parent.mkdir(exist_ok=True)
    return run_lcp("render", face, audio, "-o", out, *FAST, *extra, cache_dir=tmp_path / "c"), out


def test_missing_face_file(tmp_path):
    proc, out = _render(tmp_path, tmp_path / "nope.png", SPEECH)
    _assert_clean_failure(proc, 10, "nope.png", out.parent)


def test_missing_audio_file(tmp_path):
    proc, out = _render(tmp_path, FACE, tmp_path / "nope.wav")
    _assert_clean_failure(proc, 10, "nope.wav", out.parent)


def test_not_an_image(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is text, not a PNG")
    proc, out = _render(tmp_path, fake, SPEECH)
    _assert_clean_failure(proc, 11, "fake.png", out.parent)


def test_image_without_a_face(tmp_path):
    proc, out = _render(tmp_path, NO_FACE, SPEECH)
    _assert_clean_failure(proc, 12, "no_face.png", out.parent)


def test_unreadable_audio(tmp_path):
    bad = tmp_path / "noise.wav"
    bad.write_bytes(os.urandom(4096))
    proc, out = _render(tmp_path, FACE, bad)
    _assert_clean_failure(proc, 13, "noise.wav", out.parent)


def test_zero_length_audio(tmp_path):
    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    proc, out = _render(tmp_path, FACE, empty)
    _assert_clean_failure(proc, 13, "empty.wav", out.parent)


def test_silent_audio_is_valid(tmp_path):
    silent = tmp_path / "silent.wav"
    with wave.open(str(silent), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000)
    proc, out = _render(tmp_path, FACE, silent)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


def test_output_directory_missing(tmp_path):
    out = tmp_path / "missing_dir" / "video.mp4"
    proc = run_lcp("render", FACE, SPEECH, "-o", out, *FAST, cache_dir=tmp_path / "c")
    _assert_clean_failure(proc, 14, "missing_dir", tmp_path)


def test_output_directory_unwritable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        proc = run_lcp(
            "render", FACE, SPEECH, "-o", locked / "v.mp4", *FAST, cache_dir=tmp_path / "c"
        )
        _assert_clean_failure(proc, 14, "locked", locked)
    finally:
        locked.chmod(0o700)


def test_output_parent_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = run_lcp(
        "render", FACE, SPEECH, "-o", tmp_path / "afile" / "v.mp4", *FAST, cache_dir=tmp_path / "c"
    )
    assert proc.returncode == 14, proc.stderr
    assert "afile" in proc.stderr


def test_output_exists_is_refused_without_overwrite(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    existing = out_dir / "video.mp4"
    existing.write_bytes(b"precious")
    proc, _ = _render(tmp_path, FACE, SPEECH, existing)
    assert proc.returncode == 15, proc.stderr
    assert "--overwrite" in proc.stderr
    assert existing.read_bytes() == b"precious"  # nothing lost


def test_invalid_option_value(tmp_path):
    proc, out = _render(tmp_path, FACE, SPEECH, None, "--accel", "warp-drive")
    _assert_clean_failure(proc, 16, "warp-drive", out.parent)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_no_partial_output(tmp_path, sig):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cache = tmp_path / "c"
    env = {**os.environ, "LCP_CACHE_DIR": str(cache)}
    proc = subprocess.Popen(
        [str(LCP), "render", FACE, SPEECH, "-o", out_dir / "v.mp4", "--steps", "500", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # A background job of a non-interactive shell (CI under `cmd &`) inherits SIGINT
        # ignored, and then Python installs no KeyboardInterrupt handler: restore the
        # default so the child sees Ctrl-C as a terminal user's process does.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # The reference bank is cached right before denoising starts: interrupt mid-denoise.
        deadline = time.monotonic() + 120
        while not list(cache.glob("*.safetensors")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # never leave a 500-step render running
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert list(out_dir.iterdir()) == []
