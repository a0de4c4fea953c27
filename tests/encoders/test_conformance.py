"""Encoder conformance: golden embeddings of the bundled images, and medembed's preprocessing against each
checkpoint's own transformers image processor (tiny checkpoints with real processor configs)."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel
from typer.testing import CliRunner

from cli.main import app
from medembed import encoder_check as conformance
from medembed.encoder_check import GOLDEN_ENCODERS, GOLDEN_TOLERANCE, bundled_images, check_encoder
from medembed.options.encoders import CheckOptions
from medembed.data.images import decode_image
from tests.encoders.conftest import TINY_VISION, _build_tiny_gemma3

runner = CliRunner()
# Half an 8-bit grey level in [-1, 1] units. The PIL processors work in 8 bits: the input is rounded, and so is
# the resized image (PIL's fixed-point filters), hence up to ~1.5 levels apart from a float resize of the same.
HALF_LEVEL = 0.5 / 255 / 0.5
EIGHT_BIT_SLACK = 3 * HALF_LEVEL

# Processor configs as the hub checkpoints ship them (google/medsiglip-448, google/medgemma-4b-it,
# facebook/dinov2-base; written from their published preprocessor_config.json, the hub being unreachable
# here), at the tiny models' 32 px.
SIGLIP_PROCESSOR = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor",
    "resample": 2, "rescale_factor": 1 / 255, "size": {"height": 32, "width": 32},
}
GEMMA3_PROCESSOR = {
    "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor", "image_seq_length": 4,
    "image_std": [0.5, 0.5, 0.5], "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
    "pan_and_scan_min_ratio_to_activate": None, "processor_class": "Gemma3Processor", "resample": 2,
    "rescale_factor": 1 / 255, "size": {"height": 32, "width": 32},
}
DINOV2_PROCESSOR = {
    "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225], "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": 36},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> tiny checkpoint directory with the real processor config of that family."""
    root = tmp_path_factory.mktemp("conformance")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(root / "siglip")
    (root / "siglip" / "preprocessor_config.json").write_text(json.dumps(SIGLIP_PROCESSOR))
    _build_tiny_gemma3(root / "gemma3")
    (root / "gemma3" / "preprocessor_config.json").write_text(json.dumps(GEMMA3_PROCESSOR))
    torch.manual_seed(3)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=8)
    Dinov2Model(config).save_pretrained(root / "dinov2")
    (root / "dinov2" / "preprocessor_config.json").write_text(json.dumps(DINOV2_PROCESSOR))
    return {"medsiglip": root / "siglip", "medgemma": root / "gemma3", "hf-vision": root / "dinov2"}


def _by_image(result):
    return {check.image: check for check in result.images}


# --- golden embeddings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GOLDEN_ENCODERS)
def test_offline_encoders_reproduce_their_golden_embeddings_in_fp32(name):
    result = check_encoder(name)
    assert result.golden == "checked" and result.tolerance == GOLDEN_TOLERANCE["fp32"] == (1e-4, 1e-5)
    assert [check.image for check in result.images] == [path.name for path in bundled_images()]
    for check in result.images:
        assert check.golden_ok, check
        assert check.golden_max_abs_diff <= 1e-4 and check.golden_norm_rel_diff <= 1e-5
    assert result.ok and result.processor is None and result.processor_note == "not a Hugging Face checkpoint"


def test_a_changed_decoder_under_the_same_spec_is_caught(monkeypatch):
    """What a new Pillow/pydicom/resize that shifts pixels would do: same spec hash, moved embeddings."""
    from medembed.data import images

    real = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda *args, **kwargs: real(*args, **kwargs) ** 1.02)
    result = check_encoder("efficientnet-lite0")
    assert result.golden == "checked" and not result.ok
    assert all(check.golden_ok is False and check.golden_max_abs_diff > 1e-3 for check in result.images)
    assert result.lines()[-1].startswith("result       FAIL")


def test_other_options_have_no_golden_and_do_not_fail():
    result = check_encoder("efficientnet-lite0", encoder_options={"size": 192})
    assert result.golden.startswith("none for these options") and result.ok
    assert all(check.golden_ok is None for check in result.images)


def test_bf16_autocast_stays_within_its_coarse_tolerance():
    result = check_encoder("efficientnet-lite0", options=CheckOptions(precision="bf16"))
    assert result.precision == "bf16" and result.tolerance == GOLDEN_TOLERANCE["bf16"] and result.ok


