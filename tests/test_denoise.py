"""Denoise stage: context windows, initial noise, the loop's seam, and the golden runs.

The golden tests run the whole loop on the reduced EchoMimic model of
``data/golden/`` (fixtures in ``conftest.py``) and compare with the official pipeline's
latents; tolerance 1e-4 (float32 run-to-run noise there is < 1e-6).
"""

from __future__ import annotations

import contextlib
from itertools import pairwise

import pytest
import torch

from lightningcp_cli.api import resolve_denoise
from lightningcp_cli.config import DenoiseConfig, RenderConfig
from lightningcp_cli.errors import LcpError, NonFiniteError
from lightningcp_cli.models.codec import YCBCR_LUMA_CHANNELS
from lightningcp_cli.models.registry import get_model_spec
from lightningcp_cli.stages.denoise import (
    EpsilonScaledDDIMScheduler,
    Sampler,
    StepContext,
    as_clean,
    as_noise,
    context_windows,
    denoise,
    initial_latents,
    make_scheduler,
)

# --- context windows (pure) -------------------------------------------------------------


def test_windows_16_frames_step0_match_echomimic():
    assert context_windows(16, 12, 3, 0) == [
        list(range(12)),
        [9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4],
    ]


def test_windows_shift_by_two_frames_per_step():
    base = context_windows(16, 12, 3, 0)
    for step in (1, 5, 29):
        shifted = context_windows(16, 12, 3, step)
        assert shifted == [[(f + 2 * step) % 16 for f in w] for w in base]


def test_short_video_is_one_rotated_window():
    assert context_windows(4, 12, 3, 0) == [[0, 1, 2, 3]]
    assert context_windows(4, 12, 3, 1) == [[2, 3, 0, 1]]
    assert context_windows(12, 12, 3, 0) == [list(range(12))]
    assert context_windows(1, 12, 3, 7) == [[0]]


@pytest.mark.parametrize("num_frames", [1, 5, 12, 13, 16, 24, 25, 50])
@pytest.mark.parametrize(("size", "overlap"), [(12, 3), (12, 0), (4, 3), (1, 0)])
def test_every_frame_covered_every_step(num_frames, size, overlap):
    for step in range(6):
        windows = context_windows(num_frames, size, overlap, step)
        covered = {f for w in windows for f in w}
        assert covered == set(range(num_frames))
        for w in windows:
            assert len(w) == min(size, num_frames)
            assert len(set(w)) == len(w)  # no frame twice in one window
            # consecutive frames, wrapping around the end
            assert all((b - a) % num_frames == 1 for a, b in pairwise(w))


def test_wrap_around_for_24_frames():
    assert context_windows(24, 12, 3, 0)[-1] == [18, 19, 20, 21, 22, 23, 0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "args", [(0, 12, 3, 0), (16, 0, 0, 0), (16, 12, 12, 0), (16, 12, -1, 0), (16, 12, 3, -1)]
)
def test_windows_reject_bad_arguments(args):
    with pytest.raises(ValueError):
        context_windows(*args)


# --- scheduler and initial noise -------------------------------------------------------


def test_scheduler_matches_golden_tables(golden_io):
    s = make_scheduler()
    s.set_timesteps(30)
    assert torch.equal(s.timesteps, golden_io["ddim_timesteps"])
    # float32 cumprod rounds differently on different CPU vector paths (3e-7 seen on an
    # AVX-512 AMD EPYC), so the table is equal up to that rounding, not bit for bit
    torch.testing.assert_close(
        s.alphas_cumprod, golden_io["ddim_alphas_cumprod"], rtol=0, atol=1e-6
    )
    out = s.step(golden_io["ddim_in_model_output"], 999, golden_io["ddim_in_sample"], eta=0.0)
    assert (out.prev_sample - golden_io["ddim_out_prev_sample"]).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["sample", "v_prediction", "epsilon"])
