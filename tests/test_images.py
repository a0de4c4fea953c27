"""Decoding (8/16-bit, colour, DICOM, broken files, FracAtlas) and the preprocessing spec's numerics."""

import dataclasses
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medembed.errors import MedembedError
from medembed.images import ImageDecodeError, PreprocessSpec, decode_image, medsiglip_spec

TRUNCATED_REASON = "truncated JPEG (no end-of-image marker)"


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
    decoded = decode_image(tmp_path / "grey.png")
    assert decoded.dtype == np.float32 and decoded.shape == (2, 2)
    np.testing.assert_allclose(decoded, [[0.0, 0.2], [0.8, 1.0]], atol=1e-7)


def test_16bit_png_is_scaled_by_65535(tmp_path):
    pixels = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(pixels).save(path)
    assert path.read_bytes()[24] == 16  # the IHDR bit depth: really a 16-bit PNG
    decoded = decode_image(path)
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
    np.testing.assert_allclose(decode_image(path), pixels / 4095.0, atol=1e-7)


def test_16bit_tiff_is_scaled_by_65535(tmp_path):
    pixels = np.array([[0, 30000], [65535, 12]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "grey16.tif")
    np.testing.assert_allclose(decode_image(tmp_path / "grey16.tif"), pixels / 65535.0, atol=1e-7)


def test_rgb_with_identical_channels_is_greyscale(tmp_path):
    grey = np.array([[10, 20, 30]], dtype=np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "grey_rgb.png")
    decoded = decode_image(tmp_path / "grey_rgb.png")
    assert decoded.shape == (1, 3)
    np.testing.assert_allclose(decoded, grey / 255.0, atol=1e-7)


def test_colour_stays_three_channels_and_alpha_is_dropped(tmp_path):
    rgba = np.array([[[255, 0, 0, 7], [0, 255, 0, 255]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "colour.png")
    decoded = decode_image(tmp_path / "colour.png")
    assert decoded.shape == (1, 2, 3)
    np.testing.assert_allclose(decoded, rgba[..., :3] / 255.0, atol=1e-7)


# --- decoding: DICOM -----------------------------------------------------------------------------


def test_dicom_rescale_then_window_then_min_max(tmp_path):
    # stored -> rescaled (2 * s - 100): 0 -> -100 (below the window), 150 -> 200 (inside), 1000 -> 1900 (above)
    stored = np.array([[0, 150], [1000, 1000]])
    path = _write_dicom(
        tmp_path / "window.dcm", stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=200, WindowWidth=201
    )
    decoded = decode_image(path)
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
    np.testing.assert_allclose(decode_image(path), [[1.0, 1.0 - inside], [0.0, 0.0]], atol=1e-6)


def test_dicom_without_window_is_min_max_of_rescaled_values_and_found_by_magic(tmp_path):
    stored = np.array([[100, 200], [300, 500]])
    path = _write_dicom(tmp_path / "no_suffix", stored, RescaleSlope=3, RescaleIntercept=7)
    decoded = decode_image(path)  # no .dcm suffix: recognised by the DICM magic
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
    np.testing.assert_allclose(decode_image(path), rgb / 255.0, atol=1e-7)


def test_dicom_without_pixels_is_refused(tmp_path):
    path = _write_dicom(tmp_path / "ok.dcm", np.zeros((2, 2)))
    dataset = pydicom.dcmread(path)
    del dataset.PixelData
    dataset.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(ImageDecodeError, match="no pixel data"):
        decode_image(tmp_path / "nopixels.dcm")


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
    Image.fromarray(np.full((30, 50), 200, dtype=np.uint8)).save(tmp_path / "ok.png")
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
