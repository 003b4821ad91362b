"""Batch rendering: many (face, audio, output) jobs from one job file, one model load.

``read_job_file(path)`` parses a JSON-lines or CSV job file into :class:`Job` entries
(and :class:`BadLine` entries for lines that cannot be a job); ``run_batch(entries,
base_config)`` renders them in line order through :func:`lightningcp_cli.api.render`
with one preloaded model and one reference-feature cache, and returns a
:class:`BatchReport`.  A failing job becomes a ``failed`` result with its line number
and the error's one-line message; the batch goes on.

Resume (``resume=True``) skips a job only when its output is verified complete: the
sidecar ``OUTPUT.json`` carries this job's fingerprint (a digest of the face and audio
bytes, the resolved settings and the model's weights) and ffmpeg decodes exactly the
number of frames that sidecar records, in a video whose duration matches.  Anything
else (missing, truncated, corrupt, rendered with other inputs or settings) is rendered
again.  The job-file format, the report schema and the exit codes: ``docs/BATCH.md``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .cache import FeatureCache
from .config import ProgressFn, RenderConfig, parse_key_steps
from .errors import (
    BatchFailedError,
    ConfigError,
    InputError,
    InputNotFoundError,
    Interrupted,
    LcpError,
    OutputError,
    OutputExistsError,
)
from .media import count_frames, last_line, try_probe

if TYPE_CHECKING:
    from .models.bundle import TalkingHeadModel

__all__ = [
    "JOB_FIELDS",
    "OVERRIDES",
    "BadLine",
    "BatchReport",
    "Job",
    "JobResult",
    "ReferenceMemo",
    "Verdict",
    "job_config",
    "job_fingerprint",
    "parse_jobs",
    "read_job_file",
    "run_batch",
    "verify_output",
]

JOB_FIELDS = ("face", "audio", "output")


# --- job values ------------------------------------------------------------------------


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, not {json.dumps(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"expected an integer, not {value!r}")


def _as_float(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ValueError(f"expected a number, not {value!r}")


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, not {value!r}")


def _as_str(value: Any) -> str:
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError(f"expected a name, not {value!r}")


def _as_key_steps(value: Any) -> tuple[int, ...]:
    """``[0, 1, 3]`` or ``"0,1,3"`` (as ``--key-steps`` takes it)."""
    if isinstance(value, list):
        value = ",".join(str(_as_int(v)) for v in value)
    if not isinstance(value, str):
        raise ValueError(f"expected integers like 0,2,5, not {value!r}")
    try:
        return parse_key_steps(value)
    except ConfigError as e:
        raise ValueError(str(e)) from None


#: Per-job overrides: the names of ``lcp render``'s options (``cfg`` = ``--cfg``), each
#: with the converter that turns a JSON or CSV value into the option's type.
OVERRIDES: dict[str, Callable[[Any], Any]] = {
    "steps": _as_int,
    "cfg": _as_float,
    "seed": _as_int,
    "fps": _as_int,
    "size": _as_int,
    "accel": _as_str,
    "key_interval": _as_int,
    "key_steps": _as_key_steps,
    "estimate": _as_bool,
    "dfa_dilate": _as_float,
}
_ALIASES = {"guidance": "cfg"}
#: Settings that hold for the whole batch (one model load): command-line options only.
_BATCH_WIDE = ("model", "weights", "device", "dtype", "cache", "overwrite", "resume")


def _normalise_key(key: str) -> str:
    """``--key-steps``, ``Key Steps`` and ``key_steps`` are the same key."""
    key = key.strip().lower().lstrip("-").replace("-", "_").replace(" ", "_")
    return _ALIASES.get(key, key)


# --- job files -------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One line of a job file.  Paths are absolute (relative ones were taken relative to
    the job file's folder); ``overrides`` maps :data:`OVERRIDES` names to typed values."""

    line: int
    face: Path
    audio: Path
    output: Path
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadLine:
    """A line of the job file that is not a valid job, and why (one line)."""

    line: int
    reason: str
    output: Path | None = None


Entry = Job | BadLine


