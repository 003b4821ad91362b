"""The bundled ffmpeg binary and what it says about media files.

There is no ``ffprobe`` next to imageio-ffmpeg's binary, so :func:`probe` reads the
stream summary that ``ffmpeg -i FILE`` prints on stderr, and :func:`count_frames`
decodes the first video stream into the null muxer and reads its final ``frame=``
count.  Both run the real binary; nothing here is guessed from file names.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import EncodeError, InputError, InputNotFoundError

__all__ = [
    "MediaInfo",
    "StreamInfo",
    "count_frames",
    "ffmpeg_exe",
    "last_line",
    "parse_probe_output",
    "probe",
    "try_probe",
]


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of imageio-ffmpeg's ffmpeg binary (or ``$IMAGEIO_FFMPEG_EXE``), looked up once."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:  # ImportError, RuntimeError: no binary for this platform
        raise EncodeError(f"ffmpeg binary not available ({e})") from e


def last_line(text: str | bytes) -> str:
    """The last non-empty line of ffmpeg's stderr, for one-line error messages."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    return lines[-1] if lines else "no message"


@dataclass(frozen=True)
class StreamInfo:
    """One audio or video stream of a media file; fields of the other kind are None."""

    index: int  # position among all streams of the input (as in ``0:N``)
    kind: str  # "video" | "audio"
    codec: str  # e.g. "h264", "aac", "pcm_s16le"
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    pix_fmt: str | None = None
    sample_rate: int | None = None
    channels: int | None = None


@dataclass(frozen=True)
class MediaInfo:
    path: Path
    format: str  # demuxer names, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    duration: float | None  # seconds; None when ffmpeg reports N/A
    streams: tuple[StreamInfo, ...]

    @property
    def video(self) -> StreamInfo | None:
        """The first video stream, if any."""
        return next((s for s in self.streams if s.kind == "video"), None)

    @property
    def audio(self) -> StreamInfo | None:
        """The first audio stream, if any."""
        return next((s for s in self.streams if s.kind == "audio"), None)


# "Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'x.mp4':"
_INPUT_RE = re.compile(r"^Input #0, (?P<fmt>.+?), from '", re.M)
# "  Duration: 00:00:02.00, start: 0.000000, bitrate: 91 kb/s"   (or "Duration: N/A")
_DURATION_RE = re.compile(
    r"^\s*Duration:\s*(?:(?P<h>\d+):(?P<m>\d{2}):(?P<s>\d+(?:\.\d*)?)|N/A)", re.M
)
# "  Stream #0:1[0x2](und): Audio: aac (LC) (mp4a / 0x6134706D), 16000 Hz, mono, ..."
_STREAM_RE = re.compile(
    r"^\s*Stream #0:(?P<idx>\d+)\S*?:\s*"
    r"(?P<kind>Video|Audio|Subtitle|Data|Attachment):\s*(?P<rest>.*)$",
    re.M,
)
_SIZE_RE = re.compile(r"^(\d+)x(\d+)\b")
_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(k?)\s+(fps|tbr)$")
_HZ_RE = re.compile(r"^(\d+)\s*Hz$")
_CHANNELS_RE = re.compile(r"^(\d+)\s+channels\b")
_LAYOUTS = {
    "mono": 1,
    "stereo": 2,
    "downmix": 2,
    "2.1": 3,
    "3.0": 3,
    "3.0(back)": 3,
    "4.0": 4,
    "quad": 4,
    "quad(side)": 4,
    "3.1": 4,
    "5.0": 5,
    "5.0(side)": 5,
    "4.1": 5,
    "5.1": 6,
    "5.1(side)": 6,
    "6.0": 6,
    "6.0(front)": 6,
    "hexagonal": 6,
    "6.1": 7,
    "6.1(back)": 7,
    "6.1(front)": 7,
    "7.0": 7,
    "7.0(front)": 7,
    "7.1": 8,
    "7.1(wide)": 8,
    "7.1(wide-side)": 8,
    "octagonal": 8,
}


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside (), [] (``yuv420p(tv, bt709)`` stays whole)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def _rate(value: str, k: str) -> float:
    return float(value) * (1000.0 if k else 1.0)


