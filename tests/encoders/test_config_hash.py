"""config_sha256: the checkpoint's config.json checksum tells apart local checkpoints whose revision is just "local"."""

import hashlib
import json
import shutil

import torch

from medembed.encoders import get_encoder
from medembed.encoders.runtime import store_fingerprint


def test_hf_config_hash_is_the_sha256_of_config_json_and_tells_local_checkpoints_apart(tmp_path, tiny_siglip):
    directory = tiny_siglip[0]
    encoder = get_encoder("medsiglip", model_id=str(directory))
    expected = hashlib.sha256((directory / "config.json").read_bytes()).hexdigest()
    assert encoder.fingerprint()["config_sha256"] == expected
    assert store_fingerprint(encoder, "float16", "bf16")["config_sha256"] == expected
    # Same weights, same revision ("local"), another architecture setting: only the config hash says so.
    other = tmp_path / "edited"
    shutil.copytree(directory, other)
    config = json.loads((other / "config.json").read_text())
    config["layer_norm_eps"] = 1e-3
    (other / "config.json").write_text(json.dumps(config))
    edited = get_encoder("medsiglip", model_id=str(other))
    a, b = encoder.fingerprint(), edited.fingerprint()
    assert a["revision"] == b["revision"] == "local" and a["weights_sha256"] == b["weights_sha256"]
    assert a["config_sha256"] != b["config_sha256"]


def test_medgemma_and_generic_encoders_hash_their_config(tmp_path, build_tiny_gemma3):
    gemma = tmp_path / "gemma"
    build_tiny_gemma3(gemma)
    fingerprint = get_encoder("medgemma", model_id=str(gemma)).fingerprint()
    assert fingerprint["config_sha256"] == hashlib.sha256((gemma / "config.json").read_bytes()).hexdigest()

    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    dino = tmp_path / "dino"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)).save_pretrained(dino)
    (dino / "preprocessor_config.json").write_text(json.dumps({"size": 32, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    generic = get_encoder("hf-vision", model_id=str(dino)).fingerprint()
    assert generic["config_sha256"] == hashlib.sha256((dino / "config.json").read_bytes()).hexdigest()


def test_efficientnet_config_hash_is_the_architecture_as_the_installed_code_builds_it():
    first = get_encoder("efficientnet-lite0").fingerprint()["config_sha256"]
    assert len(first) == 64 and first == get_encoder("efficientnet-lite0").config_sha256()
    # the network is built for the input size ('same' padding is precomputed), so the size is part of it
    assert get_encoder("efficientnet-lite0", size=64).config_sha256() != first
