"""Zero-shot scoring with a tiny random SiglipModel and a tokenizer built here, on a store of real FracAtlas images."""

import csv
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast, SiglipConfig, SiglipModel

from medembed.encoders import get_encoder
from medembed.options.extract import ExtractOptions
from medembed.extract.runner import extract
from medembed.scorers.options import FitOptions
from medembed.data.manifest import Manifest, build_fracatlas
from medembed.store import open_store
from medembed.scorers.zeroshot import (
    DEFAULT_PROMPTS,
    GENERIC_BODY_PART,
    PromptClassifier,
    SiglipTextTower,
    ZeroShotError,
    body_part_phrase,
    fill_prompts,
    load_prompts,
    tokenize,
)
from medembed.zeroshot import zeroshot_run
from medembed.options.zeroshot import ZeroShotOptions

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=200)
PHRASES = ("hand", "leg", "hip", "shoulder", GENERIC_BODY_PART)
CUSTOM_PROMPTS = {"normal": ["no fracture"], "abnormal": ["a {body_part} with a fracture"]}
EXTRACT = ExtractOptions(batch_size=8, num_workers=0, device="cpu", store_dtype="float32")
LOGIT_SCALE, LOGIT_BIAS = 2.0, -3.0


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No test may reach the Hugging Face hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def save_tokenizer(directory) -> None:
    """A word-level tokenizer covering every prompt used here, with SigLIP's conventions (eos appended, pad id)."""
    words = {
        word
        for phrase in PHRASES
        for prompts in (DEFAULT_PROMPTS, CUSTOM_PROMPTS)
        for texts in fill_prompts(prompts, phrase).values()
        for text in texts
        for word in text.lower().split()
    }
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "</s>", *sorted(words)])}
    assert len(vocab) <= TINY_TEXT["vocab_size"]
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", model_max_length=64)
    wrapped.save_pretrained(directory)


