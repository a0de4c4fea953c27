"""The device-side preprocessing (run here on CPU tensors) against the CPU path, on real files of every kind."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from medembed.extract.device_preprocess import pack, preprocess_packed, unpack
from medembed.encoders.efficientnet_lite import efficientnet_lite_spec
from medembed.encoders.medgemma import gemma3_spec
from medembed.data.images import CompactPixels, PreprocessSpec, medsiglip_spec
from medembed.data.manifest import read_manifest

from tests.conftest import REPO, TRUNCATED
from tests.test_images import _tiff_12bit, _write_dicom

TOLERANCE = 1e-5  # the bound; float32 division order is all that may differ
# One spec of each kind of geometry and resampling the encoders use, plus single-channel luma and bicubic.
SPECS = {
    "medsiglip-448": medsiglip_spec(448),
    "gemma3-896": gemma3_spec(896),
    "efficientnet-lite-224 (JPEG draft)": efficientnet_lite_spec(224),
    "bicubic-1-channel": PreprocessSpec(size=160, pad_to_square=True, resize="bicubic", antialias=True, mean=(0.4,), std=(0.3,), channels=1),
}
# The store hashes of today's specs: a device path must not change them (stores stay compatible).
HASHES = {"medsiglip-448": "ae6ce0c0965a9d05", "gemma3-896": "52665e060cea0d26", "efficientnet-lite-224 (JPEG draft)": "d65cecbe1072255a"}


def device_path(spec, paths) -> np.ndarray:
    """What the extractor's device path computes: compact decode in the worker, pack, then on the device."""
    return preprocess_packed(spec, pack([spec.decode_compact(p) for p in paths])).numpy()


def cpu_path(spec, paths) -> np.ndarray:
    return np.stack([spec.load(p) for p in paths])


def assert_paths_agree(spec, paths) -> None:
    expected, actual = cpu_path(spec, paths), device_path(spec, paths)
    assert actual.shape == expected.shape == (len(paths), spec.channels, spec.size, spec.size)
    difference = np.abs(actual - expected).max()
    assert difference <= TOLERANCE, f"max |device - cpu| = {difference:.2e}"


@pytest.fixture(scope="module")
def fracatlas_paths(fracatlas_root):
    """Real FracAtlas JPEGs of both stored sizes, greyscale and RGB-coded, plus one truncated file."""
    manifest = read_manifest(REPO / "data_manifests" / "fracatlas.csv")
    paths = manifest.resolve(fracatlas_root)
    sizes, picked = {}, []
    for path in paths:
        if not path.exists():
            continue  # gpu_check.sh carries a subset of FracAtlas
        with Image.open(path) as image:
            key = (image.size, image.mode)
        if key not in sizes:
            sizes[key] = 1
            picked.append(path)
    assert len({size for size, _ in sizes}) >= 3 and {mode for _, mode in sizes} == {"L", "RGB"}
    truncated = [p for p, i in zip(paths, manifest.image_id) if i == TRUNCATED[0]]
    return picked, truncated


@pytest.mark.parametrize("name", SPECS)
def test_device_path_equals_cpu_path_on_real_fracatlas_jpegs(fracatlas_paths, name):
    picked, _ = fracatlas_paths
    assert_paths_agree(SPECS[name], picked)


def test_lenient_decoding_of_a_truncated_jpeg_agrees_too(fracatlas_paths):
    _, truncated = fracatlas_paths
    assert_paths_agree(dataclasses.replace(medsiglip_spec(448), lenient_decoding=True), truncated)


