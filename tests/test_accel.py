"""Accelerations (lightningcp_cli.accel): LightningCP, DFA, static caching, the registry.

A micro denoiser (two levels, 8x8 latents, random weights) keeps every test on CPU in
well under a second or two; equalities are exact or float32 noise (<= 1e-5).
"""

from __future__ import annotations

import pytest
import torch

from lightningcp_cli import config as config_module
from lightningcp_cli.accel import ACCEL_FACTORIES, ACCEL_METHODS, build_sampler
from lightningcp_cli.accel import hooks as accel_hooks
from lightningcp_cli.accel.dfa import (
    BackgroundStore,
    foreground_index,
    foreground_indices,
    gather_tokens,
    level_mask,
    repeat_rows,
    scatter_tokens,
)
from lightningcp_cli.accel.lightningcp import (
    LIGHTNINGCP,
    LightningCPSampler,
    adaptive_interval,
    apply_lightningcp,
    is_key_step,
    key_steps,
    remove_lightningcp,
)
from lightningcp_cli.accel.processors import (
    ACCEL_EXTRAS_KEY,
    ACCEL_PROCESSORS,
    AccelAudioAttnProcessor,
    AccelCall,
    AccelReferenceAttnProcessor,
)
from lightningcp_cli.accel.static_cache import StaticFeatures, audio_row_index
from lightningcp_cli.config import (
    AccelConfig,
    DenoiseConfig,
    DFAConfig,
    LightningCPConfig,
    RenderConfig,
)
from lightningcp_cli.errors import AccelerationError, ConfigError
from lightningcp_cli.models.unet import (
    AudioAttnProcessor,
    ReferenceAttnProcessor,
    ReferenceNet,
    UNetConfig,
    UNetContext,
    VideoUNet,
)
from lightningcp_cli.stages.denoise import (
    RunInputs,
    Sampler,
    StepContext,
    StepGroup,
    denoise,
    make_scheduler,
)

MICRO = UNetConfig(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 32),
    attention_blocks=(True, True),
    layers_per_block=1,
    attention_heads=2,
    norm_num_groups=8,
    cross_attention_dim=16,
    motion_heads=2,
    motion_norm_groups=8,
)
LATENT = (4, 8, 8)


class Setup:
    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = VideoUNet(MICRO).eval()
        with torch.no_grad():  # motion outputs are zero-initialised nowhere here, but be sure
            for p in self.model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        reference = ReferenceNet(MICRO).eval()
        with torch.no_grad():
            self.bank = reference(torch.randn(1, *LATENT))
        self.face = torch.randn(1, 32, 1, 8, 8) * 0.1
        self.audio = {n: torch.randn(n, 5, 16) for n in (8, 20)}

    def run(self, sampler=None, frames=8, steps=6, guidance=2.5):
        cfg = DenoiseConfig(steps=steps, guidance=guidance, context_frames=12, context_overlap=3)
        return denoise(
            self.model, self.audio[frames], self.face, self.bank, cfg, LATENT, sampler=sampler
        )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster and immune to a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


@pytest.fixture(scope="module")
def baseline(setup):
    return {(f, g): setup.run(frames=f, guidance=g) for f in (8, 20) for g in (1.0, 2.5)}


def _center_foreground() -> torch.Tensor:
    cov = torch.zeros(8, 8)
    cov[2:6, 3:6] = 1.0
    return cov


# --- key-step schedules (pure) -------------------------------------------------------------


def test_uniform_and_list_schedules():
    assert key_steps(10, LightningCPConfig(interval=3, warmup=0)) == [0, 3, 6, 9]
    assert key_steps(10, LightningCPConfig(interval=4, warmup=2)) == [0, 1, 4, 8]
    assert key_steps(6, LightningCPConfig(interval=1)) == list(range(6))
    lst = LightningCPConfig(schedule="list", key_steps=(2, 5, 40), warmup=0)
    assert key_steps(8, lst) == [0, 2, 5]
    assert is_key_step(0, 8, lst) and not is_key_step(1, 8, lst)