def save_tiny_clip(directory, seed: int) -> SiglipModel:
    """A random full SiglipModel (text + vision) with a non-trivial logit scale and bias, and its tokenizer."""
    torch.manual_seed(seed)
    config = SiglipConfig(text_config={**TINY_TEXT, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, vision_config=TINY_VISION)
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
        model.logit_bias.fill_(LOGIT_BIAS)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return model


@pytest.fixture(scope="module")
def setup(fracatlas_root, tmp_path_factory):
    """Two tiny checkpoints; a store of 24 FracAtlas images (8 per split, both classes) made with the first."""
    base = tmp_path_factory.mktemp("zeroshot")
    model = save_tiny_clip(base / "model_a", seed=0)
    save_tiny_clip(base / "model_b", seed=1)
    manifest, _ = build_fracatlas(fracatlas_root)
    rows = np.r_[np.flatnonzero(manifest.label == 1)[:12], np.flatnonzero(manifest.label == 0)[:12]]
    columns = {name: values[rows] for name, values in manifest.columns.items()}
    columns["split"] = np.array((["train"] * 4 + ["val"] * 4 + ["test"] * 4) * 2, dtype=object)
    small = Manifest(columns)
    encoder = get_encoder("medsiglip", model_id=str(base / "model_a"))
    extract(small, fracatlas_root, encoder, base / "store.h5", EXTRACT, encoder_options={"model_id": str(base / "model_a")})
    run = base / "run"
    metrics = zeroshot_run([base / "store.h5"], str(base / "model_a"), run, FitOptions(n_resamples=20), ZeroShotOptions(device="cpu"))
    return {"base": base, "model": model, "manifest": small, "encoder": encoder, "run": run, "metrics": metrics, "root": fracatlas_root}


def reference_probability(model: SiglipModel, tokenizer, pixels: np.ndarray, phrase: str) -> float:
    """sigmoid(mean abnormal logit - mean normal logit) from SiglipModel's own forward on one image."""
    filled = fill_prompts(DEFAULT_PROMPTS, phrase)
    texts = filled["normal"] + filled["abnormal"]
    ids = tokenizer(texts, padding="max_length", max_length=64, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=ids, pixel_values=torch.from_numpy(pixels)[None]).logits_per_image[0].double()
    n_normal = len(filled["normal"])
    return float(torch.sigmoid(logits[n_normal:].mean() - logits[:n_normal].mean()))


def test_scores_equal_a_direct_siglip_forward(setup):
    model, manifest, encoder = setup["model"], setup["manifest"], setup["encoder"]
    tokenizer = AutoTokenizer.from_pretrained(setup["base"] / "model_a")
    test = manifest.subset(manifest.split == "test")
    expected = np.array([
        reference_probability(model, tokenizer, encoder.preprocess.load(path), body_part_phrase(part))
        for path, part in zip(test.resolve(setup["root"]), test.body_part)
    ])
    with open(setup["run"] / "predictions.csv") as f:
        written = {row["image_id"]: float(row["probability"]) for row in csv.DictReader(f)}
    np.testing.assert_allclose([written[i] for i in test.image_id], expected, atol=2e-6)
    assert len(set(np.round(expected, 4))) > 4  # the prompts tell these images apart

    classifier = PromptClassifier.load(setup["run"] / "scorer")
    assert (classifier.logit_scale, classifier.logit_bias) == (LOGIT_SCALE, LOGIT_BIAS)
    table = open_store(setup["base"] / "store.h5").read("test")
    order = [list(table.image_id).index(i) for i in test.image_id]
    np.testing.assert_allclose(classifier.probabilities(table.embeddings[order], table.columns["body_part"][order]), expected, rtol=1e-6, atol=1e-9)


def test_prompts_are_padded_to_max_length_which_changes_the_text_embeddings(setup):
    model = setup["model"]
    tower = SiglipTextTower(setup["encoder"].checkpoint, torch.device("cpu"))
    texts = fill_prompts(DEFAULT_PROMPTS, "hand")["abnormal"]
    ids = tokenize(tower.tokenizer, texts, tower.max_length)
    assert ids.shape == (len(texts), 64) and (ids[:, -1] == 0).all()
    with torch.inference_mode():
        padded = model.get_text_features(input_ids=ids).pooler_output
        longest = tower.tokenizer(texts, padding="longest", return_tensors="pt")["input_ids"]
        unpadded = model.get_text_features(input_ids=longest).pooler_output
    np.testing.assert_allclose(tower.embed(texts), padded.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(tower.embed(texts), unpadded.numpy(), atol=1e-3)
    # The tower holds the text model only: no vision tensor was read.
    assert not any("vision" in name for name in tower.model.state_dict())


def test_run_directory_holds_prompts_text_embeddings_and_fit_outputs(setup):
    run = setup["run"]
    for name in ("run.json", "metrics.json", "report.md", "predictions.csv", "scorer/prompts.json", "scorer/text_embeddings.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "figures" / "roc_image.png").is_file()
    info = json.loads((run / "run.json").read_text())
    assert info["kind"] == "zeroshot" and info["scorer"] == "zeroshot"
    assert info["details"]["text_model"]["padding"] == "max_length" and info["details"]["text_model"]["max_length"] == 64
    assert info["fingerprint"]["weights_sha256"] == info["details"]["text_model"]["weights_sha256"]
    assert sorted(info["split_sizes"]) == ["test", "val"] and info["split_sizes"]["test"]["images"] == 8
    assert 0.0 < info["image_threshold"] < 1.0 and info["calibration"]["kind"] == "none"
    prompts = json.loads((run / "scorer" / "prompts.json").read_text())["prompts"]
    parts = {body_part_phrase(p) for p in setup["manifest"].subset(setup["manifest"].split != "train").body_part}
    assert set(prompts) == parts
    with safe_open(run / "scorer" / "text_embeddings.safetensors", framework="np") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor(f"{min(parts)}/abnormal").shape == (len(DEFAULT_PROMPTS["abnormal"]), 32)
    assert keys == {f"{p}/{c}" for p in parts for c in ("normal", "abnormal")} | {"logit_scale", "logit_bias"}
    assert set(setup["metrics"]) == {"image", "study"}


def test_custom_prompt_file_and_platt_calibration(setup, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(CUSTOM_PROMPTS))
    zeroshot_run(
        [setup["base"] / "store.h5"], str(setup["base"] / "model_a"), tmp_path / "run",
        FitOptions(calibration="platt", threshold="youden", n_resamples=0), ZeroShotOptions(prompts=prompts, device="cpu"),
    )
    saved = json.loads((tmp_path / "run" / "scorer" / "prompts.json").read_text())["prompts"]
    assert saved["hand"] == {"normal": ["no fracture"], "abnormal": ["a hand with a fracture"]}
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["calibration"]["kind"] == "platt" and info["options"]["threshold"] == "youden"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"normal": ["a"]}', "exactly the keys"),
        ('{"normal": [], "abnormal": ["b"]}', "non-empty list"),
        ('{"normal": ["a {view} of a {body_part}"], "abnormal": ["b"]}', r"placeholder\(s\) \['view'\]"),
        ("not json", "cannot read the prompts JSON"),
        ('{"normal": ["a {body_part"], "abnormal": ["b"]}', "not a valid template"),
    ],
)
def test_bad_prompt_files_are_refused(tmp_path, content, message):
    path = tmp_path / "prompts.json"
    path.write_text(content)
    with pytest.raises(ZeroShotError, match=message):
        load_prompts(path)


