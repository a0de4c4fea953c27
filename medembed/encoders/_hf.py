"""Shared Hugging Face plumbing: loading, ViT FLOPs and levels (checkpoint resolution is `_hub`, re-exported here).

Used by the SigLIP, MedGemma and generic encoders so that each of them only says what it builds and
how it pools.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from medembed.encoders._hub import (  # noqa: F401 - re-exported: the encoders and zero-shot import them from here
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    HFCheckpoint,
    hub_problem,
    offline_mode,
    read_json,
)
from medembed.encoders.base import EncoderError, freeze


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
