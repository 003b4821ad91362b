"""Audio stage: decoding real files, features, per-frame windows (EchoMimic golden)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from lightningcp_cli.config import AudioConfig
from lightningcp_cli.errors import AudioError, InputNotFoundError
from lightningcp_cli.media import probe
from lightningcp_cli.models.audio_encoder import AudioEncoder, MelAudioEncoder
from lightningcp_cli.stages.audio import (
    FrameWindows,
    _read_ffmpeg,
    _read_soundfile,
    audio_windows,
    load_audio,
    log_mel,
    num_video_frames,
    prepare_audio,
    window_position_code,
)

DATA = Path(__file__).parent / "data"
WAV = DATA / "speech_2s.wav"
STEREO = {ext: DATA / f"speech_1s_stereo44k.{ext}" for ext in ("flac", "mp3", "m4a")}
GOLDEN = DATA / "golden" / "inputs_outputs.safetensors"


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_audio(WAV).samples


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


# ------------------------------------------------------------------------ loading


def test_load_wav_16k(speech: np.ndarray) -> None:
    audio = load_audio(WAV)
    assert audio.sample_rate == 16_000
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert len(audio.samples) == 32_000
    assert audio.duration == pytest.approx(2.0)
    assert audio.path == WAV
    ref, _ = sf.read(WAV, dtype="float32")
    np.testing.assert_array_equal(audio.samples, ref)


def test_stereo_flac_is_mixed_and_resampled(speech: np.ndarray) -> None:
    # The file is left = speech, right = 0.5 * speech at 44.1 kHz: the mono mix is 0.75x.
    assert probe(STEREO["flac"]).audio.channels == 2
    audio = load_audio(STEREO["flac"])
    assert audio.sample_rate == 16_000 and audio.samples.ndim == 1
    assert len(audio.samples) == 16_000
    expected = 0.75 * speech[:16_000]
    err = np.abs(audio.samples - expected)
    assert float(np.median(err)) < 2e-3 and _rms(audio.samples - expected) < 0.02 * _rms(expected)


@pytest.mark.parametrize("ext", ["mp3", "m4a"])
def test_lossy_formats(ext: str, speech: np.ndarray) -> None:
    audio = load_audio(STEREO[ext])
    assert audio.sample_rate == 16_000 and audio.samples.dtype == np.float32
    assert audio.samples.ndim == 1
    assert abs(audio.duration - 1.0) < 0.08
    # Same loudness as the 0.75x mono mix, and the same waveform (gapless decoding: the
    # encoder delay is trimmed, so no lag).
    assert _rms(audio.samples) == pytest.approx(0.75 * _rms(speech[:16_000]), rel=0.1)
    n = min(len(audio.samples), 16_000)
    assert float(np.corrcoef(audio.samples[:n], speech[:n])[0, 1]) > 0.95


def test_m4a_needs_ffmpeg_and_ffmpeg_matches_soundfile() -> None:
    assert _read_soundfile(STEREO["m4a"]) is None  # libsndfile has no AAC: ffmpeg path
    sf_data, sf_rate = _read_soundfile(STEREO["flac"])
    ff_data, ff_rate = _read_ffmpeg(STEREO["flac"])
    assert sf_rate == ff_rate == 44_100
    assert sf_data.shape == ff_data.shape == (44_100, 2)
    np.testing.assert_allclose(ff_data, sf_data, atol=1e-6)


@pytest.mark.parametrize("rate", [8_000, 22_050])
def test_resample(rate: int) -> None:
    audio = load_audio(WAV, sample_rate=rate)
    assert audio.sample_rate == rate
    assert len(audio.samples) == 2 * rate
    assert audio.duration == pytest.approx(2.0)


def test_stereo_wav_mixes_to_mean(tmp_path: Path) -> None:
    t = np.arange(8_000) / 8_000
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, np.zeros_like(left)], axis=1), 8_000, subtype="FLOAT")
    audio = load_audio(path)  # also 8 kHz -> 16 kHz
    assert len(audio.samples) == 16_000
    assert np.abs(audio.samples).max() == pytest.approx(0.25, abs=0.01)


def test_silent_audio_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(8_000, dtype=np.float32), 16_000)
    audio = load_audio(path)
    assert audio.duration == pytest.approx(0.5)
    assert not audio.samples.any()
    feats = prepare_audio(path, MelAudioEncoder(), fps=24)
    assert feats.num_frames == 12
    assert torch.isfinite(feats.tokens).all()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="nope.wav: file not found"):
        load_audio(tmp_path / "nope.wav")


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "x.mp3"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(AudioError, match=r"x\.mp3: cannot decode audio \(.+\)"):
        load_audio(path)


def test_text_file_is_not_audio() -> None:
    with pytest.raises(AudioError, match="README.md: "):
        load_audio(DATA / "README.md")


def test_empty_and_zero_length(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: empty file"):
        load_audio(empty)
    zero = tmp_path / "zero.wav"  # a valid WAV header with no samples
    sf.write(zero, np.zeros((0,), dtype=np.float32), 16_000)
    assert zero.stat().st_size > 0
    with pytest.raises(AudioError, match=r"zero\.wav: no audio samples"):
        load_audio(zero)


def test_directory_is_not_audio(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)


def test_one_line_messages(tmp_path: Path) -> None:
    path = tmp_path / "x.m4a"
    path.write_bytes(b"\x00" * 1000)
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ frames, windows


def test_num_video_frames() -> None:
    assert num_video_frames(2.0, 24) == 48
    assert num_video_frames(2.01, 24) == 49
    assert num_video_frames(5 / 24, 24) == 5  # 5/24*24 = 5.000000000000001 in floats
    assert num_video_frames(0.0, 25) == 1
    assert num_video_frames(1e-4, 25) == 1
    assert num_video_frames(1.0, 29.97) == 30


@pytest.mark.parametrize("frames", [4, 16])
def test_windows_match_echomimic_golden(frames: int) -> None:
    g = load_file(GOLDEN)
    whisper = g["whisper_feats"]  # [64, 5, 384]
    out = audio_windows(whisper, frames, 24, AudioConfig())
    expected = g[f"audio_fea_final_F{frames}"][0]  # [F, 50, 384]
    assert out.shape == expected.shape
    assert torch.equal(out, expected)


def test_windows_index_rule() -> None:
    # features[t, l, 0] = 10 * t + l: every row says which feature it came from.
    t, layers = 7, 2
    feats = (10 * torch.arange(t)[:, None] + torch.arange(layers)[None, :]).float()[..., None]
    out = audio_windows(feats, num_frames=6, fps=25, cfg=AudioConfig())
    assert out.shape == (6, 10 * layers, 1)
    for i in range(6):
        c = int(i * 50 / 25)
        for k, idx in enumerate(range(c - 4, c + 6)):
            idx = min(max(idx, 0), t - 1)
            for layer in range(layers):
                assert out[i, k * layers + layer, 0] == 10 * idx + layer
    narrow = audio_windows(feats, 3, 25, AudioConfig(window_before=0, window_after=0))
    assert narrow[:, :, 0].tolist() == [[0, 1], [20, 21], [40, 41]]


def test_windows_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        audio_windows(torch.zeros(0, 1, 4), 3, 24)
    with pytest.raises(ValueError):
        audio_windows(torch.zeros(5, 4), 3, 24)


# ------------------------------------------------------------------------ features


def test_log_mel_shape_rate_and_range(speech: np.ndarray) -> None:
    mel = log_mel(speech, 16_000)
    assert mel.shape == (100, 80)  # 2 s at 50 Hz
    assert mel.dtype == torch.float32
    assert float(mel.max() - mel.min()) <= 2.0 + 1e-6  # whisper clamp: 8 decades / 4
    assert log_mel(speech[:16_000], 16_000, n_mels=40).shape == (50, 40)
    assert log_mel(speech[:100], 16_000).shape == (1, 80)  # shorter than a hop


def test_mel_encoder_contract(speech: np.ndarray) -> None:
    enc = MelAudioEncoder()
    assert isinstance(enc, AudioEncoder)
    assert (enc.layers, enc.dim, enc.feature_rate) == (1, 80, 50)
    feats = enc.encode(speech)
    assert feats.shape == (100, 1, 80) and feats.dtype == torch.float32
    assert float(feats.max()) == pytest.approx(1.0)
    assert float(feats.min()) >= -1.0
    # Per-utterance loudness normalisation: gain does not matter.
    torch.testing.assert_close(enc.encode(0.3 * speech), feats, atol=1e-4, rtol=0)
    assert MelAudioEncoder(n_mels=32).encode(speech).shape == (100, 1, 32)


def test_mel_encoder_silence_differs_from_speech(speech: np.ndarray) -> None:
    enc = MelAudioEncoder()
    silent = enc.encode(np.zeros(32_000, dtype=np.float32))
    assert torch.equal(silent, torch.full_like(silent, -1.0))
    faint = enc.encode(np.random.default_rng(0).normal(0, 1e-4, 32_000).astype(np.float32))
    talk = enc.encode(speech)
    assert float(talk.mean()) > float(faint.mean()) + 0.3
    assert float(faint.mean()) < -0.4
    # The leading 0.1 s of the clip is silence; the speech after it is much louder.
    assert float(talk[:4].mean()) < float(talk[10:].mean()) - 0.3


def test_prepare_audio(speech: np.ndarray) -> None:
    feats = prepare_audio(WAV, MelAudioEncoder(), fps=24, cfg=AudioConfig())
    assert feats.num_frames == 48 and feats.fps == 24
    assert feats.tokens.shape == (48, 10, 80)
    assert feats.audio.duration == pytest.approx(2.0)
    full = MelAudioEncoder().encode(speech)
    torch.testing.assert_close(feats.tokens, audio_windows(full, 48, 24))


@pytest.mark.parametrize("fps", [24, 25, 30.0])
def test_frame_windows_slices_equal_the_whole(fps: float) -> None:
    """Renders take the windows one chunk at a time: every range equals the same rows of
    the all-at-once windows, also at the clamped ends."""
    feats = torch.randn(103, 5, 8)  # whisper-like: 5 layers
    frames = num_video_frames(103 / 50, fps)
    whole = audio_windows(feats, frames, fps)
    lazy = FrameWindows(feats, frames, fps)
    assert lazy.shape == tuple(whole.shape) and len(lazy) == frames
    for a, b in [(0, frames), (0, 1), (5, 17), (frames - 3, frames), (frames - 1, frames + 9)]:
        torch.testing.assert_close(lazy[a:b], whole[a:b], rtol=0, atol=0)
    assert lazy[7:7].shape == (0, *whole.shape[1:])
    with pytest.raises(TypeError):
        lazy[3]  # type: ignore[index]
    with pytest.raises(TypeError):
        lazy[0:10:2]


def test_prepare_audio_keeps_features_not_windows() -> None:
    """Memory for long audio: the features (one row per 20 ms) are kept, the 10-row
    windows per video frame are not made until a frame range asks for them."""
    feats = prepare_audio(WAV, MelAudioEncoder(), fps=24, cfg=AudioConfig())
    assert feats.windows.features.shape == (100, 1, 80)  # 2 s at 50 Hz
    assert feats.windows.shape == (48, 10, 80)


def test_window_position_code_tells_the_rows_of_a_window_apart() -> None:
    """Log-mel rows carry no time: with the code, every row of a window gets its
    offset's sinusoid added (the same for every frame and layer), and the W codes differ."""
    feats = torch.randn(80, 2, 16)
    plain = FrameWindows(feats, 30, 24)
    coded = FrameWindows(feats, 30, 24, position=0.5)
    code = window_position_code(10, 16, 0.5)  # [W, D]
    assert code.shape == (10, 16) and float(code.abs().max()) <= 0.5
    assert torch.cdist(code, code).add(torch.eye(10)).min() > 0.1  # all offsets distinct
    diff = (coded[3:9] - plain[3:9]).view(6, 10, 2, 16)
    torch.testing.assert_close(diff, code[None, :, None, :].expand(6, 10, 2, 16))
    torch.testing.assert_close(audio_windows(feats, 30, 24, position=0.5), coded[:])


def test_prepare_audio_adds_the_encoders_window_code() -> None:
    plain = prepare_audio(WAV, MelAudioEncoder(), fps=24)
    coded = prepare_audio(WAV, MelAudioEncoder(window_position=0.5), fps=24)
    code = window_position_code(10, 80, 0.5)
    torch.testing.assert_close(coded.tokens - plain.tokens, code[None].expand(48, 10, 80))