def _path(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value.strip()))
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _entry(line: int, row: Mapping[str, Any], base: Path) -> Entry:
    """A job from one line's ``key -> value`` mapping (JSON object or CSV row)."""
    fields: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for raw_key, value in row.items():
        key = _normalise_key(str(raw_key))
        if key in seen:
            return BadLine(line, f"{raw_key!r} and {seen[key]!r} are the same key")
        seen[key] = str(raw_key)
        if key in JOB_FIELDS:
            fields[key] = value
        elif key in OVERRIDES:
            if value is None or (isinstance(value, str) and not value.strip()):
                continue  # empty CSV cell / JSON null: the batch default
            try:
                overrides[key] = OVERRIDES[key](value)
            except ValueError as e:
                return BadLine(line, f"{raw_key}: {e}")
        elif key in _BATCH_WIDE:
            flag = key.replace("_", "-")
            return BadLine(line, f"{raw_key!r} is set for the whole batch (lcp batch --{flag})")
        else:
            known = ", ".join((*JOB_FIELDS, *OVERRIDES))
            return BadLine(line, f"unknown key {raw_key!r} (known: {known})")
    missing = [k for k in JOB_FIELDS if fields.get(k) is None or fields.get(k) == ""]
    if missing:
        return BadLine(line, f"missing {', '.join(missing)}")
    for k in JOB_FIELDS:
        if not isinstance(fields[k], str) or not fields[k].strip():
            return BadLine(line, f"{k}: expected a file path, not {fields[k]!r}")
    return Job(
        line,
        _path(base, fields["face"]),
        _path(base, fields["audio"]),
        _path(base, fields["output"]),
        overrides,
    )


def _jsonl_entries(text: str, base: Path) -> list[Entry]:
    entries: list[Entry] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            entries.append(BadLine(line, f"not valid JSON: {e.msg} at column {e.colno}"))
            continue
        if not isinstance(obj, dict):
            entries.append(BadLine(line, 'expected a JSON object like {"face": ..., ...}'))
            continue
        entries.append(_entry(line, obj, base))
    return entries


def _csv_entries(text: str, base: Path, source: str) -> list[Entry]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    header_line = 0
    entries: list[Entry] = []
    end = 0  # the line the previous record ended on
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise InputError(f"{source}: line {reader.line_num}: not valid CSV ({e})") from None
        line, end = end + 1, reader.line_num
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if header is None:
            header, header_line = cells, line
            keys = [_normalise_key(c) for c in cells]
            problems = [f"missing column {k!r}" for k in JOB_FIELDS if k not in keys]
            for c, k in zip(cells, keys, strict=True):
                if k in _BATCH_WIDE:
                    flag = k.replace("_", "-")
                    problems.append(f"column {c!r} is set for the whole batch (lcp batch --{flag})")
                elif k not in JOB_FIELDS and k not in OVERRIDES:
                    problems.append(f"unknown column {c!r}")
            if problems:
                raise ConfigError(
                    f"{source}: line {line} (header): {'; '.join(problems)} "
                    f"(columns: {', '.join((*JOB_FIELDS, *OVERRIDES))})"
                )
            continue
        if len(cells) > len(header):
            entries.append(
                BadLine(line, f"{len(cells)} cells, but the header (line {header_line}) "
                        f"has {len(header)} columns")
            )  # fmt: skip
            continue
        entries.append(_entry(line, dict(zip(header, cells, strict=False)), base))
    if header is None:
        raise ConfigError(f"{source}: no header row (face,audio,output[,overrides...])")
    return entries


def parse_jobs(text: str, base: Path, *, fmt: str, source: str = "job file") -> list[Entry]:
    """Entries of a job file's text, in line order.  ``fmt``: ``"jsonl"`` or ``"csv"``;
    relative paths are taken relative to ``base``.  A second job writing the same output
    becomes a :class:`BadLine`.  Raises :class:`ConfigError` when no line is a job."""
    base = Path(base).absolute()
    if fmt == "jsonl":
        entries = _jsonl_entries(text, base)
    elif fmt == "csv":
        entries = _csv_entries(text, base, source)
    else:
        raise ConfigError(f"unknown job file format {fmt!r} (jsonl or csv)")
    first_line: dict[Path, int] = {}
    checked: list[Entry] = []
    for e in entries:
        if isinstance(e, Job):
            if e.output in first_line:
                e = BadLine(
                    e.line, f"{e.output}: also the output of line {first_line[e.output]}", e.output
                )
            else:
                first_line[e.output] = e.line
        checked.append(e)
    if not checked:
        raise ConfigError(f"{source}: no jobs (one JSON object or CSV row per line)")
    return checked


