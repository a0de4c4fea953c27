"""Metrics against hand-worked values and sklearn, group bootstrap, study aggregation, seed summaries."""

import numpy as np
import pytest
from sklearn import metrics as skm

from medembed.errors import MedembedError
from medembed.protocol.metrics import (
    METRICS,
    aggregate_studies,
    binary_metrics,
    bootstrap_metrics,
    evaluate_predictions,
    reliability_table,
    summarize_seeds,
    weighted_metrics,
)


def test_binary_metrics_match_the_hand_worked_example():
    # y = 0 0 1 1 1, calls p >= 0.5 = 0 0 0 1 1: TP 2, FP 0, FN 1, TN 2.
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    m = binary_metrics(y, p, 0.5)
    assert (m["n"], m["n_pos"], m["threshold"]) == (5, 3, 0.5)
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1.0)
    assert m["ppv"] == pytest.approx(1.0)
    assert m["npv"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    # po = 4/5; pe = (calls+ * labels+ + calls- * labels-) / n^2 = (2*3 + 3*2) / 25 = 12/25
    assert m["kappa"] == pytest.approx((4 / 5 - 12 / 25) / (1 - 12 / 25))
    # 6 abnormal-normal pairs; only (0.35, 0.4) is ranked wrongly.
    assert m["auroc"] == pytest.approx(5 / 6)
    # Average precision: recall steps of 1/3 at precisions 1/1, 2/2 and 3/4.
    assert m["auprc"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert m["brier"] == pytest.approx((0.1**2 + 0.4**2 + 0.65**2 + 0.2**2 + 0.1**2) / 5)
    # Every probability is alone in its 1/15-wide bin, so ECE is the mean |p - y|.
    assert m["ece"] == pytest.approx((0.1 + 0.4 + 0.65 + 0.2 + 0.1) / 5)


def test_ece_weights_each_bin_by_its_size():
    # Bin [12/15, 13/15) holds 0.82 (normal) and 0.85 (abnormal): |0.835 - 0.5| over 2 rows.
    # Bin [1/15, 2/15) holds 0.10 (abnormal) and 0.12 (normal): |0.11 - 0.5| over 2 rows.
    m = binary_metrics([0, 1, 1, 0], [0.82, 0.85, 0.10, 0.12], 0.5)
    assert m["ece"] == pytest.approx((2 * 0.335 + 2 * 0.39) / 4)
    table = reliability_table(np.array([0, 1, 1, 0]), np.array([0.82, 0.85, 0.10, 0.12]))
    assert table["count"][[1, 12]].tolist() == [2, 2]
    np.testing.assert_allclose(table["mean_p"][[1, 12]], [0.11, 0.835])
    np.testing.assert_allclose(table["frac_pos"][[1, 12]], [0.5, 0.5])


def test_undefined_metrics_are_nan_not_errors():
    one_class = binary_metrics([0, 0, 0], [0.2, 0.6, 0.9], 0.5)
    assert np.isnan(one_class["auroc"]) and np.isnan(one_class["auprc"]) and np.isnan(one_class["sensitivity"])
    no_positive_calls = binary_metrics([0, 1, 1], [0.2, 0.3, 0.4], 0.9)
    assert np.isnan(no_positive_calls["ppv"]) and no_positive_calls["sensitivity"] == 0
    assert no_positive_calls["kappa"] == 0


def _random_scores(seed: int, n: int, decimals: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.round(np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1), decimals)


def _sklearn_metrics(y: np.ndarray, p: np.ndarray, threshold: float, weights: np.ndarray | None = None) -> dict:
    calls = (p >= threshold).astype(int)
    return {
        "auroc": skm.roc_auc_score(y, p, sample_weight=weights),
        "auprc": skm.average_precision_score(y, p, sample_weight=weights),
        "kappa": skm.cohen_kappa_score(y, calls, sample_weight=weights),
        "brier": skm.brier_score_loss(y, p, sample_weight=weights),
        "f1": skm.f1_score(y, calls, sample_weight=weights),
        "accuracy": skm.accuracy_score(y, calls, sample_weight=weights),
        "sensitivity": skm.recall_score(y, calls, sample_weight=weights),
        "ppv": skm.precision_score(y, calls, sample_weight=weights),
    }


@pytest.mark.parametrize(("seed", "decimals"), [(0, 6), (1, 2), (2, 1)])  # coarse rounding makes many ties
def test_binary_metrics_agree_with_sklearn(seed, decimals):
    y, p = _random_scores(seed, 700, decimals)
    ours = binary_metrics(y, p, 0.5)
    for name, value in _sklearn_metrics(y, p, 0.5).items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name


def test_weighted_metrics_agree_with_sklearn_sample_weights():
    y, p = _random_scores(3, 400, 2)
    weights = np.random.default_rng(4).integers(0, 4, (3, 400)).astype(float)
    ours = weighted_metrics(y, p, 0.45, weights)
    for r in range(3):
        for name, value in _sklearn_metrics(y, p, 0.45, weights[r]).items():
            assert ours[name][r] == pytest.approx(value, abs=1e-12), name


def test_bootstrap_matches_a_slow_sklearn_reference():
    y, p = _random_scores(5, 240, 3)
    groups = np.array([f"patient{i // 3:03d}" for i in range(240)])  # sorted ids = row order of groups
    group_index = np.arange(240) // 3
    ours = bootstrap_metrics(y, p, 0.5, groups, n_resamples=60, seed=7)
    rng = np.random.default_rng(7)
    reference = {name: [] for name in ("auroc", "auprc", "kappa", "brier")}
    for _ in range(60):
        multiplicity = np.bincount(rng.integers(0, 80, 80), minlength=80)
        resampled = _sklearn_metrics(y, p, 0.5, multiplicity[group_index].astype(float))
        for name in reference:
            reference[name].append(resampled[name])
    for name, values in reference.items():
        np.testing.assert_allclose(ours[name], np.percentile(values, [2.5, 97.5]), atol=1e-12, err_msg=name)


def test_bootstrap_is_deterministic_for_a_seed_and_contains_the_estimate():
    y, p = _random_scores(6, 600, 3)
    groups = np.arange(600) // 2
    first = bootstrap_metrics(y, p, 0.5, groups, n_resamples=300, seed=11)
    assert first == bootstrap_metrics(y, p, 0.5, groups, n_resamples=300, seed=11)
    assert first != bootstrap_metrics(y, p, 0.5, groups, n_resamples=300, seed=12)
    point = binary_metrics(y, p, 0.5)
    for name in METRICS:
        low, high = first[name]
        assert low <= point[name] <= high, name


def test_bootstrap_interval_depends_on_group_count_not_image_count():
    # 150 patients, each with 6 identical images: the images add no information beyond the patient.
    y_patient, p_patient = _random_scores(8, 150, 3)
    y, p = np.repeat(y_patient, 6), np.repeat(p_patient, 6)
    patients = np.repeat([f"p{i:03d}" for i in range(150)], 6)
    by_patient = bootstrap_metrics(y, p, 0.5, patients, n_resamples=400, seed=0)
    one_row_per_patient = bootstrap_metrics(y_patient, p_patient, 0.5, None, n_resamples=400, seed=0)
    by_image = bootstrap_metrics(y, p, 0.5, None, n_resamples=400, seed=0)
    for name in METRICS:
        np.testing.assert_allclose(by_patient[name], one_row_per_patient[name], rtol=1e-9, err_msg=name)
    width = {name: (ci["auroc"][1] - ci["auroc"][0]) for name, ci in (("patient", by_patient), ("image", by_image))}
    assert width["image"] < 0.7 * width["patient"]  # about 1/sqrt(6) as wide when images are wrongly independent


def test_bootstrap_gives_nan_for_a_metric_never_defined():
    intervals = bootstrap_metrics([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], 0.5, None, n_resamples=20)
    assert np.isnan(intervals["auroc"]).all()
    assert intervals["specificity"] == (1.0, 1.0)


def test_study_aggregation_mean_and_max():
    p = np.array([0.2, 0.6, 0.9, 0.1, 0.3])
    y = np.array([1, 1, 1, 0, 0])
    studies = np.array(["s2", "s2", "s2", "s1", "s1"])
    patients = np.array(["pa", "pa", "pa", "pb", "pb"])
    parts = np.array(["XR_HAND"] * 3 + ["XR_WRIST"] * 2)
    mean = aggregate_studies(p, y, studies, groups=patients, attributes={"body_part": parts})
    assert mean.study_ids.tolist() == ["s1", "s2"]
    np.testing.assert_allclose(mean.p, [0.2, (0.2 + 0.6 + 0.9) / 3])
    assert mean.y.tolist() == [0, 1]
    assert mean.groups.tolist() == ["pb", "pa"]
    assert mean.attributes["body_part"].tolist() == ["XR_WRIST", "XR_HAND"]
    np.testing.assert_allclose(aggregate_studies(p, y, studies, how="max").p, [0.3, 0.9])


def test_study_whose_images_disagree_is_named():
    with pytest.raises(MedembedError, match="disagree on label: 'study7'"):
        aggregate_studies(np.array([0.1, 0.2, 0.3]), np.array([0, 1, 0]), np.array(["study7", "study7", "s8"]))
    with pytest.raises(MedembedError, match="disagree on group: 's1'"):
        aggregate_studies(np.array([0.1, 0.2]), np.array([0, 0]), np.array(["s1", "s1"]), groups=np.array(["a", "b"]))
    with pytest.raises(MedembedError, match="unknown study aggregation"):
        aggregate_studies(np.array([0.1]), np.array([0]), np.array(["s1"]), how="median")


def _toy_cohort(seed: int = 0) -> dict:
    """60 patients x 2 studies x 2 images, three body parts, labels constant within a study."""
    rng = np.random.default_rng(seed)
    n = 240
    study_label = rng.integers(0, 2, n // 2)
    y = np.repeat(study_label, 2)
    return {
        "y": y,
        "p": np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1),
        "study_ids": np.array([f"s{i // 2:03d}" for i in range(n)]),
        "patient_ids": np.array([f"p{i // 4:03d}" for i in range(n)]),
        "body_parts": np.array(["XR_HAND", "XR_WRIST", "XR_ELBOW"])[np.arange(n) // 4 % 3],
    }


def test_evaluate_predictions_nests_levels_and_body_parts():
    cohort = _toy_cohort()
    result = evaluate_predictions(
        cohort["y"],
        cohort["p"],
        0.5,
        study_ids=cohort["study_ids"],
        patient_ids=cohort["patient_ids"],
        body_parts=cohort["body_parts"],
        study_threshold=0.45,
        n_resamples=50,
    )
    image, study = result["image"], result["study"]
    assert image["bootstrap"]["unit"] == "patient" and study["bootstrap"]["unit"] == "patient"
    assert image["overall"]["auroc"]["value"] == binary_metrics(cohort["y"], cohort["p"], 0.5)["auroc"]
    studies = aggregate_studies(cohort["p"], cohort["y"], cohort["study_ids"])
    expected = binary_metrics(studies.y, studies.p, 0.45)
    assert {name: leaf["value"] for name, leaf in study["overall"].items()} == expected
    assert study["aggregation"] == "mean" and study["overall"]["n"]["value"] == 120
    assert sorted(image["by_body_part"]) == ["XR_ELBOW", "XR_HAND", "XR_WRIST"]
    assert image["by_body_part"]["XR_HAND"]["n"]["value"] == 80
    assert study["by_body_part"]["XR_HAND"]["n"]["value"] == 40
    assert len(image["overall"]["kappa"]["ci"]) == 2 and image["overall"]["n"]["ci"] is None


def test_evaluate_predictions_falls_back_to_studies_then_images():
    cohort = _toy_cohort(1)
    by_study = evaluate_predictions(cohort["y"], cohort["p"], 0.5, study_ids=cohort["study_ids"], n_resamples=10)
    assert by_study["image"]["bootstrap"]["unit"] == "study" and by_study["study"]["bootstrap"]["unit"] == "study"
    images_only = evaluate_predictions(cohort["y"], cohort["p"], 0.5, n_resamples=0)
    assert "study" not in images_only and images_only["image"]["bootstrap"]["unit"] == "image"
    assert images_only["image"]["overall"]["auroc"]["ci"] is None and images_only["image"]["by_body_part"] == {}


def test_misaligned_inputs_are_refused():
    cohort = _toy_cohort(2)
    with pytest.raises(MedembedError, match="body_parts must have one entry per row"):
        evaluate_predictions(cohort["y"], cohort["p"], 0.5, body_parts=cohort["body_parts"][:-1], n_resamples=0)


def test_summarize_seeds_gives_mean_and_sd_with_the_same_nesting():
    runs = [
        {"image": {"overall": {"auroc": {"value": 0.8, "ci": [0.7, 0.9]}}, "bootstrap": {"unit": "patient"}}},
        {"image": {"overall": {"auroc": {"value": 0.9, "ci": [0.8, 1.0]}}, "bootstrap": {"unit": "patient"}}},
    ]
    summary = summarize_seeds(runs)
    leaf = summary["image"]["overall"]["auroc"]
    assert leaf["mean"] == pytest.approx(0.85)
    assert leaf["sd"] == pytest.approx(np.sqrt((0.05**2 + 0.05**2) / 1))  # sample sd, ddof = 1
    assert leaf["n_seeds"] == 2 and leaf["values"] == [0.8, 0.9]
    assert summary["image"]["bootstrap"] == {"unit": "patient"}
    assert np.isnan(summarize_seeds(runs[:1])["image"]["overall"]["auroc"]["sd"])
    with pytest.raises(MedembedError, match="differ in structure at result.image"):
        summarize_seeds([runs[0], {"image": {"overall": {}}}])
