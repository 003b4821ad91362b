"""``lcp eval`` and its metrics: lip sync measured by mediapipe on real animated faces,
identity drift and flicker outside the mouth, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lightningcp_cli.bench.audio_use import AudioUseConfig, audio_use
from lightningcp_cli.bench.evaluate import EvalConfig, _ci95, heldout_samples, identity_kind
from lightningcp_cli.bench.quality import (
    correlation,
    flicker,
    identity_drift,
    lip_sync_score,
    mouth_openings,
)
from lightningcp_cli.models.bundle import load_model

from .cli_util import FACE, SPEECH, run_lcp


def test_correlation_needs_signal() -> None:
    t = np.linspace(0, 6, 40)
    assert correlation(np.sin(t), np.sin(t) * 3 + 1) == pytest.approx(1.0)
    assert correlation(np.sin(t), -np.sin(t)) == pytest.approx(-1.0)
    assert np.isnan(correlation(np.ones(10), np.arange(10.0)))  # a still mouth: no score
    gaps = np.where(np.arange(40) % 5 == 0, np.nan, np.sin(t))  # frames without a face
    assert correlation(gaps, np.sin(t)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        correlation(np.ones(3), np.ones(4))


def test_drift_and_flicker_ignore_the_mouth() -> None:
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mouth = np.zeros((32, 32), np.float32)
    mouth[20:28, 10:22] = 1
    talking = []
    for i in range(4):
        f = ref.copy()
        f[20:28, 10:22] = 40 * i  # only the mouth changes
        talking.append(f)
    assert identity_drift(talking, ref, mouth) == 100.0
    assert flicker(talking, mouth) == 0.0
    assert flicker(talking) > 0 and identity_drift(talking, ref) < 100.0  # whole frame
    shaky = [np.roll(ref, i % 2, axis=1) for i in range(4)]
    assert flicker(shaky, mouth) > 10 and identity_drift(shaky, ref, mouth) < 20


def test_confidence_interval_of_the_mean() -> None:
    """Student's t, 2 degrees of freedom: t = 4.303, sd 0.2, sem 0.2 / sqrt(3)."""
    rows = [{"lip_sync": v} for v in (0.2, 0.4, 0.6, float("nan"))]  # no score: left out
    assert _ci95(rows, "lip_sync") == pytest.approx(4.303 * 0.2 / 3**0.5, rel=1e-3)
    assert np.isnan(_ci95(rows[:1], "lip_sync"))  # one clip has no spread
    assert identity_kind("procedural-439") == "procedural"
    assert identity_kind("echomimic_e") == "echomimic_e"


@pytest.fixture(scope="module")
def heldout(corpus_dir: Path) -> dict:
    return heldout_samples(corpus_dir, EvalConfig(clips=1, frames=40, seed=1))[0]


def test_lip_sync_of_ground_truth_is_high(heldout: dict) -> None:
    """The data engine's animation, measured by face mesh, follows the speech envelope;
    the same frames against a time-reversed envelope do not."""
    frames, env = list(heldout["frames"]), heldout["envelope"]
    assert len(env) == len(frames) == 40 and env.max() > 0
    openings = mouth_openings(frames)
    assert np.isfinite(openings).mean() > 0.9
    assert lip_sync_score(frames, env) > 0.6
    assert lip_sync_score(frames, env[::-1]) < 0.3


def test_audio_use_probe_sees_the_audio_at_high_noise(corpus_dir: Path) -> None:
    """The probe on the shipped weights, held-out clips.  Nearly clean input (t = 100):
    the mouth is in the input, so the prediction follows it whatever the speech.  At
    t = 800 the input barely shows the mouth and the clip's own speech (audio and mouth
    track) must beat another clip's (measured on this corpus: R² -0.11 against -0.21)."""
    model = load_model("lcp-tiny")
    rep = audio_use(model, corpus_dir, AudioUseConfig(timesteps=(800, 100), clips=17))
    high, low = rep["rows"]
    assert (high["timestep"], low["timestep"]) == (800, 100) and rep["split"] == "heldout"
    assert rep["clips"] == 16  # a last batch of one clip has no other clip's audio
    assert low["r2"] > 0.6 and abs(low["r2"] - low["r2_other_audio"]) < 0.1
    assert high["r2"] - high["r2_other_audio"] > 0.05
    assert high["r2"] < low["r2"]


def test_eval_cli_on_corpus_and_portrait(corpus_dir: Path, tmp_path: Path) -> None:
    res = run_lcp(
        "eval",
        "--corpus", corpus_dir, "--clips", "2", "--frames", "8", "--clip-seed", "5",
        "--face", FACE, "--audio", SPEECH,
        "--steps", "2", "--videos", tmp_path / "videos", "--audio-use", "--probe-clips", "4",
        "--json", "--quiet",
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    held = rep["heldout"]
    assert len(held["clips"]) == 2 and rep["config"]["seed"] == 5
    drawn = heldout_samples(corpus_dir, EvalConfig(clips=2, frames=8, seed=5))
    assert [(c["utterance"], c["offset"]) for c in held["clips"]] == [
        (s["utterance"], s["offset"]) for s in drawn
    ]
    assert all(0 < c["psnr"] < 100 and -1 <= c["ssim"] <= 1 for c in held["clips"])
    assert held["ci95"]["psnr"] > 0  # two clips: a spread, so an interval
    assert sum(g["clips"] for g in held["by_identity"].values()) == 2
    probe = rep["audio_use"]
    assert [r["timestep"] for r in probe["rows"]] == [999, 900, 800, 700]
    assert all(r["r2"] <= 1 and r["r2_other_audio"] <= 1 for r in probe["rows"])
    (p,) = rep["portraits"]
    assert p["frames"] == 48 and p["identity_drift_db"] > 0 and p["flicker"] >= 0
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 1


def test_eval_cli_errors(tmp_path: Path) -> None:
    res = run_lcp("eval", cache_dir=tmp_path)
    assert res.returncode == 16 and "nothing to score" in res.stderr
    res = run_lcp("eval", "--face", FACE, cache_dir=tmp_path)
    assert res.returncode == 16 and "--audio" in res.stderr
    res = run_lcp("eval", "--face", FACE, "--audio", SPEECH, "--audio-use", cache_dir=tmp_path)
    assert res.returncode == 16 and "--corpus" in res.stderr
    res = run_lcp("eval", "--corpus", tmp_path / "none", cache_dir=tmp_path)
    assert res.returncode == 10 and "no corpus" in res.stderr
