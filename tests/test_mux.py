"""Mux stage: real ffmpeg encodes, probed back with the real binary."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lightningcp_cli.errors import (
    EncodeError,
    InputError,
    InputNotFoundError,
    OutputError,
    OutputExistsError,
)
from lightningcp_cli.media import count_frames, ffmpeg_exe, parse_probe_output, probe
from lightningcp_cli.stages.mux import VideoWriter, check_output_path

DATA = Path(__file__).parent / "data"
WAV = DATA / "speech_2s.wav"


def frames(n: int, width: int = 64, height: int = 48):
    """A moving gradient, one frame at a time."""
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        r = (xx * 4 + i * 10) % 256
        g = (yy * 5) % 256
        b = np.full_like(xx, (i * 25) % 256)
        yield np.stack([r, g, b], axis=-1).astype(np.uint8)


def top_level_atoms(path: Path) -> list[str]:
    data = path.read_bytes()
    atoms, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        elif size == 0:
            size = len(data) - pos
        assert size >= 8
        atoms.append(kind.decode("latin-1"))
        pos += size
    return atoms


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".lcp-tmp-" in p.name)


def test_video_with_audio(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    # 10 frames at 5 fps = 2.0 s, the length of the audio.
    with VideoWriter(out, fps=5, width=64, height=48, audio_path=WAV) as w:
        for f in frames(10):
            w.write(f)
        assert w.frames_written == 10
    info = probe(out)
    v, a = info.video, info.audio
    assert (v.codec, v.pix_fmt, v.width, v.height, v.fps) == ("h264", "yuv420p", 64, 48, 5.0)
    assert (a.codec, a.sample_rate, a.channels) == ("aac", 16_000, 1)
    assert info.duration == pytest.approx(2.0, abs=0.05)
    assert count_frames(out) == 10
    atoms = top_level_atoms(out)
    assert atoms.index("moov") < atoms.index("mdat")  # +faststart
    assert leftovers(tmp_path) == []
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_audio_is_kept_whole(tmp_path: Path) -> None:
    # Fewer frames than the audio needs: the audio is not cut to the video.
    out = tmp_path / "short.mp4"
    with VideoWriter(out, fps=24, width=32, height=32, audio_path=WAV) as w:
        for f in frames(6, 32, 32):
            w.write(f)
    assert count_frames(out) == 6
    assert probe(out).duration == pytest.approx(2.0, abs=0.05)


def test_video_only_and_odd_size(tmp_path: Path) -> None:
    out = tmp_path / "odd.mp4"
    with VideoWriter(out, fps=24, width=33, height=21) as w:
        assert w.size == (34, 22)
        for f in frames(7, 33, 21):
            w.write(f)
    info = probe(out)
    assert [s.kind for s in info.streams] == ["video"]
    assert (info.video.width, info.video.height, info.video.pix_fmt) == (34, 22, "yuv420p")
    assert count_frames(out) == 7


def test_temp_file_while_writing_and_none_after_error(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(out, 24, 64, 48, WAV) as w:
        for i, f in enumerate(frames(10)):
            w.write(f)
            if i == 3:
                tmp = leftovers(tmp_path)
                assert len(tmp) == 1 and tmp[0].startswith(".out.mp4.lcp-tmp-")
                assert tmp[0].endswith(".mp4")
                assert not out.exists()
                raise RuntimeError("boom")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_keyboard_interrupt_keeps_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous video")
    with (
        pytest.raises(KeyboardInterrupt),
        VideoWriter(out, 24, 64, 48, WAV, overwrite=True) as w,
    ):
        for f in frames(3):
            w.write(f)
        raise KeyboardInterrupt
    assert out.read_bytes() == b"previous video"
    assert leftovers(tmp_path) == []


def test_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous video")
    with pytest.raises(OutputExistsError, match=r"out\.mp4: exists \(use --overwrite\)"):
        VideoWriter(out, 24, 64, 48)
    assert out.read_bytes() == b"previous video"
    with VideoWriter(out, 24, 64, 48, overwrite=True) as w:
        for f in frames(2):
            w.write(f)
    assert count_frames(out) == 2
    assert leftovers(tmp_path) == []


def test_check_output_path(tmp_path: Path) -> None:
    missing = tmp_path / "out" / "x.mp4"
    with pytest.raises(OutputError, match=rf"x\.mp4: directory {tmp_path / 'out'} does not exist"):
        check_output_path(missing, overwrite=False)
    with pytest.raises(OutputError, match="is a directory"):
        check_output_path(tmp_path, overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is not a directory"):
        check_output_path(tmp_path / "file" / "x.mp4", overwrite=False)
    assert check_output_path(tmp_path / "new.mp4", overwrite=False) == tmp_path / "new.mp4"


def test_relative_output_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match=r"^out/x\.mp4: directory out does not exist$"):
        check_output_path("out/x.mp4", overwrite=False)
    with VideoWriter("a:b.mp4", 24, 16, 16) as w:  # a colon must not read as a protocol
        w.write(next(frames(1, 16, 16)))
    assert count_frames(tmp_path / "a:b.mp4") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_not_writable(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output_path(locked / "x.mp4", overwrite=False)
    finally:
        locked.chmod(0o700)


def test_ffmpeg_failure_is_encode_error(tmp_path: Path) -> None:
    bad_audio = tmp_path / "bad.wav"
    bad_audio.write_bytes(b"not audio at all" * 64)
    out = tmp_path / "out.mp4"
    with pytest.raises(EncodeError, match=r"out\.mp4: ffmpeg failed \(.+\)"):  # noqa: SIM117
        with VideoWriter(out, 24, 64, 48, audio_path=bad_audio) as w:
            for f in frames(40):
                w.write(f)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_no_frames_and_bad_frames(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with pytest.raises(EncodeError, match="no frames"), VideoWriter(out, 24, 64, 48):
        pass
    with pytest.raises(ValueError, match="uint8"), VideoWriter(out, 24, 64, 48) as w:
        w.write(np.zeros((48, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"), VideoWriter(out, 24, 64, 48) as w:
        w.write(np.zeros((64, 48, 3), dtype=np.uint8))
    assert not out.exists()
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------ media (probe)


def test_probe_audio_files() -> None:
    expected = {
        "speech_2s.wav": ("wav", "pcm_s16le", 16_000, 1, 2.0),
        "speech_1s_stereo44k.flac": ("flac", "flac", 44_100, 2, 1.0),
        "speech_1s_stereo44k.mp3": ("mp3", "mp3", 44_100, 2, 1.0),
        "speech_1s_stereo44k.m4a": ("mov,mp4,m4a,3gp,3g2,mj2", "aac", 44_100, 2, 1.0),
    }
    for name, (fmt, codec, rate, channels, duration) in expected.items():
        info = probe(DATA / name)
        assert info.format == fmt and info.video is None
        assert [s.kind for s in info.streams] == ["audio"]
        a = info.audio
        assert (a.codec, a.sample_rate, a.channels) == (codec, rate, channels), name
        assert info.duration == pytest.approx(duration, abs=0.03)


def test_probe_other_codecs(tmp_path: Path) -> None:
    # A VP9/WebM at 29.97 fps with an odd pixel format, made by the real binary.
    out = tmp_path / "t.webm"
    cmd = [ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i"]
    cmd += ["testsrc=size=40x30:rate=30000/1001:duration=0.5", "-c:v", "libvpx-vp9"]
    subprocess.run([*cmd, "-pix_fmt", "yuv444p", str(out)], check=True, capture_output=True)
    info = probe(out)
    v = info.video
    assert (v.codec, v.width, v.height, v.pix_fmt) == ("vp9", 40, 30, "yuv444p")
    assert v.fps == pytest.approx(29.97)
    assert count_frames(out) == 15


def test_parse_probe_output_variants() -> None:
    text = "\n".join(
        [
            "Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'a.mp4':",
            "  Duration: 01:02:03.50, start: 0.000000, bitrate: 91 kb/s",
            "  Stream #0:0(und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(tv, bt709, "
            "progressive), 512x384 [SAR 1:1 DAR 4:3], 1205 kb/s, 23.98 fps, 23.98 tbr, 24k tbn",
            "    Metadata:",
            "      handler_name    : VideoHandler",
            "  Stream #0:1[0x2](eng): Audio: aac (LC) (mp4a / 0x6134706D), 48000 Hz, 5.1, fltp",
            "  Stream #0:2: Subtitle: mov_text (tx3g / 0x67337874)",
            "  Stream #0:3: Video: rawvideo (RGB[24] / 0x18424752), rgb24, 8x6, 90k tbr, 90k tbn",
            "  Stream #0:4: Audio: pcm_s24le, 96000 Hz, 3 channels, s32",
            "Output #0, null, to 'pipe:':",
            "  Stream #0:0: Video: wrapped_avframe, yuv420p, 512x384, q=2-31, 24 fps",
        ]
    )
    info = parse_probe_output(Path("a.mp4"), text)
    assert info.duration == pytest.approx(3723.5)
    assert [(s.index, s.kind) for s in info.streams] == [
        (0, "video"),
        (1, "audio"),
        (3, "video"),
        (4, "audio"),
    ]
    v, a, raw, pcm = info.streams
    assert (v.codec, v.pix_fmt, v.width, v.height, v.fps) == ("h264", "yuv420p", 512, 384, 23.98)
    assert (a.codec, a.sample_rate, a.channels) == ("aac", 48_000, 6)
    assert (raw.pix_fmt, raw.width, raw.fps) == ("rgb24", 8, 90_000.0)  # tbr when no fps
    assert (pcm.sample_rate, pcm.channels) == (96_000, 3)
    assert parse_probe_output(Path("x"), "x: Invalid data found when processing input") is None
    na = parse_probe_output(Path("p"), "Input #0, image2pipe, from 'p':\n  Duration: N/A\n")
    assert na.duration is None and na.streams == ()


def test_probe_errors(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError):
        probe(tmp_path / "none.mp4")
    garbage = tmp_path / "g.mp4"
    garbage.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(InputError, match=r"g\.mp4: not a readable media file \(.+\)"):
        probe(garbage)
    with pytest.raises(InputError, match="no video stream"):
        count_frames(WAV)
