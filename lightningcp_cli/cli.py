"""The ``lcp`` command: a thin typer shell over :mod:`lightningcp_cli.api`.

Each command builds a request, calls the API and reports the result: a rich table or
``--json`` on stdout, progress and diagnostics on stderr.  Library errors become one
line on stderr and a distinct exit code (see ``lcp --help``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import __version__
from .config import (
    ACCEL_METHODS,
    AccelConfig,
    DenoiseConfig,
    DFAConfig,
    FaceConfig,
    LightningCPConfig,
    OutputConfig,
    RenderConfig,
)
from .errors import LcpError

EXIT_CODES = """\
Exit codes: 0 ok, 2 usage, 10 input file missing, 11 not an image, 12 no face,
13 bad audio, 14 output directory missing or unwritable, 15 output exists (use
--overwrite), 16 invalid option, 20 model weights, 21 device, 22 acceleration,
23 batch: some jobs failed, 24 NaN/inf in the latents, 30 video encoding,
130 interrupted (no partial output is left)."""

app = typer.Typer(
    name="lcp",
    help="Audio-driven talking-head videos with a video diffusion model, made faster.\n\n"
    "Typical use: lcp render face.png speech.wav -o out.mp4",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
cache_app = typer.Typer(help="Inspect or clear the static-feature (reference bank) cache.")
app.add_typer(cache_app, name="cache")

err = Console(stderr=True, soft_wrap=True, highlight=False)
out = Console(soft_wrap=True, highlight=False)


# --- plumbing -------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def _reported_errors() -> Iterator[None]:
    """LcpError -> one stderr line + its exit code; Ctrl-C / SIGTERM -> 130."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except LcpError as e:
        err.print(f"lcp: error: {e}", markup=False)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("lcp: interrupted; no partial output was left", markup=False)
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:  # a bug, not bad input: one line, the traceback on request
        if os.environ.get("LCP_DEBUG"):
            raise
        err.print(
            f"lcp: internal error: {type(e).__name__}: {e} (set LCP_DEBUG=1 for a traceback)",
            markup=False,
        )
        raise typer.Exit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err.print(f"lcp: warning: {message}", style="yellow", markup=False)


@contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
    """One rich Progress on stderr; hands the API a plain (stage, done, total) callback."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
        transient=False,
    )
    tasks: dict[str, TaskID] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    with progress:
        yield update


def _json_ready(data: Any) -> Any:
    """NaN/inf (e.g. a lip-sync score of a still mouth) become null: strict JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _json_ready(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_json_ready(v) for v in data]
    return data


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(_json_ready(data), indent=2, default=str, allow_nan=False) + "\n")


