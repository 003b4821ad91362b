"""``lcp profile``: time per stage and per UNet block, optionally a Chrome trace.

Block times come from forward pre/post hooks on the top-level blocks of the denoiser
(conv_in, each down block, the mid block, each up block, the output head) and on the
ReferenceNet; on a GPU each hook synchronises, which slows the run slightly but makes
the split honest.  ``--trace`` wraps the render in :mod:`torch.profiler` and writes a
trace that chrome://tracing or Perfetto opens.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ProgressFn


@dataclass
class ProfileReport:
    stage_seconds: dict[str, float]
    total_seconds: float
    block_seconds: dict[str, float]  # "denoiser.down_blocks.0" -> seconds (all calls)
    block_calls: dict[str, int]
    trace: str | None
    render: dict[str, Any]


def top_level_blocks(prefix: str, model: nn.Module) -> dict[str, nn.Module]:
    """Children of ``model``; ModuleLists are expanded one level (down_blocks.0, ...)."""
    blocks = {}
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            for i, sub in enumerate(child):
                blocks[f"{prefix}.{name}.{i}"] = sub
        elif any(True for _ in child.parameters()):
            blocks[f"{prefix}.{name}"] = child
    return blocks


class BlockTimer:
    """Accumulates wall time of modules via forward hooks; ``remove()`` undoes them."""

    def __init__(self, blocks: dict[str, nn.Module], device: torch.device) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._starts: dict[str, list[float]] = defaultdict(list)
        self._device = device
        self._handles = []
        for name, module in blocks.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _pre(self, name: str):
        def hook(module, args):
            self._sync()
            self._starts[name].append(time.perf_counter())

        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            self._sync()
            self.seconds[name] += time.perf_counter() - self._starts[name].pop()
            self.calls[name] += 1

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def run_profile(
    request: Any,
    *,
    trace: Path | None = None,
    on_progress: ProgressFn | None = None,
) -> ProfileReport:
    """Render ``request`` (an :class:`~lightningcp_cli.api.RenderRequest`) with timers on."""
    from ..api import render
    from ..models.bundle import load_model

    cfg = request.config
    model = load_model(cfg.model, cfg.weights, cfg.device, cfg.dtype, offload=cfg.offload)
    blocks = {
        **top_level_blocks("denoiser", model.denoiser),
        "reference_net": model.reference_net,
        "face_locator": model.face_locator,
    }
    timer = BlockTimer(blocks, model.device)
    with ExitStack() as stack:
        stack.callback(timer.remove)
        prof = None
        if trace is not None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if model.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            prof = stack.enter_context(torch.profiler.profile(activities=activities))
        result = render(request, model=model, on_progress=on_progress)
    if prof is not None and trace is not None:
        prof.export_chrome_trace(str(trace))
    return ProfileReport(
        stage_seconds=result.stage_seconds,
        total_seconds=result.total_seconds,
        block_seconds=dict(timer.seconds),
        block_calls=dict(timer.calls),
        trace=str(trace) if trace else None,
        render=result.to_dict(),
    )
