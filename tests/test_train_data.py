"""Data engine of lcp-tiny (``lightningcp_cli.train``): corpus, identities, animator, dataset.

Reads only committed files: the portraits and clips in ``lightningcp_cli/train/assets/``
and ``tests/data/speech_2s.wav`` (cut from the held-out ``walden.wav``, used here as a
held-out clip).  espeak-ng is optional: the espeak tests skip without it, everything else
runs on the real clips.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lightningcp_cli.stages.audio import audio_windows
from lightningcp_cli.train.animate import AnimationConfig, FaceRig, MouthAnimator, blink_track
from lightningcp_cli.train.dataset import (
    CORPUS_FILES,
    SynthesisConfig,
    TalkingFaceDataset,
)
from lightningcp_cli.train.faces import (
    ASSET_PORTRAITS,
    AugmentConfig,
    FaceBank,
    make_identity,
    procedural_source,
)
from lightningcp_cli.train.speech import (
    ASSET_SPEECH,
    HELDOUT_VARIANTS,
    SAMPLE_RATE,
    SENTENCES,
    SpeechCorpus,
    build_speech_corpus,
    espeak_available,
    make_utterance,
    mouth_curves,
)

from .conftest import build_tiny_corpus

DATA = Path(__file__).parent / "data"
# no head motion, no blinks, every reference at rest
STILL = SynthesisConfig(p_head_motion=0.0, blink_interval=(0.0, 0.0), p_open_reference=0.0)


def _digest(folder: Path) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in CORPUS_FILES}


@pytest.fixture(scope="session")
def bank(corpus_dir: Path) -> FaceBank:
    return FaceBank.load(corpus_dir / "faces.safetensors")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _burst_utterance(uid: str = "synthetic/burst", split: str = "train"):
    """2.0 s: silence, a loud voiced burst at exactly [1.0, 1.3) s, silence."""
    rng = np.random.default_rng(0)
    x = np.zeros(2 * SAMPLE_RATE, np.float32)
    t = np.arange(int(0.3 * SAMPLE_RATE)) / SAMPLE_RATE
    burst = 0.5 * np.sin(2 * np.pi * 220 * t) + 0.3 * np.sin(2 * np.pi * 660 * t)
    burst += 0.05 * rng.standard_normal(len(t))
    x[SAMPLE_RATE : SAMPLE_RATE + len(t)] = burst
    return make_utterance(uid, x, split=split, source="synthetic")


# --------------------------------------------------------------------------- corpus


def test_corpus_is_small_complete_and_deterministic(corpus_dir: Path, tmp_path: Path) -> None:
    assert all((corpus_dir / n).is_file() for n in CORPUS_FILES)
    total = sum((corpus_dir / n).stat().st_size for n in CORPUS_FILES)
    assert total < 40e6
    again = build_tiny_corpus(tmp_path / "again")
    assert _digest(again) == _digest(corpus_dir)


def test_corpus_round_trip(corpus_dir: Path, bank: FaceBank) -> None:
    speech = SpeechCorpus.load(corpus_dir / "speech.safetensors")
    assert len(speech.indices("heldout")) == 1 and len(speech.indices("train")) == 6
    u = speech[speech.indices("heldout")[0]]
    assert u.uid == "clip/speech_2s" and u.mel.shape[1:] == (1, 80) and u.mel.dtype == np.float16
    assert len(u.opening) == len(u.width) == u.num_features == len(u.samples) // 320
    assert u.opening.min() >= 0 and u.opening.max() <= 1 and u.opening.max() > 0.5
    assert bank.names("heldout") == ["echomimic_e"]
    assert len(bank.names("train")) == 4 + 12  # portraits a-d and their ordered-pair morphs
    assert all(s.image.shape == (256, 256, 3) for s in bank.sources)


def test_example_and_heldout_clips_never_train() -> None:
    with pytest.raises(ValueError, match="example"):
        build_speech_corpus(clips=[Path("x/echomimic_en.wav")], use_espeak=False)
    with pytest.raises(ValueError, match="held out"):
        build_speech_corpus(clips=[Path("x/walden.wav")], use_espeak=False)
    committed = {p.stem for p in ASSET_SPEECH.glob("*.wav")}
    assert committed.isdisjoint({"walden", "jane", "echomimic_en"})


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed (apt)")
def test_espeak_corpus_deterministic_and_split() -> None:
    kw = dict(seed=5, n_utterances=2, n_heldout=2, clips=[], use_espeak=True)
    a, b = build_speech_corpus(**kw), build_speech_corpus(**kw)
    for ua, ub in zip(a.utterances, b.utterances, strict=True):
        assert ua.uid == ub.uid and ua.info == ub.info
        assert np.array_equal(ua.mel, ub.mel) and np.array_equal(ua.opening, ub.opening)
    heldout_text = {s for i, s in enumerate(SENTENCES) if i % 8 == 7}
    for u in a.utterances:
        variant = u.info["voice"].partition("+")[2]
        if u.split == "heldout":
            assert u.info["text"] in heldout_text and variant in HELDOUT_VARIANTS
        else:
            assert not any(s in u.info["text"] for s in heldout_text)
            assert variant not in HELDOUT_VARIANTS
        assert u.opening[:2].max() == 0  # leading silence: mouth closed


# --------------------------------------------------------------------------- curves


def test_burst_opening_and_audio_windows_align(bank: FaceBank) -> None:
    u = _burst_utterance()
    feat = np.arange(u.num_features)
    on = feat[u.opening > 0]
    assert u.opening[:45].max() == 0 and u.opening[80:].max() == 0
    assert 48 <= on.min() <= 50 and 66 <= on.max() <= 76  # 1 frame lead, 60 ms release
    ds = TalkingFaceDataset(SpeechCorpus([u]), bank, "train", config=STILL)
    offset = 20  # clip frame i is video frame 20 + i; video frame 24 starts at 1.0 s
    opening, _ = ds.curves(u, offset, 12)
    assert opening[:4].max() == 0 and opening[4:12].min() > 0.3
    tokens = ds.tokens(u, offset, 12)
    mel = torch.from_numpy(u.mel.astype(np.float32))
    full = audio_windows(mel, 40, 24)
    assert torch.equal(tokens, full[offset : offset + 12])
    # a model trained with the window-position code gets the code render adds
    coded = TalkingFaceDataset(SpeechCorpus([u]), bank, "train", config=STILL, window_position=0.5)
    expected = audio_windows(mel, 40, 24, position=0.5)[offset : offset + 12]
    assert torch.equal(coded.tokens(u, offset, 12), expected)
    level = tokens.max(dim=2).values  # [F, 10]: window row r is feature c - 4 + r
    # Feature 50 (1.0 s) is the burst's first.  Clip frame 4 = video frame 24: c = 50, so
    # rows 0-3 are silent and row 4 is loud; clip frame 3 = video frame 23: c = 47, the
    # burst enters at row 7; clip frame 0 = video frame 20: c = 41, all silent.
    assert level[4, :4].max() == -1 and level[4, 4] > 0.5
    assert level[3, :7].max() == -1 and level[3, 7] > 0.5
    assert level[0].max() == -1


def test_mouth_curves_zero_in_silence_and_bounded() -> None:
    o, w = mouth_curves(np.zeros(SAMPLE_RATE, np.float32))
    assert o.shape == w.shape == (50,) and o.max() == 0 and np.abs(w).max() == 0
    u = _burst_utterance()
    assert u.opening.min() >= 0 and u.opening.max() <= 1
    assert u.width.min() >= -1 and u.width.max() <= 1


# --------------------------------------------------------------------------- animator


def _portrait_identity(bank: FaceBank, name: str = "echomimic_a"):
    rng = np.random.default_rng(0)
    return make_identity(bank.get(name), rng, 128, AugmentConfig.none())


def test_closed_mouth_is_the_reference(bank: FaceBank) -> None:
    ident = _portrait_identity(bank)
    an = MouthAnimator(ident.image, ident.rig)
    assert np.array_equal(an.render(0.0), ident.image)
    assert _psnr(an.render(0.02), ident.image) > 40
    assert _psnr(an.render(1.0), ident.image) < 35  # and an open mouth is not
    clip = an.render_clip(np.zeros(5), blinks=blink_track(5, 24, np.random.default_rng(1)))
    assert clip.shape == (5, 128, 128, 3)


def test_opening_measured_by_face_mesh(bank: FaceBank) -> None:
    """mediapipe's inner-lip distance (points 13-14) over face height grows with opening."""
    import cv2

    from lightningcp_cli.config import FaceConfig
    from lightningcp_cli.stages.face import analyze_face

    ident = _portrait_identity(bank)
    an = MouthAnimator(ident.image, ident.rig)
    ratios = []
    for opening in (0.0, 0.5, 1.0):
        frame = cv2.resize(an.render(opening), (512, 512), interpolation=cv2.INTER_CUBIC)
        lm = analyze_face(frame, FaceConfig(), 128).landmarks
        assert lm is not None
        gap = np.linalg.norm(lm[14, :2] - lm[13, :2])
        ratios.append(gap / np.linalg.norm(lm[152, :2] - lm[10, :2]))
    assert ratios[0] < 0.02
    assert ratios[0] + 0.02 < ratios[1] < ratios[2] - 0.02