def test_adaptive_interval_rule():
    assert adaptive_interval(None, 0.3, 5) == 1
    assert adaptive_interval(0.0, 0.3, 5) == 5
    assert adaptive_interval(0.1, 0.3, 5) == 3
    assert adaptive_interval(1.0, 0.3, 5) == 1
    assert adaptive_interval(0.01, 0.3, 5) == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval": 0},
        {"schedule": "fancy"},
        {"schedule": "list"},
        {"threshold": 0},
        {"max_interval": 0},
        {"key_steps": (-1,)},
    ],
)
def test_lightningcp_config_validates(kwargs):
    with pytest.raises(ConfigError):
        LightningCPConfig(**kwargs)


def test_dfa_config_validates():
    with pytest.raises(ConfigError):
        DFAConfig(dilate=2.0)
    with pytest.raises(ConfigError):
        DFAConfig(min_fraction=0.5, max_fraction=0.2)


# --- DFA masks and gather/scatter (pure) -----------------------------------------------------


def test_level_masks_pool_threshold_and_dilate():
    cov = torch.zeros(8, 8)
    cov[3, 4] = 0.25
    assert level_mask(cov, 0, 0.0, 0.0).sum() == 1
    assert level_mask(cov, 0, 0.5, 0.0).sum() == 0  # coverage below the threshold
    assert level_mask(cov, 1, 0.0, 0.0).shape == (4, 4)
    grown = level_mask(cov, 0, 0.0, 0.1)  # ceil(0.8) = 1 cell each way
    assert grown.sum() == 9 and grown[2:5, 3:6].all()


def test_foreground_index_falls_back_when_empty_or_full():
    assert foreground_index(torch.zeros(4, 4, dtype=torch.bool)) is None
    full = torch.ones(4, 4, dtype=torch.bool)
    assert foreground_index(full, max_fraction=0.9) is None
    assert torch.equal(foreground_index(full, max_fraction=1.0), torch.arange(16))
    part = torch.zeros(4, 4, dtype=torch.bool)
    part[1, 2] = part[3, 0] = True
    assert foreground_index(part).tolist() == [6, 12]
    idx = foreground_indices(_center_foreground(), 2, DFAConfig(dilate=0.0))
    assert set(idx) == {64, 16} and len(idx[64]) == 12


def test_gather_scatter_and_repeat_rows():
    x = torch.arange(24.0).view(2, 4, 3)
    idx = torch.tensor([1, 3])
    fg = gather_tokens(x, idx)
    assert torch.equal(fg, x[:, [1, 3]])
    bg = torch.zeros_like(x)
    out = scatter_tokens(bg, idx, fg)
    assert torch.equal(out[:, [1, 3]], fg) and out[:, [0, 2]].abs().sum() == 0
    assert bg.abs().sum() == 0  # the background is not written
    cached = torch.arange(6.0).view(6, 1)  # 2 batch rows x 3 rows each
    rep = repeat_rows(cached, 2, 2).view(-1).tolist()
    assert rep == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert repeat_rows(cached, 2, 1) is cached
    store = BackgroundStore()
    store.store(0, cached, 2)
    with pytest.raises(AccelerationError):
        store.background(1, 2, 1, "layer")  # no such window
    with pytest.raises(AccelerationError):
        store.background(0, 3, 1, "layer")  # wrong batch


# --- static-feature caching ---------------------------------------------------------------


