"""``lcp bench``: the baseline and each acceleration method on the same inputs and seed.

Every method renders the same portrait and speech with the same model instance, seed,
steps and windows, in one process, so the speedups are ratios measured in one run.
Fidelity is measured against the baseline's frames (PSNR/SSIM of the whole frame and
the face crop, mouth-landmark distance); lip sync (see :mod:`.quality`) for every method.

A method may carry its interval: ``deepcache@12`` (a full UNet step every 12) or
``full@3`` (a LightningCP key step every 3; also ``lightningcp@N``, ``lightningcp+dfa@N``),
so peers can be compared at matched speed; the row keeps that label.

``fewer-steps`` (a peer: the baseline with fewer DDIM steps at the same wall time) runs
after every other method: ``fewer-steps@8`` uses 8 steps, ``fewer-steps@<method>`` the
step count whose denoise time matches that method's, plain ``fewer-steps`` matches
``full`` (else ``lightningcp``, else the fastest method measured).  Its row is labelled
``fewer-steps@<steps>``.
"""

from __future__ import annotations

import math
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..accel.peers import FEWER_STEPS, matched_steps, parse_fewer_steps
from ..config import ProgressFn, RenderConfig
from ..errors import ConfigError
from ..models.bundle import load_model
from .metrics import video_fidelity
from .quality import (
    correlation,
    face_meshes,
    mouth_landmark_distance,
    openings_of,
    speech_envelope,
)

BASELINE = "none"
#: Methods ``fewer-steps`` matches when given no target, in order of preference.
FEWER_STEPS_TARGETS = ("full", "lightningcp")


@dataclass(frozen=True)
class BenchRequest:
    face: Path
    audio: Path
    methods: tuple[str, ...] = (BASELINE,)
    config: RenderConfig = field(default_factory=RenderConfig)
    warmup: bool = True  # one short untimed render first (first-call overheads)


@dataclass
class MethodResult:
    method: str
    stage_seconds: dict[str, float]
    denoise_s: float
    total_s: float
    peak_memory_mb: float
    denoise_speedup: float = 1.0
    total_speedup: float = 1.0
    fidelity: dict[str, float] = field(default_factory=dict)  # psnr/ssim, *_face, mouth_dist
    lip_sync: float = float("nan")  # mouth opening vs speech envelope (see bench.quality)
    steps: int | None = None  # DDIM steps of this run when not the bench's (fewer-steps)
    note: str = ""


@dataclass
class BenchReport:
    command: str
    machine: dict[str, Any]
    model: str
    random_weights: bool
    steps: int
    frames: int
    fps: int
    results: list[MethodResult]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_bench(request: BenchRequest, *, on_progress: ProgressFn | None = None) -> BenchReport:
    from ..api import RenderRequest, render  # the bench drives the public API

    methods = list(dict.fromkeys((BASELINE, *request.methods)))  # baseline first, once
    fewer = [m for m in methods if m.split("@")[0] == FEWER_STEPS]  # last: they match others
    regular = [m for m in methods if m not in fewer]
    for m in fewer:
        _check_fewer_steps(m)
    for m in regular:
        method_config(m, request.config)  # a bad name or interval fails before any render
    cfg = replace(request.config, use_cache=False)  # every method pays the same reference pass
    model = load_model(cfg.model, cfg.weights, cfg.device, cfg.dtype, offload=cfg.offload)
    steps = cfg.denoise.steps or model.spec.steps
    with tempfile.TemporaryDirectory(prefix="lcp-bench-") as tmp:
        out_dir = Path(tmp)
        if request.warmup:
            warm = replace(cfg, denoise=replace(cfg.denoise, steps=1))
            render(
                RenderRequest(request.face, request.audio, out_dir / "warmup.mp4", warm),
                model=model,
            )
        results: list[MethodResult] = []
        baseline: tuple[Any, MethodResult] | None = None
        baseline_meshes: list[Any] = []
        envelope = speech_envelope(request.audio, cfg.output.fps or model.spec.fps)

        def measure(i: int, label: str, mcfg: RenderConfig) -> MethodResult:
            nonlocal baseline, baseline_meshes
            if on_progress:
                on_progress("bench", i, len(methods))
            t0 = time.perf_counter()
            res = render(
                RenderRequest(request.face, request.audio, out_dir / f"{i}.mp4", mcfg),
                model=model,
                keep_frames=True,
            )
            total = time.perf_counter() - t0
            mr = MethodResult(
                method=label,
                stage_seconds=res.stage_seconds,
                denoise_s=res.stage_seconds["denoise"],
                total_s=total,
                peak_memory_mb=res.peak_memory_mb,
            )
            meshes = face_meshes(res.crop_frames)
            mr.lip_sync = correlation(openings_of(meshes), envelope[: len(meshes)])
            if baseline is None:
                baseline, baseline_meshes = (res, mr), meshes
            else:
                bres, bmr = baseline
                mr.denoise_speedup = bmr.denoise_s / mr.denoise_s
                mr.total_speedup = bmr.total_s / mr.total_s
                full = video_fidelity(bres.frames, res.frames)
                face = video_fidelity(bres.crop_frames, res.crop_frames)
                mr.fidelity = {**full, **{f"{k}_face": v for k, v in face.items()}}
                mr.fidelity["mouth_dist"] = mouth_landmark_distance(meshes, baseline_meshes)
            results.append(mr)
            return mr

        for i, method in enumerate(regular):
            measure(i, method, method_config(method, cfg))
        for i, spec in enumerate(fewer, start=len(regular)):
            n, note = _fewer_steps(spec, steps, results)
            mcfg = replace(cfg, accel=BASELINE, denoise=replace(cfg.denoise, steps=n))
            mr = measure(i, f"{FEWER_STEPS}@{n}", mcfg)
            mr.steps, mr.note = n, note
        if on_progress:
            on_progress("bench", len(methods), len(methods))
    assert baseline is not None
    return BenchReport(
        command=" ".join(shlex.quote(a) for a in ["lcp", *sys.argv[1:]]),
        machine=machine_info(model.device),
        model=model.spec.name,
        random_weights=model.random_weights,
        steps=steps,
        frames=baseline[0].num_frames,
        fps=baseline[0].fps,
        results=results,
    )


