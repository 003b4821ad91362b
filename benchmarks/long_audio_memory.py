"""Peak memory of `lcp render` against the length of the speech (long-audio streaming).

Builds speech of each length by repeating the example clip, renders it in a fresh
process (so the peak RSS belongs to that render alone) and prints a table: seconds of
audio, frames, wall time, peak RSS of the render and of the whole process.  Chunked
denoising (the default, ``DenoiseConfig.chunk_frames``) should keep the peak nearly
flat; ``--unchunked`` renders with one chunk (the whole video's latents at once) for
contrast.

    python benchmarks/long_audio_memory.py --seconds 10 60 600 --steps 2 --fps 12 \\
        --json benchmarks/results/cpu_lcp_tiny_long_audio_memory.json

Memory does not depend on the number of steps, so few steps keep the 10-minute run short.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CHILD = r"""
import json, resource, sys
from pathlib import Path
from lightningcp_cli import api
from lightningcp_cli.config import DenoiseConfig, OutputConfig, RenderConfig
face, audio, out, steps, fps, chunk = sys.argv[1:7]
denoise = DenoiseConfig(steps=int(steps))
if chunk != "default":
    denoise = DenoiseConfig(steps=int(steps), chunk_frames=int(chunk))
cfg = RenderConfig(denoise=denoise, output=OutputConfig(fps=int(fps), overwrite=True),
                   use_cache=False)
r = api.render(api.RenderRequest(Path(face), Path(audio), Path(out), cfg))
print(json.dumps({"frames": r.num_frames, "render_peak_mib": r.peak_memory_mb,
                  "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "stage_seconds": r.stage_seconds}))
"""


def _speech(seconds: float, folder: Path) -> Path:
    import librosa
    import soundfile

    clip, sr = librosa.load(Path(__file__).parents[1] / "examples" / "speech.wav", sr=16000)
    n = int(seconds * sr)
    data = np.tile(clip, n // len(clip) + 1)[:n]
    path = folder / f"speech_{seconds:g}s.wav"
    soundfile.write(path, data, sr)
    return path


def run_info() -> dict[str, str]:
    """The command line and machine of this benchmark run, for its JSON report."""
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {platform.platform()}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, nargs="+", default=[10, 60, 600])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--fps", type=int, default=12)
    ap.add_argument("--unchunked", action="store_true", help="one chunk: the old behaviour")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    face = Path(__file__).parents[1] / "examples" / "face.png"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in args.seconds:
            speech = _speech(seconds, Path(tmp))
            chunk = str(10**6) if args.unchunked else "default"
            cmd = [sys.executable, "-c", _CHILD, str(face), str(speech)]
            cmd += [str(Path(tmp) / "out.mp4"), str(args.steps), str(args.fps), chunk]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"seconds": seconds, "wall_s": round(time.perf_counter() - t0, 1), **row}
            rows.append(row)
            print(
                f"{seconds:7g} s audio  {row['frames']:6d} frames  {row['wall_s']:7.1f} s wall  "
                f"render peak {row['render_peak_mib']:7.0f} MiB  "
                f"process peak {row['process_peak_mib']:7.0f} MiB",
                flush=True,
            )
    report = {
        **run_info(),
        "steps": args.steps,
        "fps": args.fps,
        "chunked": not args.unchunked,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