def test_cached_kv_equal_recomputed_kv(setup):
    block = setup.model.up_blocks[-1].attentions[-1].transformer_blocks[0]
    static = StaticFeatures()
    audio = setup.audio[20]
    static.set_audio(audio)
    k_table, v_table = static.audio_kv("a", block.attn2, torch.float32)
    frames = [5, 6, 7, 8]
    rows = audio_row_index(frames, [False, True], static.zero_row)
    assert rows.tolist() == [20] * 4 + frames
    tokens = torch.cat([torch.zeros_like(audio[frames]), audio[frames]])
    torch.testing.assert_close(k_table[rows], block.attn2.to_k(tokens), rtol=0, atol=1e-6)
    torch.testing.assert_close(v_table[rows], block.attn2.to_v(tokens), rtol=0, atol=1e-6)
    assert static.audio_kv("a", block.attn2, torch.float32)[0] is k_table  # reused
    bank = setup.bank[block.bank_key]
    kb, vb = static.reference_kv(block.bank_key, block.attn1, bank, torch.float32)
    assert torch.equal(kb, block.attn1.to_k(bank)) and torch.equal(vb, block.attn1.to_v(bank))
    assert static.reference_kv(block.bank_key, block.attn1, bank, torch.float32)[0] is kb
    assert (
        static.reference_kv(block.bank_key, block.attn1, bank.clone(), torch.float32)[0] is not kb
    )


def test_processors_with_static_cache_equal_originals(setup):
    block = setup.model.up_blocks[-1].attentions[-1].transformer_blocks[0]
    frames = [3, 4, 5]
    audio = setup.audio[20]
    x = torch.randn(2 * len(frames), 64, 32)
    folded_audio = torch.cat([torch.zeros_like(audio[frames]), audio[frames]])
    bank = {block.bank_key: setup.bank[block.bank_key]}
    ctx = UNetContext(2, len(frames), bank=bank, ref_rows=torch.tensor([False, True]))
    with torch.no_grad():
        ref_attn = ReferenceAttnProcessor(block.bank_key)(block.attn1, x, ctx=ctx)
        ref_audio = AudioAttnProcessor(3.0)(block.attn2, x, encoder_hidden_states=folded_audio)
        static = StaticFeatures()
        static.set_audio(audio)
        call = AccelCall(static=static, audio_rows=audio_row_index(frames, [False, True], 20))
        ctx.extras[ACCEL_EXTRAS_KEY] = call
        out_attn = AccelReferenceAttnProcessor(block.bank_key)(block.attn1, x, ctx=ctx)
        out_audio = AccelAudioAttnProcessor(3.0, "b")(
            block.attn2, x, encoder_hidden_states=folded_audio, ctx=ctx
        )
    assert torch.equal(out_attn, ref_attn)
    torch.testing.assert_close(out_audio, ref_audio, rtol=0, atol=1e-5)


# --- DFA processor --------------------------------------------------------------------------


def _dfa_calls(tokens, index, dfa=None):
    dfa = dfa or DFAConfig(max_fraction=1.0)
    record = AccelCall(dfa=dfa, dfa_mode="record", foreground={tokens: index})
    reuse = AccelCall(dfa=dfa, dfa_mode="reuse", foreground={tokens: index})
    return record, reuse


def test_dfa_with_all_foreground_mask_equals_full_attention(setup):
    block = setup.model.up_blocks[-1].attentions[-1].transformer_blocks[0]
    bank = {block.bank_key: setup.bank[block.bank_key]}
    x = torch.randn(2 * 4, 64, 32)
    proc = AccelReferenceAttnProcessor(block.bank_key)

    def ctx(call):
        c = UNetContext(2, 4, bank=bank, ref_rows=torch.tensor([False, True]))
        c.extras[ACCEL_EXTRAS_KEY] = call
        return c

    plain = UNetContext(2, 4, bank=bank, ref_rows=torch.tensor([False, True]))
    record, reuse = _dfa_calls(64, torch.arange(64))
    with torch.no_grad():
        full = ReferenceAttnProcessor(block.bank_key)(block.attn1, x, ctx=plain)
        proc(block.attn1, torch.randn_like(x), ctx=ctx(record))  # a stale background
        out = proc(block.attn1, x, ctx=ctx(reuse))
    torch.testing.assert_close(out, full, rtol=0, atol=1e-6)


