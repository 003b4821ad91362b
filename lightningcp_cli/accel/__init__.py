"""Acceleration methods: a registry ``name -> factory`` building a denoising :class:`Sampler`.

A factory is called as ``factory(model, face, config)`` with the loaded
:class:`~lightningcp_cli.models.bundle.TalkingHeadModel`, the portrait's
:class:`~lightningcp_cli.stages.face.FaceAnalysis` (or None) and the render's
:class:`~lightningcp_cli.config.AccelConfig`; it returns a
:class:`~lightningcp_cli.stages.denoise.Sampler` wrapping ``model.denoiser``.  The sampler
patches the model only between ``enable()`` and ``disable()`` (``with sampler:``), so
``api.render`` runs::

    with build_sampler(cfg.accel, model, face, cfg.accel_config) as sampler:
        latents = denoise(model.denoiser, ..., sampler=sampler)

This module imports nothing heavy (``config`` reads :data:`ACCEL_METHODS` from it, and the
CLI imports ``config`` before torch): entries name their factory as ``lazy(module, attr)``
and the module is imported on first use.  To add a method, add one entry to
:data:`ACCEL_FACTORIES` below (e.g. ``"deepcache": lazy(".peers", "build_deepcache")``);
``ACCEL_METHODS``, ``--accel`` choices and ``lcp bench`` follow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import AccelerationError

if TYPE_CHECKING:  # for annotations only: importing these here would be circular/heavy
    from ..config import AccelConfig
    from ..models.bundle import TalkingHeadModel
    from ..stages.denoise import Sampler
    from ..stages.face import FaceAnalysis

#: ``factory(model, face, config) -> Sampler``
SamplerFactory = Callable[["TalkingHeadModel", "FaceAnalysis | None", "AccelConfig"], "Sampler"]


def lazy(module: str, attr: str) -> SamplerFactory:
    """A factory that imports ``module`` (relative to this package) on its first call."""

    def factory(model: Any, face: Any, config: Any) -> Any:
        target = getattr(importlib.import_module(module, __name__), attr)
        return target(model, face, config)

    factory.__qualname__ = factory.__name__ = f"lazy({module}:{attr})"
    return factory


def build_none(model: TalkingHeadModel, face: FaceAnalysis | None, config: AccelConfig) -> Sampler:
    """The model's own pipeline: the plain sampler."""
    from ..stages.denoise import Sampler

    return Sampler(model.denoiser)


#: Method name -> sampler factory.  Insertion order is the order shown to users.
ACCEL_FACTORIES: dict[str, SamplerFactory] = {
    "none": build_none,
    "lightningcp": lazy(".lightningcp", "build_lightningcp"),
    "lightningcp+dfa": lazy(".lightningcp", "build_lightningcp_dfa"),
    "full": lazy(".lightningcp", "build_full"),
    # Peers, for comparison in `lcp bench` (see docs/ACCEL.md, "Peers").
    "deepcache": lazy(".peers", "build_deepcache"),
    "tome": lazy(".peers", "build_tome"),
    "pab": lazy(".peers", "build_pab"),
}

#: The names ``--accel`` accepts (``config.ACCEL_METHODS`` is this tuple).
ACCEL_METHODS: tuple[str, ...] = tuple(ACCEL_FACTORIES)


def build_sampler(
    method: str,
    model: TalkingHeadModel,
    face: FaceAnalysis | None = None,
    config: AccelConfig | None = None,
) -> Sampler:
    """The sampler of ``method`` for ``model`` (not yet enabled: use ``with``)."""
    try:
        factory = ACCEL_FACTORIES[method]
    except KeyError:
        raise AccelerationError(
            f"unknown acceleration {method!r}; choose one of: {', '.join(ACCEL_FACTORIES)}"
        ) from None
    if config is None:
        from ..config import AccelConfig

        config = AccelConfig()
    return factory(model, face, config)


__all__ = [
    "ACCEL_FACTORIES",
    "ACCEL_METHODS",
    "SamplerFactory",
    "build_sampler",
    "lazy",
]
