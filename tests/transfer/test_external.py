"""External validation: differences with bootstrap intervals by hand, the outputs of evaluate --on, the CNN path."""

import csv
import json

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.protocol.metrics import binary_metrics
from medembed.transfer.external import compare_metrics, evaluate_on


def test_differences_are_target_minus_source_with_an_interval_around_them():
    y = np.array([0, 0, 0, 1, 1, 1] * 5)
    p_source = np.where(y == 1, 0.8, 0.2)  # perfect
    p_target = p_source.copy()
    p_target[[3, 4]] = 0.3  # two abnormal images missed: sensitivity 13 / 15
    groups = np.arange(len(y)).astype(str)
    result = compare_metrics({"image": (y, p_source, 0.5, groups)}, {"image": (y, p_target, 0.5, groups)}, n_resamples=200, seed=0)
    sensitivity = result["image"]["sensitivity"]
    assert sensitivity["source"] == 1.0 and sensitivity["target"] == pytest.approx(13 / 15)
    assert sensitivity["difference"] == pytest.approx(13 / 15 - 1)
    low, high = sensitivity["difference_ci"]
    assert low <= sensitivity["difference"] <= high <= 0
    assert result["image"]["specificity"]["difference"] == 0.0
    assert binary_metrics(y, p_target, 0.5)["kappa"] == pytest.approx(result["image"]["kappa"]["target"])


def test_evaluate_on_a_shifted_store_writes_its_report(head_run, target_store):
    result = evaluate_on(head_run, target_store, n_resamples=50)
    out = head_run / "external" / "target"
    assert {"comparison", "drift", "ood", "conformal", "metrics"} <= set(result)
    assert result["drift"]["shift"]["p_value"] < 0.05  # the target is shifted by design
    report = (out / "report.md").read_text()
    for heading in ("## External validation", "## Drift", "## Out-of-distribution score", "## Conformal prediction sets"):
        assert heading in report
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 240 and {r["prediction_set"] for r in rows} <= {"normal", "abnormal", "both", "empty"}
    assert all(r["ood"] in ("0", "1") and float(r["ood_score"]) >= 0 for r in rows)
    assert json.loads((out / "external.json").read_text())["images"] == 240


def test_the_cnn_is_validated_on_a_manifest_and_refuses_a_store(cnn_run, fracatlas_subset, fracatlas_root, target_store):
    reference = json.loads((cnn_run / "reference" / "reference.json").read_text())  # written by the CNN's fit
    assert reference["val_images"] == 16 and reference["train_sample"] == 0 and "no embedding space" in reference["unavailable"][0]
    with pytest.raises(MedembedError, match="scores images, not a store"):
        evaluate_on(cnn_run, target_store)
    result = evaluate_on(cnn_run, fracatlas_subset, root=fracatlas_root, split="test", n_resamples=20)
    assert result["images"] == 16 and "comparison" in result and "ood" not in result
    assert "no embedding space" in result["drift"]["unavailable"]
    assert result["conformal"]["0.1"]["marginal"]["n"] == 16


def _token_store(path, n, splits, shift):
    """Rows with a 2x2 token grid (and its mean as the pooled embedding); abnormal rows shifted along one direction."""
    from medembed.store import StoreWriter
    from tests.test_fit import FP

    rng = np.random.default_rng(0)
    direction = rng.standard_normal(8)
    label = np.array([(p // len(splits)) % 3 == 0 for p in range(n)], dtype=int)
    tokens = (rng.standard_normal((n, 4, 8)) + ((1.5 * label + shift)[:, None, None] * direction)).astype(np.float32)
    ids = [f"p{p}" for p in range(n)]
    columns = {"label": label.tolist(), "study_id": ids, "patient_id": ids, "body_part": ["hand"] * n, "split": [splits[p % len(splits)] for p in range(n)]}
    with StoreWriter(path, dim=8, fingerprint=FP, tokens={"final@2x2": (4, 8)}) as writer:
        writer.append(ids, tokens.mean(axis=1), columns, tokens={"final@2x2": tokens})
    return path


def test_a_token_head_run_reads_its_level_at_the_target(tmp_path):
    from medembed.scorers.options import FitOptions
    from medembed.fit import fit_run

    fit_run([_token_store(tmp_path / "s.h5", 60, ("train", "val", "test"), 0.0)], tmp_path / "run", FitOptions(n_resamples=0, head="concat", level="final@2x2"))
    result = evaluate_on(tmp_path / "run", _token_store(tmp_path / "t.h5", 60, ("test",), 0.5), n_resamples=0)
    assert result["metrics"]["image"]["overall"]["auroc"]["value"] > 0.8  # the head got its tokens, not pooled rows
    assert "shift" in result["drift"] and result["ood"]["n"] == 60  # tokens averaged into one vector per image


def test_an_unlabelled_target_gets_drift_ood_and_sets_without_metrics(head_run, tmp_path):
    from tests.test_fit import write_store
    from tests.transfer.conftest import SHIFT, add_site

    def unlabelled(ids, emb, cols):
        add_site(SHIFT)(ids, emb, cols)
        cols["label"] = [-1] * len(ids)

    store = write_store(tmp_path / "unlabelled.h5", n_patients=30, splits=("test",), corrupt=unlabelled)
    result = evaluate_on(head_run, store, n_resamples=0)
    assert "metrics" not in result and "comparison" not in result and "labelled target rows" in result["notes"][-1]
    assert result["drift"]["prevalence"]["target_called_abnormal"] > result["drift"]["prevalence"]["source_called_abnormal"]
    with open(head_run / "external" / "unlabelled" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60 and all(r["label"] == "" and r["prediction_set"] for r in rows)
    assert "## Drift" in (head_run / "external" / "unlabelled" / "report.md").read_text()