def test_as_clean_recovers_the_clean_latent_of_each_prediction_type(kind):
    """A model output that is exactly right implies the clean latent it was made from,
    the same x0 that the scheduler's own step reports."""
    s = make_scheduler(kind)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 5, 5, generator=g), torch.randn(2, 4, 3, 5, 5, generator=g)
    for t in (0, 400, 900):
        a = s.alphas_cumprod[t]
        noisy = s.add_noise(x0, eps, torch.tensor([t, t]))
        out = {"sample": x0, "epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}
        torch.testing.assert_close(as_clean(s, out[kind], t, noisy), x0, rtol=1e-4, atol=1e-4)
        s.set_timesteps(1000)
        step_x0 = s.step(out[kind], t, noisy).pred_original_sample
        torch.testing.assert_close(as_clean(s, out[kind], t, noisy), step_x0)


@pytest.mark.parametrize("kind", ["sample", "v_prediction", "epsilon"])
def test_epsilon_scaling_shrinks_only_the_noise_direction(kind):
    plain, scaled = make_scheduler(kind), make_scheduler(kind, epsilon_scaling=0.1)
    assert type(plain) is not EpsilonScaledDDIMScheduler
    assert isinstance(scaled, EpsilonScaledDDIMScheduler)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(1, 4, 2, 3, 3, generator=g), torch.randn(1, 4, 2, 3, 3, generator=g)
    for s in (plain, scaled):
        s.set_timesteps(25)
    for t in scaled.timesteps[1:4]:  # timesteps where the prediction fixes x0 and eps
        t = int(t)
        a_prev = scaled.alphas_cumprod[t - 40]  # 25 steps: 40 timesteps apart
        ref = plain.step(out, t, x)
        eps = as_noise(plain, out, t, x)
        expected = a_prev.sqrt() * ref.pred_original_sample
        expected = expected + (1 - a_prev).sqrt() * eps / (1 + 0.1 * t / 1000)
        got = scaled.step(out, t, x)
        torch.testing.assert_close(got.pred_original_sample, ref.pred_original_sample)
        torch.testing.assert_close(got.prev_sample, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got.prev_sample, ref.prev_sample)
        assert torch.equal(scaled.step(out, t, x, return_dict=False)[0], got.prev_sample)
    # the zero-SNR first step (a = 0) stays finite: x0 is kept, not recovered from eps
    # (an epsilon predictor has no x0 there, with or without scaling)
    if kind != "epsilon":
        assert torch.isfinite(scaled.step(out, int(scaled.timesteps[0]), x).prev_sample).all()
    with pytest.raises(ValueError, match="deterministic"):
        scaled.step(out, int(scaled.timesteps[1]), x, eta=1.0)


def test_epsilon_scaling_zero_is_plain_ddim_and_reaches_the_loop():
    zero = EpsilonScaledDDIMScheduler(0.0, **make_scheduler().config)
    zero.set_timesteps(10)
    plain = make_scheduler()
    plain.set_timesteps(10)
    x = torch.randn(1, 4, 2, 3, 3)
    assert torch.equal(zero.step(x, 900, x).prev_sample, plain.step(x, 900, x).prev_sample)
    audio = torch.linspace(-1, 1, 4 * 6 * 5).reshape(4, 6, 5)
    runs = [
        denoise(
            LinearDenoiser(), audio, None, None,
            DenoiseConfig(steps=3, guidance=1.0, epsilon_scaling=k), (4, 4, 6),
        )
        for k in (None, 0.0, 0.1)
    ]  # fmt: skip
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    with pytest.raises(LcpError, match="epsilon scaling"):
        DenoiseConfig(epsilon_scaling=2.0)


def test_epsilon_scaling_defaults_to_the_models():
    def resolved(model: str, **denoise) -> float:
        cfg = RenderConfig(model=model, denoise=DenoiseConfig(**denoise))
        return resolve_denoise(cfg, get_model_spec(model)).epsilon_scaling

    assert resolved("echomimic-v1") == 0.0  # the official sampler
    assert resolved("lcp-tiny") == get_model_spec("lcp-tiny").epsilon_scaling > 0
    assert resolved("lcp-tiny", epsilon_scaling=0.0) == 0.0


@pytest.mark.parametrize("frames", [4, 16])
def test_initial_latents_reproduce_golden(golden_io, frames):
    x = initial_latents((1, 4, frames, 16, 24), seed=420, clamp=1.5)
    assert torch.equal(x, golden_io[f"init_latents_F{frames}"])


def test_initial_latents_clamped_and_seeded():
    a = initial_latents((2, 4, 8, 8, 8), seed=1, clamp=0.5, dtype=torch.bfloat16)
    b = initial_latents((2, 4, 8, 8, 8), seed=1, clamp=0.5, dtype=torch.bfloat16)
    c = initial_latents((2, 4, 8, 8, 8), seed=2, clamp=0.5, dtype=torch.bfloat16)
    assert a.dtype == torch.bfloat16 and a.abs().max() <= 0.5
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)  # the global generator plays no part
    assert torch.equal(a, initial_latents((2, 4, 8, 8, 8), seed=1, clamp=0.5, dtype=torch.bfloat16))