def test_bundled_images_are_what_the_generator_makes_and_cover_the_decoders():
    with tempfile.TemporaryDirectory() as directory:
        made = conformance.write_test_images(Path(directory))
        for new, bundled in zip(made, bundled_images(), strict=True):
            a, b = decode_image(new), decode_image(bundled)
            if bundled.suffix == ".jpg":  # lossy: another libjpeg may encode it a little differently
                np.testing.assert_allclose(a, b, atol=3 / 255)
            else:
                np.testing.assert_array_equal(a, b)
    shapes = {path.name: decode_image(path).shape for path in bundled_images()}
    assert shapes["grey8_nonsquare.png"] == (420, 300) and shapes["rgb.png"] == (64, 64, 3)
    assert shapes["grey16.png"] == (52, 64) and shapes["mono1_12bit.dcm"] == (56, 40)
    assert sum(path.stat().st_size for path in bundled_images()) < 60_000
    golden = json.loads(conformance.GOLDEN_FILE.read_text())
    assert sorted(golden["encoders"]) == sorted(GOLDEN_ENCODERS)


# --- against the checkpoints' own image processors ----------------------------------------------------------


def test_medgemma_default_is_what_the_gemma3_processor_does(checkpoints):
    result = check_encoder("medgemma", model_id=str(checkpoints["medgemma"]))
    assert result.processor.startswith("Gemma3ImageProcessor") and result.golden.startswith("none for this encoder")
    for check in result.images:
        # the same stretch, antialiased bilinear and [-1, 1], but in 8 bits
        assert check.max_pixel_diff <= EIGHT_BIT_SLACK, check
        assert check.cosine > 0.9999, check
    assert result.ok


def test_medgemma_zero_pad_option_departs_from_the_processor_on_non_square_images(checkpoints):
    checks = _by_image(check_encoder("medgemma", model_id=str(checkpoints["medgemma"]), encoder_options={"pad_to_square": True}))
    assert checks["grey8_nonsquare.png"].max_pixel_diff > 0.5 and checks["grey8_nonsquare.png"].cosine < 0.99


def test_medsiglip_padding_and_antialias_against_the_siglip_processor(checkpoints):
    directory = str(checkpoints["medsiglip"])
    plain = _by_image(check_encoder("medsiglip", model_id=directory))
    antialiased = _by_image(check_encoder("medsiglip", model_id=directory, encoder_options={"antialias": True}))
    # the square image needs no padding: only antialiasing tells medembed's default from the hub processor
    assert antialiased["rgb.png"].max_pixel_diff <= EIGHT_BIT_SLACK and antialiased["rgb.png"].cosine > 0.9999
    assert plain["rgb.png"].max_pixel_diff > 4 * HALF_LEVEL
    # non-square: the processor stretches where MedSigLIP's serving code (and medembed) pads
    assert plain["grey8_nonsquare.png"].max_pixel_diff > 0.5
    assert all(-1 <= check.cosine <= 1 for check in plain.values())


def test_dinov2_padding_instead_of_centre_crop_is_measured(checkpoints):
    result = check_encoder("hf-vision", model_id=str(checkpoints["hf-vision"]))
    assert result.processor.startswith("BitImageProcessor")
    checks = _by_image(result)
    assert all(check.max_pixel_diff is not None and check.cosine is not None for check in checks.values())
    assert checks["grey8_nonsquare.png"].max_pixel_diff > 1.0  # the crop drops what the padding keeps


def test_checkpoint_without_processor_config_is_reported(tiny_siglip):
    result = check_encoder("medsiglip", model_id=str(tiny_siglip[0]))
    assert result.processor is None and "no preprocessor_config.json" in result.processor_note
    assert all(check.max_pixel_diff is None and check.cosine is None for check in result.images) and result.ok


# --- the CLI only prints ---------------------------------------------------------------------------------------


def test_cli_prints_the_check_and_exits_zero_when_golden_holds():
    result = runner.invoke(app, ["encoders", "check", "--encoder", "efficientnet-lite0"])
    assert result.exit_code == 0, result.output
    assert "store uses   medembed PreprocessSpec d65cecbe1072255a" in result.output
    assert result.output.count("golden OK") == len(bundled_images())


def test_cli_exits_one_when_an_embedding_moved(monkeypatch):
    from medembed.data import images

    real = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda *args, **kwargs: real(*args, **kwargs) * 0.9)
    result = runner.invoke(app, ["encoders", "check", "--encoder", "efficientnet-lite0", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["ok"] is False


def test_cli_hf_check_and_list(checkpoints):
    result = runner.invoke(app, ["encoders", "check", "-e", "medgemma", "--model", str(checkpoints["medgemma"])])
    assert result.exit_code == 0, result.output
    assert "max pixel diff" in result.output and "cosine" in result.output
    listed = runner.invoke(app, ["encoders", "list"])
    assert "efficientnet-lite2" in listed.output.split()
    assert "efficientnet-lite0: stem, block0..block15, final" in listed.output  # its levels, for extract --levels