_INTERVAL_METHODS = ("deepcache", "lightningcp", "lightningcp+dfa", "full")


def method_config(method: str, cfg: RenderConfig) -> RenderConfig:
    """``cfg`` rendering with ``method``: a name of ``ACCEL_METHODS``, or ``NAME@N`` for
    the methods with an interval (DeepCache's cache interval, LightningCP's key interval)."""
    name, at, arg = method.partition("@")
    if not at:
        return replace(cfg, accel=name)
    if name not in _INTERVAL_METHODS or not arg.isdigit() or int(arg) < 1:
        raise ConfigError(
            f"{method}: NAME@N takes an interval N >= 1 and one of {', '.join(_INTERVAL_METHODS)}"
        )
    acc = cfg.accel_config
    if name == "deepcache":
        acc = replace(acc, deepcache_interval=int(arg))
    else:
        acc = replace(
            acc, lightningcp=replace(acc.lightningcp, schedule="uniform", interval=int(arg))
        )
    return replace(cfg, accel=name, accel_config=acc)


def _check_fewer_steps(spec: str) -> None:
    try:
        parse_fewer_steps(spec)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _fewer_steps(spec: str, steps: int, results: list[MethodResult]) -> tuple[int, str]:
    """DDIM steps (and a note) of a ``fewer-steps[@N|@method]`` run, given the results so far
    (the baseline first)."""
    _, arg = parse_fewer_steps(spec)
    if isinstance(arg, int):
        return arg, f"{arg} of {steps} steps (fixed)"
    base, others = results[0], {r.method: r for r in results[1:]}
    if isinstance(arg, str):
        if arg not in others:
            raise ConfigError(f"{spec}: method {arg!r} is not part of this bench")
        target = others[arg]
    else:
        preferred = [others[m] for m in FEWER_STEPS_TARGETS if m in others]
        if preferred:
            target = preferred[0]
        elif others:
            target = min(others.values(), key=lambda r: r.denoise_s)
        else:
            raise ConfigError(f"{spec}: no accelerated method to match; add --accel METHOD")
    n = matched_steps(steps, base.denoise_s, target.denoise_s)
    return n, f"{n} of {steps} steps: denoise time matched to {target.method}"


def report_markdown(report: BenchReport) -> str:
    m = report.machine
    lines = [
        f"# lcp bench ({__version__})",
        "",
        f"- command: `{report.command}`",
        f"- machine: {m.get('gpu') or m['processor']}, {m['cpu_threads']} threads, "
        f"{m['platform']}, torch {m['torch']}, device {m['device']}",
        f"- model: {report.model}{' (RANDOM weights)' if report.random_weights else ''}, "
        f"{report.steps} steps, {report.frames} frames at {report.fps} fps",
        "",
    ]
    header, rows = summary_table(report, stages=True)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    notes = [f"- {r.method}: {r.note}" for r in report.results if r.note]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def summary_table(report: BenchReport, stages: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the bench table; ``stages``: seconds of every stage
    instead of the denoise stage alone."""
    names = sorted({s for r in report.results for s in r.stage_seconds}) if stages else ["denoise"]
    header = [
        "method",
        *[f"{s} s" for s in names],
        "total s",
        "denoise x",
        "total x",
        "PSNR dB",
        "SSIM",
        "face PSNR",
        "face SSIM",
        "mouth dist %",
        "lip sync",
        "peak MiB",
    ]
    rows = [
        [
            r.method,
            *[f"{r.stage_seconds.get(s, 0.0):.2f}" for s in names],
            f"{r.total_s:.2f}",
            f"{r.denoise_speedup:.2f}",
            f"{r.total_speedup:.2f}",
            *(_fmt(r.fidelity, k) for k in ("psnr", "ssim", "psnr_face", "ssim_face")),
            _fmt(r.fidelity, "mouth_dist"),
            _fmt({"lip_sync": r.lip_sync}, "lip_sync"),
            f"{r.peak_memory_mb:.0f}",
        ]
        for r in report.results
    ]
    return header, rows


def _fmt(values: dict[str, float], key: str) -> str:
    if key not in values or not math.isfinite(values[key]):  # absent or NaN
        return "—"
    return f"{values[key]:.2f}" if key.startswith(("psnr", "mouth")) else f"{values[key]:.3f}"


def plot_speed_fidelity(report: BenchReport, path: Path) -> Path:
    """PNG: denoise speedup (x) against PSNR vs the baseline (y), one point per method."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for r in report.results:
        psnr = r.fidelity.get("psnr")
        if psnr is None:  # the baseline: no fidelity against itself
            ax.axvline(r.denoise_speedup, color="grey", lw=0.8, ls="--")
            continue
        ax.scatter(r.denoise_speedup, psnr)
        ax.annotate(r.method, (r.denoise_speedup, psnr), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)  # fmt: skip
    weights = " (RANDOM weights)" if report.random_weights else ""
    ax.set_title(f"{report.model}{weights}, {report.steps} steps, {report.frames} frames")
    ax.set_xlabel("denoise speedup over the baseline (x)")
    ax.set_ylabel("PSNR vs baseline frames (dB)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.lcp-tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
