"""``--offload``: the networks live in CPU memory; each moves to the GPU only while it runs.

Model-level offload, one network on the accelerator at a time, in the order the pipeline
calls them (whisper, ReferenceNet, face locator, denoiser, VAE).  Peak GPU memory is then
the largest network plus its activations instead of the sum of all: for EchoMimic v1 in
fp16 the denoiser's 2.6 GB of weights instead of all 4.4 GB, which is what lets 8-12 GB cards
run it.  Each swap costs one host-device copy of the two networks involved; the denoiser
stays resident through all of its steps, so a render pays a few swaps per chunk, not per
step.

This is the idea of diffusers' ``enable_model_cpu_offload``, written on torch's forward
pre-hooks because our networks are not components of a diffusers pipeline.  The hook is
on *every* submodule, not only each network's root: the accelerated samplers call parts
of the denoiser directly (its last up-block at non-key steps), and the VAE is entered
through ``encode``/``decode`` rather than ``forward``.  The hook also moves the call's
tensor arguments to the GPU, since callers that place inputs by a network's parameter
device would otherwise place them on the CPU while it is offloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["ModelOffload"]


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


class ModelOffload:
    """Keeps ``networks`` (name -> module) on ``offload_device`` and moves the one being
    called to ``device``, sending the previous one back.

    ``resident`` names the network now on ``device`` (None before the first call);
    ``swaps`` counts the moves, for tests and logs.  :meth:`remove` takes the hooks off and
    leaves every network on ``offload_device``.
    """

    def __init__(
        self,
        networks: Mapping[str, nn.Module],
        device: torch.device | str,
        offload_device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.networks = dict(networks)
        self.resident: str | None = None
        self.swaps = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, net in self.networks.items():
            net.to(self.offload_device)
            hook = self._hook_for(name)
            for module in net.modules():
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _hook_for(self, name: str) -> Callable[..., tuple[tuple, dict]]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if self.resident != name:
                self.load(name)
            return _to_device(args, self.device), _to_device(kwargs, self.device)

        return hook

    def load(self, name: str) -> None:
        """Move network ``name`` to the accelerator (and the resident one off it)."""
        if self.resident is not None:
            self.networks[self.resident].to(self.offload_device)
        self.networks[name].to(self.device)
        self.resident = name
        self.swaps += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.resident is not None:
            self.networks[self.resident].to(self.offload_device)
            self.resident = None