def _sniff_format(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    first = next(
        (s for s in (ln.strip() for ln in text.splitlines()) if s and not s.startswith("#")), ""
    )
    return "jsonl" if first.startswith("{") else "csv"


def read_job_file(path: str | os.PathLike) -> list[Entry]:
    """Parse a job file (``.jsonl`` or ``.csv``; otherwise sniffed from the first line).

    Raises InputNotFoundError (missing), InputError (a folder, unreadable, not UTF-8
    text) and ConfigError (empty, no jobs, a CSV header without face/audio/output).
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: job file does not exist")
    if not path.is_file():
        raise InputError(f"{path}: job file is not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read the job file ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(
            f"{path}: not a text job file (expected UTF-8 JSON lines or CSV)"
        ) from None
    if not text.strip():
        raise ConfigError(f"{path}: the job file is empty")
    return parse_jobs(text, path.parent, fmt=_sniff_format(path, text), source=str(path))


# --- settings of one job ---------------------------------------------------------------


def job_config(base: RenderConfig, overrides: Mapping[str, Any]) -> RenderConfig:
    """``base`` (the batch's options) with one job's overrides; ConfigError when a value is
    out of range.  ``key_interval`` selects the uniform key schedule, ``key_steps`` the
    list schedule (like ``--key-steps``, it wins when both are given)."""
    o = overrides
    d = base.denoise
    denoise = replace(
        d,
        steps=o.get("steps", d.steps),
        guidance=o.get("cfg", d.guidance),
        seed=o.get("seed", d.seed),
    )
    output = replace(
        base.output, fps=o.get("fps", base.output.fps), size=o.get("size", base.output.size)
    )
    lcp = base.accel_config.lightningcp
    if "key_interval" in o:
        lcp = replace(lcp, schedule="uniform", interval=o["key_interval"], key_steps=())
    if "key_steps" in o:
        lcp = replace(lcp, schedule="list", key_steps=o["key_steps"])
    if "estimate" in o:
        lcp = replace(lcp, estimate=o["estimate"])
    dfa = base.accel_config.dfa
    if "dfa_dilate" in o:
        dfa = replace(dfa, dilate=o["dfa_dilate"])
    return replace(
        base,
        accel=o.get("accel", base.accel),
        accel_config=replace(base.accel_config, lightningcp=lcp, dfa=dfa),
        denoise=denoise,
        output=output,
    )


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def job_fingerprint(job: Job, cfg: RenderConfig, model: TalkingHeadModel) -> str:
    """What the video depends on: the face and audio bytes, the settings (not the output
    path, ``overwrite`` or the cache switch) and the model (architecture, weights, device,
    dtype).  Same fingerprint, same video."""
    settings = cfg.to_dict()
    for key in ("weights", "use_cache", "device", "dtype"):
        settings.pop(key)
    settings["output"].pop("overwrite")
    h = hashlib.sha256()
    for part in (
        _file_digest(job.face),
        _file_digest(job.audio),
        json.dumps(settings, sort_keys=True, default=str),
        repr(model.spec),
        model.weights_id,
        str(model.device),
        str(model.dtype),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def sidecar_path(output: Path) -> Path:
    """The settings file ``lcp render`` writes next to a video: ``OUTPUT.json``."""
    return output.with_name(output.name + ".json")


class Verdict(NamedTuple):
    complete: bool
    reason: str  # what was verified, or why the output is not complete
    frames: int | None = None  # the verified frame count


def verify_output(output: Path, fingerprint: str) -> Verdict:
    """``Verdict(True, "complete: N frames verified", N)`` when ``output`` is a finished
    render of the job with this fingerprint, else ``Verdict(False, why not)``.

    Checks: the sidecar parses and carries the fingerprint; ffmpeg reads the file, which
    has a video and an audio stream; decoding the video gives exactly the sidecar's
    ``num_frames``; the container's duration is ``num_frames / fps`` (within a frame).
    """
    output = Path(output)
    if not output.is_file():
        return Verdict(False, "no output file")
    side = sidecar_path(output)
    try:
        meta = json.loads(side.read_text())
        frames, fps = int(meta["num_frames"]), int(meta["fps"])
    except (OSError, ValueError, KeyError, TypeError):
        return Verdict(False, f"no readable settings file {side.name}")
    if (meta.get("batch") or {}).get("fingerprint") != fingerprint:
        return Verdict(False, "inputs or settings changed since it was rendered")
    info, err = try_probe(output)
    if info is None:
        return Verdict(False, f"unreadable video ({last_line(err)})")
    if info.video is None:
        return Verdict(False, "no video stream")
    if info.audio is None:
        return Verdict(False, "no audio stream")
    try:
        decoded = count_frames(output)
    except InputError as e:
        return Verdict(False, str(e))
    if decoded != frames:
        return Verdict(False, f"{decoded} of {frames} frames decode")
    expected_s = frames / fps
    if info.duration is None or abs(info.duration - expected_s) > 1.0 / fps + 0.1:
        return Verdict(False, f"duration {info.duration} s, expected {expected_s:.2f} s")
    return Verdict(True, f"complete: {frames} frames verified", frames)


def _stamp_sidecar(path: Path, fingerprint: str, job_file: str | None, line: int) -> None:
    """Add this job's fingerprint to the sidecar render wrote (atomically)."""
    from .api import write_text_atomic

    meta = json.loads(Path(path).read_text())
    meta["batch"] = {"fingerprint": fingerprint, "job_file": job_file, "line": line}
    write_text_atomic(path, json.dumps(meta, indent=2, default=str) + "\n")


# --- reference features ------------------------------------------------------------------


class ReferenceMemo(FeatureCache):
    """An in-memory front of the static-feature cache: the last ``size`` reference banks
    this batch computed or loaded, so a portrait's ReferenceNet pass runs once per batch
    even without the disk cache (``disk=None``).  ``hits`` / ``misses`` count lookups."""

    def __init__(self, disk: FeatureCache | None = None, size: int = 8) -> None:
        super().__init__(disk.root if disk is not None else None)
        self.disk = disk
        self.size = size
        self.hits = 0
        self.misses = 0
        self._memo: OrderedDict[tuple[str, str], dict[str, torch.Tensor]] = OrderedDict()

    def _remember(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self._memo[(kind, key)] = {k: v.detach().clone() for k, v in tensors.items()}
        self._memo.move_to_end((kind, key))
        while len(self._memo) > self.size:
            self._memo.popitem(last=False)

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        if (kind, key) in self._memo:
            self._memo.move_to_end((kind, key))
            self.hits += 1
            return {k: v.clone() for k, v in self._memo[(kind, key)].items()}
        tensors = self.disk.load(kind, key) if self.disk is not None else None
        if tensors is None:
            self.misses += 1
            return None
        self.hits += 1
        self._remember(kind, key, tensors)
        return tensors

    def save(
        self, kind: str, key: str, tensors: dict[str, torch.Tensor], *, model: str = ""
    ) -> Path:
        self._remember(kind, key, tensors)
        if self.disk is not None:
            return self.disk.save(kind, key, tensors, model=model)
        return self.root / f"{kind}-{key}.in-memory"

    def entries(self) -> list:
        return self.disk.entries() if self.disk is not None else []

    def clear(self) -> int:
        self._memo.clear()
        return self.disk.clear() if self.disk is not None else 0


# --- the run -----------------------------------------------------------------------------


@dataclass
class JobResult:
    """What happened to one line: ``status`` is ``ok``, ``skipped`` or ``failed``."""

    line: int
    status: str
    output: str | None
    # failed: the error; skipped: what was verified; ok: None, or "re-rendered: why" when
    # resume found the existing output incomplete or stale
    reason: str | None = None
    seconds: float = 0.0
    exit_code: int | None = None  # failed: the error's own exit code (as lcp render)
    frames: int | None = None
    reference_cached: bool | None = None  # ok: the ReferenceNet pass was reused

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "seconds": round(self.seconds, 3)}


@dataclass
class BatchReport:
    job_file: str | None
    jobs: list[JobResult]
    seconds: float
    model: str | None = None

    @property
    def totals(self) -> dict[str, int]:
        counts = {s: sum(r.status == s for r in self.jobs) for s in ("ok", "skipped", "failed")}
        return {"jobs": len(self.jobs), **counts}

    @property
    def failed(self) -> list[JobResult]:
        return [r for r in self.jobs if r.status == "failed"]

    @property
    def exit_code(self) -> int:
        """0 when every job is ok or skipped, else :class:`BatchFailedError`'s code."""
        return BatchFailedError.exit_code if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_file": self.job_file,
            "model": self.model,
            "seconds": round(self.seconds, 3),
            "totals": self.totals,
            "exit_code": self.exit_code,
            "jobs": [r.to_dict() for r in self.jobs],
        }


def _run_job(
    job: Job,
    base: RenderConfig,
    model: TalkingHeadModel,
    cache: FeatureCache,
    *,
    resume: bool,
    overwrite: bool,
    job_file: str | None,
    progress: ProgressFn,
) -> JobResult:
    from . import api

    t0 = time.perf_counter()
    out = job.output
    note = None
    try:
        cfg = job_config(base, job.overrides)
        api.require_file(job.face, "face image")
        api.require_file(job.audio, "audio")
        fingerprint = job_fingerprint(job, cfg, model)
        replace_existing = overwrite
        if out.exists() or out.is_symlink():
            if resume:
                verdict = verify_output(out, fingerprint)
                if verdict.complete:
                    seconds = time.perf_counter() - t0
                    return JobResult(
                        job.line, "skipped", str(out), verdict.reason, seconds, None, verdict.frames
                    )
                note, replace_existing = f"re-rendered: {verdict.reason}", True
            elif not overwrite:
                raise OutputExistsError(
                    f"{out}: exists (use --resume to keep complete outputs, or --overwrite)"
                )
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{out}: cannot create {out.parent} ({e.strerror})") from None
        cfg = replace(cfg, output=replace(cfg.output, overwrite=replace_existing))
        result = api.render(
            api.RenderRequest(job.face, job.audio, out, cfg),
            model=model,
            cache=cache,
            on_progress=progress,
        )
        _stamp_sidecar(result.config_path, fingerprint, job_file, job.line)
        return JobResult(
            job.line,
            "ok",
            str(out),
            note,
            time.perf_counter() - t0,
            frames=result.num_frames,
            reference_cached=result.reference_cache_hit,
        )
    except Interrupted:
        raise  # Ctrl-C / SIGTERM stops the batch, not just this job
    except LcpError as e:
        reason, code = str(e), e.exit_code
    except Exception as e:  # a bug or a runtime failure: report it, keep the batch going
        if os.environ.get("LCP_DEBUG"):
            raise
        reason, code = f"internal error: {type(e).__name__}: {e}", 1
    return JobResult(job.line, "failed", str(out), reason, time.perf_counter() - t0, code)


def _ray_results(
    jobs: list[Job],
    base: RenderConfig,
    address: str,
    *,
    resume: bool,
    overwrite: bool,
    job_file: str | None,
    on_done: Callable[[JobResult], None],
) -> list[JobResult]:
    """Run ``jobs`` on a Ray cluster: one actor per GPU (else per ``CPUS_PER_ACTOR`` CPUs),
    each loading the model once; results come back as jobs finish."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise ConfigError("--ray needs the ray package: pip install 'ray>=2.50'") from None

    started = not ray.is_initialized()
    if started:
        kwargs = {"include_dashboard": False, "log_to_driver": False}
        try:
            ray.init(address=None if address == "local" else address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"--ray {address}: cannot connect ({e})") from None
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        per_gpu = gpus > 0 and base.device != "cpu"
        count = gpus if per_gpu else max(1, int(resources.get("CPU", 1)) // CPUS_PER_ACTOR)
        options = {"num_gpus": 1} if per_gpu else {"num_cpus": CPUS_PER_ACTOR}
        worker = ray.remote(**options)(RenderWorker)
        actors = [worker.remote(base) for _ in range(min(count, len(jobs)))]
        pool = ActorPool(actors)
        for job in jobs:
            pool.submit(lambda a, j: a.run.remote(j, resume, overwrite, job_file), job)
        results = []
        while pool.has_next():
            result = pool.get_next_unordered()
            on_done(result)
            results.append(result)
        return results
    finally:
        if started:
            ray.shutdown()


#: CPUs one Ray actor uses on a CPU-only cluster (its torch threads).
CPUS_PER_ACTOR = 2


class RenderWorker:
    """What one Ray actor holds: the model (loaded once) and a reference memo."""

    def __init__(self, base: RenderConfig) -> None:
        from . import api

        torch.set_num_threads(CPUS_PER_ACTOR)
        self.base = replace(base, use_cache=True)
        self.model = api.load_model(
            base.model, base.weights, base.device, base.dtype, offload=base.offload
        )
        self.cache = ReferenceMemo(FeatureCache() if base.use_cache else None)

    def run(self, job: Job, resume: bool, overwrite: bool, job_file: str | None) -> JobResult:
        return _run_job(
            job,
            self.base,
            self.model,
            self.cache,
            resume=resume,
            overwrite=overwrite,
            job_file=job_file,
            progress=lambda stage, done, total: None,
        )


def run_batch(
    entries: Iterable[Entry],
    base: RenderConfig,
    *,
    job_file: str | os.PathLike | None = None,
    model: TalkingHeadModel | None = None,
    cache: FeatureCache | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_progress: ProgressFn | None = None,
    on_result: Callable[[JobResult], None] | None = None,
    ray_address: str | None = None,
) -> BatchReport:
    """Render ``entries`` in line order; ``base`` holds the batch's settings (model,
    weights, device, dtype, cache switch and the defaults of the overrides).

    ``model``: a preloaded model, else it is loaded once, when the first job needs it
    (errors loading it end the batch: they concern every job).  ``cache``: the reference
    feature cache; default: an in-memory :class:`ReferenceMemo` in front of the disk
    cache (in front of nothing when ``base.use_cache`` is False).  ``resume``: skip jobs
    whose output :func:`verify_output` finds complete, re-render the others over their
    output.  ``overwrite``: re-render every job.  Without either, a job whose output
    exists fails.  ``on_progress("jobs", done, total)`` plus each render's stages;
    ``on_result`` is called with each job's result as soon as it is known.
    ``ray_address``: run the jobs on a Ray cluster (``"local"`` starts one on this
    machine) with one model per actor; results are the same as a local run.
    """
    from . import api

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    progress = on_progress or (lambda stage, done, total: None)
    report_to = on_result or (lambda result: None)
    entries = sorted(entries, key=lambda e: e.line)
    if cache is None:
        cache = ReferenceMemo(FeatureCache() if base.use_cache else None)
    render_base = replace(base, use_cache=True)  # reuse goes through ``cache``
    source = str(Path(job_file).absolute()) if job_file is not None else None
    t0 = time.perf_counter()
    results: list[JobResult] = []
    progress("jobs", 0, len(entries))

    def done(result: JobResult) -> None:
        results.append(result)
        report_to(result)
        progress("jobs", len(results), len(entries))

    jobs = [e for e in entries if isinstance(e, Job)]
    for entry in entries:
        if isinstance(entry, BadLine):
            out = str(entry.output) if entry.output is not None else None
            done(JobResult(entry.line, "failed", out, entry.reason, 0.0, ConfigError.exit_code))
    if ray_address is not None and jobs:
        _ray_results(
            jobs,
            base,
            ray_address,
            resume=resume,
            overwrite=overwrite,
            job_file=source,
            on_done=done,
        )
    for job in jobs if ray_address is None else ():
        if model is None:
            model = api.load_model(
                base.model, base.weights, base.device, base.dtype, offload=base.offload
            )
        done(
            _run_job(
                job,
                render_base,
                model,
                cache,
                resume=resume,
                overwrite=overwrite,
                job_file=source,
                progress=progress,
            )
        )
    results.sort(key=lambda r: r.line)
    return BatchReport(
        job_file=source,
        jobs=results,
        seconds=time.perf_counter() - t0,
        model=model.spec.name if model is not None else base.model,
    )
