"""Decoding (8/16-bit, colour, DICOM, broken files, FracAtlas) and the preprocessing spec's numerics."""

import dataclasses
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medembed.errors import MedembedError
from medembed.data.images import (
    ImageDecodeError,
    ImageHeader,
    PreprocessSpec,
    decode_image,
    medsiglip_spec,
    probe_image,
)

REPO = Path(__file__).resolve().parent.parent

TRUNCATED_REASON = "truncated JPEG (no end-of-image marker)"
# Tiny test images (2x2 ...) are below the default minimum side; these tests are about pixel values.
TINY = dict(min_side=1, max_aspect_ratio=None)


def _plain_spec(size: int, **overrides) -> PreprocessSpec:
    """Identity normalisation, so outputs are the padded/resized pixels themselves."""
    fields = dict(size=size, pad_to_square=True, resize="bilinear", antialias=False, mean=(0, 0, 0), std=(1, 1, 1))
    return PreprocessSpec(**{**fields, **overrides})


def _png_with_header(width: int, height: int) -> bytes:
    """A syntactically valid greyscale PNG whose header claims `width` x `height` (no real pixel data)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _write_dicom(path: Path, stored: np.ndarray, photometric: str = "MONOCHROME2", **elements) -> Path:
    """A real single-frame DICOM file: 16-bit (12 stored) greyscale unless `elements` say otherwise."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = stored.shape[:2]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    dataset.PixelData = stored.astype(np.uint8 if dataset.BitsAllocated == 8 else np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def truncated_jpeg(tmp_path: Path) -> Path:
    """A real greyscale JPEG cut at 60% of its bytes (so no end-of-image marker)."""
    noise = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    whole = tmp_path / "whole.jpg"
    Image.fromarray(noise).save(whole, quality=90)
    data = whole.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) * 6 // 10])
    return cut


# --- decoding: integer depths and colour -------------------------------------------------------


def test_8bit_png_is_scaled_by_255(tmp_path):
    pixels = np.array([[0, 51], [204, 255]], dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "grey.png")
    decoded = decode_image(tmp_path / "grey.png", **TINY)
    assert decoded.dtype == np.float32 and decoded.shape == (2, 2)
    np.testing.assert_allclose(decoded, [[0.0, 0.2], [0.8, 1.0]], atol=1e-7)


def test_16bit_png_is_scaled_by_65535(tmp_path):
    pixels = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(pixels).save(path)
    assert path.read_bytes()[24] == 16  # the IHDR bit depth: really a 16-bit PNG
    decoded = decode_image(path, **TINY)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, pixels / 65535.0, atol=1e-7)


def _tiff_12bit(pixels: np.ndarray) -> bytes:
    """A minimal uncompressed 12-bit greyscale TIFF (PIL cannot write one): two pixels packed in 3 bytes."""
    height, width = pixels.shape
    data = b"".join(
        bytes([a >> 4, (a & 0xF) << 4 | b >> 8, b & 0xFF]) for row in pixels for a, b in zip(row[0::2], row[1::2])
    )
    data_offset = 8 + 2 + 12 * 9 + 4
    tags = [(256, width), (257, height), (258, 12), (259, 1), (262, 1), (273, data_offset), (277, 1), (278, height)]
    ifd = b"".join(struct.pack("<HHII", tag, 4, 1, value) for tag, value in [*tags, (279, len(data))])
    return b"II*\x00" + struct.pack("<IH", 8, 9) + ifd + struct.pack("<I", 0) + data


def test_12bit_tiff_is_scaled_by_its_real_bit_depth(tmp_path):
    pixels = np.array([[0, 1000], [2048, 4095]])
    path = tmp_path / "grey12.tif"
    path.write_bytes(_tiff_12bit(pixels))
    np.testing.assert_allclose(decode_image(path, **TINY), pixels / 4095.0, atol=1e-7)


