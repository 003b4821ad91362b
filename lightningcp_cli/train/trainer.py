"""Trainer of the bundled ``lcp-tiny`` model: diffusion on the data engine's clips.

The recipe (:class:`TrainConfig`) is sized to run on a 2-core CPU in under 90 minutes; a
GPU runs the same recipe faster.  Every ``checkpoint_every`` steps the full state
(models, EMA, optimizer, data position, RNG) is written atomically to
``OUT/checkpoint.pt`` together with ``OUT/loss.png``; a second run with the same ``OUT``
resumes from it.  :func:`export_weights` writes the EMA weights as safetensors in the
official EchoMimic folder layout, which :func:`~lightningcp_cli.models.bundle.load_model`
reads.

What is trained, per clip of F frames: the ReferenceNet encodes the clip's reference
face; the denoiser predicts the clean clip (the model's ``prediction_type``) from the
noised one given that bank, the audio tokens and the face-locator feature (with the
clip's mouth track drawn in, for a model with one).  With probability ``p_uncond`` all
three conditions are dropped together, exactly as the unconditional half of
classifier-free guidance sees them at inference (zero audio, zero face feature, no
reference attention).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..config import ProgressFn
from ..models.codec import encode_clip, load_codec
from ..models.loading import load_model_weights
from ..models.registry import ModelSpec, get_model_spec
from ..stages.denoise import make_scheduler
from .dataset import SynthesisConfig, TalkingFaceDataset, locator_input

WEIGHT_FILES = ("reference_unet", "denoising_unet", "motion_module", "face_locator")


@dataclass(frozen=True)
class TrainConfig:
    """The whole recipe of the shipped weights; change it and the weights change."""

    model: str = "lcp-tiny"
    steps: int = 4000
    batch_size: int = 4
    num_frames: int = 8  # clip length (frames); inference windows are longer (12)
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    p_uncond: float = 0.1
    mouth_weight: float = 4.0  # extra loss weight on the mouth region (lip sync lives there)
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25
    num_workers: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.num_frames < 1:
            raise ValueError("steps, batch size and frames must be >= 1")
        if not 0 <= self.p_uncond < 1 or not 0 < self.ema_decay < 1:
            raise ValueError("p_uncond must be in [0, 1) and ema_decay in (0, 1)")


@dataclass
class TrainState:
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        corpus: Path,
        out_dir: Path,
        device: str = "cpu",
        *,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config, self.out_dir = config, Path(out_dir)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.log = log or (lambda msg: None)
        self.spec: ModelSpec = get_model_spec(config.model)
        if self.spec.codec == "sd-vae":
            raise ValueError("the trainer trains weight-free-codec models (lcp-tiny)")
        self.codec = load_codec(self.spec.codec, self.spec.codec_factor)
        torch.manual_seed(config.seed)
        nets = load_model_weights(self.spec, None, self.device, torch.float32, seed=config.seed)
        self.nets = torch.nn.ModuleDict(
            {
                "reference_unet": nets.reference_net,
                "denoising_unet": nets.denoiser,
                "face_locator": nets.face_locator,
            }
        ).train()
        self.ema = {k: v.detach().clone() for k, v in self.nets.state_dict().items()}
        params = [p for p in self.nets.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = make_scheduler(self.spec.prediction_type)
        self.alphas = self.scheduler.alphas_cumprod.to(self.device)
        self.synthesis = SynthesisConfig(num_frames=config.num_frames, fps=self.spec.fps)
        self.data = TalkingFaceDataset.from_folder(
            corpus,
            "train",
            config=self.synthesis,
            seed=config.seed,
            length=config.steps * 1000,
            window_position=self.spec.audio_window_position,
        )
        self.state = TrainState()

    # ------------------------------------------------------------------ schedule

    def lr_at(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        t = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    # ------------------------------------------------------------------ one step

    def loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        dev, spec = self.device, self.spec
        ref = batch["reference"].to(dev)  # [B, 3, H, W]
        frames = batch["frames"].to(dev)  # [B, F, 3, H, W]
        b = frames.shape[0]
        x0, ref_latents = encode_clip(self.codec, frames, ref, spec.latent_origin)
        bank = self.nets["reference_unet"](ref_latents)
        face = self.nets["face_locator"](locator_input(batch, spec).to(dev))
        audio = batch["audio"].to(dev)

        keep = torch.rand(b, generator=generator, device="cpu") >= self.config.p_uncond
        keep = keep.to(dev)
        audio = audio * keep[:, None, None, None]
        face = face * keep[:, None, None, None, None]

        t = torch.randint(0, len(self.alphas), (b,), generator=generator).to(dev)
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        a = self.alphas[t].view(b, 1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = {
            "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0,
            "sample": x0,
            "epsilon": noise,
        }[spec.prediction_type]
        pred = self.nets["denoising_unet"](noisy, t, audio, face, bank, keep)

        factor = spec.codec_factor
        mouth = F.avg_pool2d(batch["mouth_mask"].to(dev), factor)  # [B, 1, h, w]
        weight = 1.0 + self.config.mouth_weight * mouth[:, :, None]  # broadcast over C, F
        return ((pred - target) ** 2 * weight).mean() / weight.mean()

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.config.ema_decay
        for k, v in self.nets.state_dict().items():
            if v.dtype.is_floating_point:
                self.ema[k].lerp_(v.detach(), 1 - d)
            else:
                self.ema[k].copy_(v)

    # ------------------------------------------------------------------ loop

    def fit(self, on_progress: ProgressFn | None = None) -> TrainState:
        c = self.config
        self.resume()
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(
                self.data, range(self.state.step * c.batch_size, c.steps * c.batch_size)
            ),
            batch_size=c.batch_size,
            num_workers=c.num_workers,
            persistent_workers=c.num_workers > 0,
        )
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + self.state.step)
        t_last, running = time.perf_counter(), []
        for batch in loader:
            step = self.state.step
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(step)
            loss = self.loss(batch, gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()} at step {step}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.nets.parameters(), c.grad_clip)
            self.opt.step()
            self._update_ema()
            running.append(loss.item())
            self.state.step += 1
            now = time.perf_counter()
            self.state.seconds += now - t_last
            t_last = now
            if self.state.step % c.log_every == 0 or self.state.step == c.steps:
                mean = sum(running) / len(running)
                self.state.losses.append((self.state.step, mean))
                running.clear()
                self.log(
                    f"step {self.state.step}/{c.steps} loss {mean:.4f} "
                    f"lr {self.lr_at(step):.2e} {self.state.seconds:.0f}s"
                )
            if on_progress:
                on_progress("train", self.state.step, c.steps)
            if self.state.step % c.checkpoint_every == 0 or self.state.step == c.steps:
                self.save_checkpoint()
        return self.state

    # ------------------------------------------------------------------ persistence

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".pt.lcp-tmp")
        torch.save(
            {
                "config": asdict(self.config),
                "nets": self.nets.state_dict(),
                "ema": self.ema,
                "opt": self.opt.state_dict(),
                "state": asdict(self.state),
            },
            tmp,
        )
        os.replace(tmp, self.checkpoint_path)
        plot_losses(self.state.losses, self.out_dir / "loss.png")
        self.export_weights(self.out_dir / "weights")  # always a usable latest export

    def resume(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        ckpt = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        if ckpt["config"] != asdict(self.config):
            raise ValueError(
                f"{self.checkpoint_path}: written by a different recipe; use another --out"
            )
        self.nets.load_state_dict(ckpt["nets"])
        self.ema = ckpt["ema"]
        self.opt.load_state_dict(ckpt["opt"])
        s = ckpt["state"]
        self.state = TrainState(s["step"], [tuple(x) for x in s["losses"]], s["seconds"])
        self.log(f"resumed at step {self.state.step}")
        return True

    def export_weights(self, folder: Path, dtype: torch.dtype = torch.float16) -> list[Path]:
        """EMA weights as ``<name>.safetensors`` (official layout) + ``train.json``."""
        return export_weights(self.ema, self.config, self.state, folder, dtype, self.synthesis)


def export_weights(
    ema: dict[str, torch.Tensor],
    config: TrainConfig,
    state: TrainState,
    folder: Path,
    dtype: torch.dtype = torch.float16,
    synthesis: SynthesisConfig | None = None,
) -> list[Path]:
    """Write the weights and ``train.json``: the recipe, and how its clips were
    synthesised (the data engine's defaults shape the weights as much as the recipe)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict[str, torch.Tensor]] = {name: {} for name in WEIGHT_FILES}
    for key, value in ema.items():
        net, _, name = key.partition(".")
        if net == "denoising_unet" and ".motion_modules." in f".{name}":
            net = "motion_module"
        groups[net][name] = value.detach().to("cpu", dtype).contiguous()
    paths = []
    for net, tensors in groups.items():
        path = folder / f"{net}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt", "lcp_model": config.model})
        paths.append(path)
    info = {
        "recipe": asdict(config),
        "synthesis": asdict(synthesis) if synthesis is not None else None,
        "steps_done": state.step,
        "train_seconds": round(state.seconds, 1),
        "final_loss": state.losses[-1][1] if state.losses else None,
        "losses": state.losses,
    }
    (folder / "train.json").write_text(json.dumps(info, indent=1) + "\n")
    return paths


def plot_losses(losses: list[tuple[int, float]], path: Path) -> None:
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps, values = zip(*losses, strict=True)
    ax.plot(steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE of the prediction, mouth-weighted)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.lcp-tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def quick_config(**overrides: Any) -> TrainConfig:
    """A few-step recipe for tests and smoke runs."""
    return replace(TrainConfig(), **overrides)
