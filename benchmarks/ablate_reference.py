"""Reference-feature removal ablation: which denoiser layers can run without the bank?

For every reference-attention layer (bank key) of the model, render the same input with
that one layer's reference bank dropped (plain self-attention there, everything else the
baseline) and measure fidelity to the baseline: PSNR/SSIM of the face crop and PSNR of the
mouth box (lip-sync proxy), plus the denoise-stage speed ratio.  Then drop layers
cumulatively, least harmful first, while the crop PSNR stays above ``--min-psnr``: the
layers kept dropped are the suggestion for ``AccelConfig.drop_reference`` (what ``--accel
full`` drops).

Needs trained weights to mean anything (``--weights DIR``); on random weights it only
exercises the mechanism.  Example::

    python benchmarks/ablate_reference.py --weights path/to/lcp-tiny --fps 12 --steps 25 \\
        --json ablation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lightningcp_cli.accel.lightningcp import LightningCPSampler
from lightningcp_cli.accel.sweep import (
    Experiment,
    add_experiment_arguments,
    experiment_from_args,
)
from lightningcp_cli.config import LightningCPConfig


def dropping(layers: tuple[str, ...]):
    """A sampler maker: no caching (interval 1 = the baseline) with ``layers`` dropped."""

    def make(exp: Experiment) -> LightningCPSampler:
        cfg = LightningCPConfig(interval=1, static_cache=False)
        return LightningCPSampler(exp.model.denoiser, cfg, drop_reference=layers)

    return make


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_experiment_arguments(p)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per setting")
    p.add_argument("--min-psnr", type=float, default=35.0, help="cumulative drop stops below")
    p.add_argument("--layers", nargs="*", help="bank keys to test (default: all)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    exp = experiment_from_args(args)
    keys = tuple(args.layers or exp.model.denoiser.bank_keys)
    unknown = sorted(set(keys) - set(exp.model.denoiser.bank_keys))
    if unknown:
        p.error(f"not reference layers of {args.model}: {unknown}")
    if exp.model.random_weights:
        print("WARNING: random weights: fidelity numbers are meaningless", file=sys.stderr)

    makers = {"baseline": dropping(())} | {k: dropping((k,)) for k in keys}
    single = exp.compare(makers, args.repeats)
    ranked = sorted(single[1:], key=lambda o: -o.fidelity["psnr"])

    cumulative, chosen = [], ()
    for outcome in ranked:
        trial = (*chosen, outcome.name)
        res = exp.compare({"baseline": dropping(()), "drop": dropping(trial)}, args.repeats)[1]
        cumulative.append({"layers": list(trial), **res.fidelity, "speedup": res.speedup})
        if res.fidelity["psnr"] < args.min_psnr:
            break
        chosen = trial

    print(
        f"{exp.model.spec.name}, {exp.denoise_config.steps} steps, {exp.num_frames} frames, "
        f"random weights: {exp.model.random_weights}"
    )
    print(f"{'dropped layer':55s} {'PSNR':>6s} {'SSIM':>6s} {'mouth':>6s} {'speed x':>7s}")
    for o in ranked:
        f = o.fidelity
        print(
            f"{o.name:55s} {f['psnr']:6.2f} {f['ssim']:6.4f} {f['psnr_mouth']:6.2f} "
            f"{o.speedup:7.2f}"
        )
    print("cumulative (least harmful first):")
    for row in cumulative:
        print(f"  {len(row['layers']):2d} layers  PSNR {row['psnr']:6.2f}  x{row['speedup']:.2f}")
    print(f"suggested AccelConfig.drop_reference (PSNR >= {args.min_psnr}): {list(chosen)}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": exp.model.spec.name,
                    "random_weights": exp.model.random_weights,
                    "steps": exp.denoise_config.steps,
                    "frames": exp.num_frames,
                    "single": [o.to_dict() for o in ranked],
                    "cumulative": cumulative,
                    "suggested": list(chosen),
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
