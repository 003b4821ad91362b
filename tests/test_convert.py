"""``lcp convert``: pickled official weights -> verified .safetensors copies that the
loader then prefers, with identical tensors (real CLI, real files on disk)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lightningcp_cli.models.loading import load_model_weights
from lightningcp_cli.models.whisper import (
    WhisperDims,
    WhisperEncoder,
    load_whisper_encoder,
    whisper_state_dict,
)

from .cli_util import run_lcp
from .conftest import GOLDEN_DIR

NETS = ("reference_unet", "denoising_unet", "motion_module", "face_locator")
DIMS = WhisperDims(n_audio_state=32, n_audio_head=2, n_audio_layer=1)


def _official_pickles(folder: Path) -> Path:
    """The golden weights as EchoMimic distributes them: .pth pickles, plus a tiny
    whisper checkpoint in OpenAI's format."""
    folder.mkdir()
    for name in NETS:
        torch.save(load_file(str(GOLDEN_DIR / f"{name}.safetensors")), folder / f"{name}.pth")
    (folder / "audio_processor").mkdir()
    torch.manual_seed(0)
    state = whisper_state_dict(WhisperEncoder(DIMS))
    checkpoint = {"dims": asdict(DIMS), "model_state_dict": state}
    torch.save(checkpoint, folder / "audio_processor" / "whisper_tiny.pt")
    return folder


def _params(nets) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{k}": v
        for i, m in enumerate((nets.reference_net, nets.denoiser, nets.face_locator))
        for k, v in m.state_dict().items()
    }


def test_convert_writes_identical_safetensors(tmp_path: Path, golden_spec) -> None:
    folder = _official_pickles(tmp_path / "echomimic")
    from_pickles = _params(load_model_weights(golden_spec, folder))

    res = run_lcp("convert", folder, "--json", "--quiet", cache_dir=tmp_path)
    assert res.returncode == 0, res.stderr
    written = sorted(json.loads(res.stdout)["written"])
    assert written == sorted(
        str(folder / f"{n}.safetensors") for n in (*NETS, "audio_processor/whisper_tiny")
    )
    assert not list(folder.rglob("*.lcp-tmp"))
    for name in NETS:  # the pickles can go: the copies alone load
        (folder / f"{name}.pth").unlink()
    from_copies = _params(load_model_weights(golden_spec, folder))
    assert from_copies.keys() == from_pickles.keys()
    assert all(torch.equal(from_copies[k], from_pickles[k]) for k in from_pickles)

    audio = np.random.default_rng(0).standard_normal(16_000).astype(np.float32) * 0.1
    pt = load_whisper_encoder(folder / "audio_processor" / "whisper_tiny.pt").encode(audio)
    st = load_whisper_encoder(folder / "audio_processor" / "whisper_tiny.safetensors")
    assert torch.equal(st.encode(audio), pt)


def test_convert_refuses_to_overwrite_and_empty_folders(tmp_path: Path) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    torch.save(load_file(str(GOLDEN_DIR / "face_locator.safetensors")), folder / "face_locator.pth")
    assert run_lcp("convert", folder, "-q", cache_dir=tmp_path).returncode == 0
    again = run_lcp("convert", folder, "-q", cache_dir=tmp_path)
    assert again.returncode == 15 and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert run_lcp("convert", folder, "-q", "--overwrite", cache_dir=tmp_path).returncode == 0
    empty = run_lcp("convert", tmp_path / "nothing", cache_dir=tmp_path)
    assert empty.returncode == 20 and "does not exist" in empty.stderr