def test_16bit_tiff_is_scaled_by_65535(tmp_path):
    pixels = np.array([[0, 30000], [65535, 12]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "grey16.tif")
    np.testing.assert_allclose(decode_image(tmp_path / "grey16.tif", **TINY), pixels / 65535.0, atol=1e-7)


def test_rgb_with_identical_channels_is_greyscale(tmp_path):
    grey = np.array([[10, 20, 30]], dtype=np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "grey_rgb.png")
    decoded = decode_image(tmp_path / "grey_rgb.png", **TINY)
    assert decoded.shape == (1, 3)
    np.testing.assert_allclose(decoded, grey / 255.0, atol=1e-7)


def test_colour_stays_three_channels_and_alpha_is_dropped(tmp_path):
    rgba = np.array([[[255, 0, 0, 7], [0, 255, 0, 255]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "colour.png")
    decoded = decode_image(tmp_path / "colour.png", **TINY)
    assert decoded.shape == (1, 2, 3)
    np.testing.assert_allclose(decoded, rgba[..., :3] / 255.0, atol=1e-7)


# --- decoding: DICOM -----------------------------------------------------------------------------


def test_dicom_rescale_then_window_then_min_max(tmp_path):
    # stored -> rescaled (2 * s - 100): 0 -> -100 (below the window), 150 -> 200 (inside), 1000 -> 1900 (above)
    stored = np.array([[0, 150], [1000, 1000]])
    path = _write_dicom(
        tmp_path / "window.dcm", stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=200, WindowWidth=201
    )
    decoded = decode_image(path, **TINY)
    # DICOM linear window: ((x - (c - 0.5)) / (w - 1) + 0.5) inside it, clipped outside
    inside = (200 - 199.5) / 200 + 0.5
    np.testing.assert_allclose(decoded, [[0.0, inside], [1.0, 1.0]], atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
    stored = np.array([[0, 150], [1000, 1000]])
    path = _write_dicom(
        tmp_path / "inverted.dcm",
        stored,
        photometric="MONOCHROME1",
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=200,
        WindowWidth=201,
    )
    inside = (200 - 199.5) / 200 + 0.5
    np.testing.assert_allclose(decode_image(path, **TINY), [[1.0, 1.0 - inside], [0.0, 0.0]], atol=1e-6)


def test_dicom_without_window_is_min_max_of_rescaled_values_and_found_by_magic(tmp_path):
    stored = np.array([[100, 200], [300, 500]])
    path = _write_dicom(tmp_path / "no_suffix", stored, RescaleSlope=3, RescaleIntercept=7)
    decoded = decode_image(path, **TINY)  # no .dcm suffix: recognised by the DICM magic
    np.testing.assert_allclose(decoded, (stored - 100) / 400.0, atol=1e-6)
    assert pydicom.dcmread(path).RescaleSlope == 3


def test_colour_dicom_is_scaled_by_its_bit_depth(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 51, 255]]])
    path = _write_dicom(
        tmp_path / "colour.dcm",
        rgb,
        photometric="RGB",
        SamplesPerPixel=3,
        PlanarConfiguration=0,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
    )
    np.testing.assert_allclose(decode_image(path, **TINY), rgb / 255.0, atol=1e-7)


def test_dicom_without_pixels_is_refused(tmp_path):
    path = _write_dicom(tmp_path / "ok.dcm", np.zeros((2, 2)))
    dataset = pydicom.dcmread(path)
    del dataset.PixelData
    dataset.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(ImageDecodeError, match="no pixel data"):
        decode_image(tmp_path / "nopixels.dcm", **TINY)


# --- decoding: broken files ----------------------------------------------------------------------


def test_truncated_jpeg_is_refused_by_default(truncated_jpeg):
    with pytest.raises(ImageDecodeError) as raised:
        decode_image(truncated_jpeg)
    assert raised.value.reason == TRUNCATED_REASON
    assert str(raised.value) == f"{truncated_jpeg}: {TRUNCATED_REASON}"
    assert isinstance(raised.value, MedembedError)


def test_truncated_jpeg_lenient_fills_grey_like_pil_without_touching_its_global(truncated_jpeg):
    decoded = decode_image(truncated_jpeg, lenient=True)
    assert decoded.shape == (64, 64)
    np.testing.assert_allclose(decoded[-8:], 128 / 255.0, atol=1e-7)  # the missing blocks are grey
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with Image.open(truncated_jpeg) as reference:
            expected = np.asarray(reference.convert("L"), dtype=np.float32) / 255.0
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    np.testing.assert_array_equal(decoded, expected)


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_with_header(12_000, 10_000))  # 120 Mpx claimed, 60 bytes on disk
    with pytest.raises(ImageDecodeError, match="decompression bomb: 12000x10000"):
        decode_image(bomb)
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_with_header(200_000, 200_000))  # also beyond PIL's own hard limit
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(huge, max_pixels=10**12)


