"""Generic AutoModel encoders: a tiny DINOv2 checkpoint with a RAD-DINO-style preprocessor_config.json."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Dinov2Config, Dinov2Model

from medembed.encoders import EncoderError, get_encoder
from medembed.encoders.hf_generic import spec_from_preprocessor_config
from medembed.data.images import PreprocessSpec

PROCESSOR = {
    "do_center_crop": True,
    "crop_size": {"height": 32, "width": 32},
    "size": {"shortest_edge": 36},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5307, 0.5307, 0.5307],
    "image_std": [0.2583, 0.2583, 0.2583],
}


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    torch.manual_seed(3)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=8
    )
    model = Dinov2Model(config).eval()
    directory = tmp_path_factory.mktemp("tiny_dinov2")
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return directory, model


@pytest.mark.parametrize("pooling", ["cls", "pooler_output"])
def test_embedding_equals_the_reference_model(tiny_dinov2, pixels, pooling):
    directory, model = tiny_dinov2
    encoder = get_encoder("hf-vision", model_id=str(directory), pooling=pooling)
    encoder.load(torch.device("cpu"))
    with torch.inference_mode():
        outputs = model(pixel_values=pixels)
        expected = outputs.pooler_output if pooling == "pooler_output" else outputs.last_hidden_state[:, 0]
        embedding = encoder.embed(pixels)
    assert embedding.shape == (2, encoder.dim) == (2, 32)
    torch.testing.assert_close(embedding, expected, rtol=1e-5, atol=1e-6)


def test_preprocessing_comes_from_the_checkpoint_with_padding_instead_of_crop(tiny_dinov2):
    spec = get_encoder("hf-vision", model_id=str(tiny_dinov2[0])).preprocess
    assert spec == PreprocessSpec(
        size=32, pad_to_square=True, resize="bicubic", antialias=True, mean=(0.5307,) * 3, std=(0.2583,) * 3
    )


def test_flops_equal_a_counted_forward(tiny_dinov2, pixels):
    directory, _ = tiny_dinov2
    eager = Dinov2Model.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        eager(pixel_values=pixels[:1])
    assert get_encoder("hf-vision", model_id=str(directory)).flops_per_image() == counter.get_total_flops()


@pytest.mark.parametrize(
    ("overrides", "size", "resize"),
    [
        ({"do_center_crop": False, "size": {"shortest_edge": 518}}, 518, "bicubic"),
        ({"do_center_crop": False, "size": {"height": 224, "width": 224}, "resample": 2}, 224, "bilinear"),
        ({"crop_size": 384}, 384, "bicubic"),
    ],
)
def test_size_and_resample_mapping(overrides, size, resize):
    spec = spec_from_preprocessor_config({**PROCESSOR, **overrides}, "m")
    assert (spec.size, spec.resize) == (size, resize)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"resample": 1}, "resample=1 is not supported"),
        ({"crop_size": {"height": 32, "width": 48}}, "cannot derive a square input size"),
        ({"image_mean": None}, "no image_mean/image_std"),
    ],
)
def test_unsupported_preprocessor_configs_are_refused(overrides, message):
    with pytest.raises(EncoderError, match=message):
        spec_from_preprocessor_config({**PROCESSOR, **overrides}, "m")


def test_missing_preprocessor_config_and_model_id_are_clear_errors(tmp_path, tiny_dinov2):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_dinov2[0] / name).read_bytes())
    with pytest.raises(EncoderError, match="no preprocessor_config.json"):
        get_encoder("hf-vision", model_id=str(tmp_path))
    with pytest.raises(EncoderError, match="missing a required argument: 'model_id'"):
        get_encoder("hf-vision")


@pytest.fixture(scope="module")
def vit_without_pooler(tmp_path_factory):
    """A ViT saved with add_pooling_layer=False: AutoModel builds a pooler the checkpoint has no weights for."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(4)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)
    model = ViTModel(config, add_pooling_layer=False).eval()
    directory = tmp_path_factory.mktemp("vit_no_pooler")
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({**PROCESSOR, "do_center_crop": False, "size": {"height": 32, "width": 32}}))
    return directory, model


def test_checkpoint_without_pooler_loads_for_cls_pooling(vit_without_pooler, pixels):
    directory, model = vit_without_pooler
    encoder = get_encoder("hf-vision", model_id=str(directory), pooling="cls")
    encoder.load(torch.device("cpu"))
    with torch.inference_mode():
        torch.testing.assert_close(encoder.embed(pixels), model(pixel_values=pixels).last_hidden_state[:, 0], rtol=1e-5, atol=1e-6)


def test_checkpoint_without_pooler_is_refused_for_pooler_output(vit_without_pooler):
    encoder = get_encoder("hf-vision", model_id=str(vit_without_pooler[0]), pooling="pooler_output")
    with pytest.raises(EncoderError, match=r"lacks 2 model weights, e.g. \['pooler.dense.bias'"):
        encoder.load(torch.device("cpu"))


def test_other_missing_weights_are_still_refused_for_cls(tmp_path, vit_without_pooler):
    from safetensors.torch import load_file, save_file

    directory = vit_without_pooler[0]
    tensors = load_file(directory / "model.safetensors")
    dropped = next(key for key in tensors if "layernorm" in key and "encoder" not in key)
    save_file({k: v for k, v in tensors.items() if k != dropped}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    with pytest.raises(EncoderError, match="lacks 1 model weights"):
        get_encoder("hf-vision", model_id=str(tmp_path)).load(torch.device("cpu"))
