"""Learned study pooling (medembed.scorers.study_pooling) on generated multi-image studies with a planted signal: in an
abnormal study only ONE of its 1-8 images shows the finding, so averaging image scores dilutes it and attention
has something to learn."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medembed.errors import MedembedError
from medembed.protocol.metrics import aggregate_studies
from medembed.scorers.options import FitOptions
from medembed.evaluate import evaluate_run
from medembed.fit import fit_run
from medembed.scorers.heads import make_head
from medembed.protocol.splits import load_splits
from medembed.store import StoreWriter
from medembed.scorers.study_pooling import AttentionStudyPooling, _Studies
from tests.cli.test_entry_point import run_cli
from tests.test_fit import FP


def write_study_store(path, n_studies=(160, 60, 80), dim=16, seed=1, strength=2.5):
    """Studies of 1-8 images, a third abnormal; an abnormal study's finding is a shift of one of its images."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    ids, emb, cols = [], [], {k: [] for k in ("label", "study_id", "patient_id", "body_part", "split")}
    for split, count in zip(("train", "val", "test"), n_studies):
        for s in range(count):
            label, k = int(s % 3 == 0), int(rng.integers(1, 9))
            finding = int(rng.integers(k))
            for i in range(k):
                ids.append(f"{split}{s}_img{i}")
                emb.append(rng.standard_normal(dim) + strength * label * (i == finding) * direction)
                for column, value in (("label", label), ("study_id", f"{split}{s}"), ("patient_id", f"{split}{s}"), ("body_part", "wrist"), ("split", split)):
                    cols[column].append(value)
    with StoreWriter(path, dim=dim, fingerprint=FP) as writer:
        writer.append(ids, np.asarray(emb, dtype=np.float32), cols)
    return path


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    path = write_study_store(tmp_path_factory.mktemp("studies") / "s.h5")
    splits, _, _ = load_splits([path])
    return path, splits


def fitted(splits, **params):
    train, val = splits["train"], splits["val"]
    return AttentionStudyPooling(**params).fit(train.X, train.y, eval_set=[(val.X, val.y)], study_id=train.study_id, eval_study_id=val.study_id)


def test_attention_pooling_finds_the_one_abnormal_image_that_mean_pooling_dilutes(studies):
    _, splits = studies
    train, val, test = splits["train"], splits["val"], splits["test"]
    pooling = fitted(splits)
    p = pooling.predict_proba(test.X, study_id=test.study_id)[:, 1]
    attention = aggregate_studies(p, test.y, test.study_id, how="mean")
    head = make_head("logreg").fit(train.X, train.y, eval_set=[(val.X, val.y)])
    mean = aggregate_studies(head.predict_proba(test.X)[:, 1], test.y, test.study_id, how="mean")
    attention_auroc, mean_auroc = roc_auc_score(attention.y, attention.p), roc_auc_score(mean.y, mean.p)
    assert attention_auroc > 0.85 and attention_auroc > mean_auroc + 0.04, (attention_auroc, mean_auroc)
    # Every image of a study gets the study's one pooled probability.
    for study in np.unique(test.study_id)[:10]:
        assert np.ptp(p[test.study_id == study]) == 0
    assert pooling.selection_["studies"] == {"train": 160, "val": 60} and pooling.selection_["max_images_per_study"] == 8


def test_a_saved_pooling_loads_back_identically_and_a_damaged_one_is_refused(studies, tmp_path):
    _, splits = studies
    test = splits["test"]
    pooling = fitted(splits, max_epochs=3)
    pooling.save(tmp_path / "p")
    loaded = AttentionStudyPooling.load(tmp_path / "p")
    np.testing.assert_allclose(loaded.predict_proba(test.X, study_id=test.study_id), pooling.predict_proba(test.X, study_id=test.study_id), atol=1e-7)
    (tmp_path / "p" / "study_pooling.safetensors").write_bytes(b"not weights")
    with pytest.raises(MedembedError, match="not a readable safetensors file"):
        AttentionStudyPooling.load(tmp_path / "p")
    with pytest.raises(MedembedError, match="with their study_id"):
        pooling.predict_proba(test.X)


def test_fit_writes_a_study_pooling_run_that_evaluates_alike_and_the_cli_refuses_in_one_line(studies, tmp_path):
    path, _ = studies
    metrics = fit_run([path], tmp_path / "run", FitOptions(study_pooling="attention", head_params={"max_epochs": 4}, n_resamples=0))
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["kind"] == "study-pooling" and record["scorer"] == "study-pooling:attention"
    again = evaluate_run(tmp_path / "run")
    assert again["study"]["overall"]["auroc"]["value"] == pytest.approx(metrics["study"]["overall"]["auroc"]["value"], abs=1e-9)
    done = run_cli("fit", path, "--study-pooling", "attention", "--ensemble", "mean", "--out", tmp_path / "refused")
    assert done.returncode == 2 and "cannot be combined with --ensemble" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    with pytest.raises(MedembedError, match="study_pooling must be one of attention"):
        FitOptions(study_pooling="transformer")
    with pytest.raises(MedembedError, match="unknown parameter.s. depth for study pooling"):
        FitOptions(study_pooling="attention", head_params={"depth": 2})


def test_studies_group_rows_and_take_any_abnormal_image_as_the_label():
    grouped = _Studies.of(np.arange(10, dtype=np.float32).reshape(5, 2), np.array([0, 1, 0, 0, 0]), np.array(["b", "a", "b", "a", "c"]))
    assert grouped.y.tolist() == [1, 0, 0] and grouped.sizes.tolist() == [2, 2, 1]
    x, mask = grouped.padded(np.array([0, 2]))
    assert x.shape == (2, 2, 2) and mask.tolist() == [[True, True], [True, False]]
    assert grouped.index_of_row.tolist() == [1, 0, 1, 0, 2]