def test_max_pixels_is_the_limit(tmp_path):
    Image.fromarray(np.zeros((100, 100), dtype=np.uint8)).save(tmp_path / "small.png")
    assert decode_image(tmp_path / "small.png", max_pixels=10_000).shape == (100, 100)
    with pytest.raises(ImageDecodeError, match="exceeds max_pixels=9,999"):
        decode_image(tmp_path / "small.png", max_pixels=9_999)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file (0 bytes)"),
        (b"hello, not pixels", "not a recognised image format"),
        (_png_with_header(0, 10), "zero-size image (0x10)"),
    ],
)
def test_unusable_files_are_named_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError) as raised:
        decode_image(path)
    assert raised.value.reason == reason
    assert str(path) in str(raised.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_image(tmp_path / "absent.jpg")


# --- preprocessing -------------------------------------------------------------------------------


def test_wide_image_is_padded_top_and_bottom_centred_odd_pixel_last():
    wide = np.ones((1, 4), dtype=np.float32)  # pad 3 rows: 1 above, 2 below (HAI-DEF's d // 2 first)
    out = _plain_spec(4)(wide)
    assert out.shape == (3, 4, 4) and out.dtype == np.float32
    expected = np.zeros((4, 4), dtype=np.float32)
    expected[1] = 1.0
    for channel in out:
        np.testing.assert_array_equal(channel, expected)


def test_tall_image_is_padded_left_and_right():
    tall = np.ones((4, 2), dtype=np.float32)
    out = _plain_spec(4)(tall)
    expected = np.zeros((4, 4), dtype=np.float32)
    expected[:, 1:3] = 1.0
    np.testing.assert_array_equal(out[0], expected)


def test_without_padding_the_image_is_stretched():
    out = _plain_spec(4, pad_to_square=False)(np.ones((1, 4), dtype=np.float32))
    np.testing.assert_array_equal(out, np.ones((3, 4, 4), dtype=np.float32))


def test_bilinear_without_antialias_samples_half_pixel_centres():
    ramp = np.tile(np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32) / 3.0, (4, 1))
    out = _plain_spec(2)(ramp)[0]  # output centres fall at input x = 0.5 and 2.5 (tf.image.resize)
    np.testing.assert_allclose(out, np.tile([0.5 / 3.0, 2.5 / 3.0], (2, 1)), atol=1e-6)
    smoothed = _plain_spec(2, antialias=True)(ramp)[0]
    assert not np.allclose(smoothed, out)


def test_medsiglip_spec_maps_to_minus_one_one_with_three_equal_channels():
    spec = medsiglip_spec()
    assert (spec.size, spec.pad_to_square, spec.resize, spec.antialias) == (448, True, "bilinear", False)
    image = np.random.default_rng(1).random((300, 200)).astype(np.float32)
    out = spec(image)
    assert out.shape == (3, 448, 448) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    assert out[0, 224, 0] == -1.0  # padding columns are black -> -1
    np.testing.assert_array_equal(spec(np.ones((448, 448), np.float32)), np.ones((3, 448, 448), np.float32))


