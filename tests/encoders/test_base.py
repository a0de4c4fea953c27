"""Weight checksums and the fingerprint's contract (same preprocessing -> same hash, different -> different)."""

import hashlib
import json
import os

import pytest
import torch

from medembed.encoders import EncoderError, get_encoder
from medembed.encoders.base import file_sha256, files_sha256, freeze
from medembed.data.images import PreprocessSpec


def test_file_sha256_is_the_content_digest_and_notices_changes(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"first")
    assert file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"second, longer")
    os.utime(path, ns=(1, 1))
    assert file_sha256(path) == hashlib.sha256(b"second, longer").hexdigest()


def test_files_sha256_hashes_a_sorted_sha256sum_listing(tmp_path):
    (tmp_path / "b.safetensors").write_bytes(b"B")
    (tmp_path / "a.safetensors").write_bytes(b"A")
    files = [("a.safetensors", b"A"), ("b.safetensors", b"B")]
    listing = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files)
    expected = hashlib.sha256(listing.encode()).hexdigest()
    assert files_sha256([tmp_path / "b.safetensors", tmp_path / "a.safetensors"]) == expected


def test_fingerprint_has_the_store_keys_and_follows_the_preprocessing(tiny_siglip):
    first = get_encoder("efficientnet-lite0").fingerprint()
    assert set(first) == {
        "encoder", "model_id", "revision", "weights_sha256", "config_sha256", "embedding_kind", "preprocess", "preprocess_hash",
        "levels",
    }
    assert first["levels"] == ""
    assert get_encoder("efficientnet-lite0").fingerprint() == first
    spec = PreprocessSpec.from_dict(json.loads(first["preprocess"]))
    assert spec.hash() == first["preprocess_hash"]
    resized = get_encoder("efficientnet-lite0", size=256).fingerprint()
    assert resized["preprocess_hash"] != first["preprocess_hash"]
    assert resized["weights_sha256"] == first["weights_sha256"]
    siglip = get_encoder("medsiglip", model_id=str(tiny_siglip[0])).fingerprint()
    assert siglip["preprocess_hash"] != first["preprocess_hash"]


def test_embed_before_load_is_a_clear_error():
    with pytest.raises(EncoderError, match="call load"):
        get_encoder("efficientnet-lite0").embed(torch.zeros(1, 3, 224, 224))


def test_freeze_gives_eval_mode_without_gradients():
    module = freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()), torch.device("cpu"))
    assert not module.training
    assert not any(parameter.requires_grad for parameter in module.parameters())
