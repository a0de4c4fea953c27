"""results.md and the figures of a sweep, drawn from its results rows.

Every number is a study-level metric's mean ± sd over seeds with the first seed's value and interval beside it,
computed by `medembed.protocol.metrics.summarize_seeds` and picked by `headline_leaf` (the same headline as
`medembed fit --seeds`), formatted by `medembed.protocol.report.format_cell`. Figures are drawn
on `matplotlib.figure.Figure` objects (Agg, no pyplot state).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from medembed.protocol.metrics import headline_leaf, summarize_seeds
from medembed.protocol.report import METRIC_LABELS, format_cell, markdown_table
from medembed.sweep.results import row_key

if TYPE_CHECKING:
    from medembed.sweep.config import SweepConfig

LEVEL = "study"
HEADLINE = ("auroc", "kappa")
_DPI = 120

Cell = tuple[str, str, float]  # encoder, head, budget


def summarize_cells(rows: list[dict[str, Any]]) -> dict[Cell, dict[str, dict]]:
    """{(encoder, head, budget): {metric: leaf}} over the seeds of the cells that ran.

    Each HEADLINE metric at LEVEL is the cell's headline as a run of several seeds has it (`headline_leaf`): the
    summarize_seeds summary {"mean", "sd", "n_seeds", "values"} joined with the first seed's "value", "ci" (its
    bootstrap interval, None where the rows have none) and "seed"; train_images is a seed summary. Rows with a note
    (cells that could not run) are left out.
    """
    by_cell: dict[Cell, list[dict]] = defaultdict(list)
    for row in rows:
        if not row["note"]:
            by_cell[(row["encoder"], row["head"], row["budget"])].append(row)
    summary = {}
    for cell, cell_rows in sorted(by_cell.items()):
        cell_rows = sorted(cell_rows, key=lambda row: row["seed"])
        results = [_seed_result(row) for row in cell_rows]
        run = {**results[0], "over_seeds": {**summarize_seeds(results), "seeds": [int(row["seed"]) for row in cell_rows]}}
        summary[cell] = {**{metric: headline_leaf(run, LEVEL, metric) for metric in HEADLINE}, "train_images": run["over_seeds"]["train_images"]}
    return summary


def _seed_result(row: dict[str, Any]) -> dict[str, Any]:
    """One results row as a result of one seed: HEADLINE at LEVEL with their intervals, and train_images."""
    overall = {}
    for metric in HEADLINE:
        low, high = row.get(f"{LEVEL}_{metric}_low"), row.get(f"{LEVEL}_{metric}_high")
        known = low is not None and high is not None and not (math.isnan(low) or math.isnan(high))
        overall[metric] = {"value": row[f"{LEVEL}_{metric}"], "ci": [low, high] if known else None}
    return {LEVEL: {"overall": overall}, "train_images": {"value": row["train_images"]}}


def write_report(rows: list[dict[str, Any]], config: SweepConfig, record: dict[str, Any]) -> tuple[Path, list[Path]]:
    """Write OUT/results.md, OUT/learning_curve.png and OUT/heads_encoders.png; returns their paths.

    rows: typed results rows (`read_results`) of the sweep's grid. record: sweep.json's content (protocol,
    and per-source notes).
    """
    summary = summarize_cells(rows)
    out = Path(config.out)
    markdown = out / "results.md"
    markdown.write_text(results_markdown(summary, rows, config, record), encoding="utf-8")
    figures = [out / "learning_curve.png", out / "heads_encoders.png"]
    learning_curve_figure(summary).savefig(figures[0], dpi=_DPI)
    heads_encoders_figure(summary).savefig(figures[1], dpi=_DPI)
    return markdown, figures


def results_markdown(summary: dict[Cell, dict[str, dict]], rows: list[dict[str, Any]], config: SweepConfig, record: dict[str, Any]) -> str:
    """The sweep's Markdown report: protocol, heads x encoders at the largest budget, learning curves, notes."""
    protocol = record.get("protocol", {})
    seeds = ", ".join(map(str, config.seeds))
    lines = [
        f"# Sweep: {config.name}",
        "",
        f"One protocol for every cell: manifest `{config.manifest}` (sha256 {str(protocol.get('manifest_sha256', ''))[:12]}); "
        "each head is fitted on a label budget of the train split (whole patients, else studies, stratified by label, "
        "nested across budgets, drawn per seed); probability calibration "
        f"`{config.calibration}` and the `{config.threshold}` threshold are chosen on the whole val split; metrics on the "
        f"whole test split, study probability = {config.aggregation} of its images'. "
        f"Values: {LEVEL}-level mean ± sd over seeds ({seeds}), with the first seed's value and 95% bootstrap interval "
        f"({config.bootstrap} resamples) in parentheses; a cell of one seed: its value and interval. Every cell's values with their "
        "intervals: `results.csv`.",
    ]
    if summary:
        full = max(budget for _, _, budget in summary)
        lines += ["", f"## Heads × encoders, {percent(full)} of the training labels", ""]
        for metric in HEADLINE:
            lines += [f"{METRIC_LABELS[metric]} ({LEVEL} level):", ""] + _heads_by_encoders(summary, full, metric) + [""]
        lines += ["## Learning curves", ""]
        for encoder in sorted({e for e, _, _ in summary}):
            for metric in HEADLINE:
                lines += [f"{encoder}, {METRIC_LABELS[metric]} ({LEVEL} level):", ""] + _learning_curve_table(summary, encoder, metric) + [""]
    sources = {row["encoder"] for row in rows}
    notes = [f"{source}: {note}" for source, info in sorted(record.get("sources", {}).items()) if source in sources for note in info.get("notes", [])]
    notes += [f"{row_key(row)}: not run: {row['note']}" for row in rows if row["note"]]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def _cell_text(leaf: dict | None, metric: str) -> str:
    """mean ± sd (seed 0: value [interval]), as a run of several seeds is shown everywhere; one seed's value and
    interval for a cell of one seed (its sd is undefined); '—' for a cell not in the sweep."""
    if leaf is None:
        return "—"
    if leaf["n_seeds"] == 1:
        return format_cell({"value": leaf["value"], "ci": leaf.get("ci")}, metric)
    return format_cell(leaf, metric)