def test_rig_flip_and_transform() -> None:
    src = procedural_source(1)
    rig = src.rig
    back = rig.flipped(256).flipped(256)
    assert np.allclose(back.points, rig.points, atol=1e-4)
    flipped = rig.flipped(256)
    assert flipped.part("lip_upper_inner")[0, 0] < flipped.part("lip_upper_inner")[-1, 0]
    m = np.array([[0.5, 0.0, 3.0], [0.0, 0.5, -2.0]])
    t = rig.transformed(m)
    assert np.allclose(t.part("chin")[0], rig.part("chin")[0] * 0.5 + [3.0, -2.0], atol=1e-4)
    assert abs(t.face_height - rig.face_height * 0.5) < 1e-3
    with pytest.raises(ValueError):
        FaceRig(np.zeros((3, 2)))
    with pytest.raises(ValueError):
        AnimationConfig(max_open=2.0)


def test_procedural_faces_animate() -> None:
    src = procedural_source(12)
    assert src.split == "train" and procedural_source(15).split == "heldout"
    assert np.array_equal(src.image, procedural_source(12).image)
    ident = make_identity(src, np.random.default_rng(2))
    an = MouthAnimator(ident.image, ident.rig)
    assert np.array_equal(an.render(0.0), ident.image)
    diff = np.abs(an.render(1.0).astype(int) - ident.image.astype(int)).sum(axis=2) > 20
    x0, y0, x1, y1 = ident.rig.lip_box()
    ys, xs = np.nonzero(diff)
    assert len(ys) > 10  # the mouth moved, and only around the mouth and jaw
    assert (
        ys.min() >= y0 - 6 and xs.min() >= x0 - 0.6 * (x1 - x0) and xs.max() <= x1 + 0.6 * (x1 - x0)
    )


