"""Shared fixtures.  Append new ones; keep each small and documented.

Golden vector (``data/golden/``, a copy of ``shared/checkpoints/golden/``): reduced-size
EchoMimic v1 weights plus the official pipeline's inputs and outputs; see its README.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightningcp_cli.models.face_locator import FaceLocatorConfig
from lightningcp_cli.models.registry import ModelSpec
from lightningcp_cli.models.unet import UNetConfig

GOLDEN_DIR = Path(__file__).parent / "data" / "golden"


def golden_spec_from_config(config: dict) -> ModelSpec:
    """The reduced EchoMimic model of ``golden/config.json`` as a :class:`ModelSpec`."""
    unet = config["denoising_unet"]["effective_config"]
    motion = unet["motion_module_kwargs"]
    locator = config["face_locator"]
    unet_config = UNetConfig(
        in_channels=unet["in_channels"],
        out_channels=unet["out_channels"],
        block_out_channels=tuple(unet["block_out_channels"]),
        attention_blocks=tuple("CrossAttn" in t for t in unet["down_block_types"]),
        layers_per_block=unet["layers_per_block"],
        attention_heads=unet["attention_head_dim"],  # diffusers' naming quirk: = heads
        norm_num_groups=unet["norm_num_groups"],
        norm_eps=unet["norm_eps"],
        cross_attention_dim=unet["cross_attention_dim"],
        flip_sin_to_cos=unet["flip_sin_to_cos"],
        freq_shift=unet["freq_shift"],
        downsample_padding=unet["downsample_padding"],
        motion_heads=motion["num_attention_heads"],
        motion_max_len=motion["temporal_position_encoding_max_len"],
        motion_norm_groups=config["notes"]["motion_module_groupnorm_groups"],
        motion_resolutions=tuple(unet["motion_module_resolutions"]),
        motion_mid_block=unet["motion_module_mid_block"],
    )
    return ModelSpec(
        name="golden-reduced",
        description="reduced EchoMimic v1 of the golden test vector (random weights)",
        unet=unet_config,
        face_locator=FaceLocatorConfig(
            out_channels=locator["conditioning_embedding_channels"],
            conditioning_channels=locator["conditioning_channels"],
            block_out_channels=tuple(locator["block_out_channels"]),
        ),
        audio_encoder="whisper-tiny",
        codec="sd-vae",
        codec_factor=8,
        latent_channels=unet["in_channels"],
        resolution=128,
        fps=24,
        steps=30,
        guidance=2.5,
        bank_dtype="float16",  # EchoMimic's ReferenceAttentionControl.update default
    )


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def golden_io() -> dict[str, torch.Tensor]:
    """Every tensor of ``inputs_outputs.safetensors`` (inputs, intermediates, outputs)."""
    return load_file(GOLDEN_DIR / "inputs_outputs.safetensors")


@pytest.fixture(scope="session")
def golden_spec() -> ModelSpec:
    return golden_spec_from_config(json.loads((GOLDEN_DIR / "config.json").read_text()))


@pytest.fixture(scope="session")
def golden_models(golden_spec):
    """ReferenceNet, VideoUNet and FaceLocator with the golden weights, float32 on CPU."""
    from lightningcp_cli.models.loading import load_model_weights

    return load_model_weights(golden_spec, GOLDEN_DIR, "cpu", torch.float32)


@pytest.fixture(scope="session")
def golden_bank(golden_io) -> dict[str, torch.Tensor]:
    """The official reference banks (float32, before EchoMimic's float16 cast)."""
    prefix = "ref_bank."
    return {k[len(prefix) :]: v for k, v in golden_io.items() if k.startswith(prefix)}


def build_tiny_corpus(folder: Path) -> Path:
    """The data engine's corpus at test size: the three committed clips (+1 variant each),
    one held-out clip (``speech_2s.wav``), all five portraits and their morphs; no
    espeak-ng; every waveform kept.  Seconds to build, deterministic."""
    from lightningcp_cli.train.dataset import build_corpus

    return build_corpus(
        folder,
        seed=3,
        n_utterances=0,
        n_heldout=0,
        clip_variants=1,
        heldout_clips=[Path(__file__).parent / "data" / "speech_2s.wav"],
        use_espeak=False,
        waveforms="all",
    )


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny corpus (:func:`build_tiny_corpus`) shared by the whole session."""
    return build_tiny_corpus(tmp_path_factory.mktemp("corpus") / "c")