def _heads_by_encoders(summary: dict[Cell, dict[str, dict]], budget: float, metric: str) -> list[str]:
    encoders = sorted({e for e, _, b in summary if b == budget})
    heads = sorted({h for _, h, b in summary if b == budget})
    table = [[head] + [_cell_text(summary.get((e, head, budget), {}).get(metric), metric) for e in encoders] for head in heads]
    return markdown_table(["Head"] + encoders, table)


def _learning_curve_table(summary: dict[Cell, dict[str, dict]], encoder: str, metric: str) -> list[str]:
    heads = sorted({h for e, h, _ in summary if e == encoder})
    budgets = sorted({b for e, _, b in summary if e == encoder})
    table = []
    for budget in budgets:
        cells = [summary.get((encoder, head, budget)) for head in heads]
        images = next(cell["train_images"]["mean"] for cell in cells if cell)
        table.append([percent(budget), f"{images:.0f}"] + [_cell_text(cell and cell[metric], metric) for cell in cells])
    return markdown_table(["Budget", "Train images"] + heads, table)


def learning_curve_figure(summary: dict[Cell, dict[str, dict]]) -> Figure:
    """HEADLINE metrics against the number of labelled training images (log x, ticked at the sweep's real
    budgets: images and share of the training labels): one line per encoder x head, its mean over seeds with a
    ± sd band (the legend says so)."""
    from matplotlib.patches import Patch

    figure = Figure(figsize=(13, 4.5), layout="constrained")
    axes_by_metric = figure.subplots(1, len(HEADLINE))
    ticks = {}  # budget -> mean labelled images at that budget (over the cells that ran it)
    for (_, _, budget), cell in summary.items():
        ticks.setdefault(budget, []).append(cell["train_images"]["mean"])
    seeds = max((cell[metric]["n_seeds"] for cell in summary.values() for metric in HEADLINE if metric in cell), default=0)
    for axes, metric in zip(axes_by_metric, HEADLINE):
        for (encoder, head), cells in _series(summary).items():
            x = np.array([cell["train_images"]["mean"] for cell in cells])
            mean = np.array([cell[metric]["mean"] for cell in cells])
            sd = np.nan_to_num(np.array([cell[metric]["sd"] for cell in cells]))
            line = axes.plot(x, mean, "o-", markersize=3, label=f"{encoder} · {head}")[0]
            axes.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.15, linewidth=0)
        axes.set(xscale="log", xlabel="Labelled training images (share of the training labels)",
                 ylabel=f"{METRIC_LABELS[metric]} ({LEVEL} level)", title=f"{METRIC_LABELS[metric]}, mean over {seeds} seed{'s' if seeds != 1 else ''}")
        if ticks:
            budgets = sorted(ticks)
            axes.set_xticks([float(np.mean(ticks[b])) for b in budgets], [f"{np.mean(ticks[b]):.0f}\n({percent(b)})" for b in budgets])
            axes.minorticks_off()
        axes.grid(alpha=0.3, which="both")
    _legend(figure, axes_by_metric[-1], extra=[Patch(color="grey", alpha=0.3, label=f"band: ± 1 sd over {seeds} seeds")] if seeds > 1 else [])
    return figure


