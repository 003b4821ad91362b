"""Long audio: chunked denoising with per-frame noise and cross-faded overlaps."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lightningcp_cli import api
from lightningcp_cli.bench.metrics import psnr
from lightningcp_cli.config import DenoiseConfig, OutputConfig, RenderConfig
from lightningcp_cli.errors import ConfigError
from lightningcp_cli.stages.denoise import chunk_plan, denoise, denoise_stream, frame_noise

from .cli_util import FACE, SPEECH
from .test_denoise import LinearDenoiser


@pytest.mark.parametrize(
    ("frames", "chunk", "overlap", "expected"),
    [
        (10, 10, 2, [(0, 10)]),
        (5, 10, 2, [(0, 5)]),
        (11, 10, 2, [(0, 10), (8, 11)]),
        (26, 10, 2, [(0, 10), (8, 18), (16, 26)]),
        (27, 10, 2, [(0, 10), (8, 18), (16, 26), (24, 27)]),
    ],
)
def test_chunk_plan_covers_every_frame_with_overlapping_full_chunks(
    frames, chunk, overlap, expected
):
    plan = chunk_plan(frames, chunk, overlap)
    assert plan == expected
    assert plan[0][0] == 0 and plan[-1][1] == frames
    for (s0, e0), (s1, _) in zip(plan, plan[1:], strict=False):
        assert e0 - s0 == chunk and e0 - s1 == overlap  # full chunks sharing overlap frames


def test_chunk_settings_are_validated():
    with pytest.raises(ConfigError):
        DenoiseConfig(chunk_frames=10, chunk_overlap=10)
    with pytest.raises(ConfigError):
        DenoiseConfig(chunk_overlap=0)
    with pytest.raises(ValueError):
        chunk_plan(0, 10, 2)


def test_frame_noise_depends_on_the_frame_not_the_chunk():
    a = frame_noise((4, 3, 5), range(0, 10), seed=7, clamp=1.5)
    b = frame_noise((4, 3, 5), range(6, 14), seed=7, clamp=1.5)
    assert a.shape == (1, 4, 10, 3, 5)
    assert torch.equal(a[:, :, 6:], b[:, :, :4])
    assert not torch.equal(a[:, :, 0], a[:, :, 1])
    assert not torch.equal(a, frame_noise((4, 3, 5), range(0, 10), seed=8, clamp=1.5))
    assert float(a.abs().max()) <= 1.5


def _stream(frames: int, chunk: int, overlap: int, denoiser=None):
    audio = torch.linspace(-1, 1, frames * 6 * 5).reshape(frames, 6, 5)
    cfg = DenoiseConfig(steps=3, guidance=2.5, chunk_frames=chunk, chunk_overlap=overlap)
    events: list[tuple[str, int, int]] = []
    parts = list(
        denoise_stream(
            denoiser or LinearDenoiser(),
            audio,
            None,
            None,
            cfg,
            (4, 4, 6),
            on_progress=lambda *e: events.append(e),
        )
    )
    return parts, events, audio, cfg


def test_a_video_that_fits_one_chunk_is_exactly_the_plain_loop():
    parts, _, audio, cfg = _stream(16, 240, 24)
    assert len(parts) == 1
    assert torch.equal(parts[0], denoise(LinearDenoiser(), audio, None, None, cfg, (4, 4, 6)))


def test_long_videos_stream_chunks_with_cross_faded_overlaps():
    parts, events, audio, cfg = _stream(50, 20, 6)
    plan = chunk_plan(50, 20, 6)
    assert plan == [(0, 20), (14, 34), (28, 48), (42, 50)]
    assert [p.shape[2] for p in parts] == [14, 14, 14, 8]  # every frame once, in order
    assert all(p.shape[2] <= 20 for p in parts)  # at most one chunk of latents at a time
    assert events[-1] == ("denoise", 3 * len(plan), 3 * len(plan))
    done = [e[1] for e in events]
    assert done == sorted(done)
    video = torch.cat(parts, 2)
    # the overlap of chunks 0 and 1 (frames 14..19) goes from chunk 0's to chunk 1's
    first = denoise(
        LinearDenoiser(),
        audio[0:20],
        None,
        None,
        cfg,
        (4, 4, 6),
        latents=frame_noise((4, 4, 6), range(0, 20), cfg.seed, cfg.noise_clamp),
    )
    second = denoise(
        LinearDenoiser(),
        audio[14:34],
        None,
        None,
        cfg,
        (4, 4, 6),
        latents=frame_noise((4, 4, 6), range(14, 34), cfg.seed, cfg.noise_clamp),
    )
    torch.testing.assert_close(video[:, :, :14], first[:, :, :14])
    ramp = torch.arange(1, 7, dtype=torch.float32).view(1, 1, 6, 1, 1) / 7
    torch.testing.assert_close(
        video[:, :, 14:20], first[:, :, 14:20] * (1 - ramp) + second[:, :, :6] * ramp
    )
    torch.testing.assert_close(video[:, :, 20:28], second[:, :, 6:14])


def test_chunked_render_matches_the_whole_render_without_seams(tmp_path: Path):
    """The bundled model on a 2 s clip (48 frames): chunks of 16 overlapping by 6 give
    nearly the video of one chunk, and the frames at chunk borders change no more from
    their neighbours than the others do."""
    base = RenderConfig(
        denoise=DenoiseConfig(steps=6), output=OutputConfig(fps=24), use_cache=False
    )
    chunked = replace(base, denoise=replace(base.denoise, chunk_frames=16, chunk_overlap=6))
    results = []
    for i, cfg in enumerate((base, chunked)):
        request = api.RenderRequest(FACE, SPEECH, tmp_path / f"v{i}.mp4", cfg)
        results.append(api.render(request, keep_frames=True))
    whole, parts = (r.crop_frames for r in results)
    assert len(whole) == len(parts) == results[0].num_frames == 48
    similarity = np.mean([psnr(a, b) for a, b in zip(whole, parts, strict=True)])
    assert similarity > 30.0, similarity
    steps = np.array(
        [np.abs(b.astype(np.float32) - a).mean() for a, b in zip(parts, parts[1:], strict=False)]
    )
    borders = [s - 1 for s, _ in chunk_plan(48, 16, 6)[1:]]  # frame s-1 -> s
    assert steps[borders].max() <= 3 * np.median(steps) + 1.0, (steps[borders], np.median(steps))
