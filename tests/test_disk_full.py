"""Disk full while writing: a clean one-line error, a distinct exit code, nothing left.

A real full file system: a tiny tmpfs mounted for the test (needs root, as CI and the
development machines run; skipped where mounting is not allowed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lightningcp_cli.api import write_text_atomic
from lightningcp_cli.errors import OutputError

from .cli_util import FACE, FAST, SPEECH, run_lcp


@pytest.fixture
def tiny_fs(tmp_path: Path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_render_onto_a_full_disk_fails_cleanly(tiny_fs: Path, tmp_path: Path):
    out = tiny_fs / "out.mp4"
    proc = run_lcp("render", FACE, SPEECH, "-o", out, *FAST, cache_dir=tmp_path / "c")
    assert proc.returncode == 30, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lcp: error: "), proc.stderr
    assert str(out) in lines[0] and "No space left on device" in lines[0]
    assert list(tiny_fs.iterdir()) == []  # no video, no temp file, no sidecar


def test_atomic_text_write_on_a_full_disk_is_an_output_error(tiny_fs: Path):
    (tiny_fs / "filler").write_bytes(b"\0" * (60 * 1024))
    target = tiny_fs / "report.json"
    with pytest.raises(OutputError, match="report.json: cannot write") as info:
        write_text_atomic(target, "x" * 100_000)
    assert info.value.exit_code == 14
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["filler"]
