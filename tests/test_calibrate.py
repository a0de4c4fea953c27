"""Threshold rules against hand-worked confusion tables, and calibrators against sklearn and known truths."""

import json

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import brier_score_loss, cohen_kappa_score, f1_score

from medembed.protocol.calibrate import (
    Calibrator,
    ThresholdRule,
    check_scores,
    choose_threshold,
    confusion_metrics,
    fit_calibrator,
    parse_threshold_rule,
    sweep_thresholds,
)
from medembed.errors import MedembedError

# Worked example. Sorted by score: 0.9 (abnormal), 0.8 (abnormal), 0.4 (normal), 0.35 (abnormal), 0.1 (normal).
# Calls p >= t at each distinct score t, with 3 abnormal and 2 normal rows (n = 5):
#   t     TP FP FN TN  sens  spec  F1               Youden  kappa = (po - pe) / (1 - pe)
#   0.9    1  0  2  2  1/3   1     2/(2+0+2) = .5   1/3     po 3/5, pe (1*3 + 4*2)/25 = 11/25 -> 4/14  = .286
#   0.8    2  0  1  2  2/3   1     4/(4+0+1) = .8   2/3     po 4/5, pe (2*3 + 3*2)/25 = 12/25 -> 8/13  = .615
#   0.4    2  1  1  1  2/3   1/2   4/(4+1+1) = .667 1/6     po 3/5, pe (3*3 + 2*2)/25 = 13/25 -> 1/6   = .167
#   0.35   3  1  0  1  1     1/2   6/(6+1+0) = .857 1/2     po 4/5, pe (4*3 + 1*2)/25 = 14/25 -> 6/11  = .545
#   0.1    3  2  0  0  1     0     6/(6+2+0) = .75  0       po 3/5, pe (5*3 + 0*2)/25 = 15/25 -> 0
Y = np.array([0, 0, 1, 1, 1])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.9])


def test_sweep_counts_every_distinct_score():
    sweep = sweep_thresholds(Y, P)
    np.testing.assert_array_equal(sweep.thresholds, [0.9, 0.8, 0.4, 0.35, 0.1])
    np.testing.assert_array_equal(sweep.tp, [1, 2, 2, 3, 3])
    np.testing.assert_array_equal(sweep.fp, [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(sweep.fn, [2, 1, 1, 0, 0])
    np.testing.assert_array_equal(sweep.tn, [2, 2, 1, 1, 0])


def test_sweep_keeps_tied_scores_together():
    sweep = sweep_thresholds([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9])
    np.testing.assert_array_equal(sweep.thresholds, [0.9, 0.5, 0.2])
    np.testing.assert_array_equal(sweep.tp, [1, 2, 2])
    np.testing.assert_array_equal(sweep.fp, [0, 1, 2])
    np.testing.assert_array_equal(sweep.pos_at, [1, 1, 0])


def test_confusion_metrics_match_the_hand_table():
    sweep = sweep_thresholds(Y, P)
    rates = confusion_metrics(sweep.tp, sweep.fp, sweep.tn, sweep.fn)
    np.testing.assert_allclose(rates["sensitivity"], [1 / 3, 2 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(rates["specificity"], [1, 1, 1 / 2, 1 / 2, 0])
    np.testing.assert_allclose(rates["f1"], [0.5, 0.8, 4 / 6, 6 / 7, 0.75])
    np.testing.assert_allclose(rates["youden"], [1 / 3, 2 / 3, 1 / 6, 1 / 2, 0], atol=1e-15)
    np.testing.assert_allclose(rates["kappa"], [4 / 14, 8 / 13, 1 / 6, 6 / 11, 0], atol=1e-15)


def test_confusion_metrics_are_nan_where_undefined():
    rates = confusion_metrics(tp=0, fp=0, tn=4, fn=0)
    assert np.isnan(rates["ppv"]) and np.isnan(rates["sensitivity"]) and np.isnan(rates["kappa"])
    assert rates["specificity"] == 1 and rates["accuracy"] == 1


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("f1", (0.35 + 0.1) / 2),  # best F1 6/7 calls the top four: midpoint of the gap below 0.35
        ("youden", (0.8 + 0.4) / 2),  # best J 2/3 at 0.8
        ("kappa", (0.8 + 0.4) / 2),  # best kappa 8/13 at 0.8
        ("sensitivity:0.9", 0.35),  # sensitivity 1 from 0.35 down; 2/3 above
        ("sensitivity:0.6", 0.8),  # 2/3 >= 0.6 already at 0.8
        ("sensitivity:0.3", 0.9),
        ("specificity:0.9", 0.8),  # specificity 1 down to 0.8, 1/2 at 0.4
        ("specificity:0.5", 0.35),  # 1/2 holds down to 0.35, 0 at 0.1
        ("fixed:0.5", 0.5),
    ],
)
def test_threshold_rules_on_the_worked_example(rule, expected):
    assert choose_threshold(Y, P, rule) == pytest.approx(expected, abs=1e-15)


def test_target_rate_equal_to_a_count_ratio_is_reached():
    # 9 of 10 abnormal rows above 0.5: sensitivity exactly 0.9 must count as reaching "sensitivity:0.9".
    y = np.r_[np.ones(10, int), np.zeros(5, int)]
    p = np.r_[np.linspace(0.9, 0.6, 9), 0.1, np.linspace(0.55, 0.2, 5)]
    assert choose_threshold(y, p, "sensitivity:0.9") == pytest.approx(0.6)


def test_specificity_out_of_reach_calls_nothing_positive():
    y, p = np.array([1, 0]), np.array([0.2, 0.9])
    threshold = choose_threshold(y, p, "specificity:1.0")
    assert threshold > 0.9 and not np.any(p >= threshold)


def test_gap_between_adjacent_floats_keeps_validation_calls():
    upper = np.nextafter(0.5, 1.0)
    p = np.array([upper, 0.5])
    threshold = choose_threshold([1, 0], p, "f1")
    np.testing.assert_array_equal(p >= threshold, [True, False])


@pytest.mark.parametrize("seed", range(4))
def test_optimised_rules_reach_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 80)
    p = np.round(np.clip(0.3 * y + 0.7 * rng.random(80), 0, 1), 2)  # rounding makes ties
    candidates = np.unique(p)
    for rule, score in (
        ("f1", lambda calls: f1_score(y, calls)),
        ("kappa", lambda calls: cohen_kappa_score(y, calls)),
        ("youden", lambda calls: calls[y == 1].mean() + (1 - calls[y == 0].mean()) - 1),
    ):
        best = max(score((p >= t).astype(int)) for t in candidates)
        threshold = choose_threshold(y, p, rule)
        assert score((p >= threshold).astype(int)) == pytest.approx(best)
        assert threshold not in candidates or threshold == candidates.min()


@pytest.mark.parametrize("rule", ["auc", "f1:0.3", "sensitivity", "sensitivity:high", "sensitivity:1.5", "fixed:2"])
def test_bad_rules_are_refused(rule):
    with pytest.raises(MedembedError, match="threshold rule"):
        parse_threshold_rule(rule)


def test_rules_parse_and_print_back():
    assert parse_threshold_rule(" Sensitivity:0.90 ") == ThresholdRule("sensitivity", 0.9)
    assert str(parse_threshold_rule("specificity:0.95")) == "specificity:0.95"
    assert str(parse_threshold_rule("kappa")) == "kappa"


def test_one_class_validation_is_refused():
    with pytest.raises(MedembedError, match="both classes"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9], "youden")


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 2], [0.1, 0.2], "labels must be 0 or 1"),
        ([0, 1], [0.1, np.nan], "finite"),
        ([0, 1], [0.1, 1.2], "within"),
        ([0, 1, 1], [0.1, 0.2], "aligned"),
        ([0, 1], [[0.1, 0.2]], "1-D"),
        ([], [], "empty"),
    ],
)
def test_bad_scores_are_refused(y, p, message):
    with pytest.raises(MedembedError, match=message):
        check_scores(np.array(y), np.array(p))


