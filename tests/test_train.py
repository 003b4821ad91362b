"""The trainer: a few steps on one fixed batch lower the loss; checkpoints resume; the
exported weights load into the renderer's model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightningcp_cli.models.bundle import load_model
from lightningcp_cli.train.dataset import build_corpus
from lightningcp_cli.train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # The committed clips only (no espeak-ng), few variants: seconds to build.
    out = tmp_path_factory.mktemp("corpus")
    return build_corpus(
        out,
        n_utterances=0,
        n_heldout=0,
        clip_variants=1,
        use_espeak=False,
        heldout_clips=[Path(__file__).parent / "data" / "speech_2s.wav"],
        morphs=False,
    )


def _trainer(corpus, out, **kw):
    cfg = TrainConfig(batch_size=1, num_frames=2, num_workers=0, log_every=1, **kw)
    return Trainer(cfg, corpus, out, "cpu")


def test_a_few_steps_lower_the_loss_on_one_batch(corpus, tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(corpus, tmp_path, steps=12, warmup_steps=1, lr=1e-3)
    batch = torch.utils.data.default_collate([trainer.data[0]])
    losses = []
    for _ in range(12):
        loss = trainer.loss(batch, torch.Generator().manual_seed(7))  # same noise, same t
        trainer.opt.zero_grad()
        loss.backward()
        trainer.opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_checkpoint_resume_and_export(corpus, tmp_path):
    first = _trainer(corpus, tmp_path, steps=2, checkpoint_every=1)
    first.fit()
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "loss.png").is_file()
    again = _trainer(corpus, tmp_path, steps=2, checkpoint_every=1)
    assert again.resume() and again.state.step == 2
    for a, b in zip(first.nets.parameters(), again.nets.parameters(), strict=True):
        assert torch.equal(a, b)
    weights = tmp_path / "weights"
    first.export_weights(weights)
    model = load_model("lcp-tiny", weights)  # strict: every key lands, every parameter covered
    assert not model.random_weights
    ema = first.ema["denoising_unet.conv_in.weight"].half().float()
    assert torch.equal(model.denoiser.conv_in.weight, ema)
    info = json.loads((weights / "train.json").read_text())
    assert info["recipe"]["steps"] == 2 and info["steps_done"] == 2
    assert info["synthesis"]["num_frames"] == first.config.num_frames  # the data recipe too
    assert info["synthesis"]["p_open_reference"] == first.synthesis.p_open_reference
    with pytest.raises(ValueError, match="different recipe"):
        _trainer(corpus, tmp_path, steps=3).resume()
