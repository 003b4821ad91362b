"""Denoise-stage speed of a model at its real size, baseline vs acceleration methods.

Model compute does not depend on weight values, so this builds the named model with
random weights (no checkpoint needed) and times the denoise stage alone — the sampler
loop with its scheduler, CFG and sliding context windows — on random audio tokens and a
real reference bank computed from random reference latents.  Fidelity is meaningless
here (random weights); only time is measured.  Every method runs in the same process on
the same inputs and seed, so the ratios are measured in one run.

    python benchmarks/denoise_speed.py --model echomimic-v1 --frames 24 --steps 30 \\
        --device cuda --dtype float16 --accel none --accel lightningcp --accel full

On a machine without mediapipe the face masks come from a fixed face box (the portrait's
centre), which is what DFA needs: a foreground region of realistic size.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lightningcp_cli.api import face_feature as locator_feature
from lightningcp_cli.config import DenoiseConfig, FaceConfig
from lightningcp_cli.models.bundle import TalkingHeadModel, resolve_device
from lightningcp_cli.models.loading import load_model_weights
from lightningcp_cli.models.registry import get_model_spec
from lightningcp_cli.stages.denoise import denoise
from lightningcp_cli.stages.face import build_analysis
from lightningcp_cli.stages.motion import MouthTrack


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="echomimic-v1")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--accel", action="append", default=None)
    ap.add_argument("--repeat", type=int, default=1, help="extra runs per method (best kept)")
    ap.add_argument("--key-interval", type=int, default=None, help="LightningCP key interval")
    ap.add_argument("--batch-limit", type=int, default=0, help="non-key steps per batched call")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    from lightningcp_cli.accel import build_sampler
    from lightningcp_cli.config import AccelConfig, LightningCPConfig

    spec = get_model_spec(args.model)
    device, dtype = resolve_device(args.device, args.dtype)
    torch.manual_seed(0)
    nets = load_model_weights(spec, None, device, dtype)
    model = TalkingHeadModel(
        spec=spec,
        reference_net=nets.reference_net,
        denoiser=nets.denoiser,
        face_locator=nets.face_locator,
        codec=None,  # type: ignore[arg-type]  # not used by the denoise stage
        audio_encoder=None,  # type: ignore[arg-type]
        device=device,
        dtype=dtype,
        random_weights=True,
        weights_id="random:0",
    )
    res, lat = spec.resolution, spec.resolution // spec.codec_factor
    image = np.full((res, res, 3), 128, np.uint8)
    q = res // 4  # a face box covering the middle half of the crop, as a real crop has
    face = build_analysis(image, (q, q, res - q, res - q), FaceConfig(), res)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        ref_latents = torch.randn(1, spec.latent_channels, lat, lat, generator=gen)
        bank = model.reference_net(ref_latents.to(device, dtype))
        opening = np.linspace(0, 1, args.frames, dtype=np.float32)  # a mouth track's cost
        track = MouthTrack(face.mouth_mask, face.mouth_geometry(), opening)
        face_feature = locator_feature(model, face.face_mask, track, face.crop)
        n_tokens = 10 * (5 if spec.audio_encoder == "whisper-tiny" else 1)
        audio = torch.randn(args.frames, n_tokens, spec.unet.cross_attention_dim, generator=gen)
        audio = audio.to(device, dtype)
    cfg = DenoiseConfig(steps=args.steps or spec.steps, guidance=spec.guidance)
    lcp = LightningCPConfig(batch_limit=args.batch_limit)
    if args.key_interval is not None:
        lcp = LightningCPConfig(interval=args.key_interval, batch_limit=args.batch_limit)
    accel_config = AccelConfig(lightningcp=lcp)
    methods = list(dict.fromkeys(["none", *(args.accel or [])]))

    def run(method: str, config: DenoiseConfig) -> float:
        with torch.inference_mode(), build_sampler(method, model, face, accel_config) as sampler:
            _sync(device)
            t0 = time.perf_counter()
            denoise(
                model.denoiser, audio, face_feature, bank, config,
                latent_shape=(spec.latent_channels, lat, lat), dtype=dtype, device=device,
                sampler=sampler,
            )  # fmt: skip
            _sync(device)
        return time.perf_counter() - t0

    if args.repeat == 0:  # a single timed run per method: warm kernels and caches first
        warm = run("none", DenoiseConfig(steps=1, guidance=spec.guidance))
        print(f"# warm-up: one baseline step in {warm:.1f} s", flush=True)
    rows = []
    for method in methods:
        # with --repeat N >= 1 the first of the N + 1 runs warms up kernels and caches
        best = min(run(method, cfg) for _ in range(args.repeat + 1))
        print(f"# {method}: {best:.1f} s", flush=True)
        rows.append({"method": method, "denoise_s": best, "frames_per_s": args.frames / best})
    base = rows[0]["denoise_s"]
    for r in rows:
        r["speedup"] = base / r["denoise_s"]
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "model": spec.name,
        "resolution": res,
        "frames": args.frames,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "dtype": str(dtype),
        "key_interval": lcp.interval,
        "batch_limit": lcp.batch_limit,
        "results": rows,
    }
    print(f"# {report['command']}\n# {report['machine']}")
    print(f"# {spec.name} {res}px, {args.frames} frames, {cfg.steps} steps, CFG {cfg.guidance}")
    print("| method | denoise s | frames/s | speedup |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['denoise_s']:.2f} | {r['frames_per_s']:.3f} | "
              f"{r['speedup']:.2f}x |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
