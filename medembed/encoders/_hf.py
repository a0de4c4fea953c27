"""Shared Hugging Face plumbing: checkpoint resolution (local dir or hub cache, offline flags), loading, ViT FLOPs.

Used by the SigLIP, MedGemma and generic encoders so that each of them only says what it builds and
how it pools.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError

from medembed.encoders.base import EncoderError, file_sha256, freeze

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def offline_mode() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set (read now, not at import time)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class HFCheckpoint:
    """A checkpoint named by a local directory or a hub id (+ revision), resolved file by file.

    Hub files come from (or go to) the regular Hugging Face cache; with `local_files_only` (or the
    offline environment flags) nothing is downloaded and a missing file is a clear EncoderError.
    """

    model_id: str
    revision: str | None = None
    cache_dir: str | None = None
    local_files_only: bool | None = None

    @property
    def is_local(self) -> bool:
        """Whether `model_id` is an existing directory (then revision and cache are unused)."""
        return Path(self.model_id).expanduser().is_dir()

    @property
    def offline(self) -> bool:
        """Explicit `local_files_only`, else the environment's offline flag."""
        return offline_mode() if self.local_files_only is None else bool(self.local_files_only)

    def file(self, filename: str, *, required: bool = True) -> Path | None:
        """Local path of `filename` in the checkpoint; None when absent and not `required`."""
        if self.is_local:
            path = Path(self.model_id).expanduser() / filename
            if path.is_file():
                return path
            if required:
                raise EncoderError(f"{self.model_id}: checkpoint directory has no {filename}")
            return None
        return self._hub_file(filename, required)

    def _hub_file(self, filename: str, required: bool) -> Path | None:
        try:
            return Path(
                hf_hub_download(
                    self.model_id,
                    filename,
                    revision=self.revision,
                    cache_dir=self.cache_dir,
                    local_files_only=self.offline,
                )
            )
        except EntryNotFoundError as error:
            if not required:
                return None
            hint = " (offline: download it first, or pass a local directory)" if self.offline else ""
            raise EncoderError(f"{self.model_id}: cannot find {filename}{hint}") from error
        except HFValidationError as error:
            raise EncoderError(f"{self.model_id}: neither a local directory nor a valid hub id") from error
        except OSError as error:  # network failures, gated or missing repositories
            raise EncoderError(f"{self.model_id}: cannot fetch {filename} ({error})") from error

    def config_dict(self) -> dict[str, Any]:
        """The parsed config.json."""
        return read_json(self.file("config.json"))

    def config_sha256(self) -> str:
        """sha256 of the config.json bytes (the architecture: layers, sizes, image size, ...)."""
        return file_sha256(self.file("config.json"))

    def weight_map(self) -> dict[str, str] | None:
        """Tensor name -> shard file name from the safetensors index; None for a single-file checkpoint."""
        index = self.file(SAFETENSORS_INDEX, required=False)
        return None if index is None else read_json(index)["weight_map"]

    def weight_files(self) -> list[Path]:
        """All safetensors files of the checkpoint (every shard, or the single file)."""
        weight_map = self.weight_map()
        if weight_map is not None:
            return [self.file(name) for name in sorted(set(weight_map.values()))]
        single = self.file(SAFETENSORS_SINGLE, required=False)
        if single is None:
            raise EncoderError(f"{self.model_id}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} (need safetensors)")
        return [single]

    def directory(self) -> Path:
        """The local directory holding the checkpoint's files (hub: the cached snapshot)."""
        return self.file("config.json").parent

    def resolved_revision(self) -> str:
        """The hub commit the files came from ("local" for a directory; the requested revision if unknown)."""
        if self.is_local:
            return "local"
        snapshot = self.directory().name
        return snapshot if _COMMIT_RE.match(snapshot) else (self.revision or "main")


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file, naming the file when it is malformed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EncoderError(f"{path}: cannot read JSON ({error})") from error


