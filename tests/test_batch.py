"""``lcp batch``: job files (JSON lines, CSV), one model load and one ReferenceNet pass
per portrait, per-line failures, verified resume.  Renders are tiny (1 step, 4 fps)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightningcp_cli import api
from lightningcp_cli.batch import (
    BadLine,
    Job,
    ReferenceMemo,
    job_config,
    parse_jobs,
    read_job_file,
    run_batch,
    verify_output,
)
from lightningcp_cli.config import (
    AccelConfig,
    DenoiseConfig,
    LightningCPConfig,
    OutputConfig,
    RenderConfig,
)
from lightningcp_cli.errors import BatchFailedError, ConfigError, InputError, InputNotFoundError
from lightningcp_cli.media import count_frames, probe

from .cli_util import DATA, FACE, SPEECH, run_lcp

SHORT = DATA / "speech_1s_stereo44k.flac"
TINY = ["--steps", "1", "--fps", "4", "--quiet"]


def _by_line(entries):
    return {e.line: e for e in entries}


# --- job files ---------------------------------------------------------------------------


def test_jsonl_paths_overrides_and_bad_lines(tmp_path):
    lines = [
        "# portraits x clips",
        '{"face": "faces/a.png", "audio": "/abs/s.wav", "output": "out/a.mp4", "steps": 4,'
        ' "guidance": 1.5, "--key-steps": "0,2", "estimate": "no", "Size": 256}',
        "",
        '{"face": "a.png", "audio": "s.wav", "output": "out/b.mp4", "seed": null}',
        '{"face": "a.png", "audio": "s.wav"}',
        '{"face": "a.png", "audio": "s.wav", "output": "o1.mp4", "stepz": 3}',
        '{"face": "a.png", "audio": "s.wav", "output": "o2.mp4", "model": "echomimic-v1"}',
        '{"face": "a.png", "audio": "s.wav", "output": "o3.mp4", "steps": "ten"}',
        '{"face": "a.png", "audio": "s.wav", "output": "out/a.mp4"}',
        '{"face": "a.png", "audio": "s.wav",',
        '["a.png", "s.wav", "o4.mp4"]',
        '{"face": "a.png", "audio": 3, "output": "o5.mp4"}',
        '{"face": "a.png", "audio": "s.wav", "output": "o6.mp4", "cfg": 2, "guidance": 3}',
    ]
    entries = parse_jobs("\n".join(lines), tmp_path, fmt="jsonl")
    by_line = _by_line(entries)
    assert sorted(by_line) == [2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    a, b = by_line[2], by_line[4]
    assert isinstance(a, Job) and isinstance(b, Job)
    assert a.face == tmp_path / "faces" / "a.png"
    assert a.audio == Path("/abs/s.wav")
    assert a.output == tmp_path / "out" / "a.mp4"
    assert a.overrides == {
        "steps": 4,
        "cfg": 1.5,
        "key_steps": (0, 2),
        "estimate": False,
        "size": 256,
    }
    assert b.overrides == {}  # null: the batch default
    reasons = {n: e.reason for n, e in by_line.items() if isinstance(e, BadLine)}
    assert reasons[5] == "missing output"
    assert reasons[6].startswith("unknown key 'stepz'")
    assert "lcp batch --model" in reasons[7]
    assert reasons[8] == "steps: expected an integer, not 'ten'"
    assert reasons[9].endswith("also the output of line 2")
    assert reasons[10].startswith("not valid JSON")
    assert "JSON object" in reasons[11]
    assert reasons[12].startswith("audio: expected a file path")
    assert "same key" in reasons[13]


def test_csv_jobs_relative_to_the_job_file(tmp_path):
    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / "batch.csv").write_text(
        "# a comment row\n"
        "face,audio,output,Steps,cfg,key-steps,estimate\n"
        "a.png,s.wav,out/a.mp4,8,,,\n"
        '"my faces/b, left.png",../s.wav,/abs/b.mp4,,2.5,"0,1,3",false\n'
        "\n"
        "a.png,s.wav,out/c.mp4,eight,,,\n"
        "a.png,s.wav,,,,,\n"
        "a.png,s.wav,out/d.mp4,1,1,0,yes,surplus\n"
        "a.png,s.wav,out/e.mp4\n"
    )
    by_line = _by_line(read_job_file(folder / "batch.csv"))
    assert sorted(by_line) == [3, 4, 6, 7, 8, 9]
    a, b, e = by_line[3], by_line[4], by_line[9]
    assert isinstance(a, Job) and isinstance(b, Job) and isinstance(e, Job)
    assert (a.face, a.audio, a.output) == (
        folder / "a.png",
        folder / "s.wav",
        folder / "out" / "a.mp4",
    )
    assert a.overrides == {"steps": 8}  # empty cells: the batch default
    assert b.face == folder / "my faces" / "b, left.png"
    assert b.audio == tmp_path / "s.wav" and b.output == Path("/abs/b.mp4")
    assert b.overrides == {"cfg": 2.5, "key_steps": (0, 1, 3), "estimate": False}
    assert e.overrides == {}  # trailing columns left out
    assert by_line[6].reason == "Steps: expected an integer, not 'eight'"
    assert by_line[7].reason == "missing output"
    assert "8 cells" in by_line[8].reason and "line 2" in by_line[8].reason


def test_unusable_job_files_raise_one_clear_error(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        read_job_file(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="not a file"):
        read_job_file(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match="empty"):
        read_job_file(empty)
    comments = tmp_path / "comments.jsonl"
    comments.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="no jobs"):
        read_job_file(comments)
    header = tmp_path / "h.csv"
    header.write_text("face,speech,output\na.png,s.wav,o.mp4\n")
    with pytest.raises(ConfigError, match=r"line 1 \(header\): missing column 'audio'"):
        read_job_file(header)
    header.write_text("# jobs\nface,audio,output,device\na.png,s.wav,o.mp4,cuda\n")
    with pytest.raises(ConfigError, match=r"line 2 \(header\): column 'device' .* --device"):
        read_job_file(header)
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    with pytest.raises(InputError, match="UTF-8"):
        read_job_file(binary)


def test_overrides_reach_the_render_config():
    base = RenderConfig(
        denoise=DenoiseConfig(steps=5, seed=1),
        output=OutputConfig(fps=12),
        accel_config=AccelConfig(LightningCPConfig(schedule="list", key_steps=(0, 4))),
    )
    cfg = job_config(base, {"steps": 2, "cfg": 1.0, "size": 64, "key_interval": 2})
    assert (cfg.denoise.steps, cfg.denoise.guidance, cfg.denoise.seed) == (2, 1.0, 1)
    assert (cfg.output.fps, cfg.output.size) == (12, 64)
    assert cfg.accel_config.lightningcp.schedule == "uniform"
    assert cfg.accel_config.lightningcp.interval == 2
    cfg = job_config(base, {"accel": "lightningcp", "key_steps": (0, 2), "dfa_dilate": 0.3})
    assert cfg.accel == "lightningcp" and cfg.accel_config.lightningcp.key_steps == (0, 2)
    assert cfg.accel_config.dfa.dilate == 0.3
    assert job_config(base, {}) == base
    with pytest.raises(ConfigError, match="steps must be"):
        job_config(base, {"steps": 0})
    with pytest.raises(ConfigError, match="unknown acceleration"):
        job_config(base, {"accel": "warp"})


# --- rendering ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Seeded random lcp-tiny weights as a weights folder.  The batch tests exercise
    ``--weights`` and do not depend on which bundled weights are shipped (what the video
    shows does not matter here)."""
    from lightningcp_cli.models.loading import load_model_weights
    from lightningcp_cli.models.registry import get_model_spec

    folder = tmp_path_factory.mktemp("weights")
    nets = load_model_weights(get_model_spec("lcp-tiny"), None, seed=5)
    for name, net in (
        ("reference_unet", nets.reference_net),
        ("denoising_unet", nets.denoiser),
        ("face_locator", nets.face_locator),
    ):
        tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
        save_file(tensors, str(folder / f"{name}.safetensors"))
    return folder