def test_colour_input_keeps_its_channels_and_per_channel_normalisation():
    colour = np.zeros((2, 2, 3), dtype=np.float32)
    colour[..., 1] = 1.0
    out = _plain_spec(2, mean=(0.5, 0.5, 0.0), std=(0.5, 0.25, 1.0))(colour)
    np.testing.assert_allclose(out[0], -1.0)
    np.testing.assert_allclose(out[1], 2.0)
    np.testing.assert_allclose(out[2], 0.0)


def test_single_channel_spec_turns_colour_into_luma():
    colour = np.zeros((2, 2, 3), dtype=np.float32)
    colour[..., 0] = 1.0
    out = _plain_spec(2, channels=1, mean=(0.0,), std=(1.0,))(colour)
    assert out.shape == (1, 2, 2)
    np.testing.assert_allclose(out, 0.299, atol=1e-6)


def test_spec_hash_is_stable_and_sensitive_to_every_field():
    base = medsiglip_spec()
    assert base.hash() == medsiglip_spec().hash() and len(base.hash()) == 16
    variants = [
        medsiglip_spec(896),
        _plain_spec(448, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pad_to_square=False),
        _plain_spec(448, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="bicubic"),
        _plain_spec(448, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), antialias=True),
        _plain_spec(448, mean=(0.5, 0.5, 0.4), std=(0.5, 0.5, 0.5)),
        _plain_spec(448, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), lenient_decoding=True),
    ]
    assert _plain_spec(448, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).hash() == base.hash()
    assert len({base.hash(), *(variant.hash() for variant in variants)}) == len(variants) + 1


def test_spec_round_trips_through_dict_and_pickle():
    spec = medsiglip_spec(896)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    clone = pickle.loads(pickle.dumps(spec))  # DataLoader workers receive it pickled
    assert clone == spec and clone.hash() == spec.hash()


@pytest.mark.parametrize(
    "bad", [dict(resize="nearest"), dict(size=0), dict(channels=2), dict(std=(1, 0, 1)), dict(mean=(0.5,))]
)
def test_invalid_spec_is_refused(bad):
    fields = dict(size=8, pad_to_square=True, resize="bilinear", antialias=False, mean=(0, 0, 0), std=(1, 1, 1))
    with pytest.raises(ValueError):
        PreprocessSpec(**{**fields, **bad})


def test_load_decodes_strictly_unless_the_spec_is_lenient(truncated_jpeg, tmp_path):
    Image.fromarray(np.full((40, 70), 200, dtype=np.uint8)).save(tmp_path / "ok.png")
    spec = _plain_spec(16)
    np.testing.assert_array_equal(spec.load(tmp_path / "ok.png"), spec(decode_image(tmp_path / "ok.png")))
    with pytest.raises(ImageDecodeError):
        spec.load(truncated_jpeg)
    assert _plain_spec(16, lenient_decoding=True).load(truncated_jpeg).shape == (3, 16, 16)


# --- real data -----------------------------------------------------------------------------------


def test_fracatlas_strict_decoding_rejects_exactly_the_59_truncated_jpegs(fracatlas_root):
    paths = sorted((fracatlas_root / "images").glob("*/*.jpg"))
    assert len(paths) == 4083
    refused = {}
    for path in paths:
        try:
            pixels = decode_image(path)
        except ImageDecodeError as error:
            refused[path] = error.reason
            continue
        assert pixels.dtype == np.float32 and pixels.ndim in (2, 3)
        assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    assert len(paths) - len(refused) == 4024
    assert len(refused) == 59
    assert set(refused.values()) == {TRUNCATED_REASON}
    assert {path.parent.name for path in refused} == {"Non_fractured"}
    assert all("IMG0004028" <= path.stem <= "IMG0004347" for path in refused)
    for path in refused:
        assert decode_image(path, lenient=True).ndim == 2


