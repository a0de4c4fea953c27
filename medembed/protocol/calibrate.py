"""Threshold rules and probability calibration, both chosen on the validation split only.

A threshold turns probabilities into calls: a row is called abnormal when ``p >= threshold``. Rules that maximise
a metric (F1, Youden's J, Cohen's kappa) scan every distinct validation score as a candidate in one sorted pass.
Any threshold strictly between two adjacent distinct scores makes the same calls on the validation rows, so the
rule returns the midpoint of that gap rather than a score seen in validation: a threshold sitting exactly on a
validation score would flip calls on test rows that tie it by chance.

The confusion-count formulas (``confusion_metrics``) and the threshold sweep (``sweep_thresholds``) live here
because threshold rules are their first user; ``medembed.protocol.metrics`` and ``medembed.protocol.report`` reuse them, so each
metric has one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medembed.errors import MedembedError
from medembed.options.protocol import CALIBRATIONS, OPTIMISED_RULES, ThresholdRule, parse_threshold_rule

# Logits of probabilities closer than this to 0 or 1 are clipped: heads can emit exact 0/1 probabilities.
_LOGIT_EPS = 1e-12
# Absorbs rounding when a target rate equals a count ratio exactly (9/10 against "sensitivity:0.9").
_TARGET_TOLERANCE = 1e-12


def check_probabilities(p: np.ndarray) -> np.ndarray:
    """Validate probabilities and return them as [N] float64, each finite and within [0, 1]."""
    p_arr = np.asarray(p, dtype=np.float64)
    if p_arr.ndim != 1:
        raise MedembedError(f"probabilities must be 1-D; got shape {p_arr.shape}")
    bad = np.flatnonzero(~np.isfinite(p_arr) | (p_arr < 0) | (p_arr > 1))
    if bad.size:
        raise MedembedError(
            f"probabilities must be finite and within [0, 1]; rows {bad[:5].tolist()} hold {p_arr[bad[:5]].tolist()}"
        )
    return p_arr


def check_scores(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and probabilities and return them as ([N] int8 in {0, 1}, [N] float64 in [0, 1])."""
    y_arr = np.asarray(y)
    p_arr = check_probabilities(p)
    if y_arr.shape != p_arr.shape:
        raise MedembedError(f"labels and probabilities must be aligned; got shapes {y_arr.shape} and {p_arr.shape}")
    if len(y_arr) == 0:
        raise MedembedError("no rows to evaluate: labels and probabilities are empty")
    bad = np.flatnonzero((y_arr != 0) & (y_arr != 1))
    if bad.size:
        raise MedembedError(f"labels must be 0 or 1; rows {bad[:5].tolist()} hold {y_arr[bad[:5]].tolist()}")
    return y_arr.astype(np.int8), p_arr


@dataclass(frozen=True)
class ThresholdSweep:
    """Confusion counts at every distinct score used as a threshold (a call is positive when p >= threshold).

    thresholds: [K] distinct scores, descending. pos_at, neg_at: [..., K] (weighted) positives / negatives scoring
    exactly thresholds[k]; tp, fp: [..., K] their running sums, i.e. those scoring >= thresholds[k]. The leading
    axes are those of the weights (none when unweighted).
    """

    thresholds: np.ndarray
    pos_at: np.ndarray
    neg_at: np.ndarray
    tp: np.ndarray
    fp: np.ndarray

    @property
    def n_pos(self) -> np.ndarray:
        """[...] (weighted) number of positives."""
        return self.tp[..., -1]

    @property
    def n_neg(self) -> np.ndarray:
        """[...] (weighted) number of negatives."""
        return self.fp[..., -1]

    @property
    def fn(self) -> np.ndarray:
        """[..., K] positives scoring below each threshold."""
        return self.n_pos[..., None] - self.tp

    @property
    def tn(self) -> np.ndarray:
        """[..., K] negatives scoring below each threshold."""
        return self.n_neg[..., None] - self.fp


def sweep_thresholds(y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None) -> ThresholdSweep:
    """Confusion counts at every distinct score of p [N], from one sort: O(N log N).

    weights: optional [..., N] non-negative row multiplicities (a batch of bootstrap resamples); counts are then
    weighted sums with the same leading axes.
    """
    y, p = check_scores(y, p)
    row_weights = np.ones(len(p)) if weights is None else np.asarray(weights, dtype=np.float64)
    if row_weights.ndim == 0 or row_weights.shape[-1] != len(p):
        raise MedembedError(f"weights must end in an axis of {len(p)} rows; got shape {row_weights.shape}")
    # Callers that score many weightings pass rows pre-sorted: skip the sort and the [..., N] gather.
    if np.any(p[1:] > p[:-1]):
        order = np.argsort(-p, kind="stable")
        y, p, row_weights = y[order], p[order], row_weights[..., order]
    positives = row_weights * y
    # A threshold cannot separate tied rows: sum each run of tied scores.
    tie_starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
    if len(tie_starts) < len(p):
        positives = np.add.reduceat(positives, tie_starts, axis=-1)
        row_weights = np.add.reduceat(row_weights, tie_starts, axis=-1)
    negatives = row_weights - positives
    return ThresholdSweep(
        thresholds=p[tie_starts],
        pos_at=positives,
        neg_at=negatives,
        tp=np.cumsum(positives, axis=-1),
        fp=np.cumsum(negatives, axis=-1),
    )