# --------------------------------------------------------------------------- dataset


def test_dataset_samples_deterministic(corpus_dir: Path) -> None:
    a = TalkingFaceDataset.from_folder(corpus_dir, "train", seed=7, length=50)
    b = TalkingFaceDataset.from_folder(corpus_dir, "train", seed=7, length=50)
    sa, sb = a[11], b[11]
    assert sa["utterance"] == sb["utterance"] and sa["identity"] == sb["identity"]
    for k in ("reference", "frames", "audio", "face_mask", "mouth_open"):
        assert torch.equal(sa[k], sb[k])
    assert sa["frames"].shape == (12, 3, 128, 128) and sa["audio"].shape == (12, 10, 80)
    assert sa["reference"].shape == (3, 128, 128) and sa["face_mask"].shape == (1, 128, 128)
    assert float(sa["frames"].min()) >= -1 and float(sa["frames"].max()) <= 1
    b.set_epoch(1)
    assert not torch.equal(b[11]["frames"], sa["frames"])
    batch = torch.utils.data.default_collate([a[0], a[1]])
    assert batch["frames"].shape == (2, 12, 3, 128, 128)


def test_dataset_face_mask_matches_face_stage(corpus_dir: Path, bank: FaceBank) -> None:
    """Unaugmented portrait: the face mask equals the render's (face box grown by 0.1)."""
    from lightningcp_cli.config import FaceConfig
    from lightningcp_cli.stages.face import analyze_face, load_image

    ds = TalkingFaceDataset.from_folder(corpus_dir, "train", config=STILL)
    ident = _portrait_identity(bank, "echomimic_b")
    fa = analyze_face(load_image(ASSET_PORTRAITS / "echomimic_b.jpg"), FaceConfig(), 128)
    assert np.array_equal(ds.face_mask(ident), fa.face_mask)
    assert _psnr(ident.image, fa.crop) > 24  # same framing, resampled differently


