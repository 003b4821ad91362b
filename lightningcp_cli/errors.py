"""Errors of the library, each with its own process exit code.

Library code raises these and never exits; only ``cli.py`` catches them, prints the
one-line message on stderr and exits with ``exit_code``.  Messages name the file and
the problem, e.g. ``face.png: no face found``.
"""

from __future__ import annotations


class LcpError(Exception):
    """Base of every error lcp reports to a user."""

    exit_code: int = 1


class InputError(LcpError):
    """A user-supplied input is wrong."""

    exit_code = 3


class InputNotFoundError(InputError):
    exit_code = 10


class ImageError(InputError):
    """Not an image, or an image that cannot be decoded."""

    exit_code = 11


class NoFaceError(InputError):
    exit_code = 12


class AudioError(InputError):
    """Unreadable, empty (zero-length) or undecodable audio. Silent audio is valid."""

    exit_code = 13


class OutputError(InputError):
    """Output directory missing or not writable."""

    exit_code = 14


class OutputExistsError(OutputError):
    exit_code = 15


class ConfigError(InputError):
    """An invalid option value or config file."""

    exit_code = 16


class ModelLoadError(LcpError):
    """Weights missing, unreadable, or not matching the model (keys or shapes)."""

    exit_code = 20


class DeviceError(LcpError):
    exit_code = 21


class AccelerationError(LcpError):
    exit_code = 22


class BatchFailedError(LcpError):
    """``lcp batch``: at least one job failed (each is reported with its line number)."""

    exit_code = 23


class NonFiniteError(LcpError):
    """The latents stopped being finite (NaN/inf) during denoising; names the step."""

    exit_code = 24


class EncodeError(LcpError):
    """ffmpeg failed while writing the video."""

    exit_code = 30


class Interrupted(LcpError):
    """SIGINT / SIGTERM during work; outputs were not written."""

    exit_code = 130
