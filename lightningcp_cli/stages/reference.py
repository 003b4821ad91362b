"""Reference stage: run the ReferenceNet once per video and keep its feature bank.

The bank depends only on the face crop, the weights and the dtype, so it is cached on
disk (:class:`~lightningcp_cli.cache.FeatureCache`): a batch job that reuses a portrait
skips this pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..cache import FeatureCache, cache_key
from ..models.bundle import TalkingHeadModel
from ..models.codec import image_to_tensor
from .face import FaceAnalysis

CACHE_KIND = "refbank"


@dataclass
class Reference:
    bank: dict[str, torch.Tensor]  # transformer-block path -> [1, tokens, channels]
    latents: torch.Tensor  # [1, C, h, w], the encoded face crop
    cache_hit: bool


def reference_cache_key(model: TalkingHeadModel, face: FaceAnalysis) -> str:
    return cache_key(
        np.ascontiguousarray(face.crop).tobytes(),
        str(face.crop.shape),
        repr(model.spec),  # the whole architecture, not just its name
        model.weights_id,
        str(model.dtype),
    )


@torch.inference_mode()
def compute_reference(
    model: TalkingHeadModel, face: FaceAnalysis, cache: FeatureCache | None = None
) -> Reference:
    """Encode the face crop and run the ReferenceNet, or load both from the cache."""
    key = reference_cache_key(model, face)
    if cache is not None and (hit := cache.load(CACHE_KIND, key)) is not None:
        latents = hit.pop("__latents__")
        bank = {k: v.to(model.device, model.dtype) for k, v in hit.items()}
        return Reference(bank, latents.to(model.device, model.dtype), cache_hit=True)
    image = image_to_tensor(face.crop, model.device, model.dtype)
    latents = model.codec.encode(image)
    bank = model.reference_net(latents)
    if cache is not None:
        cache.save(CACHE_KIND, key, {**bank, "__latents__": latents}, model=model.spec.name)
    return Reference(dict(bank), latents, cache_hit=False)
