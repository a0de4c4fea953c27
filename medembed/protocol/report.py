"""JSON and Markdown of a run: metrics.json, report.md and the compare table.

The report only formats: every number comes from ``medembed.protocol.metrics`` (metrics, intervals, seed
summaries); the figures are ``medembed.protocol.figures``'.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from medembed._files import atomic_write_text
from medembed.errors import MedembedError
from medembed.protocol.metrics import headline_leaf

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
    over_seeds = result.get("over_seeds")
    if over_seeds is not None:  # a run of several seeds: their summary beside the first seed's result
        if not isinstance(over_seeds, dict) or not any(level in over_seeds for level in LEVELS):
            raise MedembedError(f"{path}: over_seeds must be an object with the image or study level")
        for level in LEVELS:
            if level in over_seeds:
                _check_metrics_level(over_seeds[level], f"{path}: over_seeds.{level}")
        seeds = over_seeds.get("seeds")
        if seeds is not None and not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
            raise MedembedError(f"{path}: over_seeds.seeds must be a non-empty list of integers")
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
        values = leaf.get("values")
        if values is not None and not (isinstance(values, list) and all(v is None or _is_number(v) for v in values)):
            raise MedembedError(f"{where}: values must be a list of numbers (one per seed)")
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

    Headline table: rows = metrics, columns = image / study level, cells as `format_cell` writes them: "0.871
    [0.842, 0.897]" (value and bootstrap interval), "0.871 ± 0.012" (a seed summary), or, for a run of several
    seeds (a seed summary stored beside the first seed's result under "over_seeds"), "0.855 ± 0.012 (seed 0: 0.871
    [0.842, 0.897])" with a table of every seed's values under it. Then one per-body-part table per level (the
    first seed's), and the context (store fingerprint, head, threshold rule and value, calibration, split sizes,
    ...) as a list. `sections` (Markdown, each starting with its "## " heading) go before the context.
    """
    levels = [level for level in LEVELS if level in result]
    if not levels:
        raise MedembedError(f"result has no image or study level to report; keys: {sorted(result)}")
    lines = [f"# {title}", ""] + _headline(result, levels)
    seeds = _seed_table(result, levels)
    if seeds:
        lines += ["", "## Every seed", ""] + seeds
    first_seed = _first_seed_label(result)
    for level in levels:
        by_part = result[level].get("by_body_part") or {}
        if not by_part:
            continue
        lines += ["", f"## Per body part, {level} level" + (f" ({first_seed})" if first_seed else ""), ""]
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


def compare_table(
    results: dict[str, dict], level: str = "study", metrics: tuple[str, ...] = COMPARE_METRICS, about: dict[str, dict[str, str]] | None = None
) -> str:
    """Markdown table of several runs side by side: one row per run name, its `about` columns (e.g. kind, scorer,
    encoder: the same keys for every run), one column per metric at `level` (each run's headline, `headline_leaf`)
    and the intervals each run's cells carry (its own resamples, confidence and resampling unit)."""
    if not results:
        raise MedembedError("compare needs at least one run")
    about = about or {}
    columns = list(next(iter(about.values()), {}))
    rows = []
    for name, result in results.items():
        shown = level if level in result else "image"
        rows.append(
            [name]
            + [about.get(name, {}).get(column, "") for column in columns]
            + [format_cell(headline_leaf(result, shown, metric), metric) for metric in metrics]
            + [("" if shown == level else f"{shown} level; ") + intervals_cell(result, shown)]
        )
    note = (
        "Cells: point estimate [percentile bootstrap interval, over the resamples in the Intervals column]; a run of "
        "several seeds: mean ± sd over its seeds (its first seed's point estimate [interval])."
    )
    header = ["Run"] + columns + [METRIC_LABELS[m] for m in metrics] + ["Intervals"]
    return "\n".join(markdown_table(header, rows) + ["", note]) + "\n"


