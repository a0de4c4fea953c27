"""The encoders medembed knows, by name, without importing them: where each one's class lives and what it says
about itself in `medembed encoders list` (kept here so listing imports no torch; tests/encoders/test_registry.py
checks every entry against its class)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from medembed.errors import MedembedError


class EncoderError(MedembedError):
    """A user-fixable encoder problem: unknown name or option, missing checkpoint file, unsupported config."""


_VIT_LEVELS = (
    "layer0..layerN (layer0: the patch embeddings, layerK: transformer layer K's output; layer:-4 counts from the end), "
    "final (the last hidden state, after the final norm): patch tokens as a side x side grid"
)


@dataclass(frozen=True)
class RegisteredEncoder:
    """One encoder's entry: its module and class, and the levels it can store as tokens, in words."""

    module: str
    cls: str
    levels: str

    def load(self) -> type:
        """The encoder class (imports its module: torch, and transformers for hub encoders)."""
        return getattr(importlib.import_module(self.module), self.cls)


_REGISTRY: dict[str, RegisteredEncoder] = {
    "efficientnet-lite0": RegisteredEncoder(
        "medembed.encoders.efficientnet_lite", "EfficientNetLite0Encoder",
        "stem, block0..block15, final (at 224 px: block0 112x112x16, block2 56x56x24, block4 28x28x40, block10 14x14x112, "
        "block14 7x7x192, block15 7x7x320, final 7x7x1280)"),
    "efficientnet-lite1": RegisteredEncoder(
        "medembed.encoders.efficientnet_lite", "EfficientNetLite1Encoder",
        "stem, block0..block20, final (at 240 px: block0 120x120x16, block3 60x60x24, block6 30x30x40, block14 15x15x112, "
        "block19 8x8x192, block20 8x8x320, final 8x8x1280)"),
    "efficientnet-lite2": RegisteredEncoder(
        "medembed.encoders.efficientnet_lite", "EfficientNetLite2Encoder",
        "stem, block0..block20, final (at 260 px: block0 130x130x16, block3 65x65x24, block6 33x33x48, block14 17x17x120, "
        "block19 9x9x208, block20 9x9x352, final 9x9x1280)"),
    "medsiglip": RegisteredEncoder("medembed.encoders.siglip", "SiglipEncoder", _VIT_LEVELS),
    "medgemma": RegisteredEncoder("medembed.encoders.medgemma", "MedGemmaEncoder", f"{_VIT_LEVELS} (the vision tower's)"),
    "hf-vision": RegisteredEncoder(
        "medembed.encoders.hf_generic", "HFVisionEncoder",
        f"{_VIT_LEVELS}, for ViT-style checkpoints (patch_size, hidden_size, num_hidden_layers in config.json; CLS and "
        "register tokens left out)"),
    "autoencoder": RegisteredEncoder(  # trained by `medembed baseline autoencoder`
        "medembed.encoders.autoencoder", "AutoencoderEncoder",
        "stage1..stage3 (the first three stride-2 stages), final (the bottleneck map, size/16 on a side)"),
}

# Options every encoder takes (Encoder.configure_tokens), beside its constructor's own.
TOKEN_OPTIONS = ("levels", "tokens", "views", "view_reduce")


def available_encoders() -> list[str]:
    """Registered encoder names, sorted."""
    return sorted(_REGISTRY)


def encoder_levels_help(name: str) -> str:
    """The levels encoder `name` can store as tokens, in words (`medembed encoders list`)."""
    return _REGISTRY[name].levels