def _tiny(weights: Path, **kw) -> RenderConfig:
    return RenderConfig(
        weights=weights, denoise=DenoiseConfig(steps=1), output=OutputConfig(fps=4), **kw
    )


def test_one_model_load_and_one_reference_pass_per_portrait(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("LCP_CACHE_DIR", str(tmp_path / "cache"))
    loads, reference_passes = [], []
    real_load = api.load_model

    def counting_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        model.reference_net.register_forward_hook(lambda *_: reference_passes.append(1))
        loads.append(model)
        return model

    monkeypatch.setattr(api, "load_model", counting_load)  # render's own fallback too
    face_d = DATA / "face_d.png"
    jobs = [
        Job(1, FACE, SHORT, tmp_path / "a.mp4"),
        Job(2, face_d, SHORT, tmp_path / "b.mp4"),
        Job(3, FACE, SHORT, tmp_path / "c.mp4", {"seed": 7}),
        Job(4, face_d, SHORT, tmp_path / "d.mp4", {"steps": 2}),
    ]
    # No disk cache: the reuse is the in-memory memo's alone.
    report = run_batch(jobs, _tiny(weights, use_cache=False))
    assert [r.status for r in report.jobs] == ["ok"] * 4, report.to_dict()
    assert len(loads) == 1
    assert len(reference_passes) == 2  # one ReferenceNet pass per portrait, not per job
    assert [r.reference_cached for r in report.jobs] == [False, False, True, True]
    assert not (tmp_path / "cache").exists()
    assert report.exit_code == 0

    # The same through the disk cache: a second batch (a new process, say) reuses it.
    reference_passes.clear()
    memo = ReferenceMemo(api.FeatureCache(tmp_path / "disk"))
    run_batch(jobs[:1], _tiny(weights), model=loads[0], cache=memo, overwrite=True)
    fresh = ReferenceMemo(api.FeatureCache(tmp_path / "disk"))
    again = run_batch(jobs[:1], _tiny(weights), model=loads[0], cache=fresh, overwrite=True)
    assert len(reference_passes) == 1 and again.jobs[0].reference_cached
    assert (fresh.hits, fresh.misses) == (1, 0)


def test_existing_output_fails_the_job_without_resume(weights, tmp_path):
    model = api.load_model("lcp-tiny", weights)
    out = tmp_path / "taken.mp4"
    out.write_bytes(b"someone else's file")
    report = run_batch([Job(1, FACE, SHORT, out)], _tiny(weights), model=model)
    (r,) = report.jobs
    assert r.status == "failed" and r.exit_code == 15 and "--resume" in r.reason
    assert out.read_bytes() == b"someone else's file"
    assert report.exit_code == BatchFailedError.exit_code == 23
    with pytest.raises(ConfigError, match="exclude"):
        run_batch([Job(1, FACE, SHORT, out)], _tiny(weights), resume=True, overwrite=True)


def _write_jobs(folder: Path, jobs: list[dict | str]) -> Path:
    path = folder / "jobs.jsonl"
    path.write_text("".join((j if isinstance(j, str) else json.dumps(j)) + "\n" for j in jobs))
    return path


JOBS = [
    "# line 1: a comment; line numbers count it",
    {"face": "face.png", "audio": "short.flac", "output": "out/a.mp4"},
    {"face": "no_face.png", "audio": "speech.wav", "output": "out/nf.mp4"},
    {"face": "face.png", "audio": "speech.wav", "output": "out/b.mp4", "seed": 7},
    {"face": "face.png", "audio": "missing.wav", "output": "out/m.mp4"},
    {"face": "face.png", "audio": "speech.wav", "output": "out/c.mp4", "steps": 0},
]


def _assert_valid_video(out: Path, audio: Path) -> None:
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    info = probe(out)
    assert info.video is not None and info.video.codec == "h264"
    assert info.audio is not None and info.audio.codec == "aac"
    expected = math.ceil(probe(audio).duration * 4 - 1e-6)
    assert count_frames(out) == sidecar["num_frames"] == expected
    assert len(sidecar["batch"]["fingerprint"]) == 64


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory, weights):
    """A job folder (inputs copied in, relative paths) and the first batch run over it."""
    folder = tmp_path_factory.mktemp("batch")
    shutil.copy(FACE, folder / "face.png")
    shutil.copy(DATA / "no_face.png", folder / "no_face.png")
    shutil.copy(SHORT, folder / "short.flac")
    shutil.copy(SPEECH, folder / "speech.wav")
    jobs = _write_jobs(folder, JOBS)
    proc = run_lcp("batch", jobs, *TINY, "--weights", weights, "--json", cache_dir=folder / "cache")
    return folder, jobs, proc