def test_dfa_partial_mask_keeps_background_and_attends_foreground_only(setup):
    block = setup.model.up_blocks[-1].attentions[-1].transformer_blocks[0]
    x = torch.randn(4, 64, 32)
    index = foreground_index(level_mask(_center_foreground(), 0, 0.0, 0.0))
    proc = AccelReferenceAttnProcessor(block.bank_key)
    record, reuse = _dfa_calls(64, index)

    def ctx(call):
        c = UNetContext(1, 4)  # no bank: plain self-attention
        c.extras[ACCEL_EXTRAS_KEY] = call
        return c

    with torch.no_grad():
        key_out = proc(block.attn1, x, ctx=ctx(record))
        y = x + 0.1 * torch.randn_like(x)
        out = proc(block.attn1, y, ctx=ctx(reuse))
        fg_only = ReferenceAttnProcessor("none")(block.attn1, y[:, index])
    background = torch.ones(64, dtype=torch.bool)
    background[index] = False
    assert torch.equal(out[:, background], key_out[:, background])
    torch.testing.assert_close(out[:, index], fg_only, rtol=0, atol=1e-6)


@pytest.mark.parametrize("whole_blocks", [False, True])
def test_dfa_everywhere_with_all_foreground_equals_lightningcp_without_dfa(setup, whole_blocks):
    """Whole runs: every DFA switch on, a mask covering everything, gathering allowed
    (max_fraction 1) -> the same video as LightningCP without DFA, whether DFA covers the
    attentions or the whole transformers of the last layer."""
    cfg = LightningCPConfig(interval=3, warmup=0)
    dfa = DFAConfig(max_fraction=1.0, audio=True, temporal=True, whole_blocks=whole_blocks)
    with LightningCPSampler(setup.model, cfg) as s:
        plain = setup.run(s, frames=20)
    with LightningCPSampler(setup.model, cfg, dfa=dfa, foreground=torch.ones(8, 8)) as s:
        full_mask = setup.run(s, frames=20)
        stores = [p.store for p in s._processors.values() if hasattr(p, "store")]
        kept = sum(len(st) > 0 for st in stores)
        blocks = sum(len(st) > 0 for st in s._block_stores)
        # attention level: attn1, attn2 and 2 temporal attentions of the last layer;
        # whole blocks: its spatial and its temporal transformer, nothing inside them
        assert (kept, blocks) == ((0, 2) if whole_blocks else (4, 0))
    torch.testing.assert_close(full_mask, plain, rtol=0, atol=1e-5)
    with LightningCPSampler(
        setup.model, cfg, dfa=dfa, foreground=_center_foreground()
    ) as s:  # a real mask changes the result (and still runs every switch)
        partial = setup.run(s, frames=20)
    assert not torch.allclose(partial, plain, atol=1e-5)
    assert not any("forward" in vars(m) for m in setup.model.modules())  # wrappers undone


def test_whole_transformer_dfa_keeps_background_and_computes_foreground(setup):
    """Reuse: background tokens are the key step's output; foreground tokens equal the
    transformer run on those tokens alone (norm statistics from the whole grid)."""
    from lightningcp_cli.accel.dfa_blocks import wrap_transformers

    model = setup.model
    layer = model.up_blocks[-1].attentions[-1]
    prefix = [n for n, m in model.named_modules() if m is layer][0]
    index = foreground_index(level_mask(_center_foreground(), 0, 0.0, 0.0))
    dfa = DFAConfig(max_fraction=1.0)
    x = torch.randn(4, layer.norm.num_channels, 8, 8)
    y = x + 0.1 * torch.randn_like(x)

    def ctx(mode):
        c = UNetContext(1, 4)  # no bank: plain self-attention
        c.extras[ACCEL_EXTRAS_KEY] = AccelCall(dfa=dfa, dfa_mode=mode, foreground={64: index})
        return c

    audio = torch.randn(4, 3, model.config.cross_attention_dim)
    undo, stores = wrap_transformers(model, (prefix + ".",))
    try:
        with torch.no_grad():
            key_out = layer(x, ctx("record"), audio)
            out = layer(y, ctx("reuse"), audio)
    finally:
        undo()
    assert len(stores) == 1 and "forward" not in vars(layer)
    with torch.no_grad():
        full = layer(y, UNetContext(1, 4), audio)
        tokens = layer.norm(y).flatten(2)[:, :, index].transpose(1, 2)
        tokens = torch.nn.functional.conv1d(
            tokens.transpose(1, 2), layer.proj_in.weight.flatten(2), layer.proj_in.bias
        ).transpose(1, 2)
        for block in layer.transformer_blocks:
            tokens = block(tokens, UNetContext(1, 4), audio)
        fg = (
            torch.nn.functional.conv1d(
                tokens.transpose(1, 2), layer.proj_out.weight.flatten(2), layer.proj_out.bias
            )
            + y.flatten(2)[:, :, index]
        )
    background = torch.ones(64, dtype=torch.bool)
    background[index] = False
    assert torch.equal(out.flatten(2)[:, :, background], key_out.flatten(2)[:, :, background])
    torch.testing.assert_close(out.flatten(2)[:, :, index], fg, rtol=0, atol=1e-5)
    assert not torch.allclose(out.flatten(2)[:, :, index], full.flatten(2)[:, :, index])


