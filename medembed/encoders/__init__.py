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

__all__ = ["Encoder", "EncoderChoice", "EncoderError", "available_encoders", "encoder_levels_help", "get_encoder"]

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


def encoder_levels_help(name: str) -> str:
    """The levels encoder `name` can store as tokens, in words (`medembed encoders list`)."""
    module_name, class_name = _REGISTRY[name]
    return getattr(importlib.import_module(module_name), class_name).levels_help()


def get_encoder(name: str, **options: Any) -> Encoder:
    """The encoder registered as `name`, built with `options` (its constructor's keyword arguments).

    Only config files are read here; weights are read by `load`. Unknown names or options raise
    EncoderError listing what is available.
    """
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; available: {', '.join(available_encoders())}")
    module_name, class_name = _REGISTRY[name]
    encoder_class = getattr(importlib.import_module(module_name), class_name)
    token_options = {key: options.pop(key) for key in TOKEN_OPTIONS if key in options}
    signature = inspect.signature(encoder_class)
    try:
        signature.bind(**options)
    except TypeError as error:
        accepted = ", ".join([*signature.parameters, *TOKEN_OPTIONS]) or "none"
        raise EncoderError(f"encoder {name!r}: {error}; its options: {accepted}") from error
    encoder = encoder_class(**options)
    encoder.configure_tokens(**token_options)
    return encoder


# Options every encoder takes (Encoder.configure_tokens), beside its constructor's own.
TOKEN_OPTIONS = ("levels", "tokens", "views", "view_reduce")


@dataclass
class EncoderChoice:
    """Which encoder a command builds, and with what: the options `extract`, `encoders check` and the sweep share."""

    encoder: str = option("medsiglip", "Encoder name (medembed encoders list).", flag="-e")
    model: str | None = option(None, "Hub id or local directory of the checkpoint (HF encoders).")
    revision: str | None = option(None, "Model revision (branch, tag or commit) on the hub.")
    options: dict[str, Any] = option(help="Encoder option key=value, e.g. --option pooling=mean_patch_tokens --option size=320.", flag="--option", factory=dict)
    levels: str | None = option(None, "Intermediate levels to store as tokens, e.g. block14,block10@7x7 or layer:-4@4x4 (medembed encoders list shows each encoder's).")
    tokens: str | None = option(None, "Regional tokens of the final feature map, e.g. 2x2,4x4 (= levels final@2x2,final@4x4).")
    views: str | None = option(None, "Test-time views embedded beside each image and averaged into its embedding: hflip, vflip, zoom:F.")
    view_reduce: str = option("mean", "With --views: mean (store the average) | all (also every view, as the token level 'views').")

    def __post_init__(self) -> None:
        if self.encoder not in _REGISTRY:
            raise EncoderError(f"unknown encoder {self.encoder!r}; available: {', '.join(available_encoders())}")
        if self.view_reduce not in ("mean", "all"):
            raise EncoderError(f"option view_reduce must be mean or all, got {self.view_reduce!r}")

    def encoder_options(self) -> dict[str, Any]:
        """The keyword arguments for `get_encoder` (what a store records as its encoder options)."""
        given = {"model_id": self.model, "revision": self.revision, "levels": self.levels, "tokens": self.tokens, "views": self.views}
        if self.views:
            given["view_reduce"] = self.view_reduce
        return dict(self.options) | {key: value for key, value in given.items() if value is not None}