def test_silent_frames_equal_reference(bank: FaceBank) -> None:
    u = _burst_utterance()
    ds = TalkingFaceDataset(SpeechCorpus([u]), bank, "train", config=STILL, length=8)
    for i in range(4):
        s = ds.sample_arrays(i)
        closed = s["mouth_open"] == 0
        for f in np.flatnonzero(closed):
            assert _psnr(s["frames"][f], s["reference"]) > 40
        for f in np.flatnonzero(s["mouth_open"] > 0.5):
            assert _psnr(s["frames"][f], s["reference"]) < 40


def test_open_references_change_only_the_lower_face_and_only_in_training(
    bank: FaceBank,
) -> None:
    def datasets(split: str) -> list[TalkingFaceDataset]:
        corpus = SpeechCorpus([_burst_utterance(split=split)])
        return [
            TalkingFaceDataset(
                corpus, bank, split, length=8, config=replace(STILL, p_open_reference=p)
            )
            for p in (0.0, 1.0)
        ]

    rest, opened = datasets("train")
    for i in range(8):
        a, b = rest.sample_arrays(i), opened.sample_arrays(i)
        assert a["identity"] == b["identity"]
        assert np.array_equal(a["frames"], b["frames"])  # drawn last: the clip is the same
        rows = np.flatnonzero(np.any(a["reference"] != b["reference"], axis=(1, 2)))
        assert len(rows), a["identity"]  # an opening of at least 0.1 always shows
        mouth_top = np.flatnonzero(a["mouth_mask"].any(1))[0]
        assert rows[0] >= mouth_top - 8  # eyes and forehead stay as they are
    rest, opened = datasets("heldout")
    for i in range(4):  # held-out references stay as the portrait is
        assert np.array_equal(
            rest.sample_arrays(i)["reference"], opened.sample_arrays(i)["reference"]
        )


def test_heldout_split_is_disjoint(corpus_dir: Path) -> None:
    train = TalkingFaceDataset.from_folder(corpus_dir, "train", length=40)
    held = TalkingFaceDataset.from_folder(corpus_dir, "heldout", length=40)
    tr = [train.sample_arrays(i) for i in range(24)]
    he = [held.sample_arrays(i) for i in range(24)]
    tr_u, he_u = {s["utterance"] for s in tr}, {s["utterance"] for s in he}
    assert he_u == {"clip/speech_2s"} and tr_u.isdisjoint(he_u)
    for s in tr:
        name = s["identity"]
        assert "echomimic_e" not in name
        if name.startswith("procedural-"):
            assert int(name.split("-")[1]) % 8 != 7
    for s in he:
        name = s["identity"]
        assert name == "echomimic_e" or int(name.split("-")[1]) % 8 == 7
    assert {s["identity"] for s in he} & {"echomimic_e"}


def test_dataset_needs_no_build_time_packages(corpus_dir: Path) -> None:
    """What a training machine runs: no mediapipe, librosa, scipy, soundfile, ffmpeg."""
    code = f"""
import sys, importlib.abc
BLOCK = {{"mediapipe", "librosa", "soundfile", "scipy", "imageio_ffmpeg", "diffusers", "skimage"}}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCK:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Blocker())
from lightningcp_cli.train.dataset import TalkingFaceDataset
s = TalkingFaceDataset.from_folder({str(corpus_dir)!r}, "heldout")[0]
assert s["frames"].shape == (12, 3, 128, 128)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
