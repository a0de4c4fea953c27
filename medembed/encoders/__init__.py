"""Frozen image encoders behind one interface (`Encoder`), looked up by name.

    encoder = get_encoder("medsiglip", model_id="/models/medsiglip-448")
    encoder.load(torch.device("cuda"))
    vectors = encoder.embed(batch)            # [B, 3, S, S] -> [B, encoder.dim]

Encoder modules are imported on first use (`medembed.encoders.registry` knows them by name without importing
them), so asking for the CPU default does not import transformers, and listing the encoders imports no torch.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from medembed.encoders.registry import _REGISTRY, TOKEN_OPTIONS, EncoderError, available_encoders, encoder_levels_help

if TYPE_CHECKING:
    from medembed.encoders.base import Encoder

__all__ = ["Encoder", "EncoderError", "available_encoders", "encoder_levels_help", "get_encoder"]


def get_encoder(name: str, **options: Any) -> Encoder:
    """The encoder registered as `name`, built with `options` (its constructor's keyword arguments).

    Only config files are read here; weights are read by `load`. Unknown names or options raise
    EncoderError listing what is available.
    """
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; available: {', '.join(available_encoders())}")
    encoder_class = _REGISTRY[name].load()
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


def __getattr__(name: str) -> Any:
    """`Encoder`, the interface, from its module on first use (it imports torch)."""
    if name == "Encoder":
        from medembed.encoders.base import Encoder

        return Encoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