# --- LightningCP in the loop ----------------------------------------------------------------


@pytest.mark.parametrize("frames", [8, 20])
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_interval_one_equals_baseline(setup, baseline, frames, guidance):
    cfg = LightningCPConfig(interval=1)
    dfa = DFAConfig(max_fraction=1.0)
    with LightningCPSampler(setup.model, cfg, dfa=dfa, foreground=_center_foreground()) as s:
        out = setup.run(s, frames=frames, guidance=guidance)
        assert s.stats()["cheap_steps"] == 0
    assert (out - baseline[(frames, guidance)]).abs().max() <= 1e-6


def test_key_groups_run_cheap_steps_and_stay_close(setup, baseline):
    with LightningCPSampler(setup.model, LightningCPConfig(interval=3, warmup=0)) as s:
        out = setup.run(s, frames=20)
        stats = s.stats()
    assert stats["key_steps"] == [0, 3] and stats["cheap_steps"] == 4 * 3  # x 3 windows
    assert stats["key_calls"] == 2 * 3 and stats["cheap_calls"] == 2 * 3  # 3 windows, batched
    ref = baseline[(20, 2.5)]
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert (out - ref).pow(2).mean().sqrt() < 0.5 * ref.pow(2).mean().sqrt()


def test_adaptive_schedule_plans_from_feature_change(setup):
    cfg = LightningCPConfig(schedule="adaptive", threshold=1e9, max_interval=3)
    with LightningCPSampler(setup.model, cfg) as s:
        setup.run(s, steps=8)
        stats = s.stats()
    # step 0 has no change yet (interval 1); then a huge threshold gives max_interval
    assert stats["key_steps"] == [0, 1, 4, 7] and stats["change_per_step"] > 0


class Spy(LightningCPSampler):
    """Records which window cache each cheap call reads; can swap caches on purpose."""

    swap = False

    def reset(self):
        super().reset()
        self.used = []
        self.batches = []

    def predict_batch(self, latents, ctxs, audio, face_feature, bank):
        cache = self.state.windows[ctxs[0].window_index]
        self.used.append((ctxs[0].window_index, ctxs[0].frames, cache.frames, cache.step))
        if self.swap and ctxs[0].window_index == 0:
            other = self.state.windows[1]
            cache.feature, other.feature = other.feature, cache.feature
            try:
                return super().predict_batch(latents, ctxs, audio, face_feature, bank)
            finally:
                cache.feature, other.feature = other.feature, cache.feature
        self.batches.append((latents.clone(), list(ctxs), audio, face_feature, bank))
        return super().predict_batch(latents, ctxs, audio, face_feature, bank)


