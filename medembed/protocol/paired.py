"""Whether one run is better than another on the same test images: paired differences of AUROC and kappa.

Two statistics, at image and study level:

- The **paired bootstrap** of the difference (run − baseline) in AUROC and Cohen's kappa: both runs are scored on
  the same resamples of patients (else studies, else images), drawn exactly as the runs' own intervals are
  (`medembed.protocol.metrics.resample_weights`), so what the two runs share (the same hard patients) cancels in
  the difference. Its percentile interval, and a two-sided p-value: twice the smaller share of resamples on either
  side of 0, with the +1 correction ((1 + count) / (1 + R)), capped at 1: the smallest alpha at which the percentile
  interval would exclude 0.
- **DeLong's test** for two correlated AUROCs (DeLong, DeLong & Clarke-Pearson, Biometrics 1988) in the fast
  midrank form of Sun & Xu (IEEE SPL 2014), O(N log N), with Obuchowski's variance for clustered data (Biometrics
  1997): the structural components are summed per cluster (the unit the bootstrap resamples: patients, else
  studies), so several images of one patient do not count as independent evidence. With one row per cluster it is
  DeLong's variance exactly.

Each run's scored images come from its predictions.csv (untrusted: `read_predictions` validates every row) and
its own thresholds from run.json decide its calls, hence its kappa.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medembed.errors import MedembedError
from medembed.protocol.metrics import aggregate_studies, binary_metrics, group_index, resample_weights, weighted_metrics

PAIRED_METRICS = ("auroc", "kappa")
_REQUIRED = ("image_id", "study_id", "label", "probability")
_MAX_ROWS = 10_000_000  # a predictions file longer than this is not a test split


@dataclass(frozen=True)
class Scored:
    """One run's scored test images and the thresholds that make its calls.

    image_id [N] str (unique), study_id [N] str, patient_id [N] str or None (the run knows no patients),
    y [N] int8 {0, 1}, p [N] float64 calibrated probability in [0, 1]."""

    name: str
    image_id: np.ndarray
    study_id: np.ndarray
    patient_id: np.ndarray | None
    y: np.ndarray
    p: np.ndarray
    image_threshold: float
    study_threshold: float
    aggregation: str = "mean"

    def take(self, rows: np.ndarray) -> Scored:
        """The images `rows` (indices), in that order."""
        return replace(self, image_id=self.image_id[rows], study_id=self.study_id[rows], y=self.y[rows], p=self.p[rows],
                       patient_id=None if self.patient_id is None else self.patient_id[rows])


def read_predictions(path: Path, *, name: str, image_threshold: float, study_threshold: float, aggregation: str = "mean") -> Scored:
    """A run's predictions.csv (image_id, study_id, label, probability and optionally patient_id), validated:
    one MedembedError naming the file and row of the first problem (a missing column, an empty or repeated image
    id, a label other than 0/1, a probability that is not a number in [0, 1])."""
    from medembed._csv import read_text_cell

    path = Path(path)
    if not path.is_file():
        raise MedembedError(f"{path}: no such predictions file; a paired comparison reads each run's predictions.csv")
    ids, studies, patients, labels, probabilities = [], [], [], [], []
    seen: dict[str, int] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            missing = [column for column in _REQUIRED if column not in (header or [])]
            if header is None or missing:
                raise MedembedError(f"{path}: not a run's predictions file (missing columns {', '.join(missing)})")
            where = {column: header.index(column) for column in (*_REQUIRED, "patient_id") if column in header}
            for cells in reader:
                row = reader.line_num
                if len(cells) != len(header):
                    raise MedembedError(f"{path}: row {row}: {len(cells)} cells for {len(header)} columns")
                if len(ids) >= _MAX_ROWS:
                    raise MedembedError(f"{path}: more than {_MAX_ROWS:,} rows; not a run's predictions file")
                image_id = read_text_cell(cells[where["image_id"]])
                if not image_id:
                    raise MedembedError(f"{path}: row {row}: empty image_id")
                if image_id in seen:
                    raise MedembedError(f"{path}: row {row}: image {image_id!r:.60} also on row {seen[image_id]}")
                seen[image_id] = row
                label = cells[where["label"]].strip()
                if label not in ("0", "1"):
                    raise MedembedError(f"{path}: row {row}: label {label!r:.40} is not 0 or 1")
                probability = _probability(cells[where["probability"]])
                if probability is None:
                    raise MedembedError(f"{path}: row {row}: probability {cells[where['probability']]!r:.40} is not a number in [0, 1]")
                study = read_text_cell(cells[where["study_id"]])
                patient = read_text_cell(cells[where["patient_id"]]) if "patient_id" in where else ""
                ids.append(image_id)
                studies.append(study or image_id)  # as the run's splits: an image without a study is its own
                patients.append(patient)
                labels.append(int(label))
                probabilities.append(probability)
    except UnicodeDecodeError as error:
        raise MedembedError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise MedembedError(f"{path}: not a CSV file ({error})") from None
    if not ids:
        raise MedembedError(f"{path}: no scored images")
    studies_array = np.array(studies, dtype=str)
    known = any(patients)
    return Scored(
        name=name,
        image_id=np.array(ids, dtype=str),
        study_id=studies_array,
        patient_id=np.where(np.array(patients, dtype=str) != "", np.array(patients, dtype=str), studies_array) if known else None,
        y=np.array(labels, dtype=np.int8),
        p=np.array(probabilities, dtype=np.float64),
        image_threshold=float(image_threshold),
        study_threshold=float(study_threshold),
        aggregation=aggregation,
    )


def _probability(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None


def pair(baseline: Scored, other: Scored, intersect: bool = False) -> tuple[Scored, Scored, list[str]]:
    """The two runs on the same images, in one order, and notes. Refuses (MedembedError, one line) test sets that
    differ in image ids, unless `intersect` (then a note says how many each alone scored), and images whose label,
    study or patient differ between the runs."""
    common, in_base, in_other = np.intersect1d(baseline.image_id, other.image_id, assume_unique=True, return_indices=True)
    only_base, only_other = len(baseline.image_id) - len(common), len(other.image_id) - len(common)
    notes = []
    if only_base or only_other:
        counts = f"{only_other} images only in {other.name}, {only_base} only in {baseline.name}"
        if not intersect:
            raise MedembedError(
                f"{other.name} and {baseline.name} were scored on different test images ({counts}); a paired comparison needs the "
                f"same images: --intersect compares them on the {len(common)} both scored, --no-paired shows the table alone"
            )
        if not len(common):
            raise MedembedError(f"{other.name} and {baseline.name} share no test image; there is nothing to compare them on")
        notes.append(f"{other.name} vs {baseline.name}: compared on the {len(common)} images both scored ({counts})")
    a, b = baseline.take(in_base), other.take(in_other)
    for what, first, second in (("labelled", a.y, b.y), ("in study", a.study_id, b.study_id)):
        differs = np.flatnonzero(first != second)
        if differs.size:
            k = differs[0]
            raise MedembedError(
                f"{other.name}: image {str(a.image_id[k])!r:.60} is {what} {second[k]} there and {first[k]} in {baseline.name} "
                f"({differs.size} such images); paired runs must be scored on the same labelled images"
            )
    if a.patient_id is not None and b.patient_id is not None and (a.patient_id != b.patient_id).any():
        k = int(np.flatnonzero(a.patient_id != b.patient_id)[0])
        raise MedembedError(f"{other.name}: image {str(a.image_id[k])!r:.60} belongs to patient {b.patient_id[k]} there and {a.patient_id[k]} in {baseline.name}")
    patients = a.patient_id if a.patient_id is not None else b.patient_id  # the same images: either run's patients
    return replace(a, patient_id=patients), replace(b, patient_id=patients), notes


def delong_test(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, groups: np.ndarray | None = None) -> dict[str, float]:
    """DeLong's test of AUROC(b) − AUROC(a) for two scores p_a, p_b [N] of the same rows with labels y [N], rows
    clustered by `groups` [N] (None: each row its own cluster).

    Returns {"auroc_a", "auroc_b", "difference", "se", "z", "p_value", "clusters"} (two-sided, normal approximation).
    Needs at least two clusters holding a positive and two holding a negative; otherwise every value but the AUROCs
    (and clusters) is NaN. Identical scores give p = 1."""
    y = np.asarray(y)
    scores = np.stack([np.asarray(p_a, dtype=np.float64), np.asarray(p_b, dtype=np.float64)])
    cluster = group_index(groups, len(y))
    n_clusters = int(cluster.max()) + 1 if len(y) else 0
    positive = y == 1
    m, n = int(positive.sum()), int((~positive).sum())
    nan = float("nan")
    if m == 0 or n == 0:
        return {"auroc_a": nan, "auroc_b": nan, "difference": nan, "se": nan, "z": nan, "p_value": nan, "clusters": n_clusters}
    v10, v01, auroc = [], [], []
    for row in scores:
        x, w = row[positive], row[~positive]
        tx, tw, tz = _midranks(x), _midranks(w), _midranks(np.concatenate([x, w]))
        auroc.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)  # per positive: the share of negatives ranked below it (ties half)
        v01.append(1.0 - (tz[m:] - tw) / m)  # per negative: the share of positives ranked above it
    difference = float(auroc[1] - auroc[0])
    result = {"auroc_a": float(auroc[0]), "auroc_b": float(auroc[1]), "difference": difference, "se": nan, "z": nan, "p_value": nan,
              "clusters": n_clusters}
    variance = _clustered_difference_variance(np.array(auroc), np.stack(v10), np.stack(v01), cluster[positive], cluster[~positive], n_clusters)
    if math.isnan(variance):
        return result
    if variance <= 1e-300:  # identical (or perfectly concordant) scores: no spread to test against
        return result | {"se": 0.0, "z": 0.0 if difference == 0 else math.copysign(math.inf, difference), "p_value": 1.0 if difference == 0 else 0.0}
    z = difference / math.sqrt(variance)
    return result | {"se": math.sqrt(variance), "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2))}


def _clustered_difference_variance(auroc: np.ndarray, v10: np.ndarray, v01: np.ndarray, positive_cluster: np.ndarray,
                                   negative_cluster: np.ndarray, n_clusters: int) -> float:
    """Var(AUROC_b − AUROC_a) by Obuchowski (1997) from the two scores' structural components (v10 [2, M] per
    positive, v01 [2, N] per negative) and each row's cluster: per cluster, the components' sums minus their count
    times the AUROC; S10 and S01 their (co)variances over clusters holding a positive or a negative, S11 the
    within-cluster cross-products of positives with negatives. NaN below two clusters of either class."""
    m, n = v10.shape[1], v01.shape[1]
    holding_positive, holding_negative = len(np.unique(positive_cluster)), len(np.unique(negative_cluster))
    if holding_positive < 2 or holding_negative < 2:
        return float("nan")

    def centred_sums(components: np.ndarray, clusters: np.ndarray) -> np.ndarray:  # [2, n_clusters]
        counts = np.bincount(clusters, minlength=n_clusters)
        sums = np.stack([np.bincount(clusters, weights=row, minlength=n_clusters) for row in components])
        return sums - counts[None, :] * auroc[:, None]

    dx, dy = centred_sums(v10, positive_cluster), centred_sums(v01, negative_cluster)
    s10 = holding_positive / ((holding_positive - 1) * m) * (dx @ dx.T)
    s01 = holding_negative / ((holding_negative - 1) * n) * (dy @ dy.T)
    s11 = n_clusters / (n_clusters - 1) * (dx @ dy.T)
    covariance = s10 / m + s01 / n + (s11 + s11.T) / (m * n)
    return float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])


def _midranks(x: np.ndarray) -> np.ndarray:
    """[N] 1-based ranks of x, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    _, starts, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(starts + (counts + 1) / 2, counts)
    return ranks


