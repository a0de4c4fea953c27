"""Corruptions: numerics on crafted images, determinism, the spec-like wrapper, and the option parsers."""

import pickle

import numpy as np
import pytest
from PIL import Image

from medembed.data.corrupt import (
    CORRUPTIONS,
    SEVERITIES,
    CorruptedPreprocess,
    CorruptionError,
    corrupt,
    parameter,
    parse_corruptions,
    parse_severities,
)
from medembed.data.images import decode_image, medsiglip_spec


def crafted(shape=(180, 150)) -> np.ndarray:
    """A radiograph-like test card: smooth ramps, a bright block with sharp edges, fine stripes."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    image = 0.25 + 0.35 * (xx / shape[1]) + 0.1 * np.sin(yy / 6.0)
    image[40:110, 30:80] = 0.9
    image[120:170, 90:140] += 0.15 * ((xx[120:170, 90:140] // 3) % 2)
    return image.astype(np.float32)


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_stronger_severity_moves_further_from_the_clean_image(corruption):
    image = crafted()
    distances = [rms(corrupt(image, corruption, s), image) for s in SEVERITIES]
    assert distances[0] > 0.005
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("shape", [(180, 150), (180, 150, 3)])
def test_output_keeps_shape_and_stays_in_unit_range(corruption, shape):
    image = crafted(shape[:2])
    if len(shape) == 3:
        image = np.stack([image, 1 - image, np.clip(image * 1.5, 0, 1)], axis=-1)
    for severity in (1, 5):
        out = corrupt(image, corruption, severity)
        assert out.shape == image.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_pointwise_corruptions_follow_their_formulas():
    image = crafted()
    np.testing.assert_allclose(corrupt(image, "gamma", 5), image ** parameter("gamma", 5), rtol=1e-6)
    mean = image.mean()
    np.testing.assert_allclose(corrupt(image, "contrast", 2), (image - mean) * 0.3 + mean, rtol=1e-5, atol=1e-6)


def test_noise_sd_matches_the_table_and_is_constant_over_reference_cells():
    image = np.full((896, 448), 0.5, dtype=np.float32)  # long side 4 x 224: cells of 4 x 4 pixels
    noise = corrupt(image, "noise", 2) - image
    assert noise.std() == pytest.approx(parameter("noise", 2), rel=0.05)
    cells = noise.reshape(224, 4, 112, 4)
    assert np.ptp(cells, axis=(1, 3)).max() == 0  # one draw per 224-px reference cell


def test_blur_scales_with_the_image_so_it_looks_the_same_after_resizing():
    small = crafted((180, 150))
    large = np.asarray(Image.fromarray(small).resize((600, 720), Image.Resampling.BILINEAR))
    blurred_large = np.asarray(Image.fromarray(corrupt(large, "blur", 3)).resize((150, 180), Image.Resampling.BILINEAR))
    # Blurring at 4x the resolution then shrinking is close to blurring the small image directly...
    assert rms(blurred_large, corrupt(small, "blur", 3)) < 0.1 * rms(small, corrupt(small, "blur", 3))


def test_noise_is_a_function_of_image_corruption_and_severity_not_call_order():
    first, second = crafted(), crafted()[::-1].copy()
    a1 = corrupt(first, "noise", 3)
    b1 = corrupt(second, "noise", 3)
    b2 = corrupt(second, "noise", 3)
    a2 = corrupt(first, "noise", 3)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    assert not np.array_equal(a1 - first, (b1 - second)[::-1])  # another image gets another draw
    assert not np.array_equal(corrupt(first, "noise", 3, key="id-1"), corrupt(first, "noise", 3, key="id-2"))
    np.testing.assert_array_equal(corrupt(first, "noise", 3, key="id-1"), corrupt(first, "noise", 3, key="id-1"))


def test_jpeg_roundtrip_quality_matches_pil(tmp_path):
    image = crafted()
    path = tmp_path / "q10.jpg"
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path, quality=10)
    np.testing.assert_array_equal(corrupt(image, "jpeg", 4), decode_image(path))


def test_wrapper_preprocesses_the_corrupted_image_and_hashes_the_corruption(tmp_path):
    spec = medsiglip_spec(64)
    path = tmp_path / "card.png"
    Image.fromarray(np.round(crafted() * 255).astype(np.uint8)).save(path)
    wrapped = CorruptedPreprocess(spec, "blur", 2)
    np.testing.assert_array_equal(wrapped.load(path), spec(corrupt(decode_image(path), "blur", 2)))
    assert wrapped.load(path).shape == spec.load(path).shape == (3, 64, 64)
    hashes = {spec.hash()} | {CorruptedPreprocess(spec, c, s).hash() for c in CORRUPTIONS for s in SEVERITIES}
    assert len(hashes) == 1 + len(CORRUPTIONS) * len(SEVERITIES)
    assert wrapped.hash() == CorruptedPreprocess(medsiglip_spec(64), "blur", 2).hash()
    assert wrapped.to_dict()["corruption"] == {"name": "blur", "severity": 2, "parameter": 2.0, "version": 1}
    assert pickle.loads(pickle.dumps(wrapped)) == wrapped


def test_wrapper_refuses_unknown_corruptions_and_severities():
    with pytest.raises(CorruptionError, match="unknown corruption 'fog'"):
        CorruptedPreprocess(medsiglip_spec(64), "fog", 1)
    with pytest.raises(CorruptionError, match="severity must be one of"):
        CorruptedPreprocess(medsiglip_spec(64), "blur", 6)


def test_parse_corruptions():
    assert parse_corruptions("noise,blur") == ["noise", "blur"]
    assert parse_corruptions(" JPEG , gamma ") == ["jpeg", "gamma"]
    assert parse_corruptions("all") == list(CORRUPTIONS)
    with pytest.raises(CorruptionError, match="unknown corruption.*fog"):
        parse_corruptions("noise,fog")
    with pytest.raises(CorruptionError, match="twice"):
        parse_corruptions("noise,noise")
    with pytest.raises(CorruptionError, match="no corruption"):
        parse_corruptions(" , ")


def test_parse_severities():
    assert parse_severities("1..5") == [1, 2, 3, 4, 5]
    assert parse_severities("1,3,5") == [1, 3, 5]
    assert parse_severities("4") == [4]
    assert parse_severities("2..3,1") == [1, 2, 3]
    for bad in ("0..5", "6", "3..1", "high", "1..", ""):
        with pytest.raises(CorruptionError):
            parse_severities(bad)