def test_body_part_phrases():
    assert body_part_phrase("XR_WRIST") == "wrist"
    assert body_part_phrase("hand") == "hand"
    assert body_part_phrase("mixed") == body_part_phrase("") == GENERIC_BODY_PART
    assert load_prompts(None) == DEFAULT_PROMPTS


def test_store_from_another_model_is_refused(setup, tmp_path):
    with pytest.raises(ZeroShotError, match="weights checksum .* differs"):
        zeroshot_run([setup["base"] / "store.h5"], str(setup["base"] / "model_b"), tmp_path / "run", options=ZeroShotOptions(device="cpu"))
    assert not (tmp_path / "run").exists()


def test_store_of_mean_patch_tokens_is_refused(setup, tmp_path):
    encoder = get_encoder("medsiglip", model_id=str(setup["base"] / "model_a"), pooling="mean_patch_tokens")
    extract(setup["manifest"].subset(np.arange(2)), setup["root"], encoder, tmp_path / "tokens.h5", EXTRACT)
    with pytest.raises(ZeroShotError, match="not the pooled output"):
        zeroshot_run([tmp_path / "tokens.h5"], str(setup["base"] / "model_a"), tmp_path / "run", options=ZeroShotOptions(device="cpu"))


def test_a_zeroshot_run_round_trips_through_evaluate_compare_predict(setup, tmp_path):
    from tests.cli.test_entry_point import assert_round_trip

    test = setup["manifest"].subset(setup["manifest"].split == "test")
    assert_round_trip(setup["run"], test.resolve(setup["root"])[:3], tmp_path)


def test_a_format_2_zeroshot_run_that_recorded_fit_options_still_loads(setup, tmp_path):
    """Zero-shot runs made from fit's options recorded its head fields beside the protocol's; they load, typed."""
    import json
    import shutil

    from medembed.options.protocol import ProtocolOptions
    from medembed.runs.record import load_run

    run = shutil.copytree(setup["run"], tmp_path / "old")
    document = json.loads((run / "run.json").read_text())
    document["options"] |= {"head": "logreg", "head_params": {}, "seeds": 1, "ensemble": "", "ensemble_folds": 5, "level": "", "study_pooling": ""}
    (run / "run.json").write_text(json.dumps(document))
    assert type(load_run(run).record.options) is ProtocolOptions
