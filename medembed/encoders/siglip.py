"""SigLIP vision towers (default MedSigLIP-448) from a hub id or a local directory.

Accepts a SiglipVisionModel checkpoint or a full SiglipModel one (only its vision tower is kept).
Embeddings are the raw pooled output (no L2 normalisation): normalising is a head option.

Preprocessing (`medsiglip_spec`), step by step, and where each step comes from:
- decode to [0, 1] by bit depth: HAI-DEF medsiglip `serving/predictor.py` (and medembed's decoder for DICOM);
- zero-pad to a square, image centred: `_zero_pad_image_to_square` in the same serving code (the hub
  processor, SiglipImageProcessor, stretches instead; `medembed encoders check` shows the difference);
- resize to the checkpoint's `image_size`, bilinear without antialiasing: `tf.image.resize`'s default as
  used in the MedSigLIP quick-start notebook. `antialias=True` (`--option antialias=true`) antialiases the
  downscale instead, as the hub processor's PIL resize does (a different spec hash);
- scale to [-1, 1] (mean 0.5, std 0.5): the serving code and the hub preprocessor_config.json agree;
- grey repeated to three channels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from medembed.encoders._hf import (
    VIT_LEVELS_HELP,
    HFCheckpoint,
    load_pretrained,
    siglip_tower_flops,
    vit_level_maps,
    vit_level_names,
)
from medembed.encoders.base import Encoder, EncoderError
from medembed.data.images import medsiglip_spec

_SIGLIP_MODEL_TYPES = ("siglip", "siglip_vision_model")


class SiglipEncoder(Encoder):
    """A SigLIP vision tower with MedSigLIP's preprocessing at the checkpoint's own resolution.

    `pooling`: "pooler_output" (the attention-pooling head, SigLIP's image embedding) or
    "mean_patch_tokens" (mean of the last hidden states). `antialias`: antialias the bilinear downscale
    (default False, as the quick-start notebook's `tf.image.resize`).
    """

    name = "medsiglip"
    POOLINGS = ("pooler_output", "mean_patch_tokens")

    def __init__(
        self,
        model_id: str = "google/medsiglip-448",
        *,
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        pooling: str = "pooler_output",
        antialias: bool = False,
    ) -> None:
        if pooling not in self.POOLINGS:
            raise EncoderError(f"medsiglip: pooling must be one of {self.POOLINGS}, got {pooling!r}")
        self.checkpoint = HFCheckpoint(model_id, revision, cache_dir, local_files_only)
        model_type = self.checkpoint.config_dict().get("model_type")
        if model_type not in _SIGLIP_MODEL_TYPES:
            raise EncoderError(f"{model_id}: model_type {model_type!r} is not SigLIP (use 'medgemma' or 'hf-vision')")
        # For a full SiglipModel config this picks its vision_config.
        self.config = SiglipVisionConfig.from_pretrained(self.checkpoint.directory())
        if pooling == "pooler_output" and not self.config.vision_use_head:
            raise EncoderError(f"{model_id}: this vision tower has no pooling head; use pooling='mean_patch_tokens'")
        self.pooling = pooling
        self.model_id = model_id
        self.revision = self.checkpoint.resolved_revision()
        self.dim = self.config.hidden_size
        self.embedding_kind = pooling
        if not isinstance(antialias, bool):
            raise EncoderError(f"medsiglip: antialias must be true or false, got {antialias!r}")
        self.preprocess = dataclasses.replace(medsiglip_spec(self.config.image_size), antialias=antialias)
        self._model: torch.nn.Module | None = None

    def load(self, device: torch.device) -> None:
        """Load the vision tower's float32 weights onto `device`, frozen."""
        self._model = load_pretrained(SiglipVisionModel, self.checkpoint, device)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` -> `[B, hidden_size]` float32 (pooled output or mean patch token)."""
        return self._pooled(self._require_loaded(self._model)(pixel_values=pixels))

    def _pooled(self, outputs) -> torch.Tensor:
        if self.pooling == "pooler_output":
            return outputs.pooler_output.float()
        return outputs.last_hidden_state.mean(dim=1).float()

    @classmethod
    def levels_help(cls) -> str:
        return VIT_LEVELS_HELP

    def level_names(self) -> list[str]:
        """`layer0`..`layer{depth}` and `final` (see `vit_level_names`)."""
        return vit_level_names(self.config.num_hidden_layers)

    def level_map_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Every level is a (hidden_size, side, side) grid of patch tokens, side = image_size / patch_size."""
        side = self.config.image_size // self.config.patch_size
        return dict.fromkeys(self.level_names(), (self.config.hidden_size, side, side))

    def level_maps(self, pixels: torch.Tensor, names: set[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The embedding and the patch-token maps of `names`, from one forward with every hidden state."""
        outputs = self._require_loaded(self._model)(pixel_values=pixels, output_hidden_states=True)
        side = self.config.image_size // self.config.patch_size
        return self._pooled(outputs), vit_level_maps(outputs, names, side)

    def config_sha256(self) -> str:
        """sha256 of the checkpoint's config.json."""
        return self.checkpoint.config_sha256()

    def weight_files(self) -> list[Path]:
        """The checkpoint's safetensors files (from_pretrained reads all of them)."""
        return self.checkpoint.weight_files()

    def flops_per_image(self) -> float:
        """ViT forward FLOPs from the config, including the attention-pooling head when present."""
        return siglip_tower_flops(self.config)
