"""Every file of the corpus through the library: decode_image, the encoders' PreprocessSpec.load, probe_image,
and validate_manifest. Bad input is always an ImageDecodeError with a one-line reason, never anything else."""

import dataclasses
import pickle

import numpy as np
import pytest

from medembed.data.images import DECODE_ERROR_KINDS, ImageDecodeError, decode_image, medsiglip_spec, probe_image
from medembed.data.manifest import Manifest, validate_manifest


# The names are fixed by generators.write_corpus; parametrising on them gives one test per file.
NAMES = [
    "grey8.png", "grey16.png", "bit1.png", "palette.png", "cmyk.jpg", "rgb.jpg", "float.tif", "röntgen_画像.png",
    " spaced name.png ", "dicom_mono1.dcm", "dicom_mono2.dcm", "dicom_mono1_no_suffix", "dicom_mono2_no_suffix",
    "png_named.dcm", "empty.png", "text.png", "truncated.png", "truncated.jpg", "zero_size.png", "header_bomb.png",
    "huge_real.png", "dot.png", "sliver.png", "strip.png", "nan.tif", "junk.dcm", "dicom_cut.dcm",
    "dicom_no_pixels.dcm", "loop.png", "dangling.png", "folder.png", "missing.png",
]
SPEC = dataclasses.replace(medsiglip_spec(64), jpeg_draft=True)  # small, and exercising the JPEG draft path


def _case(corpus, name):
    root, cases = corpus
    (case,) = [c for c in cases if c.path == name]
    return root / name, case


def test_the_corpus_is_what_the_tests_name(corpus):
    assert [c.path for c in corpus[1]] == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_decode_and_load_answer_pixels_or_a_named_reason(corpus, name):
    path, case = _case(corpus, name)
    if case.good:
        pixels = decode_image(path)
        assert pixels.dtype == np.float32 and pixels.ndim in (2, 3)
        assert np.isfinite(pixels).all() and 0.0 <= pixels.min() and pixels.max() <= 1.0
        tensor = SPEC.load(path)
        assert tensor.shape == (3, 64, 64) and np.isfinite(tensor).all()
        return
    for decode in (decode_image, SPEC.load):
        with pytest.raises(ImageDecodeError) as raised:
            decode(path)
        error = raised.value
        assert (error.kind, case.reason in error.reason) == (case.kind, True), error.reason
        assert "\n" not in error.reason and str(error) == f"{path}: {error.reason}"
        clone = pickle.loads(pickle.dumps(error))  # it crosses DataLoader worker processes
        assert (clone.reason, clone.kind) == (error.reason, error.kind)


@pytest.mark.parametrize("name", NAMES)
def test_the_header_check_agrees_without_decoding_pixels(corpus, name):
    path, case = _case(corpus, name)
    if case.probe_kind is None:
        header = probe_image(path)
        assert header.width >= 32 and header.height >= 32
        if "dicom" in name:
            assert header.format == "DICOM" and header.mode in ("MONOCHROME1", "MONOCHROME2")
        return
    with pytest.raises(ImageDecodeError) as raised:
        probe_image(path)
    assert raised.value.kind == case.probe_kind and raised.value.kind in DECODE_ERROR_KINDS
    if case.probe_kind == case.kind:
        assert case.reason in raised.value.reason


def test_dicom_monochrome1_is_the_inverse_of_monochrome2_with_or_without_suffix(corpus):
    root, _ = corpus
    mono2 = decode_image(root / "dicom_mono2.dcm")
    np.testing.assert_array_equal(decode_image(root / "dicom_mono2_no_suffix"), mono2)
    np.testing.assert_allclose(decode_image(root / "dicom_mono1.dcm"), 1.0 - mono2, atol=1e-7)
    np.testing.assert_allclose(decode_image(root / "dicom_mono1_no_suffix"), 1.0 - mono2, atol=1e-7)


def test_validation_names_every_file_the_header_check_or_the_decoder_refuses(corpus):
    """`manifest check --decode` reads headers, then decodes in full as extract does: truncated JPEG data and NaN
    pixels, which no header shows, are errors there too."""
    root, cases = corpus
    manifest = Manifest({"image_id": [c.image_id for c in cases], "path": [c.path for c in cases]})
    report = validate_manifest(manifest, root, check_decodable=True)
    flagged = {row for p in report.errors for row in p.rows}
    expected = {i + 1 for i, c in enumerate(cases) if c.probe_kind is not None or c.kind is not None}
    assert flagged == expected
    text = report.format()
    for i, case in enumerate(cases):
        if case.probe_kind not in (None, "not_found"):
            lines = [line for line in text.splitlines() if f"row {i + 1} {case.path!r} (" in line]
            assert len(lines) == 1, case.path
            if case.probe_kind == case.kind:
                assert case.reason in lines[0]