def heads_encoders_figure(summary: dict[Cell, dict[str, dict]]) -> Figure:
    """HEADLINE metrics at the largest budget as grouped bars: heads along x, one bar per encoder, ± sd."""
    figure = Figure(figsize=(13, 4.5), layout="constrained")
    axes_by_metric = figure.subplots(1, len(HEADLINE))
    full = max((b for _, _, b in summary), default=1.0)
    encoders = sorted({e for e, _, b in summary if b == full})
    heads = sorted({h for _, h, b in summary if b == full})
    width = 0.8 / max(len(encoders), 1)
    for axes, metric in zip(axes_by_metric, HEADLINE):
        for k, encoder in enumerate(encoders):
            leaves = [summary.get((encoder, head, full), {}).get(metric) for head in heads]
            mean = np.array([leaf["mean"] if leaf else math.nan for leaf in leaves])
            sd = np.nan_to_num(np.array([leaf["sd"] if leaf else math.nan for leaf in leaves]))
            x = np.arange(len(heads)) + (k - (len(encoders) - 1) / 2) * width
            axes.bar(x, np.nan_to_num(mean), width, yerr=sd, capsize=3, label=encoder)
            for position, value in zip(x, mean):
                if not math.isfinite(value):  # a cell that did not run: said, not drawn as a bar at 0
                    axes.text(position, 0.02, "n/a", ha="center", va="bottom", rotation=90, color="dimgrey")
        images = [cell["train_images"]["mean"] for (_, _, b), cell in summary.items() if b == full]
        axes.set_xticks(np.arange(len(heads)), heads)
        axes.set(ylabel=f"{METRIC_LABELS[metric]} ({LEVEL} level)",
                 title=f"{METRIC_LABELS[metric]}, {percent(full)} of the training labels" + (f" ({np.mean(images):.0f} images)" if images else ""))
        axes.grid(alpha=0.3, axis="y")
    from matplotlib.lines import Line2D

    _legend(figure, axes_by_metric[-1], extra=[Line2D([], [], color="black", marker="|", linestyle="none", markersize=10, label="error bar: ± 1 sd over seeds")])
    return figure


def percent(budget: float) -> str:
    """A label budget as a percentage of the training labels: 0.125 -> '12.5%'."""
    return f"{100 * budget:g}%"


def _legend(figure: Figure, axes: Any, extra: list[Any] | None = None) -> None:
    """One legend for both panels, right of them, where it hides no line or bar; `extra` handles (what a band
    or error bar is) go last."""
    handles, labels = axes.get_legend_handles_labels()
    if handles:  # a sweep whose cells all failed to run draws nothing to label
        extra = extra or []
        figure.legend(handles + extra, labels + [handle.get_label() for handle in extra], loc="outside right upper", fontsize="small")


def _series(summary: dict[Cell, dict[str, dict]]) -> dict[tuple[str, str], list[dict[str, dict]]]:
    """Each (encoder, head)'s cells in budget order."""
    series: dict[tuple[str, str], list[dict[str, dict]]] = defaultdict(list)
    for (encoder, head, _), cell in sorted(summary.items()):
        series[(encoder, head)].append(cell)
    return dict(series)
