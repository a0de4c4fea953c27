"""Frozen image encoders behind one interface (`Encoder`), looked up by name.

    encoder = get_encoder("medsiglip", model_id="/models/medsiglip-448")
    encoder.load(torch.device("cuda"))
    vectors = encoder.embed(batch)            # [B, 3, S, S] -> [B, encoder.dim]

Encoder modules are imported on first use (`medembed.encoders.registry` knows them by name without importing
them), so asking for the CPU default does not import transformers, and listing the encoders imports no torch. A hub
encoder's config.json is resolved before its module is imported, so a model that cannot be had (no network, gated,
not downloaded) fails in about a second with the cause and the fix, not after the seconds torch and transformers
take to import.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from medembed.encoders.registry import (
    HUB,
    TOKEN_OPTIONS,
    EncoderError,
    available_encoders,
    encoder_levels_help,
    registered_encoder,
)

if TYPE_CHECKING:
    from medembed.encoders.base import Encoder

__all__ = ["Encoder", "EncoderError", "available_encoders", "encoder_levels_help", "get_encoder"]


def get_encoder(name: str, **options: Any) -> Encoder:
    """The encoder registered as `name`, built with `options` (its constructor's keyword arguments).

    Only config files are read here; weights are read by `load`. Unknown names or options raise
    EncoderError listing what is available; so does a hub checkpoint that cannot be had (see the module doc).
    """
    entry = registered_encoder(name)
    model_id = options.get("model_id", entry.default_model)
    if entry.source == HUB and isinstance(model_id, str):
        _resolve_hub_config(model_id, options)
    encoder_class = entry.load()
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


def _resolve_hub_config(model_id: str, options: dict[str, Any]) -> None:
    """Fetch (or find in the cache) the checkpoint's config.json, as its constructor will: the cheap first step,
    which fails when the hub cannot serve the checkpoint (a local directory is left to the constructor)."""
    from medembed.encoders._hub import HFCheckpoint

    hub = {key: options.get(key) for key in ("revision", "cache_dir", "local_files_only")}
    checkpoint = HFCheckpoint(model_id, **hub)
    if not checkpoint.is_local:
        checkpoint.file("config.json")


def __getattr__(name: str) -> Any:
    """`Encoder`, the interface, from its module on first use (it imports torch)."""
    if name == "Encoder":
        from medembed.encoders.base import Encoder

        return Encoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
