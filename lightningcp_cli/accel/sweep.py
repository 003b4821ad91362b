"""Measure accelerations on one input: denoise-stage speed ratios and fidelity to the baseline.

:class:`Experiment` prepares one render's static inputs once (face, audio tokens, reference
bank, face feature) and runs only the denoise stage with any sampler, so many settings can
be compared in one process, interleaved and repeated (ratios, not absolute times, on a
shared machine).  Fidelity compares decoded crop frames with the baseline's: PSNR/SSIM of
the whole crop, PSNR of the mouth box and the lip-landmark distance `lcp bench` reports.

``python -m lightningcp_cli.accel.sweep`` sweeps key-step schedules (see ``--help``);
``benchmarks/ablate_reference.py`` uses the same class for the reference-removal ablation.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import (
    AccelConfig,
    AudioConfig,
    DenoiseConfig,
    DFAConfig,
    FaceConfig,
    LightningCPConfig,
    RenderConfig,
)
from ..stages.denoise import Sampler

SamplerMaker = Callable[["Experiment"], Sampler]


@dataclass
class Outcome:
    name: str
    seconds: list[float] = field(default_factory=list)
    speedup: float = 1.0
    fidelity: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": min(self.seconds) if self.seconds else None,
            "speedup": self.speedup,
            **self.fidelity,
            **{k: v for k, v in self.stats.items() if k in ("key_steps", "change_per_step")},
        }


class Experiment:
    """One portrait + speech prepared for repeated denoise runs on one model."""

    def __init__(
        self,
        model: str = "lcp-tiny",
        weights: Path | None = None,
        face: Path | None = None,
        audio: Path | None = None,
        *,
        fps: int = 12,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 420,
        device: str = "cpu",
    ) -> None:
        from ..api import example_inputs, face_feature, mouth_track, resolve_denoise
        from ..models.bundle import load_model
        from ..stages.audio import prepare_audio
        from ..stages.face import analyze_face, load_image
        from ..stages.reference import compute_reference

        ex_face, ex_audio = example_inputs()
        self.model = load_model(model, weights, device, None)
        spec = self.model.spec
        self.face = analyze_face(
            load_image(face or ex_face), FaceConfig(), spec.resolution, source=str(face)
        )
        with torch.inference_mode():
            self.audio = prepare_audio(
                audio or ex_audio, self.model.audio_encoder, fps, AudioConfig()
            )
            self.reference = compute_reference(self.model, self.face, None)
            track = mouth_track(self.face, self.audio) if spec.mouth_track else None
            self.face_feature = face_feature(self.model, self.face.face_mask, track, self.face.crop)
        asked = DenoiseConfig(
            steps=steps,
            guidance=guidance,
            context_frames=spec.context_frames,
            context_overlap=spec.context_overlap,
            seed=seed,
        )  # the model's defaults for the rest, as a render resolves them
        self.denoise_config = resolve_denoise(RenderConfig(model=spec.name, denoise=asked), spec)
        self._mouth = _box(self.face.mouth_mask)

    @property
    def num_frames(self) -> int:
        return int(self.audio.tokens.shape[0])

    def run(self, sampler: Sampler | None = None, bank=None) -> tuple[torch.Tensor, float]:
        """Denoise once; returns latents and wall seconds of the denoise stage."""
        from ..stages.denoise import denoise

        m = self.model
        sampler = sampler or Sampler(m.denoiser)
        with torch.inference_mode(), sampler:
            t0 = time.perf_counter()
            latents = denoise(
                m.denoiser,
                self.audio.tokens.to(m.device, m.dtype),
                self.face_feature,
                self.reference.bank if bank is None else bank,
                self.denoise_config,
                tuple(self.reference.latents.shape[1:]),
                dtype=m.dtype,
                device=m.device,
                sampler=sampler,
            )
            if m.device.type == "cuda":
                torch.cuda.synchronize(m.device)
            return latents, time.perf_counter() - t0

    def frames(self, latents: torch.Tensor) -> list[np.ndarray]:
        from ..stages.decode import model_frames

        return list(model_frames(self.model, latents, self.reference.latents))

    def fidelity(
        self, ref: list[np.ndarray], test: list[np.ndarray], ref_meshes: list
    ) -> dict[str, float]:
        """PSNR/SSIM of the crops, PSNR of the mouth box and the lip-landmark distance (%
        of the face height, as ``lcp bench``) to ``ref``, whose face meshes are
        ``ref_meshes`` (measured once per comparison)."""
        from ..bench.metrics import psnr, video_fidelity
        from ..bench.quality import face_meshes, mouth_landmark_distance

        out = video_fidelity(ref, test)
        out["mouth_dist"] = mouth_landmark_distance(face_meshes(test), ref_meshes)
        y0, y1, x0, x1 = self._mouth
        out["psnr_mouth"] = float(
            np.mean(
                [psnr(a[y0:y1, x0:x1], b[y0:y1, x0:x1]) for a, b in zip(ref, test, strict=True)]
            )
        )
        return out

    def compare(self, makers: dict[str, SamplerMaker | None], repeats: int = 2) -> list[Outcome]:
        """Run every sampler ``repeats`` times interleaved (after one untimed warm-up run of
        the first); the first entry is the reference for speed and fidelity."""
        outcomes = {name: Outcome(name) for name in makers}
        latents: dict[str, torch.Tensor] = {}
        first = next(iter(makers.values()))
        self.run(first(self) if first is not None else None)  # first-call overheads
        for _ in range(repeats):
            for name, make in makers.items():
                sampler = make(self) if make is not None else None
                lat, secs = self.run(sampler)
                outcomes[name].seconds.append(secs)
                latents[name] = lat
                if hasattr(sampler, "stats"):
                    outcomes[name].stats = sampler.stats()
        from ..bench.quality import face_meshes

        names = list(makers)
        ref_frames = self.frames(latents[names[0]])
        ref_meshes = face_meshes(ref_frames)
        base = min(outcomes[names[0]].seconds)
        for name in names:
            out = outcomes[name]
            out.speedup = base / min(out.seconds)
            if name != names[0]:
                out.fidelity = self.fidelity(ref_frames, self.frames(latents[name]), ref_meshes)
        return [outcomes[n] for n in names]


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0, mask.shape[0], 0, mask.shape[1]
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def lightningcp_maker(
    config: LightningCPConfig, method: str = "lightningcp", dfa: DFAConfig | None = None
) -> SamplerMaker:
    from . import build_sampler

    accel = AccelConfig(lightningcp=config, dfa=dfa or DFAConfig())

    def make(exp: Experiment) -> Sampler:
        return build_sampler(method, exp.model, exp.face, accel)

    return make


def parse_schedule(text: str) -> LightningCPConfig:
    """``uniform:3``, ``uniform:4,warmup=2``, ``list:0,1,3,6``, ``adaptive:0.3``,
    optionally followed by ``;estimate=0`` / ``;parallel=0``."""
    head, _, opts = text.partition(";")
    kind, _, arg = head.partition(":")
    cfg = LightningCPConfig()
    if kind == "uniform":
        interval, *rest = arg.split(",")
        cfg = replace(cfg, interval=int(interval))
        for item in rest:
            k, v = item.split("=")
            cfg = replace(cfg, **{k: int(v)})
    elif kind == "list":
        cfg = replace(cfg, schedule="list", key_steps=tuple(int(s) for s in arg.split(",")))
    elif kind == "adaptive":
        cfg = replace(cfg, schedule="adaptive", threshold=float(arg or cfg.threshold))
    else:
        raise ValueError(f"unknown schedule {text!r}")
    for item in filter(None, opts.split(",")):
        k, v = item.split("=")
        cfg = replace(cfg, **{k: bool(int(v))})
    return cfg


DEFAULT_SCHEDULES = (
    "uniform:2",
    "uniform:3",
    "uniform:3;estimate=0",
    "uniform:4",
    "uniform:5",
    "uniform:4,warmup=3",
    "list:0,1,2,4,6,9,12,15,18,21,24",
    "adaptive:0.3",
)


def add_experiment_arguments(p: argparse.ArgumentParser) -> None:
    """The options every denoise-only experiment script takes (model, inputs, device)."""
    p.add_argument("--model", default="lcp-tiny")
    p.add_argument("--weights", type=Path)
    p.add_argument("--face", type=Path)
    p.add_argument("--audio", type=Path)
    p.add_argument("--fps", type=int, default=12)
    p.add_argument("--steps", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)


def experiment_from_args(args: argparse.Namespace) -> Experiment:
    torch.set_num_threads(args.threads)
    return Experiment(
        args.model,
        args.weights,
        args.face,
        args.audio,
        fps=args.fps,
        steps=args.steps,
        device=args.device,
    )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_experiment_arguments(p)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--method", default="lightningcp")
    p.add_argument("--dfa-dilate", type=float, help="DFA mask dilation (default: DFAConfig's)")
    p.add_argument("--json", type=Path)
    p.add_argument("schedules", nargs="*", default=list(DEFAULT_SCHEDULES))
    args = p.parse_args(argv)
    exp = experiment_from_args(args)
    dfa = None if args.dfa_dilate is None else DFAConfig(dilate=args.dfa_dilate)
    makers: dict[str, SamplerMaker | None] = {"none": None}
    for s in args.schedules:
        makers[s] = lightningcp_maker(parse_schedule(s), args.method, dfa)
    results = exp.compare(makers, args.repeats)
    rows = [r.to_dict() for r in results]
    header = (
        f"{'schedule':40s} {'keys':>4s} {'denoise x':>9s} {'PSNR':>6s} {'mouth':>6s} {'SSIM':>6s}"
        f" {'lips %':>6s}"
    )
    print(
        f"{exp.model.spec.name}, {exp.denoise_config.steps} steps, {exp.num_frames} frames, "
        f"random weights: {exp.model.random_weights}"
    )
    print(header)
    for r in rows:
        keys = len(r.get("key_steps") or []) or exp.denoise_config.steps
        print(
            f"{r['name']:40s} {keys:4d} {r['speedup']:9.2f} {r.get('psnr', float('nan')):6.2f} "
            f"{r.get('psnr_mouth', float('nan')):6.2f} {r.get('ssim', float('nan')):6.4f}"
            f" {r.get('mouth_dist', float('nan')):6.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
