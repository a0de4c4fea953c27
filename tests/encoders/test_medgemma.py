"""MedGemma vision tower: built from the config, filled from vision tensors only, equal to the full model's."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from medembed.encoders import EncoderError, get_encoder
from medembed.encoders.base import files_sha256
from medembed.encoders.medgemma import gemma3_spec
from medembed.data.images import medsiglip_spec

VISION_OR_PROJECTOR = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def _weight_map(directory: Path) -> dict[str, str]:
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]


def _all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(set(_weight_map(directory).values())):
        with safe_open(directory / shard, framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def _save_single_file(tensors: dict[str, torch.Tensor], config_from: Path, directory: Path) -> Path:
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text((config_from / "config.json").read_text())
    return directory


def _delete_language_only_shards(directory: Path) -> list[str]:
    """Remove every shard that holds no vision/projector tensor: a loader that opens one fails."""
    needed = {shard for key, shard in _weight_map(directory).items() if key.startswith(VISION_OR_PROJECTOR)}
    deleted = sorted(set(_weight_map(directory).values()) - needed)
    for shard in deleted:
        (directory / shard).unlink()
    return deleted


@pytest.fixture
def gemma3(tmp_path, pixels, build_tiny_gemma3):
    """(checkpoint dir with the language-only shards deleted, reference outputs, the full reference model)."""
    model = build_tiny_gemma3(tmp_path)
    with torch.no_grad():
        tower = model.model.vision_tower(pixel_values=pixels).last_hidden_state
        projected = model.model.get_image_features(pixel_values=pixels).pooler_output
    deleted = _delete_language_only_shards(tmp_path)
    assert deleted, "the tiny checkpoint must have language-only shards for this test to mean anything"
    return tmp_path, {"pooled": tower.mean(dim=1), "projector": projected.mean(dim=1)}, model


@pytest.mark.parametrize("output", ["pooled", "projector"])
def test_embedding_equals_the_full_models_vision_path(gemma3, pixels, output):
    directory, reference, _ = gemma3
    encoder = get_encoder("medgemma", model_id=str(directory), output=output)
    encoder.load(torch.device("cpu"))
    with torch.inference_mode():
        embedding = encoder.embed(pixels)
    assert embedding.dtype == torch.float32 and embedding.shape == (2, encoder.dim)
    torch.testing.assert_close(embedding, reference[output], rtol=1e-5, atol=1e-5)


def test_only_vision_tensors_are_read(gemma3):
    directory, _, _ = gemma3
    encoder = get_encoder("medgemma", model_id=str(directory))
    encoder.load(torch.device("cpu"))
    vision_keys = {key for key in _weight_map(directory) if key.startswith("vision_tower.")}
    assert set(encoder.tensors_read) == vision_keys
    opened = {path.name for path in encoder.weight_files()}
    assert opened == {_weight_map(directory)[key] for key in vision_keys}
    assert encoder.fingerprint()["weights_sha256"] == files_sha256([directory / name for name in opened])


def test_dims_kinds_and_preprocessing_follow_the_checkpoint(gemma3):
    directory, _, _ = gemma3
    pooled = get_encoder("medgemma", model_id=str(directory))
    projector = get_encoder("medgemma", model_id=str(directory), output="projector")
    assert (pooled.dim, pooled.embedding_kind) == (32, "vision_mean_patch_tokens")
    assert (projector.dim, projector.embedding_kind) == (48, "projector_mean_tokens")
    assert pooled.preprocess == gemma3_spec(32)
    assert pooled.revision == "local"


def test_default_preprocessing_is_the_gemma3_processors_and_zero_pad_is_an_option(gemma3):
    directory = str(gemma3[0])
    default = get_encoder("medgemma", model_id=directory).preprocess
    assert (default.pad_to_square, default.resize, default.antialias) == (False, "bilinear", True)
    assert (default.mean, default.std) == ((0.5,) * 3, (0.5,) * 3)
    padded = get_encoder("medgemma", model_id=directory, pad_to_square=True).preprocess
    assert padded == medsiglip_spec(32)  # the earlier default: its stores keep their hash under this option
    assert padded.hash() != default.hash()
    # the real 896-px default: a new hash, so stores made with the old default are refused with a mismatch
    assert gemma3_spec(896).hash() != medsiglip_spec(896).hash() == "af483da2dab43c9d"
    assert gemma3_spec(896).hash() == "52665e060cea0d26"
    with pytest.raises(EncoderError, match="pad_to_square must be true or false"):
        get_encoder("medgemma", model_id=directory, pad_to_square="yes")


def test_hub_style_tensor_names_are_accepted(tmp_path, pixels, build_tiny_gemma3):
    """Hub MedGemma (saved by transformers 4.x) names the tower `vision_tower.vision_model.*`."""
    model = build_tiny_gemma3(tmp_path / "saved")
    renamed = {
        key.replace("vision_tower.", "vision_tower.vision_model.", 1): tensor
        for key, tensor in _all_tensors(tmp_path / "saved").items()
    }
    hub = _save_single_file(renamed, tmp_path / "saved", tmp_path / "hub")  # also the single-file layout
    encoder = get_encoder("medgemma", model_id=str(hub))
    encoder.load(torch.device("cpu"))
    assert all(key.startswith("vision_tower.vision_model.") for key in encoder.tensors_read)
    with torch.inference_mode():
        expected = model.model.vision_tower(pixel_values=pixels).last_hidden_state.mean(dim=1)
        torch.testing.assert_close(encoder.embed(pixels), expected, rtol=1e-5, atol=1e-5)


def test_flops_equal_a_counted_forward_of_the_reference(gemma3, pixels):
    directory, _, model = gemma3
    model.set_attn_implementation("eager")  # the FLOP counter sees eager attention's matmuls, not fused SDPA
    with torch.inference_mode(), FlopCounterMode(display=False) as tower_only:
        model.model.vision_tower(pixel_values=pixels[:1])
    with torch.inference_mode(), FlopCounterMode(display=False) as with_projector:
        model.model.get_image_features(pixel_values=pixels[:1])
    pooled = get_encoder("medgemma", model_id=str(directory))
    projector = get_encoder("medgemma", model_id=str(directory), output="projector")
    assert pooled.flops_per_image() == tower_only.get_total_flops()
    assert projector.flops_per_image() == with_projector.get_total_flops()


def test_checkpoint_without_vision_tensors_is_refused(tmp_path, build_tiny_gemma3):
    build_tiny_gemma3(tmp_path / "saved")
    language_only = {key: tensor for key, tensor in _all_tensors(tmp_path / "saved").items() if "vision" not in key}
    text_only = _save_single_file(language_only, tmp_path / "saved", tmp_path / "text")
    encoder = get_encoder("medgemma", model_id=str(text_only))
    with pytest.raises(EncoderError, match="no vision tensors found"):
        encoder.load(torch.device("cpu"))


def test_not_a_gemma3_checkpoint_is_refused(tiny_siglip):
    with pytest.raises(EncoderError, match="not a Gemma 3"):
        get_encoder("medgemma", model_id=str(tiny_siglip[0]))


def test_unknown_output_is_refused(gemma3):
    with pytest.raises(EncoderError, match="output must be one of"):
        get_encoder("medgemma", model_id=str(gemma3[0]), output="logits")
