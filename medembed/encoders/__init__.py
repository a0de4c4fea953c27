"""Frozen image encoders behind one interface (`Encoder`), looked up by name.

    encoder = get_encoder("medsiglip", model_id="/models/medsiglip-448")
    encoder.load(torch.device("cuda"))
    vectors = encoder.embed(batch)            # [B, 3, S, S] -> [B, encoder.dim]

Encoder modules are imported on first use, so asking for the CPU default does not import
transformers.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from medembed.encoders.base import Encoder, EncoderError

__all__ = ["Encoder", "EncoderError", "available_encoders", "get_encoder"]

# name -> (module, class)
_REGISTRY: dict[str, tuple[str, str]] = {
    "efficientnet-lite0": ("medembed.encoders.efficientnet_lite", "EfficientNetLite0Encoder"),
    "efficientnet-lite1": ("medembed.encoders.efficientnet_lite", "EfficientNetLite1Encoder"),
    "efficientnet-lite2": ("medembed.encoders.efficientnet_lite", "EfficientNetLite2Encoder"),
    "medsiglip": ("medembed.encoders.siglip", "SiglipEncoder"),
    "medgemma": ("medembed.encoders.medgemma", "MedGemmaEncoder"),
    "hf-vision": ("medembed.encoders.hf_generic", "HFVisionEncoder"),
    "autoencoder": ("medembed.encoders.autoencoder", "AutoencoderEncoder"),  # trained by `medembed baseline autoencoder`
}


def available_encoders() -> list[str]:
    """Registered encoder names, sorted."""
    return sorted(_REGISTRY)


def get_encoder(name: str, **options: Any) -> Encoder:
    """The encoder registered as `name`, built with `options` (its constructor's keyword arguments).

    Only config files are read here; weights are read by `load`. Unknown names or options raise
    EncoderError listing what is available.
    """
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; available: {', '.join(available_encoders())}")
    module_name, class_name = _REGISTRY[name]
    encoder_class = getattr(importlib.import_module(module_name), class_name)
    signature = inspect.signature(encoder_class)
    try:
        signature.bind(**options)
    except TypeError as error:
        accepted = ", ".join(signature.parameters) or "none"
        raise EncoderError(f"encoder {name!r}: {error}; its options: {accepted}") from error
    return encoder_class(**options)
