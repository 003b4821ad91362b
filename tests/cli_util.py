"""Running the real ``lcp`` console script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data"
FACE = DATA / "face_a.png"
SPEECH = DATA / "speech_2s.wav"
LCP = Path(sys.executable).with_name("lcp")
# Small and fast: few frames, few steps (the bundled tiny model).
FAST = ["--steps", "2", "--fps", "6", "--quiet"]


def run_lcp(*args: str | os.PathLike, cache_dir: Path, timeout: float = 300):
    env = {**os.environ, "LCP_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [str(LCP), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )
