"""Our EchoMimic-v1 re-implementation reproduces the official code's outputs.

``data/golden/`` is a copy of ``shared/checkpoints/golden/``: reduced-size random weights
in the official layout and tensors captured from the official pipeline (see its
README.md for every quirk).  All comparisons are float32 on CPU, max abs error <= 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from lightningcp_cli.models.loading import load_model_weights

GOLDEN = Path(__file__).parent / "data" / "golden"
TOL = 1e-4
CFG_SCALE = 2.5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest, and it cannot stall when other
    processes share the CPU (two OpenMP threads on a busy 2-core machine can)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "inputs_outputs.safetensors"))


@pytest.fixture(scope="module")
def nets(golden_spec):  # the reduced spec of golden/config.json (conftest.py)
    return load_model_weights(golden_spec, GOLDEN, "cpu", torch.float32)


@pytest.fixture(scope="module")
def bank32(nets, io):
    with torch.inference_mode():
        return nets.reference_net(io["ref_latents"], io["ref_timestep"], bank_dtype=torch.float32)


@pytest.fixture(scope="module")
def run_a(nets, io, bank32):
    """Run A (CFG): the denoiser call of step 0 with the fp16 bank (default) and fp32."""
    with torch.inference_mode():
        bank16 = nets.reference_net(io["ref_latents"], io["ref_timestep"])
        args = (
            io["unet_in_sample"],
            io["unet_in_timestep"],
            io["unet_in_audio_cond_fea"],
            io["unet_in_face_musk_fea"],
        )
        rows = torch.tensor([False, True])
        return {
            "bank16": bank16,
            "unet_out": nets.denoiser(*args, bank16, rows),
            "unet_out_bankfp32": nets.denoiser(*args, bank32, rows),
        }


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def scheduler() -> DDIMScheduler:
    cfg = json.loads((GOLDEN / "config.json").read_text())["noise_scheduler_kwargs"]
    sched = DDIMScheduler(**cfg)
    sched.set_timesteps(30)
    return sched


def test_loaded_from_golden_files(nets):
    assert not nets.random_weights
    assert set(nets.files) == {"reference_unet", "denoising_unet", "motion_module", "face_locator"}


def test_reference_bank(bank32, io):
    names = {k[len("ref_bank.") :] for k in io if k.startswith("ref_bank.")}
    assert set(bank32) == names and len(names) == 16
    for name in names:
        assert bank32[name].dtype == torch.float32
        assert err(bank32[name], io[f"ref_bank.{name}"]) <= TOL, name


def test_bank_dtype_default_is_the_spec_float16(run_a, bank32):
    bank16 = run_a["bank16"]
    assert all(v.dtype == torch.float16 for v in bank16.values())
    key = "mid_block.attentions.0.transformer_blocks.0"
    assert torch.equal(bank16[key], bank32[key].half())


def test_face_locator(nets, io):
    with torch.inference_mode():
        out = nets.face_locator(io["face_mask"])
        assert err(out, io["face_locator_out"]) <= TOL
        # a 4-D mask [B, 1, H, W] is one frame
        assert err(nets.face_locator(io["face_mask"][:, :, 0]), io["face_locator_out"]) <= TOL


def test_unet_out_fp16_bank(run_a, io):
    assert err(run_a["unet_out"], io["unet_out"]) <= TOL
    # closer to the fp16-bank golden than to the fp32-bank one (they differ by 6.6e-5)
    assert err(run_a["unet_out"], io["unet_out"]) < err(run_a["unet_out"], io["unet_out_bankfp32"])


def test_unet_out_fp32_bank(run_a, io):
    assert err(run_a["unet_out_bankfp32"], io["unet_out_bankfp32"]) <= TOL
    # the rounding matters (6.6e-5 upstream), so the fp16 bank was really used above
    assert err(run_a["unet_out"], run_a["unet_out_bankfp32"]) > 1e-6


def test_unet_without_cfg(nets, io, run_a):
    """Run B: guidance 1 (B=1), the same fp16 bank, ref_rows None = every row."""
    with torch.inference_mode():
        out = nets.denoiser(
            io["init_latents_F4"],
            int(io["unet_in_timestep"]),
            io["audio_fea_final_F4"],
            io["face_locator_out"],
            run_a["bank16"],
        )
    assert err(out, io["nocfg_unet_out"]) <= TOL
    step = scheduler().step(out, 999, io["init_latents_F4"], eta=0.0)
    assert err(step.prev_sample, io["nocfg_ddim_out_prev_sample"]) <= TOL
    # rows are independent: the conditional CFG row is the same computation
    assert err(run_a["unet_out"][1:], out) <= TOL


def test_ddim_step(run_a, io):
    sched = scheduler()
    assert sched.timesteps.tolist() == io["ddim_timesteps"].tolist()
    for suffix in ("", "_bankfp32"):
        u, c = run_a[f"unet_out{suffix}"].chunk(2)
        pred = u + CFG_SCALE * (c - u)
        if not suffix:
            assert err(pred, io["ddim_in_model_output"]) <= TOL
        out = sched.step(pred, 999, io["init_latents_F4"], eta=0.0)
        assert err(out.prev_sample, io[f"ddim_out_prev_sample{suffix}"]) <= TOL
        if not suffix:
            assert err(out.pred_original_sample, io["ddim_out_pred_original_sample"]) <= TOL


@pytest.mark.parametrize("t", [966, 499, 32])
def test_ddim_step_other_timesteps(io, t):
    out = scheduler().step(io["ddim_in_model_output"], t, io["ddim_in_sample"], eta=0.0)
    assert err(out.prev_sample, io[f"ddim_extra_prev_sample_t{t}"]) <= TOL
    assert err(out.pred_original_sample, io[f"ddim_extra_pred_original_sample_t{t}"]) <= TOL


# --------------------------------------------------------------------------- seams


def test_lightningcp_seam_reproduces_forward(nets, io, run_a):
    """Capture the last layer's input with a hook; replay only the last layer + head."""
    den = nets.denoiser
    captured = []
    handle = den.last_layer_input.register_forward_hook(lambda m, a, out: captured.append(out))
    args = (
        io["unet_in_sample"],
        io["unet_in_timestep"],
        io["unet_in_audio_cond_fea"],
        io["unet_in_face_musk_fea"],
        run_a["bank16"],
        torch.tensor([False, True]),
    )
    try:
        with torch.inference_mode():
            full = den(*args)
            state = den.prepare(*args)
            fast = den.run_head(state, den.run_last_layer(state, captured[0]))
    finally:
        handle.remove()
    assert len(captured) == 1
    assert captured[0].shape == (2 * 4, 32, 16, 24)
    assert torch.equal(fast, full)
    assert err(full, io["unet_out"]) <= TOL