def _miscalibrated(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from true risks q, reported as overconfident probabilities sigmoid(3 * logit(q))."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.02, 0.98, n)
    y = (rng.random(n) < q).astype(int)
    return y, 1 / (1 + np.exp(-3 * np.log(q / (1 - q))))


@pytest.mark.parametrize("kind", ["platt", "isotonic"])
def test_calibrators_improve_brier_on_held_out_rows(kind):
    y_val, p_val = _miscalibrated(0, 3000)
    y_test, p_test = _miscalibrated(1, 3000)
    calibrator = fit_calibrator(kind, y_val, p_val)
    assert brier_score_loss(y_test, calibrator.transform(p_test)) < brier_score_loss(y_test, p_test) - 0.01


def test_platt_recovers_the_generating_logistic_map():
    rng = np.random.default_rng(2)
    p = rng.uniform(0.01, 0.99, 20000)
    true_risk = 1 / (1 + np.exp(-(2.0 * np.log(p / (1 - p)) - 0.5)))
    y = (rng.random(p.size) < true_risk).astype(int)
    calibrator = fit_calibrator("platt", y, p)
    assert calibrator.slope_ == pytest.approx(2.0, abs=0.1)
    assert calibrator.intercept_ == pytest.approx(-0.5, abs=0.1)


def test_platt_stays_finite_on_separable_data():
    calibrator = fit_calibrator("platt", [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert np.isfinite([calibrator.slope_, calibrator.intercept_]).all()
    assert np.all(np.diff(calibrator.transform(np.array([0.1, 0.5, 0.9]))) > 0)


def test_isotonic_matches_sklearn():
    y, p = _miscalibrated(3, 500)
    p = np.round(p, 2)
    reference = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
    queries = np.r_[np.linspace(0, 1, 101), p]
    np.testing.assert_allclose(fit_calibrator("isotonic", y, p).transform(queries), reference.predict(queries))


@pytest.mark.parametrize("kind", ["none", "platt", "isotonic"])
def test_calibrators_round_trip_through_json(kind):
    y, p = _miscalibrated(4, 400)
    fitted = fit_calibrator(kind, y, p)
    restored = Calibrator.from_dict(json.loads(json.dumps(fitted.to_dict())))
    queries = np.linspace(0, 1, 57)
    np.testing.assert_array_equal(restored.transform(queries), fitted.transform(queries))
    assert restored.kind == kind


def test_none_calibrator_is_the_identity():
    p = np.array([0.0, 0.3, 1.0])
    np.testing.assert_array_equal(fit_calibrator("none", [0, 1, 1], p).transform(p), p)


@pytest.mark.parametrize(
    "state",
    [
        {"kind": "sigmoid"},
        {"kind": "platt", "slope": 1.0},
        {"kind": "isotonic", "x_knots": [0.2, 0.1], "y_knots": [0.0, 1.0]},
        {"kind": "isotonic", "x_knots": [0.1], "y_knots": [0.0, 1.0]},
    ],
)
def test_malformed_calibration_state_is_refused(state):
    with pytest.raises(MedembedError):
        Calibrator.from_dict(state)


def test_unfitted_or_one_class_calibration_is_refused():
    with pytest.raises(MedembedError, match="before fit"):
        Calibrator("platt").transform(np.array([0.5]))
    with pytest.raises(MedembedError, match="both classes"):
        fit_calibrator("isotonic", [0, 0, 0], [0.1, 0.2, 0.3])
