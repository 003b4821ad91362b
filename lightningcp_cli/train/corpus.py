"""Build the training corpus folder: ``python -m lightningcp_cli.train.corpus OUT_DIR``.

Example (from the repository root, with espeak-ng installed)::

    python -m lightningcp_cli.train.corpus build/corpus --seed 0 \\
        --heldout-speech ../shared/data/speech/walden.wav ../shared/data/speech/jane.wav

Prints the manifest (``corpus.json``) on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .dataset import build_corpus


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lightningcp_cli.train.corpus",
        description="Build the lcp-tiny training corpus (speech + faces) into OUT_DIR.",
    )
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--utterances", type=int, default=480, help="train espeak-ng utterances")
    ap.add_argument("--heldout-utterances", type=int, default=48)
    ap.add_argument("--clip-variants", type=int, default=7, help="augmented copies per clip")
    ap.add_argument(
        "--heldout-speech", type=Path, nargs="*", default=[], help="held-out clips (walden, jane)"
    )
    ap.add_argument("--no-espeak", action="store_true", help="real clips only")
    ap.add_argument("--waveforms", choices=("all", "heldout", "none"), default="heldout")
    ap.add_argument("--no-morphs", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    def progress(stage: str, done: int, total: int) -> None:
        if not args.quiet and (done == total or done % 25 == 0):
            print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)

    for p in args.heldout_speech:
        if not p.is_file():
            print(f"{p}: file not found", file=sys.stderr)
            return 10
    t0 = time.perf_counter()
    out = build_corpus(
        args.out_dir,
        seed=args.seed,
        n_utterances=args.utterances,
        n_heldout=args.heldout_utterances,
        clip_variants=args.clip_variants,
        heldout_clips=args.heldout_speech,
        use_espeak=False if args.no_espeak else None,
        waveforms=args.waveforms,
        morphs=not args.no_morphs,
        progress=progress,
    )
    manifest = json.loads((out / "corpus.json").read_text())
    print(json.dumps(manifest, indent=1))
    size = sum(manifest["bytes"].values()) / 1e6
    print(f"{out}: {size:.1f} MB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
