"""Checkpoint resolution: local directories, the hub cache offline, offline flags, clear errors."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from medembed.encoders import EncoderError, get_encoder
from medembed.encoders._hf import HFCheckpoint, offline_mode
from tests.encoders.conftest import CACHED_COMMIT as COMMIT



@pytest.mark.parametrize("revision", [None, COMMIT])
def test_hub_id_resolves_from_the_cache_offline_and_records_the_commit(hub_cache, tiny_siglip, pixels, revision):
    encoder = get_encoder("medsiglip", model_id="acme/tiny-siglip", revision=revision, cache_dir=str(hub_cache))
    assert encoder.revision == COMMIT
    assert all(COMMIT in str(path) for path in encoder.weight_files())
    encoder.load(torch.device("cpu"))
    with torch.inference_mode():
        expected = tiny_siglip[1](pixel_values=pixels).pooler_output
        torch.testing.assert_close(encoder.embed(pixels), expected, rtol=1e-5, atol=1e-6)


def test_explicit_local_files_only_overrides_the_environment(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    checkpoint = HFCheckpoint("acme/tiny-siglip", cache_dir=str(hub_cache), local_files_only=True)
    assert checkpoint.offline and checkpoint.file("config.json").is_file()
    assert checkpoint.file("absent.json", required=False) is None


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, False),
        ({"HF_HUB_OFFLINE": "0"}, False),
        ({"HF_HUB_OFFLINE": "1"}, True),
        ({"TRANSFORMERS_OFFLINE": "yes"}, True),
    ],
)
def test_offline_mode_reads_the_environment_now(monkeypatch, variables, expected):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert offline_mode() is expected


def test_single_file_and_sharded_weights_are_listed(tiny_siglip, tiny_siglip_full):
    assert [path.name for path in HFCheckpoint(str(tiny_siglip_full[0])).weight_files()] == ["model.safetensors"]
    shards = HFCheckpoint(str(tiny_siglip[0])).weight_files()
    assert len(shards) > 1 and all(path.name.startswith("model-") for path in shards)


def test_checkpoint_without_safetensors_is_refused(tmp_path, tiny_siglip):
    shutil.copy(tiny_siglip[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(EncoderError, match="need safetensors"):
        get_encoder("medsiglip", model_id=str(tmp_path)).fingerprint()


def test_neither_directory_nor_hub_id_is_a_clear_error():
    with pytest.raises(EncoderError, match="neither a local directory nor a valid hub id"):
        get_encoder("medsiglip", model_id="/no/such/dir/../x")


def test_a_model_weight_missing_from_the_checkpoint_is_refused(tmp_path, tiny_siglip_full):
    tensors = load_file(tiny_siglip_full[0] / "model.safetensors")
    del tensors["vision_model.post_layernorm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(tiny_siglip_full[0] / "config.json", tmp_path / "config.json")
    encoder = get_encoder("medsiglip", model_id=str(tmp_path))
    with pytest.raises(EncoderError, match=r"lacks 1 model weights, e.g. \['post_layernorm.weight'\]"):
        encoder.load(torch.device("cpu"))
