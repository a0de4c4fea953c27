"""Paired comparisons of two runs: DeLong (plain and clustered) against slow structural-components references, the paired bootstrap
against a slow sklearn reference, predictions.csv validation, pairing, and real fitted runs."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from medembed.errors import MedembedError
from medembed.fit import fit_run
from medembed.protocol.metrics import resampled_metrics
from medembed.protocol.paired import (
    Scored, bootstrap_p_value, delong_test, pair, paired_bootstrap, paired_comparison, read_predictions,
)
from medembed.runs.compare import compare_runs
from medembed.scorers.options import FitOptions
from tests.test_fit import write_store


def _scores(seed: int, n: int = 300, decimals: int = 3, noise: float = 0.25):
    """Labels and two correlated scores: b is a plus noise (rounded, so there are ties)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    b = np.clip(a + noise * (rng.random(n) - 0.5) + 0.05 * y, 0, 1)
    return y, np.round(a, decimals), np.round(b, decimals)


def _slow_delong(y, p_a, p_b):
    """DeLong et al. (1988) as written: psi over every positive-negative pair, O(m n)."""
    components = []
    for p in (p_a, p_b):
        x, w = p[y == 1], p[y == 0]
        psi = (x[:, None] > w[None, :]) + 0.5 * (x[:, None] == w[None, :])
        components.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    m, n = (y == 1).sum(), (y == 0).sum()
    s10 = np.cov(np.stack([c[1] for c in components]))
    s01 = np.cov(np.stack([c[2] for c in components]))
    s = s10 / m + s01 / n
    variance = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    return components[0][0], components[1][0], variance


@pytest.mark.parametrize(("seed", "decimals"), [(0, 6), (1, 2), (2, 1)])  # coarse rounding: many ties
def test_delong_agrees_with_the_slow_structural_components(seed, decimals):
    from math import erfc, sqrt

    y, a, b = _scores(seed, decimals=decimals)
    ours = delong_test(y, a, b)
    auc_a, auc_b, variance = _slow_delong(y, a, b)
    assert ours["auroc_a"] == pytest.approx(skm.roc_auc_score(y, a), abs=1e-12) == pytest.approx(auc_a, abs=1e-12)
    assert ours["auroc_b"] == pytest.approx(auc_b, abs=1e-12)
    assert ours["se"] == pytest.approx(sqrt(variance), rel=1e-9)
    assert ours["p_value"] == pytest.approx(erfc(abs(auc_b - auc_a) / sqrt(variance) / sqrt(2)), rel=1e-9)


def _slow_clustered_variance(y, p_a, p_b, clusters):
    """Obuchowski (Biometrics 1997) as written: a loop over clusters summing each unit's psi shares, O(m n)."""
    ids = sorted(set(clusters))
    m, n = (y == 1).sum(), (y == 0).sum()
    pos = [c for c in ids if ((clusters == c) & (y == 1)).any()]
    neg = [c for c in ids if ((clusters == c) & (y == 0)).any()]
    x_parts, y_parts = [], []
    for p in (p_a, p_b):
        x, w = p[y == 1], p[y == 0]
        psi = (x[:, None] > w[None, :]) + 0.5 * (x[:, None] == w[None, :])
        auc = psi.mean()
        shares_pos, shares_neg = psi.mean(axis=1), psi.mean(axis=0)
        cx, cw = clusters[y == 1], clusters[y == 0]
        x_parts.append(np.array([shares_pos[cx == c].sum() - (cx == c).sum() * auc for c in ids]))
        y_parts.append(np.array([shares_neg[cw == c].sum() - (cw == c).sum() * auc for c in ids]))
    def cov(i, j):
        s10 = len(pos) / ((len(pos) - 1) * m) * np.sum(x_parts[i] * x_parts[j])
        s01 = len(neg) / ((len(neg) - 1) * n) * np.sum(y_parts[i] * y_parts[j])
        s11 = len(ids) / (len(ids) - 1) * np.sum(x_parts[i] * y_parts[j])
        s11_t = len(ids) / (len(ids) - 1) * np.sum(x_parts[j] * y_parts[i])
        return s10 / m + s01 / n + (s11 + s11_t) / (m * n)
    return cov(0, 0) + cov(1, 1) - 2 * cov(0, 1)