def _version(value: bool) -> None:
    if value:
        out.print(f"lcp {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Audio-driven talking-head videos with a video diffusion model, made faster."""
    warnings.showwarning = _show_warning


# --- shared options ------------------------------------------------------------------

Model = Annotated[
    str, typer.Option("--model", "-m", help="Model name (see `lcp info`).", show_default=True)
]
Weights = Annotated[
    Path | None,
    typer.Option(help="Folder of weights (official EchoMimic layout). Default: bundled."),
]
Steps = Annotated[
    int | None, typer.Option(min=1, max=1000, help="Sampler steps. Default: the model's.")
]
Guidance = Annotated[
    float | None,
    typer.Option("--cfg", min=0.0, help="Classifier-free guidance scale (<=1 disables it)."),
]
EpsScaling = Annotated[
    float | None,
    typer.Option(
        "--eps-scaling",
        min=0.0,
        max=1.0,
        help="Exposure-bias correction: each DDIM step's noise direction is divided by "
        "1 + K*t/1000 (default: the model's; lcp-tiny 0.1, EchoMimic 0 = plain DDIM).",
    ),
]
ChromaGuidance = Annotated[
    float | None,
    typer.Option(
        "--chroma-cfg",
        min=0.0,
        help="Guidance scale of the latent's colour channels (YCbCr latents only; default: "
        "the model's, lcp-tiny 3.0; others use --cfg for every channel).",
    ),
]
Fps = Annotated[int | None, typer.Option(min=1, max=120, help="Video frame rate.")]
Seed = Annotated[int, typer.Option(help="Random seed: same seed, same video.")]
Size = Annotated[
    int | None,
    typer.Option(min=16, max=4096, help="Output height in pixels (default: the portrait's)."),
]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto.")]
Dtype = Annotated[
    str | None, typer.Option(help="float32, float16 or bfloat16 (default: fp32 CPU, fp16 GPU).")
]
Offload = Annotated[
    bool,
    typer.Option(
        "--offload",
        help="Keep the networks in CPU memory and move each to the GPU only while it runs "
        "(one at a time): for 8-12 GB cards, at the cost of a few copies per render.",
    ),
]
Accel = Annotated[str, typer.Option(help=f"Acceleration: {', '.join(ACCEL_METHODS)}.")]
_ACCEL_PANEL = "Acceleration settings"
KeyInterval = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=100,
        help="LightningCP: a key step every N steps (default 8; 1 = no caching).",
        rich_help_panel=_ACCEL_PANEL,
    ),
]
KeySteps = Annotated[
    str | None,
    typer.Option(
        help="LightningCP: exactly these key steps, e.g. 0,1,2,4,8 (step 0 always is one).",
        rich_help_panel=_ACCEL_PANEL,
    ),
]
Estimate = Annotated[
    bool,
    typer.Option(
        "--estimate/--no-estimate",
        help="LightningCP: estimate the input latents of batched non-key steps "
        "(off: all take the key step's output).",
        rich_help_panel=_ACCEL_PANEL,
    ),
]
DfaDilate = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=1.0,
        help=(
            "DFA: grow the face mask by this fraction of each layer's grid "
            "(default 0: the mask's cells only)."
        ),
        rich_help_panel=_ACCEL_PANEL,
    ),
]
BatchLimit = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="LightningCP: at most N non-key steps per batched call (default 0 = all); "
        "the video is the same, the memory smaller: use 1-2 at 512 px on small GPUs.",
        rich_help_panel=_ACCEL_PANEL,
    ),
]
LevelRoll = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=180.0,
        help="Cut a face rolled by more than this many degrees levelled, and turn it back "
        "in the video (the model saw upright faces); 180 never levels.",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def _accel_config(
    key_interval: int | None,
    key_steps: str | None,
    estimate: bool,
    dfa_dilate: float | None,
    batch_limit: int | None = None,
) -> AccelConfig:
    """The acceleration knobs of the command line; the rest keep their defaults."""
    from .config import parse_key_steps

    lcp = LightningCPConfig(estimate=estimate, batch_limit=batch_limit or 0)
    if key_interval is not None:
        lcp = replace(lcp, interval=key_interval)
    if key_steps is not None:
        lcp = replace(lcp, schedule="list", key_steps=parse_key_steps(key_steps, "--key-steps"))
    dfa = DFAConfig() if dfa_dilate is None else DFAConfig(dilate=dfa_dilate)
    return AccelConfig(lightningcp=lcp, dfa=dfa)


def _render_config(
    model: str,
    weights: Path | None,
    steps: int | None,
    guidance: float | None,
    fps: int | None,
    seed: int,
    size: int | None,
    device: str,
    dtype: str | None,
    accel: str,
    overwrite: bool = False,
    use_cache: bool = True,
    accel_config: AccelConfig | None = None,
    offload: bool = False,
    epsilon_scaling: float | None = None,
    chroma_guidance: float | None = None,
    face: FaceConfig | None = None,
) -> RenderConfig:
    return RenderConfig(
        model=model,
        face=face or FaceConfig(),
        weights=weights,
        device=device,
        dtype=dtype,
        offload=offload,
        accel=accel,
        accel_config=accel_config or AccelConfig(),
        use_cache=use_cache,
        denoise=DenoiseConfig(
            steps=steps,
            guidance=guidance,
            seed=seed,
            epsilon_scaling=epsilon_scaling,
            chroma_guidance=chroma_guidance,
        ),
        output=OutputConfig(fps=fps, size=size, overwrite=overwrite),
    )