def test_bank_is_optional_per_layer(nets, io, run_a):
    """Dropping a layer's bank entry = plain self-attention there; no bank = all plain."""
    den = nets.denoiser
    args = (io["init_latents_F4"], 999, io["audio_fea_final_F4"], io["face_locator_out"])
    bank = dict(run_a["bank16"])
    with torch.inference_mode():
        full = den(*args, bank)
        dropped = den(*args, {k: v for k, v in bank.items() if not k.startswith("up_blocks.3")})
        none = den(*args, None)
        rows_off = den(*args, bank, torch.tensor([False]))
    assert err(full, io["nocfg_unet_out"]) <= TOL
    assert err(dropped, full) > 1e-3 and err(none, dropped) > 1e-3
    assert torch.equal(rows_off, none)
    with pytest.raises(ValueError, match="keys this model does not have"):
        den(*args, {"nope": bank["mid_block.attentions.0.transformer_blocks.0"]})


def test_bank_with_one_row_per_batch_row(nets, io, run_a):
    """The official reader duplicates the bank for CFG (``cat([v, v])``): same result."""
    bank2 = {k: torch.cat([v, v]) for k, v in run_a["bank16"].items()}
    with torch.inference_mode():
        out = nets.denoiser(
            io["unet_in_sample"],
            io["unet_in_timestep"],
            io["unet_in_audio_cond_fea"],
            io["unet_in_face_musk_fea"],
            bank2,
            [False, True],
        )
    assert err(out, run_a["unet_out"]) <= 1e-5


def test_odd_latent_sizes_and_limits(nets, io, run_a):
    """Latents that are not a multiple of 8 upsample to the skip sizes (as diffusers)."""
    den = nets.denoiser
    with torch.inference_mode():
        bank = nets.reference_net(torch.randn(1, 4, 12, 20))
        out = den(torch.randn(2, 4, 3, 12, 20), 500, torch.randn(2, 3, 50, 384), None, bank)
        assert out.shape == (2, 4, 3, 12, 20) and torch.isfinite(out).all()
        with pytest.raises(ValueError, match="motion modules allow 32"):
            den(torch.randn(1, 4, 33, 8, 8), 500, torch.randn(1, 33, 50, 384))
        with pytest.raises(ValueError, match="audio must be"):
            den(torch.randn(1, 4, 2, 8, 8), 500, torch.randn(1, 2, 50, 80))
