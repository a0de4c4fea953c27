"""Metrics per subgroup of any manifest column (site, sex, age band, view, scanner) with bootstrap intervals.

Each column is taken on its own: one group per distinct value (empty values form no group), image-level metrics
from `medembed.protocol.metrics` at the run's threshold, percentile intervals resampling patients (else studies) within
the group, and per metric the largest gap between two groups that define it and have at least MIN_GROUP images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from medembed.errors import MedembedError
from medembed.protocol.metrics import binary_metrics, bootstrap_metrics
from medembed.protocol.splits import Split

GAP_METRICS = ("auroc", "sensitivity", "specificity", "kappa", "ppv", "npv")
MIN_GROUP = 10  # images: smaller groups are reported but take no part in the largest gap


def row_column(rows: Split, name: str) -> np.ndarray:
    """Column `name` of the rows ([N] str): a manifest column carried through the store, or body_part."""
    if name == "body_part":
        return rows.body_part
    extra = getattr(rows, "extra", {}) or {}
    if name not in extra:
        available = ", ".join(["body_part", *sorted(extra)])
        raise MedembedError(f"--by {name}: no such column on these rows (they have {available}); stores keep the manifest's columns "
                            "from extraction on, or pass --columns-from MANIFEST to join them by image id")
    return np.asarray(extra[name]).astype(str)


def check_columns(rows: Split, columns: list[str]) -> None:
    """Fail (one line) on a --by column the rows do not have, before any metric is computed."""
    for name in columns:
        row_column(rows, name)


def subgroup_metrics(p: np.ndarray, rows: Split, columns: list[str], threshold: float, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """{column: {"groups": {value: {metric: {"value", "ci"}}}, "largest_gap": {metric: {"gap", "low", "high"}}}}."""
    y = rows.y
    units = rows.patient_id if rows.has_patients else rows.study_id
    result: dict[str, Any] = {}
    for name in columns:
        values = row_column(rows, name)
        groups: dict[str, dict] = {}
        for value in sorted(set(values.tolist()) - {""}):
            member = values == value
            point = binary_metrics(y[member], p[member], threshold)
            intervals = bootstrap_metrics(y[member], p[member], threshold, units[member], n_resamples, seed) if n_resamples else {}
            groups[value] = {metric: {"value": v, "ci": list(intervals[metric]) if metric in intervals else None} for metric, v in point.items()}
        result[name] = {"groups": groups, "largest_gap": largest_gaps(groups)}
    return result


def largest_gaps(groups: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per metric, the highest minus the lowest value over groups of at least MIN_GROUP images where it is defined."""
    gaps = {}
    for metric in GAP_METRICS:
        defined = {g: m[metric]["value"] for g, m in groups.items() if m["n"]["value"] >= MIN_GROUP and not math.isnan(m[metric]["value"])}
        if len(defined) >= 2:
            low, high = min(defined, key=defined.get), max(defined, key=defined.get)
            gaps[metric] = {"gap": defined[high] - defined[low], "low": low, "high": high}
    return gaps


def subgroup_figure(result: dict[str, Any], metrics: tuple[str, ...] = ("auroc", "sensitivity", "specificity")) -> Figure:
    """One row of panels per column: each metric per group as `draw_bars` draws it (n and abnormal count under
    each bar, an undefined value written n/a, never a bar at 0), with its 95% bootstrap interval."""
    from medembed.protocol.figures import PartBar, draw_bars
    from medembed.protocol.report import METRIC_LABELS

    figure = Figure(figsize=(2.6 * len(metrics), 2.5 * len(result)), layout="constrained")
    axes = figure.subplots(len(result), len(metrics), squeeze=False)
    for row, (column, entry) in enumerate(result.items()):
        for col, metric in enumerate(metrics):
            bars = {
                str(group): PartBar(_number(m[metric]["value"]), *[_number(b) for b in (m[metric]["ci"] or (None, None))],
                                    n=int(m["n"]["value"]), n_pos=int(m["n_pos"]["value"]))
                for group, m in entry["groups"].items()
            }
            band = "95% bootstrap interval" if any(math.isfinite(bar.low) for bar in bars.values()) else ""
            draw_bars(axes[row][col], bars, METRIC_LABELS.get(metric, metric), band)
            axes[row][col].set_title(f"{METRIC_LABELS.get(metric, metric)} by {column}")
    return figure


def _number(value: Any) -> float:
    """A metric value as a float; None (an undefined value reloaded from JSON) is NaN."""
    return math.nan if value is None else float(value)