def confusion_metrics(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Threshold metrics from (weighted) confusion counts, elementwise over arrays of any shape.

    Returns accuracy, sensitivity, specificity, ppv, npv, f1, kappa (Cohen's) and youden (sensitivity +
    specificity - 1). A metric whose denominator is zero (ppv with no positive calls) is NaN.
    """
    tp, fp, tn, fn = (np.asarray(count, dtype=np.float64) for count in (tp, fp, tn, fn))
    n = tp + fp + tn + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        sensitivity = tp / (tp + fn)
        specificity = tn / (tn + fp)
        observed_agreement = (tp + tn) / n
        # Agreement expected if calls and labels were independent with the same marginals.
        chance_agreement = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / (n * n)
        return {
            "accuracy": observed_agreement,
            "sensitivity": sensitivity,
            "specificity": specificity,
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
            "kappa": (observed_agreement - chance_agreement) / (1 - chance_agreement),
            "youden": sensitivity + specificity - 1,
        }


def choose_threshold(y: np.ndarray, p: np.ndarray, rule: str | ThresholdRule) -> float:
    """The decision threshold (call positive when p >= threshold) that a rule picks on validation y [N], p [N].

    f1 / youden / kappa: maximise the metric over all cuts between distinct scores and return the midpoint of the
    best gap (the lowest score itself when the best cut calls every row positive); among equally good cuts the
    highest threshold wins. sensitivity:t: the largest threshold whose sensitivity >= t. specificity:t: the smallest
    threshold whose specificity >= t (just above the top score when only calling nothing reaches t). Both return a
    validation score. fixed:x: x.
    """
    parsed = rule if isinstance(rule, ThresholdRule) else parse_threshold_rule(rule)
    y, p = check_scores(y, p)
    if parsed.kind == "fixed":
        return float(parsed.value)
    sweep = sweep_thresholds(y, p)
    if sweep.n_pos == 0 or sweep.n_neg == 0:
        raise MedembedError(
            f"threshold rule {parsed} needs both classes in the validation split; "
            f"got {int(sweep.n_pos)} abnormal and {int(sweep.n_neg)} normal rows"
        )
    rates = confusion_metrics(sweep.tp, sweep.fp, sweep.tn, sweep.fn)
    thresholds = sweep.thresholds
    if parsed.kind in OPTIMISED_RULES:
        best = int(np.nanargmax(rates[parsed.kind]))
        return _midpoint_below(thresholds, best)
    reaches_target = rates[parsed.kind] >= parsed.value - _TARGET_TOLERANCE
    if parsed.kind == "sensitivity":
        # Sensitivity only grows as the threshold falls, and the lowest score reaches 1.
        return float(thresholds[np.argmax(reaches_target)])
    # Specificity only falls as the threshold falls.
    if not reaches_target[0]:
        return float(np.nextafter(thresholds[0], np.inf))
    return float(thresholds[np.flatnonzero(reaches_target)[-1]])


def _midpoint_below(thresholds: np.ndarray, k: int) -> float:
    """Midpoint between distinct score thresholds[k] and the next lower one (thresholds [K] descending)."""
    if k == len(thresholds) - 1:
        return float(thresholds[k])
    midpoint = (thresholds[k] + thresholds[k + 1]) / 2
    # Adjacent floats have no midpoint; the upper score keeps the validation calls unchanged.
    return float(midpoint if midpoint > thresholds[k + 1] else thresholds[k])


class Calibrator:
    """Maps raw head probabilities to calibrated ones: "none", "platt" or "isotonic".

    Platt: p' = sigmoid(slope * logit(p) + intercept), fitted by Newton's method on Platt's smoothed targets
    ((n_pos + 1) / (n_pos + 2) and 1 / (n_neg + 2)), which keep the fit finite on separable data.
    Isotonic: a monotone step function (sklearn IsotonicRegression), stored as its knots and applied by linear
    interpolation, constant beyond the end knots. The state is JSON-safe (to_dict / from_dict); no pickle.
    """

    def __init__(self, kind: str = "none") -> None:
        if kind not in CALIBRATIONS:
            raise MedembedError(f"unknown calibration {kind!r}; expected one of {', '.join(CALIBRATIONS)}")
        self.kind = kind
        self.slope_: float | None = None
        self.intercept_: float | None = None
        self.x_knots_: np.ndarray | None = None
        self.y_knots_: np.ndarray | None = None

    def fit(self, y: np.ndarray, p: np.ndarray) -> Calibrator:
        """Fit on validation labels y [N] and probabilities p [N]; returns self."""
        y, p = check_scores(y, p)
        if self.kind == "none":
            return self
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == len(y):
            raise MedembedError(
                f"{self.kind} calibration needs both classes in the validation split; got {n_pos} abnormal of {len(y)}"
            )
        if self.kind == "platt":
            self.slope_, self.intercept_ = _fit_platt(y, p)
        else:
            from sklearn.isotonic import IsotonicRegression  # here, not at import: compare and predict never fit one

            isotonic = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
            self.x_knots_ = np.asarray(isotonic.X_thresholds_, dtype=np.float64)
            self.y_knots_ = np.asarray(isotonic.y_thresholds_, dtype=np.float64)
        return self

    def transform(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [N] float64 for raw probabilities p [N]."""
        p = check_probabilities(p)
        if self.kind == "none":
            return p.copy()
        if self.kind == "platt":
            if self.slope_ is None:
                raise MedembedError("platt calibrator used before fit")
            return _sigmoid(self.slope_ * _logit(p) + self.intercept_)
        if self.x_knots_ is None:
            raise MedembedError("isotonic calibrator used before fit")
        return np.interp(p, self.x_knots_, self.y_knots_)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state: {"kind": ...} plus slope/intercept (platt) or x_knots/y_knots (isotonic)."""
        if self.kind == "platt":
            return {"kind": "platt", "slope": self.slope_, "intercept": self.intercept_}
        if self.kind == "isotonic":
            return {"kind": "isotonic", "x_knots": self.x_knots_.tolist(), "y_knots": self.y_knots_.tolist()}
        return {"kind": "none"}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Calibrator:
        """Rebuild a fitted calibrator from ``to_dict`` output; a malformed state raises MedembedError."""
        calibrator = cls(str(state.get("kind")))
        try:
            if calibrator.kind == "platt":
                calibrator.slope_ = float(state["slope"])
                calibrator.intercept_ = float(state["intercept"])
            elif calibrator.kind == "isotonic":
                calibrator.x_knots_ = np.asarray(state["x_knots"], dtype=np.float64)
                calibrator.y_knots_ = np.asarray(state["y_knots"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as error:
            raise MedembedError(f"malformed {calibrator.kind} calibration state: {error!r}") from None
        if calibrator.kind == "isotonic" and (
            calibrator.x_knots_.ndim != 1
            or calibrator.x_knots_.shape != calibrator.y_knots_.shape
            or calibrator.x_knots_.size == 0
            or np.any(np.diff(calibrator.x_knots_) <= 0)
        ):
            raise MedembedError("malformed isotonic calibration state: knots must be non-empty, aligned and increasing")
        return calibrator


def fit_calibrator(kind: str, y: np.ndarray, p: np.ndarray) -> Calibrator:
    """A calibrator of the given kind fitted on validation labels y [N] and probabilities p [N]."""
    return Calibrator(kind).fit(y, p)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _LOGIT_EPS, 1 - _LOGIT_EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warnings for large |z|.
    return 0.5 * (1 + np.tanh(0.5 * z))


def _fit_platt(y: np.ndarray, p: np.ndarray, max_iter: int = 100) -> tuple[float, float]:
    """(slope, intercept) minimising log loss of sigmoid(slope * logit(p) + intercept) against smoothed targets."""
    n_pos = float(y.sum())
    n_neg = len(y) - n_pos
    targets = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    design = np.column_stack([_logit(p), np.ones(len(p))])

    def loss(params: np.ndarray) -> float:
        z = design @ params
        return float(np.sum(np.logaddexp(0, z) - targets * z))

    params = np.array([1.0, 0.0])  # the identity map
    current = loss(params)
    # A tiny ridge keeps the Hessian invertible when every probability is the same.
    ridge = 1e-10 * len(p) * np.eye(2)
    for _ in range(max_iter):
        q = _sigmoid(design @ params)
        gradient = design.T @ (q - targets)
        hessian = (design * (q * (1 - q))[:, None]).T @ design + ridge
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while (candidate := loss(params - scale * step)) > current and scale > 1e-8:
            scale /= 2
        if candidate > current:
            break
        params = params - scale * step
        improvement, current = current - candidate, candidate
        if improvement <= 1e-12 * max(1.0, abs(current)):
            break
    return float(params[0]), float(params[1])