# --- commands -------------------------------------------------------------------------


@app.command()
def render(
    face: Annotated[Path, typer.Argument(help="Portrait image (PNG, JPEG, WebP, ...).")],
    audio: Annotated[Path, typer.Argument(help="Speech (wav, mp3, flac, m4a, ...).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output MP4 path.")],
    model: Model = "lcp-tiny",
    weights: Weights = None,
    steps: Steps = None,
    guidance: Guidance = None,
    eps_scaling: EpsScaling = None,
    chroma_cfg: ChromaGuidance = None,
    fps: Fps = None,
    seed: Seed = 420,
    size: Size = None,
    device: Device = "cpu",
    dtype: Dtype = None,
    offload: Offload = False,
    accel: Accel = "none",
    key_interval: KeyInterval = None,
    key_steps: KeySteps = None,
    estimate: Estimate = True,
    dfa_dilate: DfaDilate = None,
    batch_limit: BatchLimit = None,
    level_roll: LevelRoll = FaceConfig.level_roll,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")
    ] = False,
    cache: Annotated[bool, typer.Option(help="Use the static-feature disk cache.")] = True,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Render FACE speaking AUDIO into an MP4 (H.264 + AAC).

    The settings, and the sampler's with the model's defaults filled in, are saved next
    to the video as OUTPUT.json.  The output is written to a temporary file and renamed
    at the end: an error or Ctrl-C never leaves a partial file.
    """
    from . import api  # heavy (torch, diffusers): imported only when a command runs

    with _reported_errors():
        cfg = _render_config(
            model,
            weights,
            steps,
            guidance,
            fps,
            seed,
            size,
            device,
            dtype,
            accel,
            overwrite,
            cache,
            _accel_config(key_interval, key_steps, estimate, dfa_dilate, batch_limit),
            offload,
            eps_scaling,
            chroma_cfg,
            FaceConfig(level_roll=level_roll),
        )
        with _progress(quiet) as on_progress:
            result = api.render(
                api.RenderRequest(face, audio, output, cfg), on_progress=on_progress
            )
    if as_json:
        _print_json(result.to_dict())
        return
    table = Table(title=f"{result.output}  ({result.num_frames} frames, {result.fps} fps)")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, secs in result.stage_seconds.items():
        table.add_row(stage, f"{secs:.2f}")
    table.add_row("total", f"{result.total_seconds:.2f}", style="bold")
    err.print(table)
    out.print(str(result.output))


@app.command()
def bench(
    face: Annotated[
        Path | None, typer.Argument(help="Portrait (default: the bundled example).")
    ] = None,
    audio: Annotated[Path | None, typer.Argument(help="Speech (default: bundled example).")] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            "--accel", help="Method(s) to compare with the baseline; repeatable. Default: all."
        ),
    ] = None,
    model: Model = "lcp-tiny",
    weights: Weights = None,
    steps: Steps = None,
    guidance: Guidance = None,
    eps_scaling: EpsScaling = None,
    chroma_cfg: ChromaGuidance = None,
    fps: Fps = None,
    seed: Seed = 420,
    device: Device = "cpu",
    dtype: Dtype = None,
    offload: Offload = False,
    key_interval: KeyInterval = None,
    key_steps: KeySteps = None,
    estimate: Estimate = True,
    dfa_dilate: DfaDilate = None,
    batch_limit: BatchLimit = None,
    report: Annotated[
        Path | None, typer.Option("--out", help="Also write the report as Markdown here.")
    ] = None,
    chart: Annotated[
        Path | None, typer.Option(help="Also write a speed-vs-fidelity chart (PNG) here.")
    ] = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Time the baseline and each acceleration method on the same inputs and seed.

    Prints wall time per stage, the speedup over the baseline measured in the same
    run, PSNR/SSIM of each method's frames against the baseline's (whole frame and
    face crop) and peak memory.
    """
    from . import api
    from .bench.runner import (
        BenchRequest,
        plot_speed_fidelity,
        report_markdown,
        run_bench,
        summary_table,
    )

    with _reported_errors():
        ex_face, ex_audio = api.example_inputs()
        cfg = _render_config(
            model, weights, steps, guidance, fps, seed, None, device, dtype, "none",
            accel_config=_accel_config(key_interval, key_steps, estimate, dfa_dilate, batch_limit),
            offload=offload,
            epsilon_scaling=eps_scaling,
            chroma_guidance=chroma_cfg,
        )  # fmt: skip
        req = BenchRequest(face or ex_face, audio or ex_audio, tuple(methods or ACCEL_METHODS), cfg)
        with _progress(quiet) as on_progress:
            rep = run_bench(req, on_progress=on_progress)
        md = report_markdown(rep)
        if report is not None:
            api.write_text_atomic(report, md)
        if chart is not None:
            plot_speed_fidelity(rep, chart)
    if as_json:
        _print_json(rep.to_dict())
        return
    table = Table(title=f"lcp bench: {rep.model}, {rep.steps} steps, {rep.frames} frames")
    header, rows = summary_table(rep)
    for col in header:
        table.add_column(col, justify="left" if col == "method" else "right")
    for cells in rows:
        table.add_row(*cells)
    out.print(table)
    err.print(f"command: {rep.command}\nmachine: {rep.machine}")