def load_pretrained(
    model_class: Any, checkpoint: HFCheckpoint, device: torch.device, *, unused_prefixes: tuple[str, ...] = ()
) -> torch.nn.Module:
    """`model_class.from_pretrained` on the resolved checkpoint directory: safetensors only, float32 weights,
    transformers' default attention (SDPA where the architecture supports it), frozen on `device`.

    Checkpoint tensors the model does not use (a full SiglipModel's text tower) are skipped quietly; a
    model weight the checkpoint lacks is an EncoderError, never a silently random-initialised embedding,
    unless its name starts with one of `unused_prefixes`: modules the caller's chosen output never reads
    (e.g. `pooler.` for a CLS-token embedding of a checkpoint saved without its pooler).
    """
    checkpoint.weight_files()  # fetch the shards into the snapshot before transformers looks for them
    report_logger = logging.getLogger("transformers.modeling_utils")
    level = report_logger.level
    report_logger.setLevel(logging.ERROR)  # its load report would list every unused text-tower tensor
    try:
        model, info = model_class.from_pretrained(
            checkpoint.directory(), dtype=torch.float32, use_safetensors=True, output_loading_info=True
        )
    finally:
        report_logger.setLevel(level)
    missing = sorted(key for key in info["missing_keys"] if not key.startswith(unused_prefixes))
    if missing:
        raise EncoderError(f"{checkpoint.model_id}: checkpoint lacks {len(missing)} model weights, e.g. {missing[:3]}")
    return freeze(model, device)


def vit_forward_flops(
    *,
    image_size: int,
    patch_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_channels: int = 3,
    prefix_tokens: int = 0,
    attention_pool_head: bool = False,
) -> float:
    """Forward FLOPs (2 x multiply-accumulates) of one image through a ViT encoder: patch embedding,
    attention (QKV/out projections and the two N^2 products) and MLP per layer, and optionally a
    SigLIP attention-pooling head. Norms, activations and softmax are ignored (a few %).
    """
    patches = (image_size // patch_size) ** 2
    tokens = patches + prefix_tokens
    d, i = hidden_size, intermediate_size
    macs = patches * num_channels * patch_size**2 * d
    macs += num_layers * (4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * i)
    if attention_pool_head:
        # one probe query: K/V projections over all tokens, Q/out projections and the MLP on one token
        macs += 2 * tokens * d * d + 2 * d * d + 2 * tokens * d + 2 * d * i
    return 2.0 * macs


def siglip_tower_flops(config: Any) -> float:
    """`vit_forward_flops` for a SiglipVisionConfig (MedSigLIP, or MedGemma's vision tower)."""
    return vit_forward_flops(
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_channels=config.num_channels,
        attention_pool_head=config.vision_use_head,
    )


VIT_LEVELS_HELP = "layer0..layerN (layer0: the patch embeddings, layerK: transformer layer K's output; layer:-4 counts from the end), final (the last hidden state, after the final norm): patch tokens as a side x side grid"


def vit_level_names(num_layers: int) -> list[str]:
    """`layer0` (patch embeddings) .. `layer{num_layers}` (the last transformer layer's output), then `final`."""
    return [*(f"layer{index}" for index in range(num_layers + 1)), "final"]


def vit_level_maps(outputs: Any, names: set[str], side: int) -> dict[str, torch.Tensor]:
    """The patch tokens of the hidden states `names` asks for (`outputs` of a forward with output_hidden_states)
    as `[B, C, side, side]` maps; the tokens before the last side * side (CLS, registers) are left out."""
    from medembed.encoders.levels import grid_side_tokens

    chosen = {name: outputs.last_hidden_state if name == "final" else outputs.hidden_states[int(name.removeprefix("layer"))] for name in names}
    return {name: grid_side_tokens(hidden[:, hidden.shape[1] - side * side :], side) for name, hidden in chosen.items()}
