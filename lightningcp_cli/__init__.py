"""lcp: audio-driven talking-head video diffusion, accelerated.

The importable API lives in :mod:`lightningcp_cli.api`; the ``lcp`` command is a thin
shell over it (:mod:`lightningcp_cli.cli`).
"""

__version__ = "0.1.0"
