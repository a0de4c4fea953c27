"""Deeper adapters: EfficientNet-Lite0's real pretrained layers after a cached `stem`/`blockN` level fine-tuned from
that level's tokens; save/load reproduces the probabilities; tampered files and levels it cannot start from are
refused in one line; the cost is recorded."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

from medembed.errors import MedembedError
from medembed.scorers.heads import HeadLoadError, load_head, make_head
from medembed.scorers.heads.adapter import adapter_start

OPTIONS = {"size": 64, "levels": "stem,block12,block10,block10@2x2", "tokens": "1x1"}
TINY = dict(encoder="efficientnet-lite0", encoder_options=OPTIONS, batch_size=16, n_jobs=1)
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def tokens():
    """Real Lite0 tokens at 64 px of 64 noise images; abnormal ones carry a bright 16 x 16 patch at a random place
    (a small local finding), so the labels are learnable but not from one fixed position."""
    from medembed.encoders import get_encoder

    torch.set_num_threads(1)
    encoder = get_encoder("efficientnet-lite0", **OPTIONS)
    encoder.load(torch.device("cpu"))
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.uniform(-1, 1, size=(64, 3, 64, 64)).astype(np.float32))
    y = np.arange(64) % 2
    for i in np.flatnonzero(y):
        row, col = rng.integers(0, 48, 2)
        pixels[i, :, row:row + 16, col:col + 16] += 1.5
    with torch.inference_mode():
        _, levels = encoder.embed_with_tokens(pixels)
    return {name: grid.numpy().astype(np.float16) for name, grid in levels.items()}, y


def test_block12_adapter_fine_tunes_blocks_13_to_15_and_round_trips(tmp_path, tokens):
    levels, y = tokens
    X = levels["block12"]
    assert X.shape == (64, 5, 192)  # 2 x 2 grid + the global token at 64 px
    head = make_head("adapter", level="block12", max_epochs=3, patience=3, lr=1e-3, **TINY)
    head.fit(X[:40], y[:40], eval_set=[(X[40:], y[40:])])
    cost = head.selection_["cost"]
    assert cost["adapts"] == "block13..block15 and the head conv" and cost["input_tokens"] == [5, 192]
    assert cost["store_bytes_per_image_float16"] == 5 * 192 * 2 and 0.01 < cost["forward_gflop_per_image"] < 0.03
    assert cost["train_gflop_per_epoch"] == pytest.approx(3 * cost["forward_gflop_per_image"] * 40, rel=0.02) and cost["seconds_per_epoch"] > 0
    assert len(head.network_.tail.blocks) == 3  # blocks 13, 14, 15
    # it trained the pretrained block 13 (not only the classifier), and kept its batch-norm statistics
    built, _ = adapter_start("efficientnet-lite0", OPTIONS, "block12")
    built.load(torch.device("cpu"))
    pretrained = built.tail("block12").state_dict()
    tuned = head.network_.tail.state_dict()
    assert not torch.equal(tuned["blocks.0._expand_conv.weight"], pretrained["blocks.0._expand_conv.weight"])
    assert torch.equal(tuned["blocks.0._bn0.running_mean"], pretrained["blocks.0._bn0.running_mean"])
    head.save(tmp_path / "adapter")
    restored = load_head(tmp_path / "adapter")
    np.testing.assert_array_equal(restored.predict_proba(X), head.predict_proba(X))
    assert roc_auc_score(y[40:], head.predict_proba(X[40:])[:, 1]) > 0.7  # the planted patch is found


def test_bn_train_reestimates_batch_norm_statistics_and_the_stem_adapter_runs_every_block(tmp_path, tokens):
    levels, y = tokens
    head = make_head("adapter", level="block10", bn="train", max_epochs=1, **TINY).fit(levels["block10"][:40], y[:40], eval_set=[(levels["block10"][40:], y[40:])])
    built, _ = adapter_start("efficientnet-lite0", OPTIONS, "block10")
    built.load(torch.device("cpu"))
    assert not torch.equal(head.network_.tail.state_dict()["blocks.0._bn0.running_mean"], built.tail("block10").state_dict()["blocks.0._bn0.running_mean"])
    head.save(tmp_path / "bn")
    np.testing.assert_array_equal(load_head(tmp_path / "bn").predict_proba(levels["block10"]), head.predict_proba(levels["block10"]))
    stem = levels["stem"]
    assert stem.shape == (64, 1 + 32 * 32, 32) and stem.dtype == np.float16
    deep = make_head("adapter", level="stem", max_epochs=1, **TINY).fit(stem[:24], y[:24], eval_set=[(stem[40:], y[40:])])
    assert len(deep.network_.tail.blocks) == 16 and deep.selection_["cost"]["adapts"] == "block0..block15 and the head conv"
    assert np.isfinite(deep.predict_proba(stem[40:])).all()


def test_levels_the_adapter_cannot_start_from_are_refused_in_one_line(tmp_path, tokens):
    levels, y = tokens
    for level, message in [
        ("final@1x1", r"cannot start from level 'final@1x1'.*stem, block0..block15.*nothing is left to adapt"),
        ("block10@2x2", r"'block10@2x2': it is pooled to 2x2, the adapter needs block10's full 4x4 grid"),
        ("layer3", r"cannot start from level 'layer3'.*one of stem, block0..block15"),
        ("block12+block13", r"cannot start from level 'block12\+block13'"),
    ]:
        with pytest.raises(MedembedError, match=message) as refused:
            make_head("adapter", level=level, max_epochs=1, **TINY).fit(levels["block12"][:40], y[:40], eval_set=[(levels["block12"][40:], y[40:])])
        assert "\n" not in str(refused.value)
    with pytest.raises(MedembedError, match=r"full square grid.*\(5, 192\)"):  # block10's tokens given as block12's
        make_head("adapter", level="block12", max_epochs=1, **TINY).fit(levels["block10"][:40], y[:40], eval_set=[(levels["block10"][40:], y[40:])])
    with pytest.raises(MedembedError, match="must be one of"):
        make_head("adapter", bn="sometimes")


def test_a_vit_store_is_refused(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    directory = tmp_path / "tiny-vit"
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    SiglipVisionModel(config).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
    }))
    with pytest.raises(MedembedError, match=r"--head adapter --level layer1: encoder 'hf-vision' has no adapter.*EfficientNet-Lite"):
        adapter_start("hf-vision", {"model_id": str(directory)}, "layer1")


def test_tampered_adapter_files_are_refused(tmp_path, tokens):
    levels, y = tokens
    X = levels["block12"]
    head = make_head("adapter", level="block12", max_epochs=1, **TINY).fit(X[:40], y[:40], eval_set=[(X[40:], y[40:])])
    head.save(tmp_path / "ok")
    weights = load_file(str(tmp_path / "ok" / "adapter.safetensors"))
    document = json.loads((tmp_path / "ok" / "head.json").read_text())

    def saved(name, tensors=weights, state=None, params=None):
        directory = tmp_path / name
        directory.mkdir()
        save_file(tensors, str(directory / "adapter.safetensors"))
        changed = {**document, "state": state or document["state"], "params": {**document["params"], **(params or {})}}
        (directory / "head.json").write_text(json.dumps(changed))
        return directory

    grown = dict(weights, **{"classifier.weight": torch.zeros(1, 4096)})
    with pytest.raises(HeadLoadError, match="classifier.weight"):
        load_head(saved("grown", grown))
    extra = dict(weights, **{"tail.blocks.3._expand_conv.weight": torch.zeros(2, 2)})
    with pytest.raises(HeadLoadError, match="unexpected"):
        load_head(saved("extra", extra))
    with pytest.raises(HeadLoadError, match=r"token_shape \[50, 192\]"):
        load_head(saved("shape", state={"token_shape": [50, 192]}))
    with pytest.raises(HeadLoadError, match="cannot rebuild.*final@1x1"):
        load_head(saved("level", params={"level": "final@1x1"}))
    nan = dict(weights, **{"classifier.bias": torch.tensor([float("nan")])})
    with pytest.raises(HeadLoadError, match="NaN"):
        load_head(saved("nan", nan))