def test_jpeg_draft_decodes_at_reduced_scale_but_never_below_the_target(tmp_path):
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (32, 40)), np.ones((32, 32))).astype(np.uint8)  # 1024 x 1280
    path = tmp_path / "big.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    full, draft = decode_image(path), decode_image(path, draft_size=224)
    assert full.shape == (1024, 1280) and draft.shape == (256, 320)  # 1/4 scale: the smallest with both sides >= 224
    spec = PreprocessSpec(size=224, pad_to_square=True, resize="bilinear", antialias=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    drafted = dataclasses.replace(spec, jpeg_draft=True)
    assert drafted.hash() != spec.hash()
    assert np.abs(drafted.load(path) - spec.load(path)).mean() < 0.02  # in [-1, 1] units: the same picture
    png = tmp_path / "big.png"
    Image.fromarray(smooth).save(png)
    assert decode_image(png, draft_size=224).shape == (1024, 1280)  # only JPEG has a DCT-domain draft


# --- integrity under bad input ---------------------------------------------------------------------


def test_default_spec_hashes_are_unchanged_by_the_decoding_limits():
    # the hashes every store made before min_side / max_pixels / max_aspect_ratio existed carries
    assert medsiglip_spec().hash() == "ae6ce0c0965a9d05"
    assert medsiglip_spec(896).hash() == "af483da2dab43c9d"
    assert set(medsiglip_spec().to_dict()) == {
        "version", "size", "pad_to_square", "resize", "antialias", "mean", "std", "channels", "lenient_decoding",
        "jpeg_draft",
    }
    for change in (dict(min_side=16), dict(max_pixels=10**6), dict(max_aspect_ratio=4.0), dict(max_aspect_ratio=None)):
        spec = dataclasses.replace(medsiglip_spec(), **change)
        assert spec.hash() != medsiglip_spec().hash()
        assert PreprocessSpec.from_dict(spec.to_dict()) == spec
        (name,) = change
        assert spec.to_dict()[name] == change[name]


def test_images_below_the_minimum_side_are_refused_with_a_reason(tmp_path):
    Image.new("L", (1, 1)).save(tmp_path / "dot.png")
    Image.new("L", (1, 50_000)).save(tmp_path / "sliver.png")
    Image.new("L", (31, 40)).save(tmp_path / "thumb.png")
    for name, size in (("dot.png", "1x1"), ("sliver.png", "1x50000"), ("thumb.png", "31x40")):
        with pytest.raises(ImageDecodeError) as raised:
            decode_image(tmp_path / name)
        assert raised.value.reason == f"image is {size} px; below the minimum side of 32 px"
        assert raised.value.kind == "too_small"
        with pytest.raises(ImageDecodeError, match="below the minimum side"):
            medsiglip_spec().load(tmp_path / name)
    assert decode_image(tmp_path / "thumb.png", min_side=31).shape == (40, 31)
    assert dataclasses.replace(_plain_spec(8), min_side=8).load(tmp_path / "thumb.png").shape == (3, 8, 8)
    with pytest.raises(ImageDecodeError, match="minimum side of 64 px"):
        dataclasses.replace(_plain_spec(8), min_side=64).load(tmp_path / "thumb.png")


def test_absurd_aspect_ratios_are_refused(tmp_path):
    Image.new("L", (800, 40)).save(tmp_path / "strip.png")
    Image.new("L", (400, 40)).save(tmp_path / "long.png")  # 10:1, the limit itself
    with pytest.raises(ImageDecodeError) as raised:
        decode_image(tmp_path / "strip.png")
    assert raised.value.reason == "image is 800x40 px; aspect ratio 20.0:1 exceeds the maximum of 10:1"
    assert raised.value.kind == "aspect_ratio"
    assert decode_image(tmp_path / "long.png").shape == (40, 400)
    assert decode_image(tmp_path / "strip.png", max_aspect_ratio=None).shape == (40, 800)
    assert dataclasses.replace(_plain_spec(8), max_aspect_ratio=25).load(tmp_path / "strip.png").shape == (3, 8, 8)


def test_spec_max_pixels_is_the_limit_of_load(tmp_path):
    Image.new("L", (100, 100)).save(tmp_path / "square.png")
    with pytest.raises(ImageDecodeError, match="exceeds max_pixels=9,999") as raised:
        dataclasses.replace(_plain_spec(8), max_pixels=9_999).load(tmp_path / "square.png")
    assert raised.value.kind == "too_large"


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("name", ["scan.dcm", "scan", "scan.png"])
def test_dicom_is_recognised_by_content_whatever_its_name(tmp_path, photometric, name):
    stored = np.arange(40 * 48).reshape(40, 48) % 4096
    path = _write_dicom(tmp_path / name, stored, photometric=photometric)
    expected = (stored - stored.min()) / (stored.max() - stored.min())
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    np.testing.assert_allclose(decode_image(path), expected, atol=1e-6)
    assert probe_image(path) == ImageHeader("DICOM", 48, 40, photometric)


def test_dicom_without_preamble_or_suffix_is_recognised(tmp_path):
    stored = np.arange(40 * 40).reshape(40, 40)
    dicom = _write_dicom(tmp_path / "with_preamble.dcm", stored)
    bare = tmp_path / "bare"
    bare.write_bytes(dicom.read_bytes()[132:])  # no preamble, no DICM marker: old ACR-NEMA style
    assert bare.read_bytes()[:2] == b"\x02\x00"
    np.testing.assert_array_equal(decode_image(bare), decode_image(dicom))
    assert probe_image(bare).format == "DICOM"


def test_a_png_named_dcm_is_decoded_as_the_png_it_is(tmp_path):
    pixels = (np.arange(40 * 40).reshape(40, 40) % 256).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "misnamed.dcm", format="PNG")
    np.testing.assert_allclose(decode_image(tmp_path / "misnamed.dcm"), pixels / 255.0, atol=1e-7)
    assert probe_image(tmp_path / "misnamed.dcm").format == "PNG"