@app.command()
def profile(
    face: Annotated[Path, typer.Argument(help="Portrait image.")],
    audio: Annotated[Path, typer.Argument(help="Speech.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Keep the rendered MP4 here.")
    ] = None,
    trace: Annotated[
        Path | None, typer.Option(help="Write a Chrome trace (torch.profiler) here.")
    ] = None,
    model: Model = "lcp-tiny",
    weights: Weights = None,
    steps: Steps = None,
    guidance: Guidance = None,
    eps_scaling: EpsScaling = None,
    chroma_cfg: ChromaGuidance = None,
    fps: Fps = None,
    seed: Seed = 420,
    device: Device = "cpu",
    dtype: Dtype = None,
    offload: Offload = False,
    accel: Accel = "none",
    key_interval: KeyInterval = None,
    key_steps: KeySteps = None,
    estimate: Estimate = True,
    dfa_dilate: DfaDilate = None,
    batch_limit: BatchLimit = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Show where a render's time goes: per stage and per UNet block."""
    from . import api
    from .bench.profile import run_profile

    with _reported_errors():
        cfg = _render_config(
            model, weights, steps, guidance, fps, seed, None, device, dtype, accel,
            overwrite=True,
            accel_config=_accel_config(key_interval, key_steps, estimate, dfa_dilate, batch_limit),
            offload=offload,
            epsilon_scaling=eps_scaling,
            chroma_guidance=chroma_cfg,
        )  # fmt: skip
        with api.output_or_temp(output) as out_path, _progress(quiet) as on_progress:
            rep = run_profile(
                api.RenderRequest(face, audio, out_path, cfg),
                trace=trace,
                on_progress=on_progress,
            )
    if as_json:
        _print_json(rep.__dict__)
        return
    stages = Table(title="time per stage")
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    for k, v in rep.stage_seconds.items():
        stages.add_row(k, f"{v:.3f}")
    stages.add_row("total", f"{rep.total_seconds:.3f}", style="bold")
    out.print(stages)
    blocks = Table(title="time per block (all calls)")
    for col in ("block", "calls", "seconds", "share"):
        blocks.add_column(col, justify="left" if col == "block" else "right")
    total = sum(v for k, v in rep.block_seconds.items() if k.startswith("denoiser.")) or 1.0
    for k, v in sorted(rep.block_seconds.items(), key=lambda kv: -kv[1]):
        share = f"{100 * v / total:.1f}%" if k.startswith("denoiser.") else ""
        blocks.add_row(k, str(rep.block_calls.get(k, 0)), f"{v:.3f}", share)
    out.print(blocks)
    if rep.trace:
        err.print(f"trace: {rep.trace}")


@app.command()
def train(
    corpus: Annotated[
        Path, typer.Option(help="Corpus folder (built there first if it holds none).")
    ] = Path("build/corpus"),
    out_dir: Annotated[
        Path,
        typer.Option("--out", help="Checkpoint folder; an existing checkpoint is resumed."),
    ] = Path("build/train"),
    export: Annotated[
        Path | None, typer.Option(help="Where to write the weights (default: OUT/weights).")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Override the recipe's steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Override the batch size.")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="Data-loader workers.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the whole run.")] = 0,
    device: Device = "auto",
    heldout_speech: Annotated[
        list[Path] | None,
        typer.Option(help="Held-out clips for the corpus (e.g. walden.wav); repeatable."),
    ] = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Train the bundled lcp-tiny model from scratch (the data engine makes the corpus).

    The default recipe runs on a 2-core CPU in about 90 minutes and writes a checkpoint
    every 250 steps (resumed when run again) and a loss curve (OUT/loss.png) beside it.
    """
    from dataclasses import replace

    from . import api
    from .train.trainer import TrainConfig

    with _reported_errors():
        overrides = {"steps": steps, "batch_size": batch_size, "num_workers": workers}
        recipe = replace(
            TrainConfig(seed=seed), **{k: v for k, v in overrides.items() if v is not None}
        )
        log = None if quiet else (lambda msg: err.print(msg, markup=False))
        with _progress(quiet) as on_progress:
            summary = api.train(
                corpus,
                out_dir,
                config=recipe,
                device=device,
                export_to=export,
                heldout_speech=tuple(heldout_speech or ()),
                on_progress=on_progress,
                log=log,
            )
    if as_json:
        _print_json(summary)
    else:
        out.print(f"weights: {', '.join(summary['weights'])}")


@app.command("eval")
def evaluate(
    corpus: Annotated[
        Path | None,
        typer.Option(help="Data-engine corpus: score its held-out clips against ground truth."),
    ] = None,
    faces: Annotated[
        list[Path] | None,
        typer.Option("--face", help="Portrait to score; repeatable (pairs with --audio)."),
    ] = None,
    audios: Annotated[
        list[Path] | None, typer.Option("--audio", help="Speech for the --face of the same rank.")
    ] = None,
    example: Annotated[
        bool, typer.Option(help="Also score the bundled example portrait and speech.")
    ] = False,
    clips: Annotated[
        int,
        typer.Option(
            min=1,
            help="Held-out clips to score (about 20 s each on a 2-core CPU); the mean is "
            "printed with its 95 % interval (lip sync: about +-0.07 at 32 clips).",
        ),
    ] = 32,
    frames: Annotated[int, typer.Option(min=3, help="Frames per held-out clip.")] = 48,
    clip_seed: Annotated[
        int,
        typer.Option(
            help="Which held-out clips are drawn (not the sampler's seed): another value "
            "scores a fresh set, e.g. to check a setting chosen on the default set."
        ),
    ] = 0,
    model: Model = "lcp-tiny",
    weights: Weights = None,
    steps: Steps = None,
    guidance: Guidance = None,
    eps_scaling: EpsScaling = None,
    chroma_cfg: ChromaGuidance = None,
    accel: Annotated[str, typer.Option(help="Acceleration to score (default: none).")] = "none",
    device: Device = "cpu",
    dtype: Dtype = None,
    videos: Annotated[
        Path | None, typer.Option(help="Keep the portrait renders (MP4) in this folder.")
    ] = None,
    audio_use: Annotated[
        bool,
        typer.Option(
            "--audio-use",
            help="Also probe the network on held-out clips (with --corpus): how well its "
            "mouth prediction follows the truth at each noise level, with the clip's own "
            "audio and with another clip's (48 clips: about 30 s).",
        ),
    ] = False,
    probe_clips: Annotated[
        int | None, typer.Option(min=2, help="Held-out clips for --audio-use [default: 48].")
    ] = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Score generation quality (not speed).

    Held-out corpus clips (identities and sentences never trained on): PSNR and SSIM
    against the ground truth and lip sync, the correlation of the mouth opening measured
    by mediapipe's face mesh with the speech envelope (also of the ground truth, the
    ceiling).  Portraits: lip sync, identity drift (PSNR outside the mouth vs the
    portrait) and flicker (mean frame-to-frame change outside the mouth, 0-255).
    """
    from . import api
    from .bench.evaluate import EvalConfig, with_sampler
    from .errors import ConfigError

    with _reported_errors():
        faces, audios = list(faces or []), list(audios or [])
        if len(faces) != len(audios):
            raise ConfigError(f"--face given {len(faces)} times but --audio {len(audios)} times")
        pairs = list(zip(faces, audios, strict=True))
        if example:
            pairs.append(api.example_inputs())
        if corpus is None and not pairs:
            raise ConfigError("nothing to score: give --corpus DIR, --face/--audio or --example")
        probe = None
        if audio_use:
            from .bench.audio_use import AudioUseConfig

            if corpus is None:
                raise ConfigError("--audio-use probes corpus clips: give --corpus DIR")
            probe = AudioUseConfig() if probe_clips is None else AudioUseConfig(clips=probe_clips)
        cfg = with_sampler(
            EvalConfig(clips=clips, frames=frames, seed=clip_seed, accel=accel, audio_use=probe),
            steps,
            guidance,
            eps_scaling,
            chroma_cfg,
        )
        with _progress(quiet) as on_progress:
            rep = api.evaluate(
                corpus=corpus,
                portraits=pairs,
                config=cfg,
                model=model,
                weights=weights,
                device=device,
                dtype=dtype,
                videos=videos,
                on_progress=on_progress,
            )
    if as_json:
        _print_json(rep)
        return
    if rep["heldout"] is not None:
        table = Table(title=f"held-out clips ({rep['model']})")
        keys = ("psnr", "ssim", "lip_sync", "lip_sync_truth", "mouth_motion_sync")
        for col in ("utterance", "identity", *keys):
            table.add_column(col, justify="left" if col in ("utterance", "identity") else "right")
        for r in rep["heldout"]["clips"]:
            table.add_row(r["utterance"], r["identity"], *(f"{r[k]:.3f}" for k in keys))
        held = rep["heldout"]
        for kind, group in held["by_identity"].items():
            label = f"mean of {group['clips']}"
            table.add_row(label, kind, *(f"{group[k]:.3f}" for k in keys), style="dim")
        table.add_row("mean", "all", *(f"{held['mean'][k]:.3f}" for k in keys), style="bold")
        table.add_row("± 95 %", "", *(f"{held['ci95'][k]:.3f}" for k in keys))
        out.print(table)
    if rep["audio_use"] is not None:
        table = Table(title="mouth prediction vs truth, temporal R² (audio use)")
        for col in ("timestep", "own audio", "another clip's audio"):
            table.add_column(col, justify="right")
        for r in rep["audio_use"]["rows"]:
            table.add_row(str(r["timestep"]), f"{r['r2']:.3f}", f"{r['r2_other_audio']:.3f}")
        out.print(table)
    if rep["portraits"]:
        table = Table(title=f"portraits ({rep['model']})")
        for col in ("face", "audio", "frames", "lip sync", "motion sync", "drift dB", "flicker"):
            table.add_column(col, justify="left" if col in ("face", "audio") else "right")
        for r in rep["portraits"]:
            table.add_row(
                Path(r["face"]).name,
                Path(r["audio"]).name,
                str(r["frames"]),
                f"{r['lip_sync']:.3f}",
                f"{r['mouth_motion_sync']:.3f}",
                f"{r['identity_drift_db']:.2f}",
                f"{r['flicker']:.3f}",
            )
        out.print(table)


@app.command()
def convert(
    folder: Annotated[Path, typer.Argument(help="EchoMimic weights folder (official layout).")],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Write the copies here (default: beside the originals)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing .safetensors copies.")
    ] = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Write a .safetensors copy of each pickled weight file (.pth/.pt) of FOLDER.

    Later loads then skip unpickling and can memory-map the tensors (the loader prefers
    .safetensors when both exist).  Each copy is read back and compared with the original
    before it is renamed into place.
    """
    from .models.convert import convert_folder

    def show(src: Path, dst: Path) -> None:
        if not quiet:
            err.print(f"{src} -> {dst}", markup=False)

    with _reported_errors():
        written = convert_folder(folder, out_dir, overwrite=overwrite, on_file=show)
    if as_json:
        _print_json({"written": [str(p) for p in written]})
    else:
        out.print(f"{len(written)} files converted")


@app.command()
def info(as_json: AsJson = False) -> None:
    """Versions, devices, models and the cache."""
    from . import api

    data = api.info()
    if as_json:
        _print_json(data)
        return
    table = Table(title=f"lcp {data['lcp']}", show_header=False)
    for key in ("python", "platform", "torch", "diffusers", "mediapipe", "cpu_threads", "cuda"):
        table.add_row(key, str(data[key]))
    table.add_row("gpus", ", ".join(data["gpus"]) or "none")
    table.add_row(
        "cache",
        f"{data['cache']['dir']} ({data['cache']['entries']} entries, "
        f"{data['cache']['bytes'] / 2**20:.1f} MiB)",
    )
    out.print(table)
    models = Table(title="models")
    for col in ("name", "resolution", "fps", "steps", "cfg", "bundled weights", "description"):
        models.add_column(col)
    for name, m in data["models"].items():
        models.add_row(
            name,
            str(m["resolution"]),
            str(m["fps"]),
            str(m["steps"]),
            str(m["guidance"])
            + (f" (colour {m['chroma_guidance']})" if m["chroma_guidance"] is not None else ""),
            "yes" if m["bundled_weights"] else "no",
            m["description"],
        )
    out.print(models)


@cache_app.command("ls")
def cache_ls(as_json: AsJson = False) -> None:
    """List cached feature banks."""
    from .cache import FeatureCache

    cache = FeatureCache()
    entries = cache.entries()
    if as_json:
        _print_json([{**e.__dict__, "path": str(e.path)} for e in entries])
        return
    table = Table(title=f"{cache.root} ({len(entries)} entries)")
    for col in ("kind", "key", "model", "MiB"):
        table.add_column(col)
    for e in entries:
        table.add_row(e.kind, e.key, e.model, f"{e.size_bytes / 2**20:.2f}")
    out.print(table)


@cache_app.command("clear")
def cache_clear() -> None:
    """Delete every cached feature bank."""
    from .cache import FeatureCache

    n = FeatureCache().clear()
    err.print(f"removed {n} cache entries")


@app.command()
def batch(
    jobs: Annotated[
        Path, typer.Argument(help="Job file: JSON lines (.jsonl) or CSV (.csv), one job a line.")
    ],
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Skip jobs whose output is verified complete; redo the others."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Render every job again, replacing its output.")
    ] = False,
    model: Model = "lcp-tiny",
    weights: Weights = None,
    steps: Steps = None,
    guidance: Guidance = None,
    eps_scaling: EpsScaling = None,
    chroma_cfg: ChromaGuidance = None,
    fps: Fps = None,
    seed: Seed = 420,
    size: Size = None,
    device: Device = "cpu",
    dtype: Dtype = None,
    offload: Offload = False,
    accel: Accel = "none",
    key_interval: KeyInterval = None,
    key_steps: KeySteps = None,
    estimate: Estimate = True,
    dfa_dilate: DfaDilate = None,
    batch_limit: BatchLimit = None,
    cache: Annotated[
        bool, typer.Option(help="Keep reference features in the disk cache too.")
    ] = True,
    ray: Annotated[
        str | None,
        typer.Option(
            metavar="ADDRESS",
            help="Run the jobs on a Ray cluster: `local` starts one here, else its address "
            "(e.g. ray://head:10001 or auto). One model per GPU, or per 2 CPUs.",
        ),
    ] = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Render every job of JOBS, a file of (face, audio, output) lines, with one model load.

    JOBS is JSON lines, e.g. `{"face": "a.png", "audio": "a.wav", "output": "out/a.mp4",
    "steps": 8}`, or CSV with a header row `face,audio,output[,steps,...]`. Relative
    paths are relative to the folder of JOBS; output folders are created. A job may
    override steps, cfg (or guidance), seed, fps, size, accel, key_interval, key_steps,
    estimate and dfa_dilate; the options below are the defaults. Model, weights, device
    and dtype hold for the whole batch: the model is loaded once, and each portrait's
    reference features are computed once (kept in memory, and in the disk cache unless
    --no-cache).

    A job that fails (no face, unreadable audio, a bad line or value, ...) is reported
    on stderr with its line number and the batch goes on. An existing output fails its
    job unless --resume or --overwrite is given. --resume skips a job only when its
    output is complete: OUTPUT.json records this job's inputs and settings and ffmpeg
    decodes the frame count recorded there; any other output is rendered again.

    Prints a summary table (or the report with --json). Exit code 0 when every job is
    ok or skipped, 23 when any job failed. Format and report schema: docs/BATCH.md.
    """
    from rich.markup import escape

    from .batch import read_job_file, run_batch
    from .errors import ConfigError

    with _reported_errors():
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        entries = read_job_file(jobs)
        base = _render_config(
            model, weights, steps, guidance, fps, seed, size, device, dtype, accel,
            use_cache=cache,
            accel_config=_accel_config(key_interval, key_steps, estimate, dfa_dilate, batch_limit),
            offload=offload,
            epsilon_scaling=eps_scaling,
            chroma_guidance=chroma_cfg,
        )  # fmt: skip

        def failed_now(result: Any) -> None:
            if result.status == "failed":
                err.print(f"lcp: line {result.line}: {result.reason}", markup=False)

        with _progress(quiet) as on_progress:
            rep = run_batch(
                entries,
                base,
                job_file=jobs,
                resume=resume,
                overwrite=overwrite,
                on_progress=on_progress,
                on_result=failed_now,
                ray_address=ray,
            )
    if as_json:
        _print_json(rep.to_dict())
    else:
        t = rep.totals
        table = Table(
            title=f"lcp batch {jobs}: {t['ok']} ok, {t['skipped']} skipped, "
            f"{t['failed']} failed ({rep.seconds:.1f} s)"
        )
        for col in ("line", "status", "output", "seconds", "reason"):
            table.add_column(col, justify="right" if col in ("line", "seconds") else "left")
        styles = {"ok": "green", "skipped": "cyan", "failed": "red"}
        for r in rep.jobs:
            table.add_row(
                str(r.line),
                f"[{styles[r.status]}]{r.status}[/]",
                escape(r.output or ""),
                f"{r.seconds:.1f}",
                escape(r.reason or ""),
            )
        out.print(table)
    if rep.failed:
        lines = ", ".join(str(r.line) for r in rep.failed)
        err.print(f"lcp: {len(rep.failed)} of {len(rep.jobs)} jobs failed (lines {lines})")
        raise typer.Exit(rep.exit_code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