def test_caches_never_cross_windows(setup):
    cfg = LightningCPConfig(interval=3, warmup=0)
    with Spy(setup.model, cfg) as spy:
        out = setup.run(spy, frames=20)
        used = list(spy.used)
        spy.swap = True
        swapped = setup.run(spy, frames=20)
    windows = {w for w, *_ in used}
    assert windows == {0, 1, 2}  # 20 frames, 12/3: windows start at 0, 9, 18
    for _, frames, cached_frames, cached_step in used:
        assert frames == cached_frames and cached_step in (0, 3)
    assert not torch.allclose(out, swapped, atol=1e-4)


def test_cache_from_another_window_is_refused(setup):
    with LightningCPSampler(setup.model, LightningCPConfig(interval=3, warmup=0)) as s:
        ctxs = _prime(setup, s, frames=20)
        s.state.windows[0].frames = tuple(range(12, 24))
        with pytest.raises(AccelerationError, match="window 0"):
            s.predict_batch(torch.randn(1, 4, 12, 8, 8), ctxs[:1], *_window_inputs(setup, 20))


def _window_inputs(setup, frames, window=range(12)):
    idx = list(window)
    return setup.audio[frames][idx].unsqueeze(0), setup.face, setup.bank


def _prime(setup, sampler, frames=8):
    """Run the key step of window 0 at step 0; returns contexts of steps 1..3 of its group."""
    sampler.reset()
    timesteps = (999, 832, 666, 499, 332, 166)
    run = RunInputs(
        setup.audio[frames].unsqueeze(0), setup.face, setup.bank, timesteps, True, LATENT
    )
    sampler.on_run_start(run)
    f = min(frames, 12)

    def ctx(step):
        return StepContext(step, 6, timesteps[step], 0, 1, tuple(range(f)), True, 0)

    with torch.no_grad():
        sampler.predict(
            torch.randn(1, 4, f, 8, 8), ctx(0), *_window_inputs(setup, frames, range(f))
        )
    return [ctx(s) for s in (1, 2, 3)]


