"""The vision tower of a MedGemma / Gemma 3 checkpoint, loaded without its language model.

Only the checkpoint's config is parsed; a SiglipVisionModel is built from `vision_config` and filled
from the vision-tower tensors alone: the safetensors index says which shards hold them, and
`safe_open` reads just those keys. The 4B language model is never built nor read. Tensor names
differ by the transformers version that saved the checkpoint (hub MedGemma:
`vision_tower.vision_model.*`, `multi_modal_projector.*`; transformers 5 in memory:
`model.vision_tower.*`); all of these are accepted.

Preprocessing (`gemma3_spec`) is what the checkpoint's own processor does (transformers'
Gemma3ImageProcessor with MedGemma's preprocessor_config.json: `size` 896x896, `resample` 2, mean/std 0.5,
no pan-and-scan): resize the whole image to the square input size without padding (the aspect ratio is
not kept), bilinear with antialiasing (PIL's BILINEAR filter widens with the downscale), scale to [-1, 1],
grey repeated to three channels. `pad_to_square=True` (`--option pad_to_square=true`) instead zero-pads to a
square first and resizes without antialiasing, i.e. MedSigLIP's serving preprocessing (`medsiglip_spec`),
medembed's earlier default: stores made with it are refused by the new default (preprocessing hash
mismatch) and can be resumed or appended to with that option.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Gemma3Config, SiglipVisionModel
from transformers.initialization import no_init_weights
from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

from medembed.encoders._hf import (
    SAFETENSORS_SINGLE,
    VIT_LEVELS_HELP,
    HFCheckpoint,
    siglip_tower_flops,
    vit_level_maps,
    vit_level_names,
)
from medembed.encoders.base import Encoder, EncoderError, freeze
from medembed.data.images import PreprocessSpec, medsiglip_spec

# Longest prefixes first: each tensor name is matched against them in order.
_VISION_PREFIXES = (
    "model.vision_tower.vision_model.",
    "vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.",
)
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


class MedGemmaEncoder(Encoder):
    """MedGemma's image encoder at the checkpoint's resolution (896 px for MedGemma 4B), MedSigLIP preprocessing.

    `output`: "pooled" (the tower's pooling head, or the mean of its patch tokens when the config has
    `vision_use_head=False`, as Gemma 3's does) or "projector" (the multimodal projector's soft tokens,
    i.e. what the language model sees, mean-pooled). `pad_to_square`: MedSigLIP's zero-pad preprocessing
    instead of the Gemma 3 processor's stretch (see the module doc).
    """

    name = "medgemma"
    OUTPUTS = ("pooled", "projector")

    def __init__(
        self,
        model_id: str = "google/medgemma-4b-it",
        *,
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        output: str = "pooled",
        pad_to_square: bool = False,
    ) -> None:
        if output not in self.OUTPUTS:
            raise EncoderError(f"medgemma: output must be one of {self.OUTPUTS}, got {output!r}")
        self.checkpoint = HFCheckpoint(model_id, revision, cache_dir, local_files_only)
        model_type = self.checkpoint.config_dict().get("model_type")
        if model_type != "gemma3":
            raise EncoderError(f"{model_id}: model_type {model_type!r} is not a Gemma 3 / MedGemma checkpoint")
        self.config = Gemma3Config.from_pretrained(self.checkpoint.directory())
        vision_config = self.config.vision_config
        self.output = output
        self.model_id = model_id
        self.revision = self.checkpoint.resolved_revision()
        if output == "projector":
            self.dim = self.config.text_config.hidden_size
            self.embedding_kind = "projector_mean_tokens"
        else:
            self.dim = vision_config.hidden_size
            has_head = vision_config.vision_use_head
            self.embedding_kind = "vision_pooler_output" if has_head else "vision_mean_patch_tokens"
        if not isinstance(pad_to_square, bool):
            raise EncoderError(f"medgemma: pad_to_square must be true or false, got {pad_to_square!r}")
        self.pad_to_square = pad_to_square
        size = vision_config.image_size
        self.preprocess = medsiglip_spec(size) if pad_to_square else gemma3_spec(size)
        self.tensors_read: tuple[str, ...] = ()  # checkpoint tensor names actually read by the last load()
        self._vision: torch.nn.Module | None = None
        self._projector: torch.nn.Module | None = None

    def _read_plan(self) -> dict[Path, list[tuple[str, str, str]]]:
        """Shard path -> [(checkpoint name, part "vision"|"projector", name inside that module)] to read."""
        parts = {"vision": _VISION_PREFIXES}
        if self.output == "projector":
            parts["projector"] = _PROJECTOR_PREFIXES
        by_shard: dict[str, list[tuple[str, str, str]]] = {}
        for name, shard in sorted(self._weight_map().items()):
            for part, prefixes in parts.items():
                prefix = next((prefix for prefix in prefixes if name.startswith(prefix)), None)
                if prefix is not None:
                    by_shard.setdefault(shard, []).append((name, part, name[len(prefix) :]))
                    break
        found = {part for entries in by_shard.values() for _, part, _ in entries}
        for part in parts.keys() - found:
            raise EncoderError(f"{self.model_id}: no {part} tensors found (names starting with {parts[part]})")
        return {self.checkpoint.file(shard): entries for shard, entries in sorted(by_shard.items())}

    def _weight_map(self) -> dict[str, str]:
        """Tensor name -> file name, from the index or, for a single file, from its header (no tensor is read)."""
        weight_map = self.checkpoint.weight_map()
        if weight_map is None:
            single = self.checkpoint.file(SAFETENSORS_SINGLE)
            with safe_open(single, framework="pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), single.name)
        return weight_map

    def _read_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Read only the planned tensors, as float32 on the CPU; records their names in `tensors_read`."""
        tensors: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "projector": {}}
        read: list[str] = []
        for path, entries in self._read_plan().items():
            with safe_open(path, framework="pt", device="cpu") as handle:
                for name, part, local_name in entries:
                    tensors[part][local_name] = handle.get_tensor(name).to(torch.float32)
                    read.append(name)
        self.tensors_read = tuple(read)
        return tensors

    def load(self, device: torch.device) -> None:
        """Build the vision tower (and projector if asked) from the config; fill it with float32 weights on `device`."""
        tensors = self._read_tensors()
        # Weights are overwritten right away, so skip the (slow, for 400M parameters) random initialisation.
        with torch.device(device), no_init_weights():
            vision = SiglipVisionModel._from_config(self.config.vision_config, dtype=torch.float32)
            projector = Gemma3MultiModalProjector(self.config) if self.output == "projector" else None
        _load_exactly(vision, tensors["vision"], self.model_id, "vision tower")
        self._vision = freeze(vision, device)
        if projector is not None:
            _load_exactly(projector, tensors["projector"], self.model_id, "multimodal projector")
            self._projector = freeze(projector, device)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` -> `[B, dim]` float32: pooled vision output, or mean of the projected soft tokens."""
        return self._pooled(self._require_loaded(self._vision)(pixel_values=pixels))

    @classmethod
    def levels_help(cls) -> str:
        return f"{VIT_LEVELS_HELP} (the vision tower's)"

    def level_names(self) -> list[str]:
        """The vision tower's `layer0`..`layer{depth}` and `final` (see `vit_level_names`)."""
        return vit_level_names(self.config.vision_config.num_hidden_layers)

    def level_map_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Every level is a (hidden_size, side, side) grid of the vision tower's patch tokens."""
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        return dict.fromkeys(self.level_names(), (vision.hidden_size, side, side))

    def level_maps(self, pixels: torch.Tensor, names: set[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The embedding and the vision tower's patch-token maps of `names`, from one forward."""
        outputs = self._require_loaded(self._vision)(pixel_values=pixels, output_hidden_states=True)
        vision = self.config.vision_config
        return self._pooled(outputs), vit_level_maps(outputs, names, vision.image_size // vision.patch_size)

    def _pooled(self, outputs) -> torch.Tensor:
        if self.output == "projector":
            return self._require_loaded(self._projector)(outputs.last_hidden_state).mean(dim=1).float()
        if outputs.pooler_output is not None:
            return outputs.pooler_output.float()
        return outputs.last_hidden_state.mean(dim=1).float()

    def config_sha256(self) -> str:
        """sha256 of the checkpoint's config.json."""
        return self.checkpoint.config_sha256()

    def weight_files(self) -> list[Path]:
        """Only the shards that hold the tensors this encoder reads."""
        return list(self._read_plan())

    def flops_per_image(self) -> float:
        """Vision tower FLOPs from the config, plus the projector's matmul when it is used."""
        vision = self.config.vision_config
        flops = siglip_tower_flops(vision)
        if self.output == "projector":
            flops += 2.0 * self.config.mm_tokens_per_image * vision.hidden_size * self.config.text_config.hidden_size
        return flops


def gemma3_spec(size: int) -> PreprocessSpec:
    """transformers' Gemma3ImageProcessor at `size`: stretch to `size` x `size` (no padding), bilinear with
    antialiasing (PIL), rescale by 1/255, normalise with mean 0.5 and std 0.5, i.e. [-1, 1]."""
    return PreprocessSpec(
        size=size, pad_to_square=False, resize="bilinear", antialias=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )


def _load_exactly(module: torch.nn.Module, state: dict[str, torch.Tensor], model_id: str, what: str) -> None:
    """load_state_dict(strict) with an EncoderError naming the mismatched tensors."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise EncoderError(
            f"{model_id}: {what} tensors do not match its config "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