def _parse_stream(idx: int, kind: str, rest: str) -> StreamInfo | None:
    parts = _split_top(rest)
    if not parts:
        return None
    codec = parts[0].split()[0] if parts[0].split() else "unknown"
    if kind == "Video":
        pix_fmt = None
        width = height = None
        fps = tbr = None
        for i, p in enumerate(parts[1:], start=1):
            m = _SIZE_RE.match(p)
            if m and width is None:
                width, height = int(m.group(1)), int(m.group(2))
                continue
            m = _RATE_RE.match(p)
            if m:
                if m.group(3) == "fps":
                    fps = _rate(m.group(1), m.group(2))
                else:
                    tbr = _rate(m.group(1), m.group(2))
                continue
            if i == 1 and re.match(r"^[a-z][a-z0-9_]*(\(|$)", p):
                pix_fmt = p.split("(")[0]
        return StreamInfo(
            index=idx,
            kind="video",
            codec=codec,
            width=width,
            height=height,
            fps=fps if fps is not None else tbr,
            pix_fmt=pix_fmt,
        )
    if kind == "Audio":
        sample_rate = channels = None
        for p in parts[1:]:
            m = _HZ_RE.match(p)
            if m and sample_rate is None:
                sample_rate = int(m.group(1))
                continue
            if channels is None:
                m = _CHANNELS_RE.match(p)
                if m:
                    channels = int(m.group(1))
                elif p in _LAYOUTS:
                    channels = _LAYOUTS[p]
        return StreamInfo(
            index=idx, kind="audio", codec=codec, sample_rate=sample_rate, channels=channels
        )
    return None  # subtitles, data, attachments: not ours


def parse_probe_output(path: Path, stderr: str) -> MediaInfo | None:
    """Parse what ``ffmpeg -i`` printed; None when it did not recognise an input."""
    m = _INPUT_RE.search(stderr)
    if not m:
        return None
    # Only the part describing input #0 (the text before any "Output #" / "Stream mapping").
    head = re.split(r"^(?:Output #|Stream mapping:)", stderr[m.start() :], maxsplit=1, flags=re.M)
    block = head[0]
    duration = None
    d = _DURATION_RE.search(block)
    if d and d.group("h") is not None:
        duration = int(d.group("h")) * 3600 + int(d.group("m")) * 60 + float(d.group("s"))
    streams = []
    for s in _STREAM_RE.finditer(block):
        info = _parse_stream(int(s.group("idx")), s.group("kind"), s.group("rest"))
        if info is not None:
            streams.append(info)
    return MediaInfo(path=path, format=m.group("fmt"), duration=duration, streams=tuple(streams))


def _check_input(path: Path) -> None:
    if not path.exists():
        raise InputNotFoundError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a media file")


def _run_ffmpeg(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )


def probe(path: str | os.PathLike) -> MediaInfo:
    """Container format, duration and audio/video streams of a media file.

    Raises InputNotFoundError for a missing file and InputError when ffmpeg cannot read it.
    """
    info, err = try_probe(path)
    if info is None:
        raise InputError(f"{path}: not a readable media file ({last_line(err)})")
    return info


def try_probe(path: str | os.PathLike) -> tuple[MediaInfo | None, str]:
    """Like :func:`probe`, but an unreadable file gives ``(None, ffmpeg's stderr)``."""
    path = Path(path)
    _check_input(path)
    # "-i" alone always exits 1 ("At least one output file must be specified"): success is
    # judged by whether ffmpeg described an input.
    proc = _run_ffmpeg(["-i", str(path)])
    err = proc.stderr.decode("utf-8", "replace")
    return parse_probe_output(path, err), err


_FRAME_RE = re.compile(r"frame=\s*(\d+)")


def count_frames(path: str | os.PathLike) -> int:
    """Number of frames of the first video stream, by decoding it (exact, not from headers)."""
    path = Path(path)
    _check_input(path)
    proc = _run_ffmpeg(
        ["-v", "error", "-stats", "-i", str(path), "-map", "0:v:0", "-f", "null", "-"]
    )
    err = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        if "matches no streams" in err:
            raise InputError(f"{path}: no video stream")
        raise InputError(f"{path}: cannot decode video ({last_line(err)})")
    counts = _FRAME_RE.findall(err)
    if not counts:
        raise InputError(f"{path}: ffmpeg reported no frame count")
    return int(counts[-1])
