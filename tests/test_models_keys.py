"""Parameter names and shapes of the models equal EchoMimic v1's checkpoints; strict loading.

The manifest ``data/echomimic_v1_keys.json`` is a copy of
``shared/checkpoints/echomimic_v1_keys.json`` (every key and shape of the official files,
dumped from the official classes at full size, in ``state_dict()`` order).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightningcp_cli.errors import ConfigError, ModelLoadError
from lightningcp_cli.models.face_locator import FaceLocator, FaceLocatorConfig
from lightningcp_cli.models.loading import (
    StateDictMismatchError,
    load_model_weights,
    load_state_file,
    load_strict,
)
from lightningcp_cli.models.registry import MODELS, get_model_spec
from lightningcp_cli.models.unet import ReferenceNet, UNetConfig, VideoUNet

DATA = Path(__file__).parent / "data"
MOTION = ".motion_modules."


@pytest.fixture(scope="module")
def manifest() -> dict[str, dict[str, list[int]]]:
    return json.loads((DATA / "echomimic_v1_keys.json").read_text())


@pytest.fixture(scope="module")
def full_models():
    spec = get_model_spec("echomimic-v1")
    with torch.device("meta"):
        return (
            ReferenceNet(spec.unet),
            VideoUNet(spec.unet),
            FaceLocator(spec.face_locator),
        )


def _shapes(state: dict[str, torch.Tensor]) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in state.items()]


def _assert_same(state: dict[str, torch.Tensor], expected: dict[str, list[int]]) -> None:
    got = _shapes(state)
    want = list(expected.items())
    assert {k for k, _ in got} == {k for k, _ in want}, (
        f"only in model: {sorted({k for k, _ in got} - set(expected))[:5]}, "
        f"only in file: {sorted(set(expected) - {k for k, _ in got})[:5]}"
    )
    assert got == want  # same shapes, same order


def test_reference_unet_keys(manifest, full_models):
    reference, _, _ = full_models
    assert len(manifest["reference_unet.pth"]) == 570
    _assert_same(reference.state_dict(), manifest["reference_unet.pth"])


def test_denoising_unet_and_motion_module_keys(manifest, full_models):
    _, denoiser, _ = full_models
    state = denoiser.state_dict()
    _assert_same(state, manifest["ALT:denoising_unet.pth(with_motion_modules)"])
    _assert_same(
        {k: v for k, v in state.items() if MOTION not in k}, manifest["denoising_unet.pth"]
    )
    _assert_same({k: v for k, v in state.items() if MOTION in k}, manifest["motion_module.pth"])


def test_face_locator_keys(manifest, full_models):
    _, _, locator = full_models
    _assert_same(locator.state_dict(), manifest["face_locator.pth"])


def test_bank_keys_pair_reference_and_denoiser(full_models):
    reference, denoiser, _ = full_models
    assert reference.bank_keys == denoiser.bank_keys
    assert len(denoiser.bank_keys) == 16
    assert "mid_block.attentions.0.transformer_blocks.0" in denoiser.bank_keys
    assert all(".transformer_blocks.0" in k for k in denoiser.bank_keys)


def test_processors_are_listed_and_swappable(full_models):
    _, denoiser, _ = full_models
    procs = denoiser.attn_processors
    key = "up_blocks.3.attentions.2.transformer_blocks.0.attn1.processor"
    assert type(procs[key]).__name__ == "ReferenceAttnProcessor"
    assert procs[key].name == "up_blocks.3.attentions.2.transformer_blocks.0"
    assert type(procs[key.replace("attn1", "attn2")]).__name__ == "AudioAttnProcessor"
    # 16 blocks x (attn1, attn2) + 21 motion modules x 2 temporal attentions
    assert len(procs) == 16 * 2 + 21 * 2
    with pytest.raises(ValueError, match="processor dict"):
        denoiser.set_attn_processor(dict(list(procs.items())[:-1]))
    denoiser.set_attn_processor(procs)  # the full dict is accepted
    assert denoiser.attn_processors == procs


# --------------------------------------------------------------------------- strict loading


def _small_locator() -> FaceLocator:
    torch.manual_seed(0)
    return FaceLocator(FaceLocatorConfig(out_channels=8, block_out_channels=(4, 8)))


def test_load_strict_accepts_exact_state():
    src, dst = _small_locator(), FaceLocator(FaceLocatorConfig(8, 1, (4, 8)))
    load_strict(dst, src.state_dict(), "face_locator.pth")
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_load_strict_reports_wrong_shape():
    state = _small_locator().state_dict()
    state["conv_out.weight"] = torch.zeros(8, 8, 1, 1)
    target = _small_locator()
    before = target.conv_out.weight.clone()
    with pytest.raises(ModelLoadError) as info:
        load_strict(target, state, "face_locator.pth")
    msg = str(info.value)
    assert msg.startswith("face_locator.pth: weights do not match the model: ")
    assert "1 shape mismatch (conv_out.weight: file [8, 8, 1, 1] vs model [8, 8, 3, 3])" in msg
    assert "\n" not in msg
    assert isinstance(info.value, StateDictMismatchError)
    assert info.value.mismatched == [("conv_out.weight", (8, 8, 1, 1), (8, 8, 3, 3))]
    assert not info.value.missing and not info.value.unexpected
    assert torch.equal(target.conv_out.weight, before)  # nothing was loaded


def test_load_strict_reports_missing_and_extra_keys():
    state = _small_locator().state_dict()
    del state["blocks.1.bias"]
    state["blocks.9.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as info:
        load_strict(_small_locator(), state, "face_locator.safetensors")
    msg = str(info.value)
    assert "face_locator.safetensors" in msg
    assert "1 missing key (blocks.1.bias)" in msg
    assert "1 unexpected key (blocks.9.weight)" in msg
    assert info.value.missing == ["blocks.1.bias"]
    assert info.value.unexpected == ["blocks.9.weight"]


def test_load_strict_message_is_short_but_error_keeps_everything(full_models):
    _, denoiser, _ = full_models
    with pytest.raises(StateDictMismatchError) as info:
        load_strict(denoiser, {}, "denoising_unet.pth")
    msg = str(info.value)
    # every key but the 42 optional pos_encoder.pe buffers; only 5 named in the message
    assert len(info.value.missing) == 1274 - 42
    assert f"{1274 - 42} missing keys (conv_in.weight, conv_in.bias, " in msg
    assert f"… +{1274 - 42 - 5})" in msg
    assert len(msg) < 400


# --------------------------------------------------------------------------- folders and files


def _tiny_weights(seed: int = 3):
    return load_model_weights(get_model_spec("lcp-tiny"), None, seed=seed)


def test_random_weights_are_seeded():
    a, b, c = _tiny_weights(1), _tiny_weights(1), _tiny_weights(2)
    assert a.random_weights
    wa, wb, wc = (w.denoiser.conv_in.weight for w in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_folder_round_trip_pth_and_safetensors(tmp_path):
    """.pth (wrapped in state_dict) + .safetensors; motion modules inside the denoiser file,
    without the pe buffers (they are recomputed)."""
    src = _tiny_weights()
    torch.save({"state_dict": src.reference_net.state_dict()}, tmp_path / "reference_unet.pth")
    den = {k: v for k, v in src.denoiser.state_dict().items() if not k.endswith("pos_encoder.pe")}
    save_file(den, str(tmp_path / "denoising_unet.safetensors"))
    torch.save(src.face_locator.state_dict(), tmp_path / "face_locator.pt")
    got = load_model_weights(get_model_spec("lcp-tiny"), tmp_path, "cpu", "float32")
    assert not got.random_weights
    assert "motion_module" not in got.files
    for a, b in ((src.reference_net, got.reference_net), (src.denoiser, got.denoiser)):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert not any(t.is_meta for t in got.denoiser.state_dict().values())


def test_folder_with_separate_motion_file(tmp_path):
    src = _tiny_weights()
    state = src.denoiser.state_dict()
    save_file(src.reference_net.state_dict(), str(tmp_path / "reference_unet.safetensors"))
    save_file(
        {k: v for k, v in state.items() if MOTION not in k},
        str(tmp_path / "denoising_unet.safetensors"),
    )
    save_file(
        {k: v for k, v in state.items() if MOTION in k}, str(tmp_path / "motion_module.safetensors")
    )
    save_file(src.face_locator.state_dict(), str(tmp_path / "face_locator.safetensors"))
    got = load_model_weights(get_model_spec("lcp-tiny"), tmp_path)
    assert set(got.files) == {"reference_unet", "denoising_unet", "motion_module", "face_locator"}
    for k, v in got.denoiser.state_dict().items():
        assert torch.equal(v, state[k]), k
    # without the motion file the denoiser is incomplete
    (tmp_path / "motion_module.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="motion_module"):
        load_model_weights(get_model_spec("lcp-tiny"), tmp_path)


def test_folder_errors(tmp_path):
    spec = get_model_spec("lcp-tiny")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_weights(spec, tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="reference_unet.pth.*face_locator.pth"):
        load_model_weights(spec, tmp_path)
    (tmp_path / "x.pth").write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError, match="x.pth: cannot read weights"):
        load_state_file(tmp_path / "x.pth")
    # weights of another size: the message names the file and a mismatching key
    src = _tiny_weights()
    save_file(src.reference_net.state_dict(), str(tmp_path / "reference_unet.safetensors"))
    save_file(src.denoiser.state_dict(), str(tmp_path / "denoising_unet.safetensors"))
    save_file(src.face_locator.state_dict(), str(tmp_path / "face_locator.safetensors"))
    with pytest.raises(
        StateDictMismatchError, match=r"^reference_unet.safetensors: .*shape mismatch"
    ):
        load_model_weights(get_model_spec("echomimic-v1"), tmp_path)


def test_pickles_are_weights_only(tmp_path):
    torch.save({"w": torch.zeros(1), "obj": Path("x")}, tmp_path / "evil.pth")
    with pytest.raises(ModelLoadError, match="evil.pth"):
        load_state_file(tmp_path / "evil.pth")


# --------------------------------------------------------------------------- specs


def test_named_specs():
    assert set(MODELS) >= {"echomimic-v1", "echomimic-v1-acc", "lcp-tiny"}
    full, acc, tiny = (get_model_spec(n) for n in ("echomimic-v1", "echomimic-v1-acc", "lcp-tiny"))
    assert (full.steps, full.guidance, full.fps, full.resolution) == (30, 2.5, 24, 512)
    assert (acc.steps, acc.guidance, acc.weight_suffix) == (6, 1.0, "_acc")
    assert acc.unet == full.unet and full.bank_dtype == "float16"
    assert full.unet.cross_attention_dim == 384 and full.unet.audio_scale == 3.0
    assert tiny.latent_channels == 32 and tiny.latent_size == 16 and tiny.bank_dtype is None
    assert tiny.codec == "dct-ycbcr" and tiny.latent_origin == "reference"
    assert tiny.prediction_type == "sample" and full.prediction_type == "v_prediction"
    assert tiny.audio_window_position > 0 and full.audio_window_position == 0
    assert tiny.face_locator.downsample_factor == tiny.codec_factor
    assert tiny.change_blur > 0 and full.change_blur == 0  # a VAE decodes no change alone
    with pytest.raises(ConfigError, match="echomimic-v1.*lcp-tiny"):
        get_model_spec("nope")


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(block_out_channels=(30, 64, 64, 64))
    with pytest.raises(ValueError, match="attention_blocks"):
        UNetConfig(block_out_channels=(32, 64))
    with pytest.raises(ValueError, match="face locator downsamples by 4, the codec by 8"):
        replace(get_model_spec("lcp-tiny"), face_locator=FaceLocatorConfig(32, 4, (8, 16, 32)))
    with pytest.raises(ValueError, match="face locator gives 64 channels"):
        replace(get_model_spec("lcp-tiny"), face_locator=FaceLocatorConfig(64, 4, (8, 16, 32, 64)))
    with pytest.raises(ValueError, match="face locator reads 1 channels, the spec gives it 4"):
        replace(get_model_spec("lcp-tiny"), face_locator=FaceLocatorConfig(32, 1, (8, 16, 32, 32)))
    with pytest.raises(ValueError, match="locator_reference needs mouth_track"):
        replace(get_model_spec("lcp-tiny"), mouth_track=False)
    with pytest.raises(ValueError, match="latent_channels"):
        replace(get_model_spec("echomimic-v1"), latent_channels=8)
    with pytest.raises(ValueError, match="change_blur needs latents relative to the reference"):
        replace(get_model_spec("echomimic-v1"), change_blur=1.0)  # a VAE is not linear
    with pytest.raises(ValueError, match="change_blur must be >= 0"):
        replace(get_model_spec("lcp-tiny"), change_blur=-1.0)
    with pytest.raises(ValueError, match="audio_window_position needs the mel encoder"):
        replace(get_model_spec("echomimic-v1"), audio_window_position=0.5)