def test_malformed_dicom_files_are_unreadable_with_a_reason(tmp_path):
    good = _write_dicom(tmp_path / "good.dcm", np.zeros((40, 40))).read_bytes()
    cases = {
        "text.dcm": b"this is not a DICOM file at all",
        "random.dcm": np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes(),
        "header_cut.dcm": good[:200],
        "pixels_cut.dcm": good[:-1000],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageDecodeError) as raised:
            decode_image(tmp_path / name)
        assert raised.value.kind == ("truncated" if name == "pixels_cut.dcm" else "dicom"), (name, raised.value.reason)
        assert "DICOM" in raised.value.reason and str(tmp_path / name) in str(raised.value)
    assert "no 'DICM' marker" in _reason(probe_image, tmp_path / "text.dcm")
    assert _reason(probe_image, tmp_path / "header_cut.dcm") == "DICOM file has no pixel data"
    # the header check reads no pixels, but sees the declared pixel length run past the end of the file
    assert _reason(probe_image, tmp_path / "pixels_cut.dcm") == (
        "truncated DICOM: pixel data needs 3,200 bytes, the file ends 1,000 bytes short"
    )


def _reason(function, path) -> str:
    with pytest.raises(ImageDecodeError) as raised:
        function(path)
    return raised.value.reason


def test_paths_that_are_not_files_get_their_own_reason(tmp_path):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    assert _reason(decode_image, tmp_path / "folder.png") == "a directory, not a file"
    assert _reason(decode_image, tmp_path / "loop.png") == "symbolic-link loop"
    assert _reason(decode_image, tmp_path / "dangling.png") == "broken symbolic link"
    assert _reason(decode_image, tmp_path / "nul\x00.png") == "path contains a NUL character"
    assert _reason(probe_image, tmp_path / "folder.png") == "a directory, not a file"