def _smooth(shape, maximum, seed) -> np.ndarray:
    """Radiograph-like content: a smooth gradient with noise, filling the whole range of the bit depth."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
    values = 0.6 * rows * cols + 0.4 * rng.random(shape)
    return np.round(values / values.max() * maximum)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """16-bit PNGs, a 12-bit TIFF, 8-bit colour, and DICOMs (windowed, MONOCHROME1, plain, signed, colour)."""
    folder = tmp_path_factory.mktemp("device_inputs")
    paths = {}
    for index, shape in enumerate([(301, 517), (640, 480), (512, 512)]):
        path = folder / f"grey16_{index}.png"
        Image.fromarray(_smooth(shape, 65535, index).astype(np.uint16)).save(path)
        paths[path.name] = path
    paths["grey12.tif"] = folder / "grey12.tif"
    paths["grey12.tif"].write_bytes(_tiff_12bit(_smooth((200, 260), 4095, 7).astype(int)))
    colour = np.stack([_smooth((333, 250), 255, s) for s in (1, 2, 3)], axis=-1).astype(np.uint8)
    paths["colour.png"] = folder / "colour.png"
    Image.fromarray(colour).save(paths["colour.png"])
    stored = _smooth((384, 300), 4095, 11)
    paths["windowed.dcm"] = _write_dicom(folder / "windowed.dcm", stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=3000, WindowWidth=4000)
    paths["inverted.dcm"] = _write_dicom(folder / "inverted.dcm", stored, photometric="MONOCHROME1", WindowCenter=1800, WindowWidth=2500)
    paths["plain.dcm"] = _write_dicom(folder / "plain.dcm", stored[:, :200], RescaleSlope=3, RescaleIntercept=7)
    signed = (stored - 2048).astype(np.int16).view(np.uint16)
    paths["signed.dcm"] = _write_dicom(folder / "signed.dcm", signed, PixelRepresentation=1)
    paths["colour.dcm"] = _write_dicom(
        folder / "colour.dcm", colour[:100, :120], photometric="RGB", SamplesPerPixel=3, PlanarConfiguration=0,
        BitsAllocated=8, BitsStored=8, HighBit=7,
    )
    return paths


@pytest.mark.parametrize("name", ["medsiglip-448", "gemma3-896", "bicubic-1-channel"])
def test_device_path_equals_cpu_path_on_16bit_png_tiff_colour_and_dicom(generated, name):
    assert_paths_agree(SPECS[name], list(generated.values()))


def test_workers_send_compact_integer_pixels_at_the_decoded_size(generated, fracatlas_paths):
    spec = medsiglip_spec(448)
    jpeg = spec.decode_compact(fracatlas_paths[0][0])
    assert jpeg.values.dtype == np.uint8 and jpeg.values.ndim == 2 and jpeg.scale == 255.0
    assert jpeg.values.shape == spec.decode(fracatlas_paths[0][0]).shape
    png16 = spec.decode_compact(generated["grey16_0.png"])
    assert png16.values.dtype == np.uint16 and png16.values.shape == (301, 517) and png16.scale == 65535.0
    assert spec.decode_compact(generated["grey12.tif"]).scale == 4095.0
    dicom = spec.decode_compact(generated["windowed.dcm"])
    assert dicom.values.dtype == np.uint16 and dicom.lut is not None and dicom.lut.dtype == np.float32
    assert dicom.nbytes < spec.decode(generated["windowed.dcm"]).nbytes
    # the numpy conversion the device repeats gives decode_image's values
    for path in generated.values():
        np.testing.assert_allclose(spec.decode_compact(path).to_float(), spec.decode(path), atol=1e-7, rtol=0)


def test_draft_decoding_is_decided_as_on_the_cpu_path(fracatlas_paths):
    spec = efficientnet_lite_spec(224)
    large = next(p for p in fracatlas_paths[0] if Image.open(p).size[1] == 1024)
    shape = spec.decode_compact(large).values.shape
    assert shape == spec.decode(large).shape and shape[0] == 512  # libjpeg's 1/2 scale, still >= 224


def test_spec_hashes_are_those_of_existing_stores():
    assert {name: SPECS[name].hash() for name in HASHES} == HASHES


def test_pack_keeps_every_array_aligned_and_unpacks_to_the_same_pixels():
    images = [
        CompactPixels(np.arange(35, dtype=np.uint8).reshape(5, 7), 255.0),
        CompactPixels(np.arange(3 * 4 * 3, dtype=np.uint16).reshape(3, 4, 3) * 1000, 65535.0),
        CompactPixels(np.array([[0, 2], [1, 1]], dtype=np.uint16), lut=np.array([0.0, 0.25, 1.0], dtype=np.float32)),
        CompactPixels(np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)),
    ]
    packed = pack(images)
    assert all(image.offset % 8 == 0 and image.lut_offset % 8 in (0, 7) for image in packed.images)
    for image, tensor in zip(images, unpack(packed)):
        expected = image.to_float()
        expected = expected[None] if expected.ndim == 2 else expected.transpose(2, 0, 1)
        np.testing.assert_array_equal(tensor.numpy(), expected)
    assert packed.pin_memory().buffer.is_pinned() if torch.cuda.is_available() else packed.nbytes % 8 == 0
