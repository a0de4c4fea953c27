"""JSON, Markdown and PNG figures of a run.

The report only formats and draws: every number comes from ``medembed.protocol.metrics`` (metrics, intervals, seed
summaries) and every curve from ``medembed.protocol.calibrate.sweep_thresholds``, the sweep that picks the thresholds.
Figures are drawn on ``matplotlib.figure.Figure`` objects, which render with Agg and touch no pyplot state.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from matplotlib.figure import Figure

from medembed.protocol.calibrate import check_scores, confusion_metrics, sweep_thresholds
from medembed._files import atomic_write_text
from medembed.errors import MedembedError
from medembed.protocol.metrics import binary_metrics, reliability_table

LEVELS = ("image", "study")
METRIC_LABELS = {
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "kappa": "Cohen's kappa",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1",
    "accuracy": "Accuracy",
    "brier": "Brier score",
    "ece": "ECE (15 bins)",
    "n": "n",
    "n_pos": "Abnormal",
    "threshold": "Threshold",
}
BODY_PART_COLUMNS = ("n", "n_pos", "auroc", "auprc", "kappa", "sensitivity", "specificity")
_INTEGER_METRICS = ("n", "n_pos")
_PLURAL = {"study": "studies"}
_FIGURE_SIZE = (5.0, 4.5)  # inches
_DPI = 120


class FigureWarning(UserWarning):
    """A figure that could not be drawn; the run is written without it."""


def write_metrics_json(result: dict, path: Path) -> None:
    """Write a result as JSON: NaN and infinities become null, keys sorted, replaced atomically."""
    text = json.dumps(_json_safe(result), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_text(Path(path), text)


def read_metrics_json(path: Path) -> dict:
    """A result written by write_metrics_json (undefined values come back as None, which the tables show as n/a),
    checked to have the shape the tables read: a tampered or foreign file is one MedembedError naming the field."""
    from medembed._files import read_json

    if not Path(path).exists():
        raise MedembedError(f"{path}: no such metrics file; is this a run directory written by `medembed fit`?")
    result = read_json(path, "metrics file")
    if not isinstance(result, dict) or not isinstance(result.get("image"), dict):
        raise MedembedError(f"{path}: a metrics file is an object with at least the image level")
    for level in LEVELS:
        if level in result:
            _check_metrics_level(result[level], f"{path}: {level}")
    return result


def _check_metrics_level(node: Any, where: str) -> None:
    """One level of a metrics file: `overall` maps metrics to {value, ci} (or {mean, sd, n_seeds}) leaves of
    numbers or null, and `bootstrap` (optional) holds unit, alpha and n_resamples."""
    if not isinstance(node, dict) or not isinstance(node.get("overall"), dict) or not node["overall"]:
        raise MedembedError(f"{where}: must be an object with a non-empty overall table")
    for metric, leaf in node["overall"].items():
        _check_metric_leaf(leaf, f"{where}.overall.{metric}")
    bootstrap = node.get("bootstrap")
    if bootstrap is not None and not (isinstance(bootstrap, dict) and (not bootstrap.get("n_resamples") or (
        isinstance(bootstrap.get("unit"), str) and all(_is_number(bootstrap.get(key)) for key in ("alpha", "n_resamples"))
    ))):
        raise MedembedError(f"{where}.bootstrap: must hold unit (a string), alpha and n_resamples (numbers)")


def _check_metric_leaf(leaf: Any, where: str) -> None:
    if not isinstance(leaf, dict):
        raise MedembedError(f"{where}: must be an object with value and ci (or mean and sd)")
    if "mean" in leaf:
        if not all(_is_number(leaf.get(key)) or leaf.get(key) is None for key in ("mean", "sd")) or not _is_number(leaf.get("n_seeds")):
            raise MedembedError(f"{where}: a seed summary holds numbers mean, sd and n_seeds")
        return
    if "value" not in leaf or not (leaf["value"] is None or _is_number(leaf["value"])):
        raise MedembedError(f"{where}: value must be a number or null")
    ci = leaf.get("ci")
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(bound is None or _is_number(bound) for bound in ci)):
        raise MedembedError(f"{where}: ci must be null or two numbers")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def markdown_report(result: dict, *, title: str, context: dict, sections: list[str] | tuple[str, ...] = ()) -> str:
    """A Markdown report of an evaluate_predictions result or a summarize_seeds summary.

    Headline table: rows = metrics, columns = image / study level, cells "0.871 (0.842–0.897)" (value and
    bootstrap interval) or "0.871 ± 0.012" (mean ± sd over seeds). A seed summary stored beside a single run's
    result under "over_seeds" gets its own headline table. Then one per-body-part table per level, and the
    context (store fingerprint, head, threshold rule and value, calibration, split sizes, ...) as a list.
    `sections` (Markdown, each starting with its "## " heading) go before the context.
    """
    levels = [level for level in LEVELS if level in result]
    if not levels:
        raise MedembedError(f"result has no image or study level to report; keys: {sorted(result)}")
    lines = [f"# {title}", ""] + _headline(result, levels)
    if result.get("over_seeds"):
        lines += ["", "## Over seeds", ""] + _headline(result["over_seeds"], levels)
    for level in levels:
        by_part = result[level].get("by_body_part") or {}
        if not by_part:
            continue
        lines += ["", f"## Per body part, {level} level", ""]
        lines += markdown_table(
            ["Body part"] + [METRIC_LABELS[metric] for metric in BODY_PART_COLUMNS],
            [
                [part] + [format_cell(table.get(metric), metric) for metric in BODY_PART_COLUMNS]
                for part, table in by_part.items()
            ],
        )
    for section in sections:
        lines += ["", section]
    if context:
        lines += ["", "## Context", ""]
        lines += [f"- **{key}**: {_context_value(value)}" for key, value in context.items()]
    return "\n".join(lines) + "\n"


COMPARE_METRICS = ("auroc", "kappa", "sensitivity", "specificity", "f1")


def compare_table(results: dict[str, dict], level: str = "study", metrics: tuple[str, ...] = COMPARE_METRICS) -> str:
    """Markdown table of several runs side by side: one row per run name, one column per metric at `level`."""
    if not results:
        raise MedembedError("compare needs at least one run")
    rows = []
    for name, result in results.items():
        node = result.get(level) or result["image"]
        rows.append([name] + [format_cell(node["overall"].get(metric), metric) for metric in metrics])
    first = next(iter(results.values()))
    note = _interval_note(first, [level if level in first else "image"])
    return "\n".join(markdown_table(["Run"] + [METRIC_LABELS[m] for m in metrics], rows) + ["", note]) + "\n"


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


def _json_safe(value: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays unwrapped, tuples to lists, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_cell(leaf: dict | None, metric: str) -> str:
    """One table cell: "v (lo–hi)", "v" without an interval, "mean ± sd" for a seed summary, "n/a" if undefined."""
    if leaf is None:
        return ""
    if "mean" in leaf:
        mean, sd = leaf["mean"], leaf["sd"]
        if metric in _INTEGER_METRICS and not sd:
            return _number(mean, metric)
        return f"{_number(mean, metric)} ± {_number(sd, metric)}"
    ci = leaf.get("ci")
    value = _number(leaf["value"], metric)
    if ci is None or value == "n/a" or any(bound is None or math.isnan(bound) for bound in ci):
        return value
    return f"{value} ({_number(ci[0], metric)}–{_number(ci[1], metric)})"


def _number(value: float | None, metric: str) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.0f}" if metric in _INTEGER_METRICS else f"{value:.3f}"


def _headline(result: dict, levels: list[str]) -> list[str]:
    """Lines of the metrics x levels table and the note saying what its cells are."""
    table = markdown_table(
        ["Metric"] + [f"{level.capitalize()} level" for level in levels],
        [
            [METRIC_LABELS[metric]] + [format_cell(result[level]["overall"].get(metric), metric) for level in levels]
            for metric in METRIC_LABELS
            if any(metric in result[level]["overall"] for level in levels)
        ],
    )
    return table + ["", _values_note(result, levels)]


def _values_note(result: dict, levels: list[str]) -> str:
    """The sentences under the headline table saying what the cells are."""
    aggregation = (result.get("study") or {}).get("aggregation")
    study_rule = f" Study probability: the {aggregation} of its images' probabilities." if aggregation else ""
    return _interval_note(result, levels) + study_rule


def _interval_note(result: dict, levels: list[str]) -> str:
    overall = result[levels[0]]["overall"]
    first_leaf = next(iter(overall.values()))
    if "mean" in first_leaf:
        return f"Values: mean ± sd over {first_leaf['n_seeds']} seeds."
    units = [
        f"{_PLURAL.get(result[level]['bootstrap']['unit'], result[level]['bootstrap']['unit'] + 's')} at {level} level"
        for level in levels
        if (result[level].get("bootstrap") or {}).get("n_resamples")
    ]
    if not units:
        return "Values: point estimates (no bootstrap)."
    bootstrap = result[levels[0]]["bootstrap"]
    confidence = round(100 * (1 - bootstrap["alpha"]))
    return (
        f"Values: point estimate ({confidence}% percentile bootstrap interval, {bootstrap['n_resamples']} resamples "
        f"of {' and '.join(units)})."
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines; numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _context_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {_context_value(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_context_value(item) for item in value)
    return str(value)


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