@pytest.mark.parametrize("use_dfa", [False, True])
def test_batched_prediction_equals_sequential_on_same_inputs(setup, use_dfa):
    dfa = DFAConfig() if use_dfa else None
    sampler = LightningCPSampler(
        setup.model, LightningCPConfig(interval=4), dfa=dfa, foreground=_center_foreground()
    )
    with sampler:
        ctxs = _prime(setup, sampler)
        inputs = torch.randn(3, 4, 8, 8, 8)
        args = _window_inputs(setup, 8, range(8))
        with torch.no_grad():
            batched = sampler.predict_batch(inputs, ctxs, *args)
            one_by_one = torch.stack(
                [
                    sampler.predict_batch(inputs[i : i + 1], [c], *args)[0]
                    for i, c in enumerate(ctxs)
                ]
            )
            via_predict = sampler.predict(inputs[1:2], ctxs[1], *args)
    assert batched.shape == (3, 2, 4, 8, 8, 8)
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-5)
    torch.testing.assert_close(via_predict, one_by_one[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_dfa", [False, True])
def test_parallel_loop_equals_sequential_cheap_steps_on_the_estimated_inputs(setup, use_dfa):
    """Inside a real run, every batched call equals the same cheap steps run one by one."""

    class Twice(LightningCPSampler):
        def reset(self):
            super().reset()
            self.diffs = []

        def predict_batch(self, latents, ctxs, audio, face_feature, bank):
            out = super().predict_batch(latents, ctxs, audio, face_feature, bank)
            if len(ctxs) > 1:
                one = super().predict_batch
                seq = [
                    one(latents[i : i + 1], [c], audio, face_feature, bank)[0]
                    for i, c in enumerate(ctxs)
                ]
                self.diffs.append(float((out - torch.stack(seq)).abs().max()))
            return out

    dfa = DFAConfig() if use_dfa else None
    cfg = LightningCPConfig(interval=4, warmup=0)
    with Twice(setup.model, cfg, dfa=dfa, foreground=_center_foreground()) as s:
        setup.run(s, frames=20, steps=8)
    assert len(s.diffs) == 2 * 3  # 2 groups x 3 windows, 3 cheap steps each
    assert max(s.diffs) <= 1e-5


def test_batch_limit_splits_the_calls_not_the_result(setup):
    """``batch_limit`` bounds memory: at most that many cheap steps per call, and the
    video equals the one of unlimited batches (inputs are estimated before any call)."""

    class Sizes(LightningCPSampler):
        def reset(self):
            super().reset()
            self.sizes = []

        def predict_batch(self, latents, ctxs, audio, face_feature, bank):
            self.sizes.append(len(ctxs))
            return super().predict_batch(latents, ctxs, audio, face_feature, bank)

    outs, sizes = [], []
    for limit in (0, 2):
        cfg = LightningCPConfig(interval=4, warmup=0, batch_limit=limit)
        with Sizes(setup.model, cfg) as s:
            outs.append(setup.run(s, frames=20, steps=8))
            sizes.append(s.sizes)
    assert sizes[0] == [3] * 6 and sizes[1] == [2, 1] * 6  # 2 groups x 3 windows
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    with pytest.raises(ConfigError):
        LightningCPConfig(batch_limit=-1)


class IdealDenoiser(torch.nn.Module):
    """Exact v-prediction denoiser of a one-point data set: its noise prediction is the
    same all along the DDIM path, so held-noise estimation must reproduce that path."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.target = target  # [C, 1, h, w], the same for every frame
        self.alphas = make_scheduler().alphas_cumprod

    def forward(self, sample, timestep, audio, face_feature=None, bank=None, ref_rows=None):
        a = self.alphas[int(timestep.reshape(-1)[0])]
        eps = (sample - a.sqrt() * self.target) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * self.target


class Groups(Sampler):
    """Plain model calls in batched groups of ``size`` steps; records inputs and latents."""

    def __init__(self, denoiser, size: int, estimate: bool) -> None:
        super().__init__(denoiser)
        self.size, self.estimate = size, estimate

    def reset(self):
        self.inputs, self.real = {}, {}

    def next_group(self, step_index, num_steps):
        size = min(self.size, num_steps - step_index)
        return StepGroup(step_index, size, batched=True, estimate=self.estimate)

    def predict_batch(self, latents, ctxs, audio, face_feature, bank):
        for i, c in enumerate(ctxs):
            self.inputs[c.step_index] = (list(c.frames), latents[i : i + 1].clone())
        return super().predict_batch(latents, ctxs, audio, face_feature, bank)

    def on_step_end(self, step_index, timestep, latents):
        self.real[step_index + 1] = latents.clone()


def _relative(frames, estimated, real):
    real = real[:, :, frames]
    return float((estimated - real).norm() / real.norm())


def test_input_estimation_follows_the_sampling_path():
    """Why estimation matters: on an exact denoiser the estimated inputs ARE the latents the
    rollout reaches (and the result equals the unbatched run); without estimation the
    cheap steps all see the latents right after the key step, tens of percent off."""
    torch.manual_seed(1)
    model = IdealDenoiser(torch.randn(4, 1, 4, 6))
    audio = torch.zeros(16, 2, 3)
    cfg = DenoiseConfig(steps=10, guidance=2.5, context_frames=12, context_overlap=3)

    def run(sampler=None):
        return denoise(model, audio, None, None, cfg, (4, 4, 6), sampler=sampler)

    reference = run()
    errors, finals = {}, {}
    for estimate in (True, False):
        s = Groups(model, 4, estimate)
        finals[estimate] = (run(s) - reference).abs().max()
        steps = [k for k in s.inputs if k - 1 not in (0, 4, 8)]  # not the exact first inputs
        errors[estimate] = max(_relative(*s.inputs[k], s.real[k]) for k in steps)
    assert errors[True] < 1e-4 and finals[True] < 1e-4
    assert errors[False] > 0.1


# --- enable / disable -----------------------------------------------------------------------


def test_enable_twice_is_harmless_and_disable_restores_exactly(setup, baseline):
    model = setup.model
    before = dict(model.attn_processors)
    hooks_before = dict(model.last_layer_input._forward_hooks)
    sampler = LightningCPSampler(model, LightningCPConfig(interval=2))
    sampler.enable()
    sampler.enable()
    processors = dict(model.attn_processors)
    assert any(p is not before[k] for k, p in processors.items())
    assert len(model.last_layer_input._forward_hooks) == len(hooks_before) + 1
    with sampler:  # entering again is enabling again
        assert dict(model.attn_processors) == processors
        setup.run(sampler)
    assert all(model.attn_processors[k] is p for k, p in before.items())
    assert dict(model.last_layer_input._forward_hooks) == hooks_before
    assert accel_hooks.installed(model, ACCEL_PROCESSORS) is None
    sampler.disable()  # disabling twice too
    assert torch.equal(setup.run(), baseline[(8, 2.5)])


def test_functional_apply_and_remove_by_name(setup):
    model = setup.model
    before = dict(model.attn_processors)
    sampler = apply_lightningcp(model, LightningCPConfig(interval=2))
    assert accel_hooks.installed(model, LIGHTNINGCP).owner is sampler
    other = LightningCPSampler(model)
    with pytest.raises(AccelerationError, match="already installed"):
        other.enable()
    assert remove_lightningcp(model) and not remove_lightningcp(model)
    assert all(model.attn_processors[k] is p for k, p in before.items())
    assert not sampler.enabled


def test_set_params_validates_and_sampler_needs_enable(setup):
    sampler = LightningCPSampler(setup.model)
    sampler.set_params(interval=2, parallel=False)
    assert sampler.config.interval == 2 and not sampler.config.parallel
    with pytest.raises(ConfigError):
        sampler.set_params(interval=0)
    with pytest.raises(AccelerationError, match="enable"):
        setup.run(sampler)


def test_reference_removal_drops_bank_layers(setup, baseline):
    keys = setup.model.bank_keys
    with LightningCPSampler(setup.model, LightningCPConfig(interval=1), drop_reference=()) as s:
        same = setup.run(s)
    with LightningCPSampler(
        setup.model, LightningCPConfig(interval=1), drop_reference=keys[:1]
    ) as s:
        dropped = setup.run(s)
    assert torch.equal(same, baseline[(8, 2.5)])
    assert not torch.allclose(dropped, same, atol=1e-5)
    # dropping a layer = a bank without that entry, on the plain model too
    bank = {k: v for k, v in setup.bank.items() if k != keys[0]}
    cfg = DenoiseConfig(steps=6, guidance=2.5, context_frames=12, context_overlap=3)
    plain = denoise(setup.model, setup.audio[8], setup.face, bank, cfg, LATENT)
    assert (plain - dropped).abs().max() <= 1e-6
    with pytest.raises(AccelerationError, match="not reference layers"):
        LightningCPSampler(setup.model, drop_reference=("nope",))


# --- registry and config --------------------------------------------------------------------


def test_registry_lists_every_method_in_config():
    assert config_module.ACCEL_METHODS == ACCEL_METHODS == tuple(ACCEL_FACTORIES)
    assert {"none", "lightningcp", "lightningcp+dfa", "full"} <= set(ACCEL_METHODS)
    assert RenderConfig(accel="full").accel_config == AccelConfig()
    with pytest.raises(ConfigError, match="unknown acceleration"):
        RenderConfig(accel="warp")
    with pytest.raises(AccelerationError, match="unknown acceleration"):
        build_sampler("warp", None)


def test_factories_build_samplers(setup):
    class Spec:
        codec_factor = 16

    class Model:
        denoiser = setup.model
        spec = Spec()

    assert type(build_sampler("none", Model())) is Sampler
    s = build_sampler("lightningcp", Model())
    assert isinstance(s, LightningCPSampler) and s.dfa is None
    full = build_sampler(
        "full", Model(), None, AccelConfig(drop_reference=setup.model.bank_keys[:1])
    )
    assert full.dfa == DFAConfig() and full.drop_reference == setup.model.bank_keys[:1]
