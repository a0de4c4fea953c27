"""Metrics, study-level aggregation, bootstrap confidence intervals, per-body-part tables and seed summaries.

Every metric comes from one function, ``weighted_metrics``, which scores a batch of row weightings at once:
all-ones weights give the point estimate (``binary_metrics``) and bootstrap multiplicities give the resamples
(``bootstrap_metrics``), so a reported value and its interval can never disagree on what the metric is.

Bootstrap intervals are percentile intervals over resamples of whole groups (patients, else studies, else
rows) drawn with replacement: images of one patient are correlated, and resampling them one by one would make
the intervals too narrow.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medembed.protocol.calibrate import check_scores, confusion_metrics, sweep_thresholds
from medembed.errors import MedembedError
from medembed.options.protocol import AGGREGATIONS

METRICS = ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "kappa", "brier", "ece")
# ECE bins: 15 equal-width bins on [0, 1]; bin b holds b/15 <= p < (b+1)/15, the last bin also holds p = 1.
ECE_BINS = 15
# Rows x resamples scored per batch. Measured fastest: ~2 MB arrays stay in cache and reuse freed memory instead
# of faulting in fresh pages, and memory stays small whatever the test set size.
_BATCH_ELEMENTS = 250_000


@dataclass(frozen=True)
class StudyTable:
    """One row per study, in sorted study-id order.

    study_ids [S] str; p [S] float64 study probability; y [S] int8 study label; groups [S] str (the study's
    patient) or None; attributes: per-study values of per-image attributes such as body_part, each [S] str.
    """

    study_ids: np.ndarray
    p: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None
    attributes: dict[str, np.ndarray] = field(default_factory=dict)


def aggregate_studies(
    p: np.ndarray,
    y: np.ndarray,
    study_ids: np.ndarray,
    how: str = "mean",
    groups: np.ndarray | None = None,
    attributes: dict[str, np.ndarray] | None = None,
) -> StudyTable:
    """Collapse images (p [N], y [N], study_ids [N]) into studies.

    The study probability is the mean of its images' probabilities (MURA's rule) or their max. The study label,
    group (patient) and each attribute [N] (e.g. body_part) must be the same for all images of a study; a study
    whose images disagree raises MedembedError naming it.
    """
    if how not in AGGREGATIONS:
        raise MedembedError(f"unknown study aggregation {how!r}; expected one of {', '.join(AGGREGATIONS)}")
    y, p = check_scores(y, p)
    study_ids = _aligned("study_ids", study_ids, len(p)).astype(str)
    unique_ids, study_of_row = np.unique(study_ids, return_inverse=True)
    order = np.argsort(study_of_row, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(study_of_row[order]) != 0])
    sizes = np.diff(np.r_[starts, len(p)])
    if how == "mean":
        p_study = np.add.reduceat(p[order], starts) / sizes
    else:
        p_study = np.maximum.reduceat(p[order], starts)
    per_study = {"label": y, **({"group": groups} if groups is not None else {}), **(attributes or {})}
    constants = {
        name: _constant_per_study(name, _aligned(name, values, len(p)), order, starts, study_of_row, unique_ids)
        for name, values in per_study.items()
    }
    label = constants.pop("label").astype(np.int8)
    group = constants.pop("group", None)
    return StudyTable(
        study_ids=unique_ids,
        p=p_study,
        y=label,
        groups=None if group is None else group.astype(str),
        attributes={name: values.astype(str) for name, values in constants.items()},
    )


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Every metric of labels y [N] and probabilities p [N] with calls p >= threshold.

    auroc, auprc (average precision, as sklearn), accuracy, sensitivity, specificity, ppv, npv, f1, kappa
    (Cohen's), brier, ece (15 equal-width bins, weighted by bin size), n, n_pos and threshold. A metric undefined
    on these rows (auroc with one class, ppv with no positive calls) is NaN.
    """
    y, p = check_scores(y, p)
    scores = weighted_metrics(y, p, threshold, np.ones((1, len(p))))
    return {name: float(values[0]) for name, values in scores.items()}


