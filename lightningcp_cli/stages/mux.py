"""Mux stage: stream RGB frames (and the input speech) into an H.264/AAC MP4.

Frames go to ffmpeg one at a time through a pipe, so memory stays bounded whatever the
video length.  ffmpeg writes ``.<name>.lcp-tmp-XXXX.mp4`` next to the output; it is
renamed onto the output (``os.replace``, atomic on one file system) only when writing
finished cleanly.  On any error, including KeyboardInterrupt, ffmpeg is killed and the
temp file deleted: a partial video never appears under the output name.

Sizes: libx264 with yuv420p needs even width and height.  An odd dimension is padded by
one pixel that repeats the last column/row, so the video is at most 1 px wider/taller
than the frames (``VideoWriter.size`` tells the encoded size).

Audio: the whole input audio stream is encoded (AAC), at its own length; the caller
renders ``num_video_frames(duration, fps)`` frames so the video covers the audio.
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path
from types import TracebackType

import ffmpeg
import numpy as np

from ..errors import EncodeError, InputNotFoundError, Interrupted, OutputError, OutputExistsError
from ..media import ffmpeg_exe

__all__ = ["VideoWriter", "check_output_path"]

TMP_MARK = ".lcp-tmp-"


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check that a video can be written at ``path``; returns it as a Path.

    Raises OutputError (directory missing, not a directory, not writable; path is a
    directory) or OutputExistsError (exists and not ``overwrite``).
    """
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    if not parent.exists():
        raise OutputError(f"{path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: directory {parent} is not writable")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{path}: exists (use --overwrite)")
        if not path.is_file():
            raise OutputError(f"{path}: exists and is not a regular file")
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class VideoWriter:
    """Context manager writing an MP4 (H.264 yuv420p, AAC, +faststart) frame by frame.

    >>> with VideoWriter("out.mp4", fps=24, width=512, height=512, audio_path="a.wav") as w:
    ...     for frame in frames:  # HxWx3 uint8 RGB
    ...         w.write(frame)

    The output appears only when the ``with`` block exits without an exception.  Raises
    OutputError/OutputExistsError (at construction), InputNotFoundError (audio missing),
    EncodeError (ffmpeg failed, with its last stderr line) and Interrupted (ffmpeg was
    killed by a signal).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float,
        width: int,
        height: int,
        audio_path: str | os.PathLike | None = None,
        crf: int = 18,
        overwrite: bool = False,
    ) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, not {fps}")
        if width < 1 or height < 1:
            raise ValueError(f"frame size must be >= 1x1, not {width}x{height}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in [0, 51], not {crf}")
        self.path = check_output_path(path, overwrite)
        self.audio_path = Path(audio_path) if audio_path is not None else None
        if self.audio_path is not None and not self.audio_path.is_file():
            raise InputNotFoundError(f"{self.audio_path}: file not found")
        self.fps = fps
        self.width = width
        self.height = height
        self.crf = crf
        self.overwrite = overwrite
        self.size = (width + width % 2, height + height % 2)  # encoded (width, height)
        self.frames_written = 0
        self._proc: subprocess.Popen | None = None
        self._tmp: Path | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)
        self._reader: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> VideoWriter:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _command(self, tmp: Path) -> list[str]:
        w, h = self.size
        video = ffmpeg.input(
            "pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=self.fps
        )
        streams = [video]
        if self.audio_path is not None:
            # Absolute paths: a relative name with a colon would read as a protocol.
            streams.append(ffmpeg.input(os.path.abspath(self.audio_path))["a:0"])
        out = ffmpeg.output(
            *streams,
            os.path.abspath(tmp),
            format="mp4",
            vcodec="libx264",
            pix_fmt="yuv420p",
            crf=self.crf,
            movflags="+faststart",
            **({"acodec": "aac"} if self.audio_path is not None else {}),
        )
        out = out.global_args("-hide_banner", "-nostdin", "-loglevel", "error").overwrite_output()
        return out.compile(cmd=ffmpeg_exe())

    def open(self) -> None:
        """Start ffmpeg (``__enter__`` does this)."""
        if self._proc is not None or self._closed:
            raise RuntimeError("VideoWriter can be opened once")
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}{TMP_MARK}", suffix=".mp4", dir=self.path.parent
        )
        os.close(fd)
        self._tmp = Path(tmp)
        try:
            # The command is built with ffmpeg-python; it is started here rather than with
            # ``run_async`` to put ffmpeg in its own session: a Ctrl-C in the terminal then
            # reaches only Python, which decides to abort, instead of ffmpeg finishing (or
            # half-finishing) the file on its own.
            self._proc = subprocess.Popen(
                self._command(self._tmp),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except BaseException:
            self._remove_tmp()
            raise
        self._reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self._reader.start()

    def _drain_stderr(self) -> None:
        # Keeps the stderr pipe empty (a full pipe would block ffmpeg) and the last lines.
        assert self._proc is not None and self._proc.stderr is not None
        for raw in iter(self._proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self._stderr.append(line)

    # ------------------------------------------------------------------ writing

    def write(self, frame: np.ndarray) -> None:
        """Append one ``H x W x 3`` uint8 RGB frame (the size given at construction)."""
        if self._proc is None or self._closed:
            raise RuntimeError("VideoWriter is not open (use it as a context manager)")
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"frame must be uint8 of shape {(self.height, self.width, 3)}, "
                f"got {frame.dtype} {tuple(frame.shape)}"
            )
        pad_h, pad_w = self.size[1] - self.height, self.size[0] - self.width
        if pad_h or pad_w:
            frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(memoryview(np.ascontiguousarray(frame)).cast("B"))
        except (BrokenPipeError, OSError) as e:
            # ffmpeg exited: report why, and clean up.
            self._proc.wait()
            err = self._failure()
            self.abort()
            raise err from e
        self.frames_written += 1

    def _failure(self) -> EncodeError | Interrupted:
        if self._reader is not None:
            self._reader.join(timeout=5)
        assert self._proc is not None
        rc = self._proc.returncode
        last = self._stderr[-1] if self._stderr else f"exit status {rc}"
        if rc is not None and rc < 0:
            return Interrupted(f"{self.path}: ffmpeg was stopped by signal {-rc}")
        if any("received signal" in ln for ln in self._stderr):
            return Interrupted(f"{self.path}: ffmpeg was interrupted ({last})")
        return EncodeError(f"{self.path}: ffmpeg failed ({last})")

    def close(self) -> Path:
        """Finish encoding and move the video to its path; returns the path."""
        if self._closed:
            return self.path
        if self._proc is None:
            raise RuntimeError("VideoWriter was never opened")
        if self.frames_written == 0:
            self.abort()
            raise EncodeError(f"{self.path}: no frames were written")
        try:
            assert self._proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, OSError):
                self._proc.stdin.close()
            self._proc.wait()
            if self._reader is not None:
                self._reader.join(timeout=5)
            if self._proc.stderr is not None:
                self._proc.stderr.close()
            if self._proc.returncode != 0:
                raise self._failure()
            assert self._tmp is not None
            if not self.overwrite and (self.path.exists() or self.path.is_symlink()):
                raise OutputExistsError(f"{self.path}: exists (use --overwrite)")
            os.chmod(self._tmp, 0o666 & ~_umask())
            os.replace(self._tmp, self.path)
            self._tmp = None
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Kill ffmpeg and delete the temp file; the output path is left untouched."""
        self._closed = True
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            if proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError, OSError):
                    proc.stdin.close()
            proc.wait()
            if self._reader is not None:
                self._reader.join(timeout=5)
            if proc.stderr is not None:
                proc.stderr.close()
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()
            self._tmp = None
