"""Named installations on a model: what an accelerator patched, and how to undo it.

Each model carries one small registry (``model._lcp_accel``: name -> :class:`Installed`),
like diffusers' ``HookRegistry``.  ``install`` refuses a name another owner holds and is
a no-op for the same owner (enabling twice is harmless); ``uninstall`` runs the undo
function and forgets the name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import AccelerationError

_ATTR = "_lcp_accel"


@dataclass(eq=False)
class Installed:
    owner: object
    undo: Callable[[], None]
    value: Any = None  # what the installer wants to find again (e.g. processor states)


def registry(model: nn.Module) -> dict[str, Installed]:
    reg = model.__dict__.get(_ATTR)
    if reg is None:
        reg = {}
        model.__dict__[_ATTR] = reg  # plain attribute: not a submodule, not in state_dict
    return reg


def installed(model: nn.Module, name: str) -> Installed | None:
    return registry(model).get(name)


def install(
    model: nn.Module, name: str, owner: object, do: Callable[[], tuple[Callable[[], None], Any]]
) -> Installed:
    """Run ``do`` (returning ``(undo, value)``) unless ``owner`` installed ``name`` already."""
    reg = registry(model)
    entry = reg.get(name)
    if entry is not None:
        if entry.owner is owner:
            return entry
        raise AccelerationError(f"{name} is already installed on this model by another owner")
    undo, value = do()
    entry = reg[name] = Installed(owner, undo, value)
    return entry


def uninstall(model: nn.Module, name: str, owner: object | None = None) -> bool:
    """Undo ``name`` (only if ``owner`` holds it, when given); True if something was undone."""
    reg = registry(model)
    entry = reg.get(name)
    if entry is None or (owner is not None and entry.owner is not owner):
        return False
    del reg[name]
    entry.undo()
    return True