def test_batch_renders_good_jobs_and_reports_failed_lines(batch_dir):
    folder, jobs, proc = batch_dir
    assert proc.returncode == BatchFailedError.exit_code, proc.stderr
    report = json.loads(proc.stdout)
    assert report["job_file"] == str(jobs)
    assert report["totals"] == {"jobs": 5, "ok": 2, "skipped": 0, "failed": 3}
    assert report["exit_code"] == 23
    rows = {r["line"]: r for r in report["jobs"]}
    assert {n: r["status"] for n, r in rows.items()} == {
        2: "ok",
        3: "failed",
        4: "ok",
        5: "failed",
        6: "failed",
    }
    assert rows[3]["exit_code"] == 12 and rows[3]["reason"].endswith("no_face.png: no face found")
    assert rows[5]["exit_code"] == 10 and "missing.wav" in rows[5]["reason"]
    assert rows[6]["exit_code"] == 16 and "steps" in rows[6]["reason"]
    for line in (3, 5, 6):  # each failure on stderr, with its line number, as it happens
        assert f"lcp: line {line}: {rows[line]['reason']}" in proc.stderr
    assert "3 of 5 jobs failed (lines 3, 5, 6)" in proc.stderr
    # The second job of the portrait reused its reference features.
    assert rows[2]["reference_cached"] is False and rows[4]["reference_cached"] is True
    assert rows[2]["frames"] == 4 and rows[4]["frames"] == 8
    _assert_valid_video(folder / "out" / "a.mp4", SHORT)
    _assert_valid_video(folder / "out" / "b.mp4", SPEECH)
    assert not (folder / "out" / "nf.mp4").exists()
    assert sorted(p.name for p in (folder / "out").iterdir()) == [
        "a.mp4",
        "a.mp4.json",
        "b.mp4",
        "b.mp4.json",
    ]  # no temp files left