# --- the loop with a stand-in denoiser ---------------------------------------------------


class LinearDenoiser(torch.nn.Module):
    """Cheap deterministic stand-in: depends on sample, timestep, audio, face, bank rows."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, sample, timestep, audio, face_feature=None, bank=None, ref_rows=None):
        self.calls.append(
            {
                "batch": sample.shape[0],
                "frames": sample.shape[2],
                "ref_rows": None if ref_rows is None else ref_rows.tolist(),
                "audio_zero": [bool((a == 0).all()) for a in audio],
            }
        )
        out = 0.5 * sample + 1e-3 * timestep.float()
        out = out + audio.mean(dim=(2, 3))[:, None, :, None, None]
        if face_feature is not None:
            out = out + face_feature.mean(dim=1, keepdim=True)
        return out


def _run(denoiser, frames=16, guidance=2.5, steps=4, sampler=None, on_progress=None):
    audio = torch.linspace(-1, 1, frames * 6 * 5).reshape(frames, 6, 5)
    face = torch.ones(1, 3, 1, 4, 6)
    cfg = DenoiseConfig(steps=steps, guidance=guidance, context_frames=12, context_overlap=3)
    return denoise(
        denoiser, audio, face, None, cfg, (4, 4, 6), on_progress=on_progress, sampler=sampler
    )


def test_loop_calls_cfg_batch_per_window_and_reports_progress():
    model = LinearDenoiser()
    progress = []
    out = _run(model, on_progress=lambda *a: progress.append(a))
    assert out.shape == (1, 4, 16, 4, 6) and torch.isfinite(out).all()
    assert len(model.calls) == 4 * 2  # steps x windows
    assert all(c["batch"] == 2 and c["frames"] == 12 for c in model.calls)
    assert all(c["ref_rows"] == [False, True] for c in model.calls)
    assert all(c["audio_zero"] == [True, False] for c in model.calls)
    assert progress == [("denoise", i, 4) for i in range(5)]


def test_loop_without_cfg_runs_one_conditional_row():
    model = LinearDenoiser()
    _run(model, frames=4, guidance=1.0, steps=2)
    assert [c["batch"] for c in model.calls] == [1, 1]
    assert all(c["ref_rows"] == [True] and c["audio_zero"] == [False] for c in model.calls)


def test_loop_is_deterministic():
    assert torch.equal(_run(LinearDenoiser()), _run(LinearDenoiser()))


def test_chroma_guidance_scales_only_the_colour_channels():
    """The stand-in treats channels independently, so with colour guidance from channel 3
    on, channels 0-2 are the run at ``guidance`` and channel 3 the run at the colour scale."""
    audio = torch.linspace(-1, 1, 16 * 6 * 5).reshape(16, 6, 5)
    face = torch.ones(1, 3, 1, 4, 6)

    def run(model=None, **guidance) -> torch.Tensor:
        cfg = DenoiseConfig(steps=3, context_frames=12, context_overlap=3, **guidance)
        return denoise(model or LinearDenoiser(), audio, face, None, cfg, (4, 4, 6))

    at2, at3 = run(guidance=2.0), run(guidance=3.0)
    mixed = run(guidance=2.0, chroma_guidance=3.0, chroma_channel=3)
    assert not torch.allclose(at2, at3)
    assert torch.equal(mixed[:, :3], at2[:, :3]) and torch.equal(mixed[:, 3:], at3[:, 3:])
    model = LinearDenoiser()  # guidance 1 with colour guidance still runs the CFG rows
    run(model, guidance=1.0, chroma_guidance=3.0, chroma_channel=3)
    assert {c["batch"] for c in model.calls} == {2}
    with pytest.raises(ValueError, match="colour channel"):
        run(guidance=2.0, chroma_guidance=3.0)  # unresolved: which channels are colour?
    with pytest.raises(LcpError, match="chroma guidance"):
        DenoiseConfig(chroma_guidance=-1.0)


def test_chroma_guidance_defaults_to_the_models():
    def resolved(model: str, **denoise) -> DenoiseConfig:
        cfg = RenderConfig(model=model, denoise=DenoiseConfig(**denoise))
        return resolve_denoise(cfg, get_model_spec(model))

    tiny = resolved("lcp-tiny")
    assert tiny.chroma_guidance == get_model_spec("lcp-tiny").chroma_guidance
    assert tiny.chroma_channel == YCBCR_LUMA_CHANNELS == 24  # Y first, then Cb and Cr
    assert resolved("lcp-tiny", chroma_guidance=1.5).chroma_guidance == 1.5
    official = resolved("echomimic-v1")  # VAE latents: one scale for every channel
    assert official.chroma_guidance is None and official.chroma_channel is None
    with pytest.raises(LcpError, match="YCbCr latents"):
        resolved("echomimic-v1", chroma_guidance=2.0)


def test_overlapping_windows_are_averaged_without_cfg_too():
    class Constant(torch.nn.Module):
        def forward(self, sample, *args, **kwargs):
            return torch.ones_like(sample)

    # one step with v = 1 everywhere: every frame must see v = 1, whether one window or two
    # cover it (16 frames, windows 12/3 overlap on 8 frames), i.e. sums are averaged
    out = _run(Constant(), guidance=1.0, steps=1)
    x0 = initial_latents((1, 4, 16, 4, 6), seed=420, clamp=1.5)
    s = make_scheduler()
    s.set_timesteps(1)
    ref = s.step(torch.ones_like(x0), s.timesteps[0], x0, eta=0.0).prev_sample
    assert torch.allclose(out, ref, atol=1e-6)


class ContextLog(Sampler):
    def reset(self):
        self.events = []

    def on_step_start(self, step_index, timestep):
        self.events.append(("start", step_index, timestep))

    def predict(self, latents, ctx, audio, face_feature, bank):
        self.events.append(("predict", ctx))
        return super().predict(latents, ctx, audio, face_feature, bank)

    def on_step_end(self, step_index, timestep, latents):
        self.events.append(("end", step_index, timestep, latents.shape))


def test_sampler_seam_sees_explicit_step_and_window_contexts():
    model = LinearDenoiser()
    sampler = ContextLog(model)
    _run(model, steps=3, sampler=sampler)
    timesteps = make_scheduler()
    timesteps.set_timesteps(3)
    ts = [int(t) for t in timesteps.timesteps]
    predicts = [e[1] for e in sampler.events if e[0] == "predict"]
    assert [e[:3] for e in sampler.events if e[0] == "start"] == [
        ("start", i, t) for i, t in enumerate(ts)
    ]
    assert len(predicts) == 6
    for ctx in predicts:
        assert isinstance(ctx, StepContext) and ctx.cfg and ctx.num_steps == 3
        assert ctx.timestep == ts[ctx.step_index] and ctx.num_windows == 2
        assert list(ctx.frames) == context_windows(16, 12, 3, ctx.step_index)[ctx.window_index]
    assert sampler.events[-1] == ("end", 2, ts[2], (1, 4, 16, 4, 6))


def test_non_finite_latents_raise_lcp_error_naming_the_step():
    class Exploding(torch.nn.Module):
        def forward(self, sample, timestep, *args, **kwargs):
            return sample * (float("nan") if int(timestep) < 999 else 1.0)

    with pytest.raises(NonFiniteError, match=r"step 2/4") as info:
        _run(Exploding(), steps=4)
    assert isinstance(info.value, LcpError) and info.value.exit_code == 24


def test_unresolved_settings_and_foreign_sampler_are_rejected():
    audio = torch.zeros(4, 2, 3)
    with pytest.raises(ValueError, match="resolve"):
        denoise(LinearDenoiser(), audio, None, None, DenoiseConfig(), (4, 2, 2))
    with pytest.raises(ValueError, match="different denoiser"):
        _run(LinearDenoiser(), sampler=Sampler(LinearDenoiser()))
    scaled = DenoiseConfig(steps=2, guidance=1.0, epsilon_scaling=0.1)
    with pytest.raises(ValueError, match="epsilon scaling"):  # a given scheduler must agree
        denoise(LinearDenoiser(), audio, None, None, scaled, (4, 2, 2), scheduler=make_scheduler())
    agreeing = make_scheduler(epsilon_scaling=0.1)
    assert (
        denoise(LinearDenoiser(), audio, None, None, scaled, (4, 2, 2), scheduler=agreeing)
        .isfinite()
        .all()
    )


# --- golden: the official pipeline's latents ------------------------------------------

TOL = 1e-4


class _Stop(Exception):
    pass


class Trajectory(Sampler):
    """Plain sampler that records the latents after every step (and can stop early)."""

    def __init__(self, denoiser, stop_after: int | None = None) -> None:
        super().__init__(denoiser)
        self.stop_after = stop_after

    def reset(self):
        self.latents = []

    def on_step_end(self, step_index, timestep, latents):
        self.latents.append(latents.clone())
        if self.stop_after is not None and step_index + 1 >= self.stop_after:
            raise _Stop


@pytest.fixture(scope="module")
def golden_conditions(golden_models, golden_io):
    """Face feature and banks computed by our FaceLocator/ReferenceNet from golden inputs."""
    ref = golden_io["ref_latents"]
    with torch.no_grad():
        return {
            "face": golden_models.face_locator(golden_io["face_mask"]),
            "bank_fp16": golden_models.reference_net(ref),  # the spec's float16 bank
            "bank_fp32": golden_models.reference_net(ref, bank_dtype=torch.float32),
        }


def _golden_run(models, io, conditions, frames, bank, guidance=2.5, stop_after=None):
    sampler = Trajectory(models.denoiser, stop_after)
    cfg = DenoiseConfig(steps=30, guidance=guidance, context_frames=12, context_overlap=3)
    with contextlib.suppress(_Stop):
        denoise(
            models.denoiser,
            io[f"audio_fea_final_F{frames}"][0],
            conditions["face"],
            conditions[bank],
            cfg,
            (4, 16, 24),
            sampler=sampler,
        )
    return sampler.latents


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_golden_f4_cfg_fp16_bank(golden_models, golden_io, golden_conditions):
    lat = _golden_run(golden_models, golden_io, golden_conditions, 4, "bank_fp16")
    assert len(lat) == 30
    assert _err(lat[0], golden_io["ddim_out_prev_sample"]) <= TOL
    assert _err(lat[1], golden_io["step1_prev_sample_F4"]) <= TOL  # window rotated [2,3,0,1]
    assert _err(lat[-1], golden_io["final_latents_F4_30steps"]) <= TOL


def test_golden_f4_cfg_fp32_bank(golden_models, golden_io, golden_conditions):
    lat = _golden_run(golden_models, golden_io, golden_conditions, 4, "bank_fp32")
    assert _err(lat[0], golden_io["ddim_out_prev_sample_bankfp32"]) <= TOL
    assert _err(lat[-1], golden_io["final_latents_F4_30steps_bankfp32"]) <= TOL


def test_golden_f4_without_cfg(golden_models, golden_io, golden_conditions):
    lat = _golden_run(
        golden_models, golden_io, golden_conditions, 4, "bank_fp16", guidance=1.0, stop_after=1
    )
    assert len(lat) == 1
    assert _err(lat[0], golden_io["nocfg_ddim_out_prev_sample"]) <= TOL


@pytest.mark.slow  # 60 UNet calls of 12 frames: ~30 s on 2 cores
def test_golden_f16_overlapping_windows(golden_models, golden_io, golden_conditions):
    lat = _golden_run(golden_models, golden_io, golden_conditions, 16, "bank_fp16")
    assert _err(lat[0], golden_io["step0_prev_sample_F16"]) <= TOL
    assert _err(lat[-1], golden_io["final_latents_F16_30steps"]) <= TOL