@pytest.mark.parametrize(("seed", "decimals"), [(0, 6), (1, 2)])
def test_clustered_delong_agrees_with_obuchowskis_loop(seed, decimals):
    from math import sqrt

    y, a, b = _scores(seed, decimals=decimals)
    clusters = np.random.default_rng(seed + 10).integers(0, 60, len(y))  # ~5 rows per cluster, classes mixed within
    ours = delong_test(y, a, b, groups=clusters)
    assert ours["clusters"] == len(set(clusters))
    assert ours["se"] == pytest.approx(sqrt(_slow_clustered_variance(y, a, b, clusters)), rel=1e-9)
    assert ours["difference"] == pytest.approx(delong_test(y, a, b)["difference"], abs=1e-15)  # clusters change the variance only


def test_clustered_delong_with_one_row_per_cluster_is_delong():
    y, a, b = _scores(4)
    plain, singletons = delong_test(y, a, b), delong_test(y, a, b, groups=np.arange(len(y)) * 7)
    for key in ("se", "z", "p_value"):
        assert singletons[key] == pytest.approx(plain[key], rel=1e-12)


def test_copies_of_every_image_are_not_new_evidence_when_clustered():
    """Every image twice under its patient: clustered, the variance is the original's; taken as independent rows
    it about halves (ddof=1 over twice the rows) and the p-value shrinks: the too-small image-level p the clustering
    exists to prevent."""
    y, a, b = _scores(5, noise=0.5)
    original = delong_test(y, a, b)
    patients = np.tile(np.arange(len(y)), 2)
    doubled = delong_test(np.tile(y, 2), np.tile(a, 2), np.tile(b, 2), groups=patients)
    independent = delong_test(np.tile(y, 2), np.tile(a, 2), np.tile(b, 2))
    assert doubled["se"] == pytest.approx(original["se"], rel=1e-9) and doubled["p_value"] == pytest.approx(original["p_value"], rel=1e-9)
    assert independent["se"] == pytest.approx(original["se"] / np.sqrt(2), rel=0.01) and independent["p_value"] < original["p_value"]


def test_clustered_delong_needs_two_clusters_of_each_class():
    y, a, b = _scores(6, n=40)
    one_positive_cluster = np.where(y == 1, 0, 1 + np.arange(len(y)))
    result = delong_test(y, a, b, groups=one_positive_cluster)
    assert np.isnan(result["p_value"]) and not np.isnan(result["difference"])


def test_delong_is_symmetric_and_identical_scores_give_p_one():
    y, a, b = _scores(3)
    forward, backward = delong_test(y, a, b), delong_test(y, b, a)
    assert forward["z"] == pytest.approx(-backward["z"]) and forward["p_value"] == pytest.approx(backward["p_value"])
    assert forward["difference"] == pytest.approx(-backward["difference"])
    same = delong_test(y, a, a)
    assert same["p_value"] == 1.0 and same["difference"] == 0.0
    # a clearly better score is detected; pure noise against the truth is not confused with it
    noise = np.random.default_rng(9).random(len(y))
    assert delong_test(y, noise, a)["p_value"] < 1e-6
    one_class = delong_test(np.zeros(5, int), a[:5], b[:5])
    assert np.isnan(one_class["p_value"])


