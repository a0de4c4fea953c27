"""Generic transformers vision encoders through AutoModel (RAD-DINO, DINOv2 and other ViT-style models).

Preprocessing comes from the checkpoint's preprocessor_config.json (image_mean/std, size or crop
size, resample). One deliberate difference: where that processor centre-crops, medembed zero-pads to
a square instead and resizes the whole image, because a crop can cut off the anatomy at a
radiograph's edges. The spec records this (pad_to_square=True), so the store's hash says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel

from medembed.encoders._hf import (
    VIT_LEVELS_HELP,
    HFCheckpoint,
    load_pretrained,
    read_json,
    vit_forward_flops,
    vit_level_maps,
    vit_level_names,
)
from medembed.encoders.base import Encoder, EncoderError
from medembed.data.images import PreprocessSpec

# PIL resample codes used in preprocessor_config.json
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


class HFVisionEncoder(Encoder):
    """Any AutoModel vision encoder; `pooling`: "cls" (first token of the last hidden state) or "pooler_output"."""

    name = "hf-vision"
    POOLINGS = ("cls", "pooler_output")

    def __init__(
        self,
        model_id: str,
        *,
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        pooling: str = "cls",
    ) -> None:
        if pooling not in self.POOLINGS:
            raise EncoderError(f"hf-vision: pooling must be one of {self.POOLINGS}, got {pooling!r}")
        self.checkpoint = HFCheckpoint(model_id, revision, cache_dir, local_files_only)
        self.config = AutoConfig.from_pretrained(self.checkpoint.directory())
        self.pooling = pooling
        self.model_id = model_id
        self.revision = self.checkpoint.resolved_revision()
        self.dim = self.config.hidden_size
        self.embedding_kind = pooling
        self.preprocess = spec_from_preprocessor_config(
            read_json(self.checkpoint.file("preprocessor_config.json")), model_id
        )
        self._model: torch.nn.Module | None = None

    def load(self, device: torch.device) -> None:
        """Load the AutoModel's float32 weights onto `device`, frozen.

        Only weights the chosen pooling reads must be in the checkpoint: for "cls" a checkpoint saved without
        its pooler (ViT's `add_pooling_layer=False`) loads; its pooler stays unused. For "pooler_output" a
        missing pooler is refused.
        """
        unused = ("pooler.",) if self.pooling == "cls" else ()
        self._model = load_pretrained(AutoModel, self.checkpoint, device, unused_prefixes=unused)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` -> `[B, hidden_size]` float32."""
        return self._pooled(self._require_loaded(self._model)(pixel_values=pixels))

    @classmethod
    def levels_help(cls) -> str:
        return f"{VIT_LEVELS_HELP}, for ViT-style checkpoints (patch_size, hidden_size, num_hidden_layers in config.json; CLS and register tokens left out)"

    def _vit_side(self) -> int | None:
        """Patch grid side for ViT-style configs (None: not ViT-style, no levels)."""
        needed = ("patch_size", "hidden_size", "num_hidden_layers")
        if not all(isinstance(getattr(self.config, field, None), int) for field in needed):
            return None
        return self.preprocess.size // self.config.patch_size

    def level_names(self) -> list[str]:
        """`layer0`..`layer{depth}` and `final` for ViT-style checkpoints, else none."""
        return [] if self._vit_side() is None else vit_level_names(self.config.num_hidden_layers)

    def level_map_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Every level is a (hidden_size, side, side) grid of patch tokens."""
        side = self._vit_side()
        return dict.fromkeys(self.level_names(), (self.config.hidden_size, side, side))

    def level_maps(self, pixels: torch.Tensor, names: set[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The embedding and the patch-token maps of `names` (CLS and register tokens left out), from one forward."""
        outputs = self._require_loaded(self._model)(pixel_values=pixels, output_hidden_states=True)
        return self._pooled(outputs), vit_level_maps(outputs, names, self._vit_side())

    def _pooled(self, outputs) -> torch.Tensor:
        if self.pooling == "pooler_output":
            if outputs.pooler_output is None:
                raise EncoderError(f"{self.model_id}: this model returns no pooler_output; use pooling='cls'")
            return outputs.pooler_output.float()
        return outputs.last_hidden_state[:, 0].float()

    def config_sha256(self) -> str:
        """sha256 of the checkpoint's config.json."""
        return self.checkpoint.config_sha256()

    def weight_files(self) -> list[Path]:
        """The checkpoint's safetensors files."""
        return self.checkpoint.weight_files()

    def flops_per_image(self) -> float | None:
        """ViT FLOPs at the preprocessed size for ViT-style configs (CLS + register tokens), else None."""
        config = self.config
        needed = ("patch_size", "hidden_size", "num_hidden_layers")
        if not all(isinstance(getattr(config, field, None), int) for field in needed):
            return None
        intermediate = getattr(config, "intermediate_size", None) or int(config.hidden_size * config.mlp_ratio)
        return vit_forward_flops(
            image_size=self.preprocess.size,
            patch_size=config.patch_size,
            hidden_size=config.hidden_size,
            intermediate_size=intermediate,
            num_layers=config.num_hidden_layers,
            num_channels=getattr(config, "num_channels", 3),
            prefix_tokens=1 + getattr(config, "num_register_tokens", 0),
        )


def spec_from_preprocessor_config(processor: dict[str, Any], model_id: str) -> PreprocessSpec:
    """Map a transformers preprocessor_config.json onto a PreprocessSpec (pad to square instead of centre crop)."""
    resample = processor.get("resample", 3)
    if resample not in _RESAMPLE:
        raise EncoderError(f"{model_id}: preprocessor resample={resample} is not supported (2=bilinear, 3=bicubic)")
    if processor.get("do_normalize", True):
        mean, std = processor.get("image_mean"), processor.get("image_std")
        if mean is None or std is None:
            raise EncoderError(f"{model_id}: preprocessor_config.json has do_normalize but no image_mean/image_std")
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return PreprocessSpec(
        size=_square_side(processor, model_id),
        pad_to_square=True,
        resize=_RESAMPLE[resample],
        antialias=True,  # HF processors resize with PIL, which antialiases when shrinking
        mean=tuple(mean),
        std=tuple(std),
    )


def _square_side(processor: dict[str, Any], model_id: str) -> int:
    """The model's input side: the crop size when the processor centre-crops, else its resize target."""
    size = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
        if "height" in size and size.get("height") == size.get("width"):
            return int(size["height"])
    raise EncoderError(f"{model_id}: cannot derive a square input size from preprocessor_config.json ({size!r})")
