"""Peer accelerations (DeepCache, ToMe, PAB, fewer steps) on a micro denoiser, CPU.

Off settings must give the baseline bit for bit; on settings must do less work and stay
finite; caches must stay per window position; removal must leave the model as built.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from lightningcp_cli.accel import ACCEL_METHODS
from lightningcp_cli.accel.peers import (
    PEERS,
    DeepCacheConfig,
    DeepCacheSampler,
    PABConfig,
    PABSampler,
    ToMeAttnProcessor,
    ToMeConfig,
    ToMeSampler,
    bipartite_soft_matching_2d,
    build_deepcache,
    build_pab,
    build_tome,
    deepcache_branch,
    deepcache_skips,
    make_peer_sampler,
    matched_steps,
    parse_fewer_steps,
)
from lightningcp_cli.bench.runner import MethodResult, _fewer_steps, report_markdown
from lightningcp_cli.config import DenoiseConfig
from lightningcp_cli.errors import AccelerationError, ConfigError
from lightningcp_cli.models.unet import ReferenceNet, UNetConfig, VideoUNet
from lightningcp_cli.stages.denoise import Sampler, StepContext, denoise

MICRO = UNetConfig(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 32),
    attention_blocks=(True, False),
    layers_per_block=1,
    attention_heads=2,
    norm_num_groups=8,
    cross_attention_dim=16,
    motion_heads=2,
    motion_norm_groups=8,
    motion_resolutions=(1, 2),
)
LATENT = (4, 8, 8)
FRAMES = 6  # two windows of 4 (overlap 1)
RUN = DenoiseConfig(steps=6, guidance=2.0, context_frames=4, context_overlap=1)

OFF = {
    "deepcache": DeepCacheConfig(cache_interval=1),
    "tome": ToMeConfig(ratio=0.0),
    "pab": PABConfig.off(),
}
ON = {"deepcache": DeepCacheConfig(), "tome": ToMeConfig(), "pab": PABConfig()}


@pytest.fixture(scope="module")
def setup():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    unet, ref = VideoUNet(MICRO).eval(), ReferenceNet(MICRO).eval()
    with torch.no_grad():  # zero-initialised parts made non-trivial
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        bank = ref(torch.randn(1, *LATENT, generator=gen))
    audio = torch.randn(FRAMES, 5, 16, generator=gen)
    face = torch.randn(1, 32, 1, *LATENT[1:], generator=gen)
    return SimpleNamespace(unet=unet, bank=bank, audio=audio, face=face)


def run(s, sampler: Sampler | None = None) -> torch.Tensor:
    return denoise(s.unet, s.audio, s.face, s.bank, RUN, LATENT, sampler=sampler)


@pytest.fixture(scope="module")
def baseline(setup):
    return run(setup)


def snapshot(unet: nn.Module) -> dict:
    return {
        "params": {k: v.clone() for k, v in unet.state_dict().items()},
        "processors": dict(unet.attn_processors),
        "patched": sorted(
            n
            for n, m in unet.named_modules()
            if "forward" in m.__dict__ or "_diffusers_hook" in m.__dict__
        ),
        "pre_hooks": sum(len(m._forward_pre_hooks) for m in unet.modules()),
        "hooks": sum(len(m._forward_hooks) for m in unet.modules()),
    }


def assert_restored(unet: nn.Module, before: dict) -> None:
    after = snapshot(unet)
    assert after["patched"] == before["patched"] == []
    assert after["pre_hooks"] == before["pre_hooks"]
    assert after["hooks"] == before["hooks"]
    assert after["processors"].keys() == before["processors"].keys()
    assert all(after["processors"][k] is v for k, v in before["processors"].items())
    assert all(torch.equal(after["params"][k], v) for k, v in before["params"].items())


class Work:
    """Counts leaf-layer work with forward hooks: calls and input rows per kind."""

    def __init__(self, unet: nn.Module) -> None:
        self.resnet_convs = self.attn_calls = self.attn1_tokens = 0
        self.handles = []
        for name, m in unet.named_modules():
            if isinstance(m, ResnetBlock2D):
                self.handles.append(m.conv1.register_forward_hook(self._resnet))
            elif name.endswith(("attn1.to_q", "attn2.to_q")) or (
                "attention_blocks" in name and name.endswith("to_q")
            ):
                self.handles.append(m.register_forward_hook(self._attn(name)))

    def _resnet(self, module, args, out) -> None:
        self.resnet_convs += 1

    def _attn(self, name: str):
        def hook(module, args, out) -> None:
            self.attn_calls += 1
            if name.endswith("attn1.to_q"):
                self.attn1_tokens += args[0].shape[0] * args[0].shape[1]

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def measure(s, sampler: Sampler | None) -> tuple[torch.Tensor, Work]:
    work = Work(s.unet)
    try:
        return run(s, sampler), work
    finally:
        work.close()


# --- off settings: exact --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PEERS))
def test_off_setting_is_the_baseline_exactly(setup, baseline, name):
    before = snapshot(setup.unet)
    out = run(setup, make_peer_sampler(name, setup.unet, OFF[name]))
    assert torch.equal(out, baseline)
    assert_restored(setup.unet, before)


# --- on settings: less work, finite, restored -----------------------------------------


def test_deepcache_skips_the_deep_path(setup, baseline):
    _, base = measure(setup, None)
    sampler = DeepCacheSampler(setup.unet)  # interval 3, branch 0
    out, work = measure(setup, sampler)
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    # 6 steps, full at 0 and 3: 2 full steps + 4 cached steps that run only the last
    # up layer (1 of the 8 resnets of this UNet), in each of the 2 windows
    per_call = base.resnet_convs // (RUN.steps * 2)
    assert per_call == 8
    assert work.resnet_convs == 2 * (2 * per_call + 4 * 1)
    assert work.attn_calls < base.attn_calls


def test_tome_merges_tokens_of_full_resolution_layers(setup, baseline):
    _, base = measure(setup, None)
    out, work = measure(setup, ToMeSampler(setup.unet, ToMeConfig(ratio=0.5)))
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    assert work.attn_calls == base.attn_calls
    # full-resolution blocks (down 0, up 1: 1 + 2 of the 4 blocks) attend to 32 of 64 tokens
    assert work.attn1_tokens < base.attn1_tokens
    assert base.attn1_tokens - work.attn1_tokens == RUN.steps * 2 * 8 * 3 * 32


def test_tome_max_downsample_reaches_coarser_layers(setup):
    _, one = measure(setup, ToMeSampler(setup.unet, ToMeConfig(max_downsample=1)))
    _, two = measure(setup, ToMeSampler(setup.unet, ToMeConfig(max_downsample=2)))
    assert two.attn1_tokens < one.attn1_tokens


def test_pab_broadcasts_attention_inside_its_timestep_range(setup, baseline):
    _, base = measure(setup, None)
    out, work = measure(setup, PABSampler(setup.unet))
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    assert work.attn_calls < base.attn_calls


@pytest.mark.parametrize("name", sorted(PEERS))
def test_removal_restores_the_model(setup, baseline, name):
    before = snapshot(setup.unet)
    sampler = make_peer_sampler(name, setup.unet, ON[name])
    sampler.enable()
    sampler.enable()  # harmless twice
    assert snapshot(setup.unet)["patched"] or name == "tome"
    sampler.disable()
    sampler.disable()
    assert_restored(setup.unet, before)
    with make_peer_sampler(name, setup.unet, ON[name]) as s:  # the api's pattern
        run(setup, s)
    assert_restored(setup.unet, before)
    assert torch.equal(run(setup), baseline)


def test_leftover_hooks_are_inert_and_replaced(setup, baseline):
    before = snapshot(setup.unet)
    stale = DeepCacheSampler(setup.unet).enable()  # e.g. a run that died half-way
    assert torch.equal(run(setup), baseline)  # hooks act only inside the sampler's predict
    fresh = DeepCacheSampler(setup.unet).enable()  # re-applying replaces them
    fresh.disable()
    stale.disable()
    assert_restored(setup.unet, before)


def test_set_params_reinstalls(setup, baseline):
    before = snapshot(setup.unet)
    sampler = ToMeSampler(setup.unet, ToMeConfig()).enable()
    sampler.set_params(ratio=0.0)
    assert sampler.enabled
    assert torch.equal(run(setup, sampler), baseline)
    assert_restored(setup.unet, before)
    with pytest.raises(ValueError):
        sampler.set_params(ratio=1.5)


# --- caches stay per window position ----------------------------------------------------


def window_calls(s, sampler: Sampler, windows: list[int], steps: int = 3) -> dict:
    """Predict the given window positions step by step; inputs differ per window."""
    gen = torch.Generator().manual_seed(1)
    inputs = {
        w: [torch.randn(1, 4, 4, *LATENT[1:], generator=gen) for _ in range(steps)] for w in (0, 1)
    }
    timesteps = (999, 500, 400)  # all but the first inside PAB's ranges
    outs = {}
    sampler.reset()
    with torch.no_grad():
        for step in range(steps):
            for w in windows:
                ctx = StepContext(step, 6, timesteps[step], w, 2, (0, 1, 2, 3), True)
                audio = s.audio[None, 2 * w : 2 * w + 4]
                outs[(step, w)] = sampler.predict(inputs[w][step], ctx, audio, s.face, s.bank)
    sampler.disable()
    return outs


@pytest.mark.parametrize("name", ["deepcache", "pab"])
def test_caches_never_cross_windows(setup, name):
    before = snapshot(setup.unet)
    cfg = DeepCacheConfig(cache_interval=3) if name == "deepcache" else PABConfig(2, 2, 2)
    both = window_calls(setup, make_peer_sampler(name, setup.unet, cfg), [0, 1])
    alone = window_calls(setup, make_peer_sampler(name, setup.unet, cfg), [1])
    for step in range(3):  # window 1 never sees window 0's cache
        assert torch.equal(both[(step, 1)], alone[(step, 1)])
    plain = window_calls(setup, Sampler(setup.unet), [0, 1])
    assert torch.equal(both[(0, 0)], plain[(0, 0)])  # a full step
    assert not torch.equal(both[(1, 1)], plain[(1, 1)])  # a cached one really reuses
    assert_restored(setup.unet, before)


def test_deepcache_cache_is_keyed_by_window(setup):
    sampler = DeepCacheSampler(setup.unet)
    sampler.reset()
    ctx = StepContext(0, 6, 999, 1, 2, (0, 1, 2, 3), True)
    with torch.no_grad():
        sampler.predict(torch.randn(1, 4, 4, 8, 8), ctx, setup.audio[None, :4], None, None)
    assert sampler.run.cache and {w for w, _ in sampler.run.cache} == {1}
    sampler.disable()
    assert not sampler.run.cache


# --- pure parts -----------------------------------------------------------------------


def test_deepcache_branch_and_skip_rule():
    assert deepcache_branch(0, 2, 4) == (0, 0)
    assert deepcache_branch(4, 2, 4) == (1, 1)  # SD: branch % 3, // 3
    assert deepcache_branch(3, 1, 4) == (1, 1)
    with pytest.raises(ValueError):
        deepcache_branch(12, 2, 4)

    def skips(step, kind, block, layer):
        return deepcache_skips(step, kind, block, layer, 3, 0, 0)

    assert not any(skips(s, k, 1, 1) for s in (0, 3, 6) for k in ("down", "mid", "up"))
    assert skips(1, "down", 0, 0) and skips(2, "mid", 0, 0) and skips(1, "down", 2, 0)
    assert skips(1, "up", 0, 1) and skips(1, "up", 1, 0)
    assert not skips(1, "up", 0, 0)  # the shallowest up layer always runs
    assert not deepcache_skips(1, "down", 0, 0, 3, 0, 1)  # branch 1: first down layer runs


def test_deepcache_holds_windows_over_each_cache_interval(setup):
    aligned = DeepCacheSampler(setup.unet, DeepCacheConfig(cache_interval=3))
    assert [aligned.next_group(s, 7).size for s in (0, 3, 6)] == [3, 3, 1]
    rotating = DeepCacheSampler(setup.unet, DeepCacheConfig(align_windows=False))
    assert rotating.next_group(0, 7).size == 1
    assert PABSampler(setup.unet).next_group(0, 7).size == 1
    assert PABSampler(setup.unet, PABConfig(hold_windows=2)).next_group(4, 7).size == 2


def test_bipartite_matching_merges_and_unmerges():
    x = torch.randn(3, 16, 8)
    merge, unmerge = bipartite_soft_matching_2d(x, 4, 4, 2, 2, 6)
    assert merge(x).shape == (3, 10, 8)
    assert unmerge(merge(x)).shape == x.shape
    same = torch.ones(2, 16, 8)  # identical tokens merge losslessly
    m, u = bipartite_soft_matching_2d(same, 4, 4, 2, 2, 12)  # capped at the 12 sources
    assert m(same).shape == (2, 4, 8)
    assert torch.equal(u(m(same)), same)
    m, u = bipartite_soft_matching_2d(x, 4, 4, 2, 2, 0)
    assert m(x) is x and u(x) is x
    with pytest.raises(ValueError):
        bipartite_soft_matching_2d(x, 3, 4, 2, 2, 2)


def test_tome_processor_wraps_and_unwraps(setup):
    sampler = ToMeSampler(setup.unet).enable()
    wrapped = [p for p in setup.unet.attn_processors.values() if isinstance(p, ToMeAttnProcessor)]
    assert len(wrapped) == 4  # every denoiser transformer block's attn1
    sampler.disable()
    assert not any(isinstance(p, ToMeAttnProcessor) for p in setup.unet.attn_processors.values())


def test_configs_validate():
    for bad in (
        lambda: DeepCacheConfig(cache_interval=0),
        lambda: DeepCacheConfig(cache_branch_id=-1),
        lambda: ToMeConfig(ratio=1.0),
        lambda: ToMeConfig(max_downsample=3),
        lambda: PABConfig(None, None, None),
        lambda: PABConfig(spatial_skip_range=0),
        lambda: PABConfig(spatial_timestep_range=(800, 100)),
        lambda: PABConfig(hold_windows=0),
    ):
        with pytest.raises(ValueError):
            bad()


def test_peers_wrap_only_video_unets(setup):
    with pytest.raises(AccelerationError):
        DeepCacheSampler(ReferenceNet(MICRO))
    with pytest.raises(AccelerationError):
        make_peer_sampler("nope", setup.unet)


def test_registry_factories(setup):
    model = SimpleNamespace(denoiser=setup.unet)
    cfg = SimpleNamespace(tome=ToMeConfig(ratio=0.25))  # an AccelConfig with a peer field
    assert isinstance(build_deepcache(model, None, object()), DeepCacheSampler)
    every5 = build_deepcache(model, None, SimpleNamespace(deepcache_interval=5))
    assert every5.config.cache_interval == 5
    assert isinstance(build_pab(model, None, object()), PABSampler)
    assert build_tome(model, None, cfg).config.ratio == 0.25


def test_fewer_steps_specs_and_matching():
    assert parse_fewer_steps("fewer-steps") == (True, None)
    assert parse_fewer_steps("fewer-steps@8") == (True, 8)
    assert parse_fewer_steps("fewer-steps@full") == (True, "full")
    assert parse_fewer_steps("deepcache") == (False, None)
    with pytest.raises(ValueError):
        parse_fewer_steps("fewer-steps@0")
    assert matched_steps(25, 10.0, 3.2) == 8  # 25 / (10 / 3.2) = 8
    assert matched_steps(25, 10.0, 0.01) == 1
    assert matched_steps(25, 10.0, 20.0) == 25

    def r(name, s):
        return MethodResult(name, {}, s, s, 0.0)

    results = [r("none", 10.0), r("deepcache", 5.0), r("full", 3.2), r("tome", 9.0)]
    assert _fewer_steps("fewer-steps", 25, results)[0] == 8  # matches full
    assert _fewer_steps("fewer-steps@tome", 25, results)[0] == 22
    assert _fewer_steps("fewer-steps@5", 25, results)[0] == 5
    assert _fewer_steps("fewer-steps", 25, [r("none", 10.0), r("tome", 9.0), r("x", 4.0)])[0] == 10
    with pytest.raises(ConfigError):
        _fewer_steps("fewer-steps@lightningcp", 25, results)
    with pytest.raises(ConfigError):
        _fewer_steps("fewer-steps", 25, results[:1])


# --- the bench (end to end, tiny) -------------------------------------------------------

DATA = Path(__file__).parent / "data"


def tiny_bench(*methods: str, steps: int):
    from lightningcp_cli.bench.runner import BenchRequest, run_bench
    from lightningcp_cli.config import OutputConfig, RenderConfig

    cfg = RenderConfig(denoise=DenoiseConfig(steps=steps), output=OutputConfig(fps=4))
    req = BenchRequest(DATA / "face_a.png", DATA / "speech_2s.wav", methods, cfg, warmup=False)
    return run_bench(req)


def test_bench_runs_fewer_steps_last_with_its_step_count():
    rep = tiny_bench("fewer-steps@1", steps=2)
    assert [r.method for r in rep.results] == ["none", "fewer-steps@1"]
    assert rep.results[1].steps == 1 and "fixed" in rep.results[1].note
    assert "fewer-steps@1: 1 of 2 steps" in report_markdown(rep)
    with pytest.raises(ConfigError):
        tiny_bench("fewer-steps@0", steps=2)


def test_bench_methods_may_carry_their_interval():
    """Peers compared at matched speed: NAME@N sets DeepCache's or LightningCP's
    interval for that row only; anything else is refused before a render."""
    from lightningcp_cli.bench.runner import method_config
    from lightningcp_cli.config import RenderConfig

    base = RenderConfig()
    deep = method_config("deepcache@12", base)
    assert deep.accel == "deepcache" and deep.accel_config.deepcache_interval == 12
    full = method_config("full@3", base)
    assert full.accel == "full" and full.accel_config.lightningcp.interval == 3
    assert method_config("tome", base).accel_config == base.accel_config
    for bad in ("tome@2", "full@0", "deepcache@x", "nope"):
        with pytest.raises(ConfigError):
            method_config(bad, base)
    rep = tiny_bench("deepcache@2", steps=2)
    assert [r.method for r in rep.results] == ["none", "deepcache@2"]
    assert rep.results[1].fidelity


@pytest.mark.skipif(
    not {"deepcache", "tome", "pab"} <= set(ACCEL_METHODS),
    reason="peers not in the accel registry yet",
)
def test_bench_runs_the_peers():
    rep = tiny_bench("deepcache", "fewer-steps", "tome", "pab", steps=3)
    names = [r.method for r in rep.results]
    assert names[:4] == ["none", "deepcache", "tome", "pab"]
    assert names[4].startswith("fewer-steps@")  # matched to the fastest of them
    assert all(r.fidelity for r in rep.results[1:])