def intervals_cell(result: dict, level: str) -> str:
    """What a result's intervals at `level` are: "95%, 1000 × patients", or "none" without a bootstrap."""
    bootstrap = (result.get(level) or {}).get("bootstrap") or {}
    if not bootstrap.get("n_resamples"):
        return "none"
    unit = bootstrap.get("unit", "row")
    return f"{round(100 * (1 - bootstrap['alpha']))}%, {bootstrap['n_resamples']:.0f} × {_PLURAL.get(unit, unit + 's')}"


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
    """One table cell, as the console and report.md print it: "v [lo, hi]" (a point estimate and its interval),
    "v" without an interval, "mean ± sd" for a seed summary, "mean ± sd (seed 0: v [lo, hi])" for a run of several
    seeds (a `headline_leaf`), "n/a" where undefined. Negative numbers carry a real minus sign (U+2212)."""
    if leaf is None:
        return ""
    if "mean" in leaf:
        mean, sd = leaf["mean"], leaf["sd"]
        if metric in _INTEGER_METRICS and not sd:
            return format_number(mean, metric)
        spread = f"{format_number(mean, metric)} ± {format_number(sd, metric)}"
        if "value" not in leaf:
            return spread
        seed = leaf.get("seed")
        return f"{spread} ({'first seed' if seed is None else f'seed {seed}'}: {format_cell({'value': leaf['value'], 'ci': leaf.get('ci')}, metric)})"
    ci = leaf.get("ci")
    value = format_number(leaf["value"], metric)
    if ci is None or value == "n/a" or any(bound is None or math.isnan(bound) for bound in ci):
        return value
    return f"{value} {format_interval(ci, metric)}"


def format_interval(ci: list[float] | tuple[float, float], metric: str = "") -> str:
    """An interval as printed everywhere: "[−0.132, 0.445]" (brackets, a comma, U+2212 for negatives)."""
    return f"[{format_number(ci[0], metric)}, {format_number(ci[1], metric)}]"


def format_number(value: float | None, metric: str) -> str:
    """One number as every table prints it: 3 decimals (counts as integers), U+2212 for negatives, "n/a" if undefined."""
    if value is None or math.isnan(value):
        return "n/a"
    text = f"{value:.0f}" if metric in _INTEGER_METRICS else f"{value:.3f}"
    if text.startswith("-") and not text.strip("-0."):  # -0.0004 rounds to zero, which has no sign
        text = text[1:]
    return text.replace("-", "\u2212")


def _headline(result: dict, levels: list[str]) -> list[str]:
    """Lines of the metrics x levels table (each cell a `headline_leaf`) and the note saying what its cells are."""
    table = markdown_table(
        ["Metric"] + [f"{level.capitalize()} level" for level in levels],
        [
            [METRIC_LABELS[metric]] + [format_cell(headline_leaf(result, level, metric), metric) for level in levels]
            for metric in METRIC_LABELS
            if any(metric in result[level]["overall"] for level in levels)
        ],
    )
    return table + ["", _values_note(result, levels)]


def _seed_table(result: dict, levels: list[str]) -> list[str]:
    """Every seed's AUROC and kappa per level, for a run of several seeds ([] otherwise)."""
    over_seeds = result.get("over_seeds") or {}
    columns = [(level, metric) for level in levels for metric in ("auroc", "kappa") if metric in ((over_seeds.get(level) or {}).get("overall") or {})]
    if not columns:
        return []
    values = {column: over_seeds[column[0]]["overall"][column[1]].get("values") or [] for column in columns}
    n_seeds = max(len(v) for v in values.values())
    seeds = over_seeds.get("seeds") or list(range(n_seeds))
    rows = [
        [str(seeds[k]) if k < len(seeds) else str(k)] + [format_number(values[c][k], c[1]) if k < len(values[c]) else "" for c in columns]
        for k in range(n_seeds)
    ]
    return markdown_table(["Seed"] + [f"{METRIC_LABELS[metric]}, {level} level" for level, metric in columns], rows)


def _first_seed_label(result: dict) -> str:
    """"seed 0" (or "first seed") for a run of several seeds, whose per-body-part tables are its first seed's."""
    over_seeds = result.get("over_seeds")
    if not over_seeds:
        return ""
    seeds = over_seeds.get("seeds")
    return f"seed {seeds[0]}" if seeds else "first seed"


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
    bootstrap = result[levels[0]].get("bootstrap") or {}
    interval = (
        f"{round(100 * (1 - bootstrap['alpha']))}% percentile bootstrap interval, {bootstrap['n_resamples']} resamples of {' and '.join(units)}"
        if units else ""
    )
    over_seeds = result.get("over_seeds") or {}
    summary = next(iter(((over_seeds.get(levels[0]) or {}).get("overall") or {}).values()), None)
    if summary and "n_seeds" in summary:
        seeds = over_seeds.get("seeds")
        listed = f" ({', '.join(map(str, seeds))})" if seeds else ""
        first = _first_seed_label(result)
        beside = f"{first}'s point estimate [{interval}]" if interval else f"{first}'s point estimate (no bootstrap)"
        return f"Values: mean ± sd over {summary['n_seeds']} seeds{listed}; in parentheses {beside}."
    if not units:
        return "Values: point estimates (no bootstrap)."
    return f"Values: point estimate [{interval}]."


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
