"""SigLIP vision towers loaded offline from tiny sharded checkpoints, equal to the reference forward."""

import copy
import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import SiglipVisionModel

from medembed.encoders import EncoderError, get_encoder
from medembed.encoders.base import files_sha256
from medembed.data.images import medsiglip_spec


def test_pooler_output_equals_the_reference_model(tiny_siglip, pixels):
    directory, model = tiny_siglip
    encoder = get_encoder("medsiglip", model_id=str(directory))
    encoder.load(torch.device("cpu"))
    with torch.inference_mode():
        embedding = encoder.embed(pixels)
        expected = model(pixel_values=pixels).pooler_output
    assert embedding.dtype == torch.float32 and embedding.shape == (2, 32) == (2, encoder.dim)
    torch.testing.assert_close(embedding, expected, rtol=1e-5, atol=1e-6)


def test_mean_patch_tokens(tiny_siglip, pixels):
    directory, model = tiny_siglip
    encoder = get_encoder("medsiglip", model_id=str(directory), pooling="mean_patch_tokens")
    encoder.load(torch.device("cpu"))
    with torch.inference_mode():
        expected = model(pixel_values=pixels).last_hidden_state.mean(dim=1)
        torch.testing.assert_close(encoder.embed(pixels), expected, rtol=1e-5, atol=1e-6)
    assert encoder.embedding_kind == "mean_patch_tokens"


def test_full_siglip_checkpoint_gives_its_vision_tower_quietly(tiny_siglip_full, pixels, capfd):
    directory, model = tiny_siglip_full
    encoder = get_encoder("medsiglip", model_id=str(directory))
    encoder.load(torch.device("cpu"))
    assert "text_model" not in capfd.readouterr().err  # no load report listing the unused text tower
    with torch.inference_mode():
        expected = model.vision_model(pixel_values=pixels).pooler_output
        torch.testing.assert_close(encoder.embed(pixels), expected, rtol=1e-5, atol=1e-6)


def test_preprocessing_is_medsiglips_at_the_checkpoints_resolution(tiny_siglip):
    directory, model = tiny_siglip
    assert get_encoder("medsiglip", model_id=str(directory)).preprocess == medsiglip_spec(model.config.image_size)


def test_antialias_is_an_option_off_by_default(tiny_siglip):
    directory = str(tiny_siglip[0])
    default = get_encoder("medsiglip", model_id=directory).preprocess
    antialiased = get_encoder("medsiglip", model_id=directory, antialias=True).preprocess
    assert default.antialias is False and antialiased.antialias is True
    assert antialiased == dataclasses.replace(default, antialias=True) and antialiased.hash() != default.hash()
    with pytest.raises(EncoderError, match="antialias must be true or false"):
        get_encoder("medsiglip", model_id=directory, antialias="on")


def test_fingerprint_checksums_every_shard_read(tiny_siglip):
    directory, _ = tiny_siglip
    fingerprint = get_encoder("medsiglip", model_id=str(directory)).fingerprint()
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert fingerprint["weights_sha256"] == files_sha256(shards)
    assert fingerprint["revision"] == "local" and fingerprint["embedding_kind"] == "pooler_output"


def test_flops_equal_a_counted_forward(tiny_siglip, pixels):
    directory, model = tiny_siglip
    eager = SiglipVisionModel.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        eager(pixel_values=pixels[:1])
    assert get_encoder("medsiglip", model_id=str(directory)).flops_per_image() == counter.get_total_flops()


def test_pooler_output_needs_a_pooling_head(tmp_path, tiny_siglip):
    config = copy.deepcopy(tiny_siglip[1].config)
    config.vision_use_head = False
    SiglipVisionModel(config).save_pretrained(tmp_path)
    with pytest.raises(EncoderError, match="no pooling head"):
        get_encoder("medsiglip", model_id=str(tmp_path))
    assert get_encoder("medsiglip", model_id=str(tmp_path), pooling="mean_patch_tokens").dim == 32


def test_missing_checkpoint_offline_is_a_clear_error(tmp_path):
    with pytest.raises(EncoderError, match=r"google/medsiglip-448: offline mode is on .* its config\.json is not in the local .*-e efficientnet-lite0"):
        get_encoder("medsiglip", cache_dir=str(tmp_path))


def test_wrong_model_type_and_pooling_are_refused(tmp_path, build_tiny_gemma3, tiny_siglip):
    build_tiny_gemma3(tmp_path)
    with pytest.raises(EncoderError, match="is not SigLIP"):
        get_encoder("medsiglip", model_id=str(tmp_path))
    with pytest.raises(EncoderError, match="pooling must be one of"):
        get_encoder("medsiglip", model_id=str(tiny_siglip[0]), pooling="max")
