"""Memory of the audio stage for long speech with EchoMimic's whisper-tiny encoder.

A render keeps whisper's features (``[T, 5, 384]``, one row per 20 ms) and makes each
chunk's per-frame windows (``[F, 50, 384]``) when the chunk is denoised
(:class:`lightningcp_cli.stages.audio.FrameWindows`).  For each length this runs, in a
fresh process, ``prepare_audio`` with a whisper-tiny encoder (random weights: the
shapes and compute are the real ones), then makes all windows at once as the old code
did, and prints the peak RSS after each and the tensor sizes.

    python benchmarks/audio_tokens_memory.py --seconds 60 600 \\
        --json benchmarks/results/cpu_whisper_tiny_audio_tokens_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from long_audio_memory import _speech, run_info  # this folder is on sys.path as a script

_CHILD = r"""
import json, resource, sys
import torch
from lightningcp_cli.models.whisper import WhisperAudioEncoder, WhisperDims, WhisperEncoder
from lightningcp_cli.stages.audio import prepare_audio
torch.manual_seed(0)
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
encoder = WhisperAudioEncoder(WhisperEncoder(WhisperDims()))
start = peak()
feats = prepare_audio(sys.argv[1], encoder, fps=float(sys.argv[2]))
lazy = peak()
chunk = feats.windows[:240]  # one chunk's windows, as a render makes them
tokens = feats.tokens  # every frame's windows at once
mib = lambda t: t.numel() * t.element_size() / 2**20
print(json.dumps({"frames": feats.num_frames, "features_mib": mib(feats.windows.features),
                  "chunk_windows_mib": mib(chunk), "all_windows_mib": mib(tokens),
                  "peak_before_mib": start, "peak_after_prepare_mib": lazy,
                  "peak_after_all_windows_mib": peak()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, nargs="+", default=[60, 600])
    ap.add_argument("--fps", type=float, default=24)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in args.seconds:
            speech = _speech(seconds, Path(tmp))
            cmd = [sys.executable, "-c", _CHILD, str(speech), str(args.fps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = {"seconds": seconds, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(
                f"{seconds:6g} s  {row['frames']:6d} frames  features {row['features_mib']:6.0f}"
                f" MiB  one chunk's windows {row['chunk_windows_mib']:5.0f} MiB  all windows "
                f"{row['all_windows_mib']:6.0f} MiB  peak RSS: after prepare "
                f"{row['peak_after_prepare_mib']:6.0f}, after all windows "
                f"{row['peak_after_all_windows_mib']:6.0f} MiB",
                flush=True,
            )
    report = {
        **run_info(),
        "fps": args.fps,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
