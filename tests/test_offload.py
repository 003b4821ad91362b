"""``--offload``: networks wait in CPU memory and go to the accelerator one at a time.

This machine has no GPU, so the copies themselves are no-ops here; what is tested is the
bookkeeping (which network is resident, when it swaps, that any entry point of a network
brings it in, that the hooks come off) and that an offloaded render is bit-identical to
a plain one, accelerated sampler included.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightningcp_cli import api
from lightningcp_cli.config import DenoiseConfig, OutputConfig, RenderConfig
from lightningcp_cli.models.bundle import load_model
from lightningcp_cli.models.offload import ModelOffload, _to_device

from .cli_util import FACE, FAST, SPEECH, run_lcp


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))


def test_one_network_resident_at_a_time_in_call_order():
    a, b = _net(), _net()
    x = torch.randn(2, 4)
    expected = b(a(x))
    offload = ModelOffload({"a": a, "b": b}, "cpu")
    assert offload.resident is None and offload.swaps == 0
    a(x)
    assert (offload.resident, offload.swaps) == ("a", 1)
    a(x)
    assert offload.swaps == 1  # staying resident costs no copy
    b[2](x)  # a submodule called directly (as the LightningCP sampler does) brings its net
    assert (offload.resident, offload.swaps) == ("b", 2)
    torch.testing.assert_close(b(a(x)), expected, rtol=0, atol=0)
    assert offload.swaps == 4
    offload.remove()
    a(x)
    assert offload.resident is None and offload.swaps == 4  # no hook left behind
    assert not any(m._forward_pre_hooks for m in [*a.modules(), *b.modules()])


def test_call_arguments_are_sent_to_the_accelerator_nested_too():
    t = torch.ones(2)
    moved = _to_device({"bank": {"k": t}, "pair": (t, [t]), "n": 3}, torch.device("meta"))
    assert moved["bank"]["k"].is_meta and moved["pair"][0].is_meta and moved["pair"][1][0].is_meta
    assert moved["n"] == 3 and isinstance(moved["pair"], tuple)
    assert _to_device(t, torch.device("cpu")) is t  # already there: no copy


def test_offloaded_render_is_identical_and_swaps_per_network(tmp_path: Path):
    cfg = RenderConfig(
        accel="full",
        denoise=DenoiseConfig(steps=4),
        output=OutputConfig(fps=8),
        use_cache=False,
    )
    plain = api.render(api.RenderRequest(FACE, SPEECH, tmp_path / "a.mp4", cfg), keep_frames=True)
    model = load_model("lcp-tiny", offload=True)
    assert model.offload is not None
    assert set(model.offload.networks) == {"reference_net", "face_locator", "denoiser"}
    result = api.render(
        api.RenderRequest(FACE, SPEECH, tmp_path / "b.mp4", cfg), model=model, keep_frames=True
    )
    for x, y in zip(plain.crop_frames, result.crop_frames, strict=True):
        np.testing.assert_array_equal(x, y)
    # reference pass, face locator, then the denoiser stays through every step
    assert (model.offload.resident, model.offload.swaps) == ("denoiser", 3)


def test_cli_offload_flag_reaches_the_saved_config(tmp_path: Path):
    out = tmp_path / "o.mp4"
    proc = run_lcp("render", FACE, SPEECH, "-o", out, *FAST, "--offload", cache_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.with_name("o.mp4.json").read_text())["config"]["offload"] is True