def test_paired_bootstrap_matches_a_slow_sklearn_reference():
    y, a, b = _scores(4, n=240)
    groups = np.array([f"patient{i // 3:03d}" for i in range(240)])  # sorted ids: group k holds rows 3k..3k+2
    ours = paired_bootstrap(y, a, b, 0.5, 0.45, groups, n_resamples=60, seed=7)
    rng = np.random.default_rng(7)
    differences = {"auroc": [], "kappa": []}
    for _ in range(60):
        weights = np.bincount(rng.integers(0, 80, 80), minlength=80)[np.arange(240) // 3].astype(float)
        differences["auroc"].append(skm.roc_auc_score(y, b, sample_weight=weights) - skm.roc_auc_score(y, a, sample_weight=weights))
        differences["kappa"].append(skm.cohen_kappa_score(y, b >= 0.45, sample_weight=weights) - skm.cohen_kappa_score(y, a >= 0.5, sample_weight=weights))
    for metric, values in differences.items():
        np.testing.assert_allclose(ours[metric]["ci"], np.percentile(values, [2.5, 97.5]), atol=1e-12, err_msg=metric)
        assert ours[metric]["p_value"] == pytest.approx(bootstrap_p_value(np.array(values)), abs=1e-12)
        assert ours[metric]["n_resamples"] == 60
    assert ours["auroc"]["difference"] == pytest.approx(skm.roc_auc_score(y, b) - skm.roc_auc_score(y, a), abs=1e-12)


def test_pairing_makes_the_interval_of_a_difference_narrower_than_independent_resamples():
    y, a, b = _scores(5, n=400, noise=0.1)
    groups = np.arange(400) // 2
    paired = paired_bootstrap(y, a, b, 0.5, 0.5, groups, n_resamples=300, seed=0)["auroc"]
    independent = resampled_metrics(y, b, 0.5, groups, 300, 1)["auroc"] - resampled_metrics(y, a, 0.5, groups, 300, 2)["auroc"]
    low, high = np.percentile(independent, [2.5, 97.5])
    assert paired["ci"][1] - paired["ci"][0] < 0.5 * (high - low)


def test_identical_runs_differ_by_nothing_with_p_one():
    y, a, _ = _scores(6)
    result = paired_bootstrap(y, a, a, 0.5, 0.5, None, n_resamples=100, seed=0)
    assert result["auroc"]["difference"] == 0 and result["auroc"]["ci"] == [0.0, 0.0] and result["auroc"]["p_value"] == 1.0
    assert result["kappa"]["p_value"] == 1.0


def test_bootstrap_p_value_by_hand():
    assert bootstrap_p_value(np.array([1.0, 1.0, 1.0, -1.0])) == pytest.approx(2 * (1 + 1) / 5)
    assert bootstrap_p_value(np.ones(99)) == pytest.approx(2 / 100)  # the smallest p 99 resamples can give
    assert np.isnan(bootstrap_p_value(np.array([])))


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


HEADER = "image_id,study_id,label,probability,abnormal,patient_id"


@pytest.mark.parametrize(("body", "message"), [
    (["a,s1,0,0.2,0,p1", "b,s1,1,1.5,1,p1"], r"p\.csv: row 3: probability '1.5' is not a number in \[0, 1\]"),
    (["a,s1,0,0.2,0,p1", "b,s1,1,nan,1,p1"], "row 3: probability 'nan'"),
    (["a,s1,2,0.2,0,p1"], "row 2: label '2' is not 0 or 1"),
    (["a,s1,0,0.2,0,p1", "a,s2,1,0.3,0,p2"], "row 3: image 'a' also on row 2"),
    ([",s1,0,0.2,0,p1"], "row 2: empty image_id"),
    (["a,s1,0,0.2"], "row 2: 4 cells for 6 columns"),
    ([], "no scored images"),
])
def test_bad_predictions_are_one_line_naming_the_file_and_row(tmp_path, body, message):
    path = _write(tmp_path / "p.csv", [HEADER, *body])
    with pytest.raises(MedembedError, match=message):
        read_predictions(path, name="r", image_threshold=0.5, study_threshold=0.5)


def test_predictions_without_the_needed_columns_or_not_text_are_refused(tmp_path):
    with pytest.raises(MedembedError, match="missing columns label, probability"):
        read_predictions(_write(tmp_path / "p.csv", ["image_id,study_id", "a,s"]), name="r", image_threshold=0.5, study_threshold=0.5)
    (tmp_path / "b.csv").write_bytes(HEADER.encode() + b"\n\xff\xfe,s,0,0.1,0,\n")
    with pytest.raises(MedembedError, match="b.csv: not UTF-8"):
        read_predictions(tmp_path / "b.csv", name="r", image_threshold=0.5, study_threshold=0.5)
    with pytest.raises(MedembedError, match="no such predictions file"):
        read_predictions(tmp_path / "none.csv", name="r", image_threshold=0.5, study_threshold=0.5)


def _scored(name, ids, y, p, patients=None):
    ids = np.array(ids)
    return Scored(name, ids, ids.copy(), None if patients is None else np.array(patients), np.array(y, np.int8), np.array(p, float), 0.5, 0.5)


def test_runs_on_different_images_are_refused_or_paired_on_the_common_ones():
    base = _scored("A", ["a", "b", "c", "d"], [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8])
    other = _scored("B", ["d", "c", "e", "b"], [1, 0, 1, 1], [0.7, 0.3, 0.6, 0.6])
    with pytest.raises(MedembedError, match=r"B and A were scored on different test images \(1 images only in B, 1 only in A\).*--intersect"):
        pair(base, other)
    a, b, notes = pair(base, other, intersect=True)
    assert a.image_id.tolist() == b.image_id.tolist() == ["b", "c", "d"] and b.p.tolist() == [0.6, 0.3, 0.7]
    assert notes == ["B vs A: compared on the 3 images both scored (1 images only in B, 1 only in A)"]
    relabelled = _scored("C", ["a", "b", "c", "d"], [0, 1, 1, 1], [0.1, 0.9, 0.2, 0.8])
    with pytest.raises(MedembedError, match="C: image 'c' is labelled 1 there and 0 in A"):
        pair(base, relabelled)
    with pytest.raises(MedembedError, match="share no test image"):
        pair(base, _scored("D", ["x"], [0], [0.5]), intersect=True)
    with pytest.raises(MedembedError, match="pair the runs first"):
        paired_comparison(base, other)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("paired")
    store = write_store(work / "s.h5", n_patients=90, images_per_study=2, corrupt=_weak)
    fit_run([store], work / "logreg", FitOptions(head="logreg", n_resamples=20))
    fit_run([store], work / "mlp", FitOptions(head="mlp", head_params={"max_epochs": 10}, threshold="f1", n_resamples=20))
    return work


def _weak(ids, emb, cols):
    emb[:] = np.random.default_rng(3).standard_normal(emb.shape) + 0.7 * np.asarray(cols["label"])[:, None]


def test_a_paired_comparison_of_real_runs_reproduces_each_runs_own_metrics(two_runs):
    comparison = compare_runs([two_runs / "logreg", two_runs / "mlp"], n_resamples=200)
    assert comparison.baseline == "logreg" and list(comparison.paired) == ["mlp"]
    result = comparison.paired["mlp"]
    assert result["images"] == 60 and result["studies"] == 30 and result["n_resamples"] == 200
    for level in ("image", "study"):
        entry = result["levels"][level]
        assert entry["unit"] == "patient"
        for run, side in (("logreg", "a"), ("mlp", "b")):
            own = json.loads((two_runs / run / "metrics.json").read_text())[level]["overall"]
            for metric in ("auroc", "kappa"):  # predictions.csv (exact probabilities) and run.json's thresholds: the same calls
                assert entry[metric][side] == pytest.approx(own[metric]["value"], abs=1e-12), (level, run, metric)
        low, high = entry["auroc"]["ci"]
        assert low <= entry["auroc"]["difference"] <= high and 0 < entry["auroc"]["p_value"] <= 1
        assert 0 < entry["auroc"]["delong"]["p_value"] <= 1
        assert entry["auroc"]["delong"]["clusters"] == 30  # the test split's patients (one study each), not its 60 images
    baseline_first = compare_runs([two_runs / "logreg", two_runs / "mlp"], baseline=two_runs / "mlp", n_resamples=50)
    assert baseline_first.baseline == "mlp" and list(baseline_first.paired) == ["logreg"]
    assert baseline_first.paired["logreg"]["levels"]["image"]["auroc"]["difference"] == pytest.approx(-result["levels"]["image"]["auroc"]["difference"])