def test_common_modes_decode_to_the_plain_formulas(tmp_path):
    rng = np.random.default_rng(0)
    grey = (rng.random((40, 50)) * 255).astype(np.uint8)
    colour = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(grey).convert("1").save(tmp_path / "bit.png")
    Image.fromarray(colour).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(colour).convert("CMYK").save(tmp_path / "cmyk.jpg")
    for name in ("bit.png", "palette.png", "cmyk.jpg"):
        with Image.open(tmp_path / name) as image:
            expected = np.asarray(image.convert("L" if name == "bit.png" else "RGB"), dtype=np.float32) / 255.0
        np.testing.assert_array_equal(decode_image(tmp_path / name), expected)
    floats = rng.random((40, 50)).astype(np.float32) * 9 - 3
    Image.fromarray(floats).save(tmp_path / "float.tif")
    expected = ((floats.astype(np.float64) - floats.min()) / (floats.max() - floats.min())).astype(np.float32)
    np.testing.assert_array_equal(decode_image(tmp_path / "float.tif"), expected)
    tall = (np.arange(5000 * 40).reshape(5000, 40) % 65536).astype(np.uint16)  # several conversion strips
    Image.fromarray(tall).save(tmp_path / "tall16.png")
    expected = (tall.astype(np.float64) / 65535).astype(np.float32)
    np.testing.assert_array_equal(decode_image(tmp_path / "tall16.png", max_aspect_ratio=None), expected)


def test_float_images_with_nan_or_inf_are_refused(tmp_path):
    floats = np.ones((40, 40), dtype=np.float32)
    floats[3, 4] = np.nan
    Image.fromarray(floats).save(tmp_path / "nan.tif")
    assert _reason(decode_image, tmp_path / "nan.tif") == "image holds NaN or infinite pixel values"


def test_decode_errors_survive_pickling_across_workers(tmp_path):
    error = ImageDecodeError(tmp_path / "x.png", "empty file (0 bytes)", "empty")
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.path, clone.reason, clone.kind, str(clone)) == (error.path, error.reason, error.kind, str(error))


def test_16bit_decoding_peaks_near_six_bytes_per_pixel(tmp_path):
    """A 16-bit image's decode holds PIL's buffer (2 B/px) and the float32 result (4 B/px), little more.

    Before the strip-wise conversion a 10,000 x 10,000 16-bit PNG peaked at 1.7 GB over the baseline
    (17 B/px: float64 copies of the whole image); this checks the bound on a 4,000 x 4,000 one.
    """
    side = 4000
    ramp = np.arange(side, dtype=np.uint32)
    Image.fromarray(((ramp[:, None] * 7 + ramp[None, :] * 3) % 65536).astype(np.uint16)).save(
        tmp_path / "big16.png", compress_level=1
    )
    code = (
        "import resource; from medembed.data.images import decode_image; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        f"pixels = decode_image({str(tmp_path / 'big16.png')!r}); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, pixels.shape)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    grown_kb, _ = result.stdout.split(" ", 1)
    bytes_per_pixel = int(grown_kb) * 1024 / side**2
    assert "(4000, 4000)" in result.stdout
    assert bytes_per_pixel < 8.0, f"decoding a 16-bit PNG grew RSS by {bytes_per_pixel:.1f} bytes per pixel"


def test_a_spec_describes_itself_in_words():
    spec = PreprocessSpec(size=448, pad_to_square=True, resize="bilinear", antialias=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert spec.describe() == "zero-pad to square, resize to 448 px (bilinear, no antialiasing), x in [0, 1] -> (x - 0.5) / 0.5, 3 channels"
    stretched = PreprocessSpec(size=896, pad_to_square=False, resize="bilinear", antialias=True, mean=(0.0,), std=(1.0,), channels=1, lenient_decoding=True)
    assert stretched.describe().startswith("stretch to square, resize to 896 px (bilinear, antialiased)")
    assert stretched.describe().endswith("1 channel, lenient decoding")
