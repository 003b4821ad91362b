"""The ``lcp`` command end to end, in a subprocess, on real inputs."""

from __future__ import annotations

import json
import math

import pytest

from lightningcp_cli.media import count_frames, probe
from lightningcp_cli.models.registry import get_model_spec

from .cli_util import DATA, FACE, FAST, SPEECH, run_lcp


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("render")
    out = tmp / "out.mp4"
    proc = run_lcp("render", FACE, SPEECH, "-o", out, *FAST, "--json", cache_dir=tmp / "cache")
    return proc, out, tmp


def test_render_writes_a_playable_mp4(rendered):
    proc, out, _ = rendered
    assert proc.returncode == 0, proc.stderr
    info = probe(out)
    kinds = {s.kind: s for s in info.streams}
    assert kinds["video"].codec == "h264" and kinds["video"].pix_fmt == "yuv420p"
    assert kinds["audio"].codec == "aac"
    audio_s = probe(SPEECH).duration
    assert count_frames(out) == math.ceil(audio_s * 6 - 1e-6)
    assert abs(info.duration - audio_s) < 0.25  # the whole speech, video covers it
    assert not list(out.parent.glob("*.lcp-tmp*"))


def test_render_json_and_sidecar(rendered):
    proc, out, _ = rendered
    result = json.loads(proc.stdout)
    assert result["output"] == str(out)
    assert result["num_frames"] == count_frames(out)
    assert {"face", "audio", "reference", "denoise", "decode", "mux"} <= set(
        result["stage_seconds"]
    )
    sidecar = json.loads(out.with_name("out.mp4.json").read_text())
    assert sidecar["config"]["denoise"]["steps"] == 2
    assert sidecar["fps"] == 6
    spec = get_model_spec("lcp-tiny")  # the sampler as run: the model's defaults filled in
    sampler = sidecar["sampler"]
    assert sampler["steps"] == 2 and sidecar["config"]["denoise"]["guidance"] is None
    assert (sampler["guidance"], sampler["chroma_guidance"]) == (
        spec.guidance,
        spec.chroma_guidance,
    )
    assert sidecar["face_roll"]["levelled"] is False  # face_a is upright
    assert abs(sidecar["face_roll"]["degrees"]) < sidecar["config"]["face"]["level_roll"]


def test_a_rolled_face_is_levelled_unless_told_not_to(tmp_path):
    """face_d is rolled ~8 degrees: cut levelled by default; --level-roll 180 keeps it."""
    rolls = {}
    for name, extra in (("default", []), ("as_is", ["--level-roll", "180"])):
        out = tmp_path / f"{name}.mp4"
        proc = run_lcp("render", DATA / "face_d.png", SPEECH, "-o", out, *FAST, *extra,
                       cache_dir=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        rolls[name] = json.loads(out.with_name(f"{name}.mp4.json").read_text())["face_roll"]
    assert rolls["default"]["levelled"] is True and rolls["as_is"]["levelled"] is False
    assert 6 < rolls["default"]["degrees"] == rolls["as_is"]["degrees"] < 11


def test_second_render_hits_the_reference_cache(rendered):
    _, _, tmp = rendered
    out = tmp / "again.mp4"
    proc = run_lcp("render", FACE, SPEECH, "-o", out, *FAST, "--json", cache_dir=tmp / "cache")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["reference_cache_hit"] is True
    ls = run_lcp("cache", "ls", "--json", cache_dir=tmp / "cache")
    assert len(json.loads(ls.stdout)) == 1
    clear = run_lcp("cache", "clear", cache_dir=tmp / "cache")
    assert clear.returncode == 0 and "removed 1" in clear.stderr
    assert json.loads(run_lcp("cache", "ls", "--json", cache_dir=tmp / "cache").stdout) == []


def test_help_reads_like_a_manual(tmp_path):
    top = run_lcp("--help", cache_dir=tmp_path)
    assert top.returncode == 0
    for command in ("render", "bench", "profile", "info", "cache"):
        assert command in top.stdout
    assert "Exit codes" in top.stdout
    render_help = run_lcp("render", "--help", cache_dir=tmp_path).stdout
    for option in (
        "--output",
        "--model",
        "--weights",
        "--steps",
        "--cfg",
        "--fps",
        "--seed",
        "--size",
        "--device",
        "--dtype",
        "--accel",
        "--overwrite",
        "--json",
    ):
        assert option in render_help


def test_info_json(tmp_path):
    proc = run_lcp("info", "--json", cache_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {"lcp-tiny", "echomimic-v1", "echomimic-v1-acc"} <= set(data["models"])
    assert data["cache"]["dir"] == str(tmp_path)


def test_bench_json_report_and_chart(tmp_path):
    report, chart = tmp_path / "report.md", tmp_path / "chart.png"
    proc = run_lcp(
        "bench",
        FACE,
        SPEECH,
        "--steps",
        "1",
        "--fps",
        "4",
        "--quiet",
        "--json",
        "--accel",
        "lightningcp",
        "--out",
        report,
        "--chart",
        chart,
        cache_dir=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [r["method"] for r in data["results"]] == ["none", "lightningcp"]
    assert data["results"][0]["denoise_s"] > 0
    assert {"psnr", "ssim", "psnr_face", "ssim_face", "mouth_dist"} <= set(
        data["results"][1]["fidelity"]
    )
    assert all("lip_sync" in r for r in data["results"])
    assert "mouth dist %" in report.read_text()
    assert data["steps"] == 1 and data["command"].startswith("lcp bench")
    assert "| none |" in report.read_text()
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_with_trace(tmp_path):
    trace = tmp_path / "trace.json"
    proc = run_lcp(
        "profile",
        FACE,
        SPEECH,
        "--steps",
        "1",
        "--quiet",
        "--json",
        "--trace",
        trace,
        cache_dir=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["block_seconds"]["denoiser.mid_block"] > 0
    assert any(k.startswith("denoiser.up_blocks.") for k in data["block_seconds"])
    assert "traceEvents" in json.loads(trace.read_text())


def test_sampler_and_acceleration_knobs_reach_the_render(tmp_path):
    out = tmp_path / "fast.mp4"
    args = ["render", FACE, SPEECH, "-o", out, *FAST, "--accel", "lightningcp+dfa"]
    knobs = ["--key-steps", "0,1,3", "--no-estimate", "--dfa-dilate", "0.25"]
    sampler_knobs = ["--eps-scaling", "0.05", "--chroma-cfg", "2.5"]
    proc = run_lcp(*args, *knobs, *sampler_knobs, cache_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = json.loads(out.with_name("fast.mp4.json").read_text())["config"]
    assert config["denoise"]["epsilon_scaling"] == 0.05
    assert config["denoise"]["chroma_guidance"] == 2.5
    accel = config["accel_config"]
    assert accel["lightningcp"]["schedule"] == "list"
    assert accel["lightningcp"]["key_steps"] == [0, 1, 3]
    assert accel["lightningcp"]["estimate"] is False
    assert accel["dfa"]["dilate"] == 0.25
    bad = run_lcp(*args, "--overwrite", "--key-steps", "0,two", cache_dir=tmp_path)
    assert bad.returncode == 16 and "--key-steps" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    # EchoMimic's VAE latents have no colour channels: refused before any work
    vae = run_lcp(
        *args, "--overwrite", "-m", "echomimic-v1", "--chroma-cfg", "2", cache_dir=tmp_path
    )
    assert vae.returncode == 16 and "chroma guidance" in vae.stderr
    assert len(vae.stderr.strip().splitlines()) == 1