def weighted_metrics(y: np.ndarray, p: np.ndarray, threshold: float, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of binary_metrics under R weightings of the same rows at once.

    y [N] int {0, 1}, p [N] float, weights [R, N] non-negative row weights (bootstrap multiplicities; all ones is
    the sample itself) -> {name: [R] float64}. Equals sklearn's metrics with sample_weight=weights[r].
    """
    y, p = check_scores(y, p)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[0] == 0 or weights.shape[1] != len(p) or weights.min() < 0:
        raise MedembedError(f"weights must be [R >= 1, {len(p)}] and non-negative; got shape {weights.shape}")
    if not np.isfinite(threshold):
        raise MedembedError(f"threshold must be a finite number; got {threshold}")
    sweep = sweep_thresholds(y, p, weights)
    n_pos, n_neg = sweep.n_pos, sweep.n_neg
    # Calls p >= threshold are the rows scoring at or above the first k distinct scores (sorted descending).
    k = int(np.searchsorted(-sweep.thresholds, -threshold, side="right"))
    tp = sweep.tp[:, k - 1] if k else np.zeros(len(weights))
    fp = sweep.fp[:, k - 1] if k else np.zeros(len(weights))
    rates = confusion_metrics(tp, fp, n_neg - fp, n_pos - tp)
    total = n_pos + n_neg
    # Rows tied at a score share p, so sums over rows reduce to sums over the sweep's distinct scores:
    # at score s, the error p - y is s for its negatives and s - 1 for its positives.
    scores = sweep.thresholds
    error_at = scores * sweep.neg_at + (scores - 1) * sweep.pos_at  # [R, K] summed (p - y)
    # Scores run descending, so each calibration bin is one run of consecutive scores.
    bins = _calibration_bin(scores)
    bin_starts = np.flatnonzero(np.r_[True, bins[1:] != bins[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        # Per negative: the positives ranked above it, ties counting half (the Mann-Whitney U).
        auroc = (_rowwise_dot(sweep.neg_at, sweep.tp) - _rowwise_dot(sweep.neg_at, sweep.pos_at) / 2) / (n_pos * n_neg)
        # Before the first call tp is 0 too: a floor on the call count makes precision 0 there, not 0/0.
        calls = np.maximum(sweep.tp + sweep.fp, np.finfo(np.float64).tiny)
        precision = np.divide(sweep.tp, calls, out=calls)
        auprc = _rowwise_dot(sweep.pos_at, precision) / n_pos
        brier = (sweep.neg_at @ scores**2 + sweep.pos_at @ (1 - scores) ** 2) / total
        # Equals the sum over bins of (bin size / n) * |mean p - fraction abnormal|.
        ece = np.abs(np.add.reduceat(error_at, bin_starts, axis=-1)).sum(axis=-1) / total
    return {
        "auroc": auroc,
        "auprc": auprc,
        **{name: rates[name] for name in METRICS if name in rates},
        "brier": brier,
        "ece": ece,
        "n": total,
        "n_pos": n_pos,
        "threshold": np.full(len(weights), float(threshold)),
    }


def bootstrap_metrics(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    groups: np.ndarray | None,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile (1 - alpha) intervals of every metric in METRICS, resampling groups [N] with replacement.

    groups: the resampling unit of each row (patient or study id); None resamples rows. Resample r draws
    n_groups indices into the sorted distinct group ids with ``np.random.default_rng(seed).integers(0, n_groups,
    n_groups)`` (resamples drawn in order, so results are reproducible for a seed) and weights every row by its
    group's multiplicity. Resamples where a metric is undefined (one class drawn) are left out of its interval;
    a metric undefined in all gives (NaN, NaN).
    """
    if not 0 < alpha < 1:
        raise MedembedError(f"alpha must be in (0, 1); got {alpha}")
    resampled = resampled_metrics(y, p, threshold, groups, n_resamples, seed)
    percentiles = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    intervals = {}
    for name in METRICS:
        values = resampled[name]
        values = values[~np.isnan(values)]
        low, high = np.percentile(values, percentiles) if values.size else (np.nan, np.nan)
        intervals[name] = (float(low), float(high))
    return intervals


def resampled_metrics(
    y: np.ndarray, p: np.ndarray, threshold: float, groups: np.ndarray | None, n_resamples: int = 1000, seed: int = 0
) -> dict[str, np.ndarray]:
    """Every metric in METRICS on each of n_resamples group resamples, {name: [R] float64} (NaN where undefined),
    drawn as `bootstrap_metrics` describes; differences between two samples' metrics are taken resample by resample."""
    y, p = check_scores(y, p)
    group_of_row = group_index(groups, len(p))
    # Pre-sorting by score makes the per-batch sort in sweep_thresholds a linear pass over sorted input.
    order = np.argsort(-p, kind="stable")
    y, p, group_of_row = y[order], p[order], group_of_row[order]
    resampled: dict[str, list[np.ndarray]] = {name: [] for name in METRICS}
    for weights in resample_weights(group_of_row, n_resamples, seed):
        scores = weighted_metrics(y, p, threshold, weights)
        for name in METRICS:
            resampled[name].append(scores[name])
    return {name: np.concatenate(values) for name, values in resampled.items()}


def group_index(groups: np.ndarray | None, n_rows: int) -> np.ndarray:
    """[N] int index of each row's resampling group in the sorted distinct group ids (None: each row its own)."""
    if groups is None:
        return np.arange(n_rows)
    _, group_of_row = np.unique(_aligned("groups", groups, n_rows).astype(str), return_inverse=True)
    return group_of_row


def resample_weights(group_of_row: np.ndarray, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Row weights of n_resamples group resamples, in batches [B, N] float64 (B resamples, in order).

    Resample r draws n_groups indices into the groups with ``np.random.default_rng(seed).integers(0, n_groups,
    n_groups)`` and weights every row by its group's multiplicity: two samples of the same rows weighted by the
    same batches are resampled jointly (a paired bootstrap)."""
    if n_resamples < 1:
        raise MedembedError(f"n_resamples must be at least 1; got {n_resamples}")
    n_groups = int(group_of_row.max()) + 1
    rng = np.random.default_rng(seed)
    batch = max(1, _BATCH_ELEMENTS // len(group_of_row))
    for start in range(0, n_resamples, batch):
        multiplicities = np.stack(
            [
                np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups).astype(np.float64)
                for _ in range(min(batch, n_resamples - start))
            ]
        )
        yield multiplicities[:, group_of_row]


def evaluate_predictions(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    *,
    study_ids: np.ndarray | None = None,
    patient_ids: np.ndarray | None = None,
    body_parts: np.ndarray | None = None,
    study_threshold: float | None = None,
    how: str = "mean",
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Image- and study-level metrics with bootstrap intervals, overall and per body part.

    Inputs are per image: y [N], p [N] and optional study_ids, patient_ids, body_parts [N] str. The study level
    (present when study_ids are given) aggregates with ``how`` and applies study_threshold (default: threshold).
    Image level resamples patients, else studies, else images; study level resamples patients, else studies.
    n_resamples=0 skips the bootstrap (every "ci" is None). Returns
    {"image": {"overall": {metric: {"value": v, "ci": [lo, hi] | None}}, "by_body_part": {part: {...}},
    "bootstrap": {...}}, "study": {... and "aggregation": how}}.
    """
    y, p = check_scores(y, p)
    if n_resamples < 0:
        raise MedembedError(f"n_resamples must be 0 (no intervals) or more; got {n_resamples}")
    for name, ids in (("study_ids", study_ids), ("patient_ids", patient_ids), ("body_parts", body_parts)):
        if ids is not None:
            _aligned(name, ids, len(p))
    image_groups, image_unit = next(
        ((ids, unit) for ids, unit in ((patient_ids, "patient"), (study_ids, "study")) if ids is not None),
        (None, "image"),
    )
    bootstrap = {"n_resamples": n_resamples, "seed": seed, "alpha": alpha}
    result = {
        "image": _level_result(y, p, threshold, image_groups, body_parts, {**bootstrap, "unit": image_unit})
    }
    if study_ids is not None:
        attributes = {"body_part": body_parts} if body_parts is not None else None
        studies = aggregate_studies(p, y, study_ids, how=how, groups=patient_ids, attributes=attributes)
        study_unit = "patient" if studies.groups is not None else "study"
        result["study"] = {
            **_level_result(
                studies.y,
                studies.p,
                threshold if study_threshold is None else study_threshold,
                studies.groups,
                studies.attributes.get("body_part"),
                {**bootstrap, "unit": study_unit},
            ),
            "aggregation": how,
        }
    return result


def summarize_seeds(results: list[dict]) -> dict:
    """Mean and sample sd of every metric value over runs that differ only in seed, with the same nesting.

    Each {"value": v, "ci": ...} leaf becomes {"mean": m, "sd": s, "n_seeds": k, "values": [v1, ...]} (sd is NaN
    for one seed). Other entries are kept when equal across runs, else listed per run.
    """
    if not results:
        raise MedembedError("no results to summarise over seeds")
    return _summarize_node(results, path="result")


def headline_leaf(result: dict, level: str, metric: str) -> dict | None:
    """The leaf that stands for a run's `metric` at `level` wherever its headline is shown (console, report.md,
    compare): for a run of several seeds (a result with "over_seeds") the mean ± sd over seeds joined with the
    first seed's value and interval, {"mean", "sd", "n_seeds", "values", "value", "ci", "seed"}; for one seed its
    {"value", "ci"}; a seed summary's own {"mean", "sd", ...} leaf as it is; None where `result` has none."""
    leaf = ((result.get(level) or {}).get("overall") or {}).get(metric)
    over_seeds = result.get("over_seeds") or {}
    summary = ((over_seeds.get(level) or {}).get("overall") or {}).get(metric)
    if summary is None or leaf is None:
        return leaf
    seeds = over_seeds.get("seeds")
    return {**summary, "value": leaf.get("value"), "ci": leaf.get("ci"), "seed": seeds[0] if seeds else None}


def reliability_table(y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Per ECE bin: edges [B + 1], count [B], mean_p [B] and frac_pos [B] (NaN for an empty bin)."""
    y, p = check_scores(y, p)
    bins = _calibration_bin(p)
    count = np.bincount(bins, minlength=ECE_BINS)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "edges": np.linspace(0, 1, ECE_BINS + 1),
            "count": count,
            "mean_p": np.bincount(bins, weights=p, minlength=ECE_BINS) / count,
            "frac_pos": np.bincount(bins, weights=y, minlength=ECE_BINS) / count,
        }


def _rowwise_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[R] sum over k of a[r, k] * b[r, k], without an [R, K] temporary."""
    return np.einsum("rk,rk->r", a, b)


def _calibration_bin(p: np.ndarray) -> np.ndarray:
    """[N] int ECE bin of each probability: floor(15 p), with p = 1 in the last bin."""
    return np.minimum((p * ECE_BINS).astype(np.int64), ECE_BINS - 1)


def _level_result(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    groups: np.ndarray | None,
    body_parts: np.ndarray | None,
    bootstrap: dict[str, Any],
) -> dict[str, Any]:
    """{"overall": table, "by_body_part": {part: table}, "bootstrap": settings} for one level (images or studies)."""
    by_body_part = {}
    if body_parts is not None:
        body_parts = _aligned("body_parts", body_parts, len(p)).astype(str)
        for part in np.unique(body_parts):
            rows = body_parts == part
            part_groups = None if groups is None else np.asarray(groups)[rows]
            by_body_part[str(part)] = _metric_table(y[rows], p[rows], threshold, part_groups, bootstrap)
    return {
        "overall": _metric_table(y, p, threshold, groups, bootstrap),
        "by_body_part": by_body_part,
        "bootstrap": bootstrap,
    }


def _metric_table(
    y: np.ndarray, p: np.ndarray, threshold: float, groups: np.ndarray | None, bootstrap: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """{metric: {"value": v, "ci": [lo, hi] or None}}; counts and the threshold never get an interval."""
    values = binary_metrics(y, p, threshold)
    intervals = {}
    if bootstrap["n_resamples"]:
        intervals = bootstrap_metrics(
            y, p, threshold, groups, bootstrap["n_resamples"], seed=bootstrap["seed"], alpha=bootstrap["alpha"]
        )
    return {
        name: {"value": value, "ci": list(intervals[name]) if name in intervals else None}
        for name, value in values.items()
    }


def _summarize_node(nodes: list[Any], path: str) -> Any:
    """Recursive step of summarize_seeds over the same position in every run's result."""
    first = nodes[0]
    if isinstance(first, dict) and "value" in first:
        # None is how metrics.json stores an undefined (NaN) value.
        values = np.array([np.nan if node["value"] is None else float(node["value"]) for node in nodes])
        return {
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
            "n_seeds": len(values),
            "values": values.tolist(),
        }
    if isinstance(first, dict):
        for node in nodes:
            if not isinstance(node, dict) or node.keys() != first.keys():
                found = sorted(node) if isinstance(node, dict) else type(node).__name__
                raise MedembedError(f"seed results differ in structure at {path}: {sorted(first)} vs {found}")
        return {key: _summarize_node([node[key] for node in nodes], f"{path}.{key}") for key in first}
    return first if all(node == first for node in nodes) else list(nodes)


def _constant_per_study(
    name: str,
    values: np.ndarray,
    order: np.ndarray,
    starts: np.ndarray,
    study_of_row: np.ndarray,
    study_ids: np.ndarray,
) -> np.ndarray:
    """[S] the value each study's images share; MedembedError naming the studies whose images disagree."""
    per_study = values[order][starts]
    disagree = np.unique(study_of_row[values != per_study[study_of_row]])
    if disagree.size:
        examples = ", ".join(repr(str(study)) for study in study_ids[disagree[:5]])
        raise MedembedError(f"{disagree.size} studies have images that disagree on {name}: {examples}")
    return per_study


def _aligned(name: str, values: np.ndarray, n_rows: int) -> np.ndarray:
    """values as a 1-D array of n_rows entries, else MedembedError naming the argument."""
    array = np.asarray(values)
    if array.shape != (n_rows,):
        raise MedembedError(f"{name} must have one entry per row ({n_rows}); got shape {array.shape}")
    return array
