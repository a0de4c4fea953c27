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
from dataclasses import dataclass
from typing import Any

from medembed.encoders.base import Encoder, EncoderError
from medembed.options import option

__all__ = ["Encoder", "EncoderChoice", "EncoderError", "available_encoders", "get_encoder"]

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


@dataclass
class EncoderChoice:
    """Which encoder a command builds, and with what: the options `extract`, `encoders check` and the sweep share."""

    encoder: str = option("medsiglip", "Encoder name (medembed encoders list).", flag="-e")
    model: str | None = option(None, "Hub id or local directory of the checkpoint (HF encoders).")
    revision: str | None = option(None, "Model revision (branch, tag or commit) on the hub.")
    options: dict[str, Any] = option(help="Encoder option key=value, e.g. --option pooling=mean_patch_tokens --option size=320.", flag="--option", factory=dict)

    def __post_init__(self) -> None:
        if self.encoder not in _REGISTRY:
            raise EncoderError(f"unknown encoder {self.encoder!r}; available: {', '.join(available_encoders())}")

    def encoder_options(self) -> dict[str, Any]:
        """The keyword arguments for `get_encoder` (what a store records as its encoder options)."""
        given = {"model_id": self.model, "revision": self.revision}
        return dict(self.options) | {key: value for key, value in given.items() if value is not None}
