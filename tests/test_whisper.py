"""whisper-tiny's encoder as EchoMimic v1 uses it: OpenAI checkpoint format, strict loading,
hidden states, 30 s segmenting, and the log-mel front end (tiny random dims, CPU)."""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path

import librosa
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lightningcp_cli.errors import ModelLoadError
from lightningcp_cli.models.audio_encoder import AudioEncoder
from lightningcp_cli.models.bundle import _audio_encoder
from lightningcp_cli.models.registry import get_model_spec
from lightningcp_cli.models.whisper import (
    WhisperAudioEncoder,
    WhisperDims,
    WhisperEncoder,
    _infer_dims,
    load_whisper_encoder,
    log_mel_spectrogram,
    sinusoids,
    whisper_dims_metadata,
    whisper_state_dict,
)
from lightningcp_cli.stages.audio import load_audio

WAV = Path(__file__).parent / "data" / "speech_2s.wav"
DIMS = WhisperDims(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=2)
TEXT_DIMS = {"n_vocab": 51865, "n_text_ctx": 448, "n_text_state": 32, "n_text_head": 2}


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_audio(WAV).samples  # 2 s, 16 kHz


@pytest.fixture(scope="module")
def reference() -> WhisperEncoder:
    """Random encoder whose weights are fp16-exact (OpenAI's files are fp16)."""
    gen = torch.Generator().manual_seed(0)
    enc = WhisperEncoder(DIMS)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            scale = 0.2 if name.endswith("bias") or "_ln" in name or "ln_" in name else 0.3
            base = 1.0 if "ln" in name and name.endswith("weight") else 0.0
            fan = p.shape[1] * (p.shape[2] if p.ndim == 3 else 1) if p.ndim > 1 else 1
            p.copy_(base + torch.randn(p.shape, generator=gen) * scale / math.sqrt(fan))
            p.copy_(p.half().float())
    return enc.eval()


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp16 weights, float32 positions (so a recomputed table is bit-identical)."""
    return {k: v if "positional" in k else v.half().contiguous() for k, v in state.items()}


def _openai_checkpoint(enc: WhisperEncoder) -> dict:
    state = _half(whisper_state_dict(enc))
    state["decoder.positional_embedding"] = torch.zeros(448, 32, dtype=torch.half)
    state["decoder.blocks.0.attn.query.weight"] = torch.zeros(32, 32, dtype=torch.half)
    dims = {**asdict(DIMS), **TEXT_DIMS, "n_text_layer": 2}
    return {"dims": dims, "model_state_dict": state}


@pytest.fixture(scope="module")
def ckpt_path(reference: WhisperEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("whisper") / "whisper_tiny.pt"
    torch.save(_openai_checkpoint(reference), path)
    return path


@pytest.fixture(scope="module")
def loaded(ckpt_path: Path) -> WhisperAudioEncoder:
    return load_whisper_encoder(ckpt_path)


def test_dims_from_checkpoint_dict_and_shapes() -> None:
    full = {**asdict(WhisperDims()), **TEXT_DIMS, "n_text_layer": 4}
    assert WhisperDims.from_dict(full) == WhisperDims(80, 1500, 384, 6, 4)
    with pytest.raises(ValueError, match="n_audio_layer"):
        WhisperDims.from_dict({"n_mels": 80})
    with torch.device("meta"):  # full-size tiny, no memory
        tiny = WhisperEncoder(WhisperDims())
    state = whisper_state_dict(tiny)
    assert len(state) == 67  # the manifest's encoder key count
    assert _infer_dims(state, Path("x")) == WhisperDims()


def test_loads_openai_format_and_is_an_audio_encoder(
    loaded: WhisperAudioEncoder, reference: WhisperEncoder
) -> None:
    assert isinstance(loaded, AudioEncoder)
    assert (loaded.layers, loaded.dim, loaded.feature_rate, loaded.sample_rate) == (
        3,
        32,
        50,
        16000,
    )
    assert loaded.dtype == torch.float32 and loaded.model.dims == DIMS
    got = loaded.model.state_dict()
    for k, v in reference.state_dict().items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k


def test_encode_one_second(loaded: WhisperAudioEncoder, speech: np.ndarray) -> None:
    feats = loaded.encode(speech[:16000])
    assert feats.shape == (50, 3, 32) and feats.dtype == torch.float32
    assert feats.device.type == "cpu" and torch.isfinite(feats).all()
    # EchoMimic's padding: the segment is zero-padded in the log-mel domain to 3000 frames
    mel = log_mel_spectrogram(speech[:16000])
    assert mel.shape == (80, 100)
    padded = torch.zeros(1, 80, 3000)
    padded[0, :, :100] = mel
    with torch.no_grad():
        want = loaded.model(padded)[0, :50]
    torch.testing.assert_close(feats, want, rtol=0, atol=0)


def test_encode_31_seconds_in_two_segments(loaded: WhisperAudioEncoder, speech: np.ndarray) -> None:
    audio = np.tile(speech, 16)[: 31 * 16000]  # 31 s
    feats = loaded.encode(audio)
    assert feats.shape == (1550, 3, 32)  # 1500 from the first 30 s, 50 from the last 1 s
    mel = log_mel_spectrogram(audio)  # one log-mel for the whole file (global max)
    assert mel.shape == (80, 3100)
    segs = torch.zeros(2, 80, 3000)
    segs[0] = mel[:, :3000]
    segs[1, :, :100] = mel[:, 3000:]
    with torch.no_grad():
        hidden = loaded.model(segs)
    want = torch.cat([hidden[0], hidden[1, :50]])
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)
    assert loaded.encode(audio[:100]).shape == (1, 3, 32)  # shorter than a frame: one frame


def test_missing_key_and_wrong_shape_name_the_key(
    reference: WhisperEncoder, tmp_path: Path
) -> None:
    ck = _openai_checkpoint(reference)
    del ck["model_state_dict"]["encoder.blocks.1.attn.key.weight"]
    torch.save(ck, tmp_path / "missing.pt")
    with pytest.raises(ModelLoadError, match=r"missing\.pt.*missing key.*blocks\.1\.attn\.key"):
        load_whisper_encoder(tmp_path / "missing.pt")

    ck = _openai_checkpoint(reference)
    ck["model_state_dict"]["encoder.blocks.0.mlp.0.weight"] = torch.zeros(64, 32)
    torch.save(ck, tmp_path / "shape.pt")
    with pytest.raises(ModelLoadError, match=r"blocks\.0\.mlp\.0\.weight: file \[64, 32\]"):
        load_whisper_encoder(tmp_path / "shape.pt")

    ck = _openai_checkpoint(reference)
    ck["model_state_dict"]["encoder.extra.weight"] = torch.zeros(1)
    torch.save(ck, tmp_path / "extra.pt")
    with pytest.raises(ModelLoadError, match=r"unexpected key.*encoder\.extra\.weight"):
        load_whisper_encoder(tmp_path / "extra.pt")

    ck = _openai_checkpoint(reference)
    ck["dims"] = {**ck["dims"], "n_audio_layer": 3}  # dims claim a block the file lacks
    torch.save(ck, tmp_path / "dims.pt")
    with pytest.raises(ModelLoadError, match=r"missing key.*encoder\.blocks\.2\."):
        load_whisper_encoder(tmp_path / "dims.pt")

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"junk\.pt: cannot read"):
        load_whisper_encoder(tmp_path / "junk.pt")


def test_safetensors_and_absent_positions_load_identically(
    reference: WhisperEncoder, loaded: WhisperAudioEncoder, speech: np.ndarray, tmp_path: Path
) -> None:
    state = _half(whisper_state_dict(reference))
    state["decoder.ln.weight"] = torch.ones(32, dtype=torch.half)
    save_file(state, tmp_path / "w.safetensors", metadata=whisper_dims_metadata(DIMS))
    st = load_whisper_encoder(tmp_path / "w.safetensors")
    want = loaded.encode(speech)
    assert want.shape == (100, 3, 32)
    assert torch.equal(st.encode(speech), want)

    ck = _openai_checkpoint(reference)
    del ck["model_state_dict"]["encoder.positional_embedding"]
    torch.save(ck, tmp_path / "nopos.pt")
    nopos = load_whisper_encoder(tmp_path / "nopos.pt")
    assert torch.equal(nopos.model.positional_embedding, sinusoids(1500, 32))
    assert torch.equal(nopos.encode(speech), want)


def test_log_mel_matches_numpy(speech: np.ndarray) -> None:
    x = speech.astype(np.float64)
    n_fft, hop = 400, 160
    padded = np.pad(x, n_fft // 2, mode="reflect")
    n_frames = 1 + (len(padded) - n_fft) // hop
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = np.stack([padded[i * hop : i * hop + n_fft] * window for i in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # [frames, 201]
    mel = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80).astype(np.float64) @ power[:-1].T
    ref = np.log10(np.maximum(mel, 1e-10))
    ref = (np.maximum(ref, ref.max() - 8.0) + 4.0) / 4.0
    got = log_mel_spectrogram(speech)
    assert got.shape == ref.shape == (80, 200)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-4)


def _manual_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _manual_block(x: torch.Tensor, sd: dict[str, torch.Tensor], i: int, heads: int) -> torch.Tensor:
    def p(name: str) -> torch.Tensor:
        return sd[f"blocks.{i}.{name}"].double()

    t, d = x.shape
    dh = d // heads
    h = _manual_layer_norm(x, p("attn_ln.weight"), p("attn_ln.bias"))
    q = h @ p("attn.query.weight").T + p("attn.query.bias")
    k = h @ p("attn.key.weight").T
    v = h @ p("attn.value.weight").T + p("attn.value.bias")
    outs = []
    for j in range(heads):
        sl = slice(j * dh, (j + 1) * dh)
        scores = q[:, sl] @ k[:, sl].T / math.sqrt(dh)
        outs.append(torch.softmax(scores, dim=-1) @ v[:, sl])
    x = x + torch.cat(outs, dim=1) @ p("attn.out.weight").T + p("attn.out.bias")
    h = _manual_layer_norm(x, p("mlp_ln.weight"), p("mlp_ln.bias"))
    h = h @ p("mlp.0.weight").T + p("mlp.0.bias")
    h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    return x + h @ p("mlp.2.weight").T + p("mlp.2.bias")


def test_hidden_states_equal_a_manual_forward(loaded: WhisperAudioEncoder) -> None:
    enc = loaded.model
    sd = enc.state_dict()
    gen = torch.Generator().manual_seed(1)
    mel = torch.rand(1, 80, 3000, generator=gen) * 2 - 1
    with torch.no_grad():
        hidden = enc(mel)[0]  # [1500, 3, 32]
        # the block alone vs. a plain per-head softmax(q k^T / sqrt(d)) v in float64
        x = torch.randn(1, 40, 32, generator=gen)
        torch.testing.assert_close(
            enc.blocks[0](x)[0].double(), _manual_block(x[0].double(), sd, 0, 2), rtol=0, atol=1e-5
        )
    # stem: gelu(conv1), gelu(conv2 stride 2), + sinusoids; then each block; no ln_post
    m = mel[0].double()
    w1, b1 = sd["conv1.weight"].double(), sd["conv1.bias"].double()
    w2, b2 = sd["conv2.weight"].double(), sd["conv2.bias"].double()
    gelu = torch.nn.functional.gelu
    h = gelu(torch.nn.functional.conv1d(m[None], w1, b1, padding=1))
    h = gelu(torch.nn.functional.conv1d(h, w2, b2, stride=2, padding=1))[0].T
    h = h + sinusoids(1500, 32).double()
    want = [h]
    for i in range(2):
        want.append(_manual_block(want[-1], sd, i, 2))
    torch.testing.assert_close(hidden.double(), torch.stack(want, dim=1), rtol=0, atol=2e-4)


def test_bundle_finds_the_whisper_file(reference: WhisperEncoder, tmp_path: Path) -> None:
    spec = get_model_spec("echomimic-v1")
    with pytest.raises(ModelLoadError, match=r"audio_processor/whisper_tiny\.pt"):
        _audio_encoder(spec, tmp_path)
    with pytest.raises(ModelLoadError, match="needs a weights folder"):
        _audio_encoder(spec, None)
    (tmp_path / "audio_processor").mkdir()
    state = {k: v.contiguous() for k, v in whisper_state_dict(reference).items()}
    save_file(state, tmp_path / "audio_processor" / "whisper_tiny.safetensors")
    # found and loaded (dims inferred from shapes), but 32 wide where the UNet takes 384
    with pytest.raises(ModelLoadError, match=r"whisper_tiny\.safetensors: .*32 wide.*384"):
        _audio_encoder(spec, tmp_path)
    mel = replace(spec, audio_encoder="mel", unet=replace(spec.unet, cross_attention_dim=80))
    assert _audio_encoder(mel, None).name == "mel80"