def paired_bootstrap(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, threshold_a: float, threshold_b: float, groups: np.ndarray | None,
    n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05, metrics: tuple[str, ...] = PAIRED_METRICS,
) -> dict[str, dict[str, Any]]:
    """The paired bootstrap of metric(b) − metric(a) on the same rows (y, p_a, p_b [N]; groups [N] the resampling
    unit, None for rows): both scored on every resample, each with its own threshold.

    {metric: {"a", "b", "difference", "ci": [lo, hi], "p_value", "n_resamples"}}; resamples where the metric is
    undefined (one class drawn) are left out ("n_resamples" counts those kept); none kept gives NaN."""
    if not 0 < alpha < 1:
        raise MedembedError(f"alpha must be in (0, 1); got {alpha}")
    point_a, point_b = binary_metrics(y, p_a, threshold_a), binary_metrics(y, p_b, threshold_b)
    differences: dict[str, list[np.ndarray]] = {metric: [] for metric in metrics}
    for weights in resample_weights(group_index(groups, len(y)), n_resamples, seed):
        scores_a, scores_b = weighted_metrics(y, p_a, threshold_a, weights), weighted_metrics(y, p_b, threshold_b, weights)
        for metric in metrics:
            differences[metric].append(scores_b[metric] - scores_a[metric])
    result = {}
    for metric in metrics:
        d = np.concatenate(differences[metric])
        d = d[~np.isnan(d)]
        ci = [float(v) for v in np.percentile(d, [100 * alpha / 2, 100 * (1 - alpha / 2)])] if d.size else [math.nan, math.nan]
        result[metric] = {
            "a": point_a[metric], "b": point_b[metric], "difference": point_b[metric] - point_a[metric],
            "ci": ci, "p_value": bootstrap_p_value(d), "n_resamples": int(d.size),
        }
    return result


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p-value of "no difference" from resampled differences [R]: 2 min((1 + #{d <= 0}), (1 + #{d >= 0}))
    / (1 + R), at most 1 (NaN for no resamples)."""
    if not differences.size:
        return math.nan
    below, above = int((differences <= 0).sum()), int((differences >= 0).sum())
    return min(1.0, 2 * (1 + min(below, above)) / (1 + differences.size))


def paired_comparison(baseline: Scored, other: Scored, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """`other` against `baseline` on the same images (`pair` them first): per level, the paired bootstrap of AUROC
    and kappa and DeLong's test of AUROC.

    {"images", "studies", "n_resamples", "alpha", "seed", "levels": {"image" | "study": {"unit": "patient" |
    "study" | "image", "n", "auroc": {..., "delong": {...}}, "kappa": {...}}}}. Image level resamples patients,
    else studies; study level aggregates each run's images by its own rule and resamples patients, else studies."""
    if (baseline.image_id != other.image_id).any():
        raise MedembedError(f"{other.name} and {baseline.name}: pair the runs first (their images differ or are in another order)")
    patients = baseline.patient_id
    y = baseline.y
    levels: dict[str, Any] = {}
    image_groups = patients if patients is not None else baseline.study_id
    levels["image"] = _level(y, baseline.p, other.p, baseline.image_threshold, other.image_threshold, image_groups,
                             "patient" if patients is not None else "study", n_resamples, seed, alpha)
    studies_a = aggregate_studies(baseline.p, y, baseline.study_id, how=baseline.aggregation, groups=patients)
    studies_b = aggregate_studies(other.p, y, other.study_id, how=other.aggregation, groups=patients)
    levels["study"] = _level(studies_a.y, studies_a.p, studies_b.p, baseline.study_threshold, other.study_threshold, studies_a.groups,
                             "patient" if patients is not None else "study", n_resamples, seed, alpha)
    return {"images": len(y), "studies": len(studies_a.y), "n_resamples": n_resamples, "alpha": alpha, "seed": seed, "levels": levels}


def _level(y, p_a, p_b, threshold_a, threshold_b, groups, unit, n_resamples, seed, alpha) -> dict[str, Any]:
    result: dict[str, Any] = {"unit": unit, "n": len(y), "n_pos": int(np.sum(y))}
    result |= paired_bootstrap(y, p_a, p_b, threshold_a, threshold_b, groups, n_resamples, seed, alpha)
    result["auroc"]["delong"] = delong_test(y, p_a, p_b, groups)
    return result