def test_resume_skips_verified_outputs_and_redoes_the_rest(batch_dir, weights):
    folder, jobs, _ = batch_dir
    a, b = folder / "out" / "a.mp4", folder / "out" / "b.mp4"
    b_bytes = b.read_bytes()
    data = a.read_bytes()
    a.write_bytes(data[: len(data) // 2])  # a crash-like truncation, same name

    def resume():
        proc = run_lcp(
            "batch", jobs, *TINY, "--weights", weights, "--resume", "--json",
            cache_dir=folder / "cache",
        )  # fmt: skip
        return proc, {r["line"]: r for r in json.loads(proc.stdout)["jobs"]}

    proc, rows = resume()
    assert proc.returncode == 23, proc.stderr  # lines 3, 5, 6 still fail
    assert rows[2]["status"] == "ok" and rows[2]["reason"].startswith("re-rendered: ")
    assert rows[4]["status"] == "skipped"
    assert rows[4]["reason"] == "complete: 8 frames verified" and rows[4]["frames"] == 8
    assert b.read_bytes() == b_bytes  # untouched
    _assert_valid_video(a, SHORT)

    # A changed job (seed) is rendered again; the unchanged one is skipped.  With the
    # failing lines gone, the exit code is 0.
    changed = [JOBS[0], JOBS[1], "# was: no face", {**JOBS[3], "seed": 8}]
    _write_jobs(folder, changed)
    proc, rows = resume()
    assert proc.returncode == 0, proc.stderr
    assert rows[2]["status"] == "skipped"
    assert rows[4]["status"] == "ok"
    assert rows[4]["reason"] == "re-rendered: inputs or settings changed since it was rendered"
    assert b.read_bytes() != b_bytes
    _assert_valid_video(b, SPEECH)


def test_verify_output_rejects_what_it_cannot_confirm(batch_dir, tmp_path):
    folder, _, _ = batch_dir
    a = folder / "out" / "a.mp4"
    fingerprint = json.loads(a.with_name("a.mp4.json").read_text())["batch"]["fingerprint"]
    assert verify_output(a, fingerprint).complete
    assert verify_output(a, "0" * 64).reason.startswith("inputs or settings changed")
    copy = tmp_path / "a.mp4"
    shutil.copy(a, copy)
    assert verify_output(copy, fingerprint).reason == "no readable settings file a.mp4.json"
    shutil.copy(a.with_name("a.mp4.json"), tmp_path / "a.mp4.json")
    assert verify_output(copy, fingerprint).complete
    copy.write_bytes(b"\0" * 4096)
    verdict = verify_output(copy, fingerprint)
    assert not verdict.complete and verdict.reason.startswith("unreadable video")


def test_batch_help_and_unusable_job_file(tmp_path):
    top = run_lcp("--help", cache_dir=tmp_path)
    assert "batch" in top.stdout and "23 batch: some jobs failed" in " ".join(top.stdout.split())
    text = run_lcp("batch", "--help", cache_dir=tmp_path).stdout
    for option in ("--resume", "--overwrite", "--json", "--steps", "--cfg", "--weights"):
        assert option in text
    missing = run_lcp("batch", tmp_path / "none.jsonl", cache_dir=tmp_path)
    assert missing.returncode == 10
    assert missing.stderr.strip().splitlines() == [
        f"lcp: error: {tmp_path / 'none.jsonl'}: job file does not exist"
    ]
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    proc = run_lcp("batch", empty, cache_dir=tmp_path)
    assert proc.returncode == 16 and "the job file is empty" in proc.stderr


def test_memo_returns_copies():
    memo = ReferenceMemo(None)
    memo.save("refbank", "k", {"x": torch.ones(2), "__latents__": torch.zeros(1)})
    hit = memo.load("refbank", "k")
    hit.pop("__latents__")  # compute_reference pops it; the memo keeps its own
    hit["x"].add_(1)
    again = memo.load("refbank", "k")
    assert set(again) == {"x", "__latents__"} and torch.equal(again["x"], torch.ones(2))
    assert memo.load("refbank", "other") is None and (memo.hits, memo.misses) == (2, 1)


def test_interrupted_batch_keeps_finished_outputs_and_resumes(tmp_path, weights):
    """SIGTERM in the middle of the second job: the first output stays complete, the
    second leaves nothing, exit 130; ``--resume`` then skips the first and renders the rest."""
    import os
    import signal
    import subprocess
    import time

    from .cli_util import LCP

    shutil.copy(FACE, tmp_path / "face.png")
    shutil.copy(SHORT, tmp_path / "short.flac")
    jobs = _write_jobs(
        tmp_path,
        [
            {"face": "face.png", "audio": "short.flac", "output": "out/a.mp4"},
            {"face": "face.png", "audio": "short.flac", "output": "out/b.mp4", "steps": 400},
        ],
    )
    env = {**os.environ, "LCP_CACHE_DIR": str(tmp_path / "c")}
    proc = subprocess.Popen(
        [str(LCP), "batch", str(jobs), *TINY, "--weights", str(weights)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    first = tmp_path / "out" / "a.mp4.json"
    try:
        deadline = time.monotonic() + 120
        while not first.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        time.sleep(1.0)  # well into job 2's 400 steps
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mp4", "a.mp4.json"]
    # finish it quickly: the same job with fewer steps is a changed job, so rewrite line 2
    jobs.write_text(jobs.read_text().replace('"steps": 400', '"steps": 1'))
    again = run_lcp("batch", jobs, *TINY, "--weights", weights, "--resume", "--json",
                    cache_dir=tmp_path / "c")  # fmt: skip
    assert again.returncode == 0, again.stderr
    statuses = {r["line"]: r["status"] for r in json.loads(again.stdout)["jobs"]}
    assert statuses == {1: "skipped", 2: "ok"}


def test_key_steps_parse_alike_on_the_command_line_and_in_job_files():
    from lightningcp_cli.config import parse_key_steps

    assert parse_key_steps("0, 2,5") == (0, 2, 5)
    for bad in ("0,two", "", ","):
        with pytest.raises(ConfigError):
            parse_key_steps(bad)
    entries = parse_jobs(
        '{"face": "f.png", "audio": "a.wav", "output": "o.mp4", "key_steps": [0, 3]}\n'
        '{"face": "f.png", "audio": "a.wav", "output": "p.mp4", "key_steps": "0,x"}\n',
        Path("."),
        fmt="jsonl",
    )
    assert entries[0].overrides["key_steps"] == (0, 3)
    assert isinstance(entries[1], BadLine) and "0,x" in entries[1].reason
