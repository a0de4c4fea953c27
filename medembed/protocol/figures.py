"""PNG figures of a run: ROC, PR, reliability, metric against threshold, per-body-part bars.

Every curve comes from ``medembed.protocol.calibrate.sweep_thresholds``, the sweep that picks the thresholds, and
every number from ``medembed.protocol.metrics``. Figures are drawn on ``matplotlib.figure.Figure`` objects, which
render with Agg and touch no pyplot state.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from matplotlib.figure import Figure

from medembed.errors import MedembedError
from medembed.protocol.calibrate import check_scores, confusion_metrics, sweep_thresholds
from medembed.protocol.metrics import binary_metrics, reliability_table
from medembed.protocol.report import LEVELS, METRIC_LABELS

_FIGURE_SIZE = (5.0, 4.5)  # inches
_DPI = 120


class FigureWarning(UserWarning):
    """A figure that could not be drawn; the run is written without it."""


def plot_figures(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    out_dir: Path,
    *,
    level: str,
    body_parts: np.ndarray | None = None,
    result: dict | None = None,
) -> list[Path]:
    """Draw the figures of one level (y [N], p [N] of images or studies) as PNGs in out_dir; returns their paths.

    roc_<level>.png and pr_<level>.png with the operating point marked, reliability_<level>.png (15 bins, with
    counts), thresholds_<level>.png (sensitivity, specificity, F1, kappa against the threshold, the chosen one
    marked) and, when per-body-part numbers exist, body_parts_<level>.png: AUROC per body part, with its interval
    from result's "by_body_part" tables (or ± sd for a seed summary) else point values from body_parts.
    result: an evaluate_predictions result (or summarize_seeds summary), whole or just this level's entry.
    Wrong arguments raise MedembedError; a figure that fails to draw or save is left out with one FigureWarning,
    so a figure never fails the run that asked for it.
    """
    if level not in LEVELS:
        raise MedembedError(f"unknown level {level!r}; expected one of {', '.join(LEVELS)}")
    y, p = check_scores(y, p)
    sweep = sweep_thresholds(y, p)
    if sweep.n_pos == 0 or sweep.n_neg == 0:
        raise MedembedError(f"cannot draw ROC/PR curves at {level} level: the labels hold only one class")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    operating = binary_metrics(y, p, threshold)
    parts = _body_part_auroc(y, p, threshold, body_parts, result, level)
    figures: dict[str, Callable[[], Figure]] = {
        f"roc_{level}.png": lambda: _roc_figure(sweep, operating),
        f"pr_{level}.png": lambda: _pr_figure(sweep, operating),
        f"reliability_{level}.png": lambda: _reliability_figure(y, p, operating),
        f"thresholds_{level}.png": lambda: _threshold_figure(sweep, threshold),
    }
    if parts:
        figures[f"body_parts_{level}.png"] = lambda: _body_part_figure(parts, level)
    paths = []
    for name, draw in figures.items():
        try:
            draw().savefig(out_dir / name, dpi=_DPI)
        except Exception as error:  # noqa: BLE001 - a figure is a by-product: the run is written without it
            if (out_dir / name).is_file():
                (out_dir / name).unlink()  # a half-written PNG
            warnings.warn(f"{out_dir / name}: figure not drawn ({type(error).__name__}: {error})", FigureWarning, stacklevel=2)
            continue
        paths.append(out_dir / name)
    return paths


def _new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    figure = Figure(figsize=_FIGURE_SIZE, layout="constrained")
    axes = figure.add_subplot()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _mark_operating_point(axes: Any, x: float, y: float, threshold: float) -> None:
    axes.plot(x, y, "o", color="crimson", label=f"threshold {threshold:.3f}")


def _roc_figure(sweep: Any, operating: dict[str, float]) -> Figure:
    figure, axes = _new_axes("ROC curve", "1 - specificity", "Sensitivity")
    false_positive_rate = np.r_[0, sweep.fp / sweep.n_neg]
    true_positive_rate = np.r_[0, sweep.tp / sweep.n_pos]
    axes.plot(false_positive_rate, true_positive_rate, label=f"AUROC {operating['auroc']:.3f}")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    _mark_operating_point(axes, 1 - operating["specificity"], operating["sensitivity"], operating["threshold"])
    axes.set(xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right")
    return figure


def _pr_figure(sweep: Any, operating: dict[str, float]) -> Figure:
    figure, axes = _new_axes("Precision-recall curve", "Recall (sensitivity)", "Precision (PPV)")
    recall = np.r_[0, sweep.tp / sweep.n_pos]
    precision = np.r_[1, sweep.tp / (sweep.tp + sweep.fp)]
    # "pre": precision at recall r_k holds over (r_{k-1}, r_k], the area that average precision sums.
    axes.step(recall, precision, where="pre", label=f"AUPRC {operating['auprc']:.3f}")
    prevalence = sweep.n_pos / (sweep.n_pos + sweep.n_neg)
    axes.axhline(prevalence, linestyle=":", color="grey", label=f"prevalence {prevalence:.3f}")
    _mark_operating_point(axes, operating["sensitivity"], operating["ppv"], operating["threshold"])
    axes.set(xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower left")
    return figure


def _reliability_figure(y: np.ndarray, p: np.ndarray, operating: dict[str, float]) -> Figure:
    bins = reliability_table(y, p)
    figure = Figure(figsize=_FIGURE_SIZE, layout="constrained")
    curve_axes, count_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    filled = bins["count"] > 0
    curve_axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    curve_axes.plot(bins["mean_p"][filled], bins["frac_pos"][filled], "o-", label=f"ECE {operating['ece']:.3f}")
    curve_axes.set(title="Reliability diagram", ylabel="Fraction abnormal", xlim=(0, 1), ylim=(0, 1.01))
    curve_axes.grid(alpha=0.3)
    curve_axes.legend(loc="upper left")
    edges = bins["edges"]
    count_axes.bar(edges[:-1], bins["count"], width=np.diff(edges), align="edge", color="grey")
    count_axes.set(xlabel="Predicted probability", ylabel="Count")
    return figure


def _threshold_figure(sweep: Any, threshold: float) -> Figure:
    figure, axes = _new_axes("Metrics against threshold", "Threshold (abnormal when p >= threshold)", "Value")
    rates = confusion_metrics(sweep.tp, sweep.fp, sweep.tn, sweep.fn)
    for metric in ("sensitivity", "specificity", "f1", "kappa"):
        axes.plot(sweep.thresholds, rates[metric], label=METRIC_LABELS[metric])
    axes.axvline(threshold, color="crimson", linestyle="--", label=f"chosen {threshold:.3f}")
    axes.set(xlim=(0, 1), ylim=(min(0.0, float(np.nanmin(rates["kappa"]))), 1.01))
    axes.legend(loc="best")
    return figure


def _body_part_auroc(
    y: np.ndarray, p: np.ndarray, threshold: float, body_parts: np.ndarray | None, result: dict | None, level: str
) -> dict[str, tuple[float, float, float]]:
    """{part: (auroc, low, high)}: the value and its interval (mean ± sd for a seed summary) from the result's
    tables, else the value computed per part with no interval (NaN bounds). Undefined numbers are NaN."""
    level_result = (result or {}).get(level, result or {})  # a whole result or just this level's entry
    tables = level_result.get("by_body_part") or {}
    if tables:
        parts = {}
        for part, table in tables.items():
            leaf = table["auroc"]
            # dtype=float turns the None of a reloaded metrics.json into NaN.
            if "mean" in leaf:
                center, spread = np.array([leaf["mean"], leaf["sd"]], dtype=float)
                parts[part] = (center, center - spread, center + spread)
            else:
                center, low, high = np.array([leaf["value"], *(leaf.get("ci") or (None, None))], dtype=float)
                parts[part] = (center, low, high)
        return parts
    if body_parts is None:
        return {}
    body_parts = np.asarray(body_parts).astype(str)
    if body_parts.shape != y.shape:
        raise MedembedError(f"body_parts must have one entry per row ({len(y)}); got shape {body_parts.shape}")
    return {
        str(part): (binary_metrics(y[body_parts == part], p[body_parts == part], threshold)["auroc"], math.nan, math.nan)
        for part in np.unique(body_parts)
    }


def _body_part_figure(parts: dict[str, tuple[float, float, float]], level: str) -> Figure:
    """Bars at the point estimates; each interval drawn from its low to its high bound.

    A percentile bootstrap interval need not contain its point estimate (a skewed metric with few resamples), so
    the interval is drawn on its own, not as distances from the bar's top (which would be negative there)."""
    figure, axes = _new_axes(f"AUROC per body part ({level} level)", "", "AUROC")
    names = list(parts)
    values, low, high = np.array([parts[name] for name in names], dtype=np.float64).reshape(-1, 3).T
    axes.bar(names, np.nan_to_num(values), color="steelblue")
    drawn = np.isfinite(low) & np.isfinite(high)
    if drawn.any():
        low, high = np.minimum(low, high)[drawn], np.maximum(low, high)[drawn]
        x = np.arange(len(names))[drawn]
        # Centred on the interval's midpoint with half its width: the bar spans exactly [low, high].
        axes.errorbar(x, (low + high) / 2, yerr=(high - low) / 2, fmt="none", ecolor="black", capsize=4)
    axes.axhline(0.5, linestyle=":", color="grey")
    axes.set(ylim=(0, 1.05))
    axes.tick_params(axis="x", labelrotation=45)
    return figure
