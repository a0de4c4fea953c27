"""Figures of a run: ROC, PR, reliability, metric against threshold, per-body-part bars; PNG at 300 dpi and PDF.

Every curve comes from ``medembed.protocol.calibrate.sweep_thresholds``, the sweep that picks the thresholds, and
every metric from ``medembed.protocol.metrics``. Figures are drawn on ``matplotlib.figure.Figure`` objects, which
render with Agg and touch no pyplot state. Each figure is written twice: ``<name>.png`` (300 dpi, for slides and
the HTML report) and ``<name>.pdf`` (vector, for a paper), at a single-column size (3.5 x 3.1 inches).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from matplotlib.figure import Figure

from medembed.errors import MedembedError
from medembed.protocol.calibrate import check_scores, confusion_metrics, sweep_thresholds
from medembed.protocol.metrics import binary_metrics
from medembed.protocol.report import LEVELS, METRIC_LABELS

_FIGURE_SIZE = (3.5, 3.1)  # inches: one column of a two-column paper
_DPI = 300
FORMATS = ("png", "pdf")  # every figure in each; the PNG is the one plot_figures returns
_FONT = {"font.size": 7.0, "axes.titlesize": 7.5, "axes.labelsize": 7.0, "legend.fontsize": 6.0,
         "xtick.labelsize": 6.5, "ytick.labelsize": 6.5, "figure.titlesize": 7.0}
_MARGINS = {"left": 0.15, "right": 0.97, "bottom": 0.13, "top": 0.82}
_UNITS = {"image": ("image", "images"), "study": ("study", "studies")}
_Z95 = 1.959963984540054  # two-sided 95% normal quantile (Wilson intervals of the reliability bins)


class FigureWarning(UserWarning):
    """A figure that could not be drawn; the run is written without it."""


@dataclass(frozen=True)
class FigureContext:
    """What a figure's title names: the run, its scorer (head) and encoder, and the threshold rule. Empty fields
    are left out of the title."""

    run: str = ""
    scorer: str = ""
    encoder: str = ""
    threshold_rule: str = ""

    def heading(self) -> str:
        """The line over every figure: "run frac-logreg · logreg on efficientnet-lite0"."""
        model = " on ".join(part for part in (self.scorer, self.encoder) if part)
        return " · ".join(part for part in (f"run {self.run}" if self.run else "", model) if part)


@dataclass(frozen=True)
class PartBar:
    """One bar of the per-body-part figure: the value and its interval bounds (NaN: undefined / none), and the
    n and abnormal count of the part (-1: not known)."""

    value: float
    low: float
    high: float
    n: int = -1
    n_pos: int = -1


def plot_figures(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    out_dir: Path,
    *,
    level: str,
    body_parts: np.ndarray | None = None,
    result: dict | None = None,
    context: FigureContext | None = None,
) -> list[Path]:
    """Draw the figures of one level (y [N], p [N] of images or studies) in out_dir; returns the PNGs' paths (a
    PDF of each lies beside it).

    roc_<level> and pr_<level> with the operating point marked; reliability_<level>: equal-count bins (their
    number grows with n, 3 to 15, about 50 cases a bin) with 95% Wilson intervals, and the histogram of p under
    it; thresholds_<level> (sensitivity, specificity, F1, kappa against the threshold, the chosen one marked)
    and, when per-body-part numbers exist, body_parts_<level>: AUROC per body part with n per bar, "n/a" written
    where AUROC is undefined (a part with one class), the interval from result's "by_body_part" tables (or ± sd
    for a seed summary), else point values from body_parts. Titles name `context`'s run, scorer and encoder and n.
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
    context = context or FigureContext()
    operating = binary_metrics(y, p, threshold)
    parts, band = _body_part_auroc(y, p, threshold, body_parts, result, level)
    heading = context.heading()
    counts = _count_phrase(len(y), int(sweep.n_pos), level)
    figures: dict[str, Callable[[], Figure]] = {
        f"roc_{level}": lambda: _roc_figure(sweep, operating, f"ROC, {level} level\n{counts}"),
        f"pr_{level}": lambda: _pr_figure(sweep, operating, f"Precision-recall, {level} level\n{counts}"),
        f"reliability_{level}": lambda: _reliability_figure(y, p, operating, f"Reliability, {level} level\n{counts}", level),
        f"thresholds_{level}": lambda: _threshold_figure(sweep, threshold, f"Metrics against threshold, {level} level\n{counts}", context.threshold_rule),
    }
    if parts:
        figures[f"body_parts_{level}"] = lambda: _body_part_figure(parts, level, band, f"AUROC per body part, {level} level\n{counts}")
    paths = []
    for name, draw in figures.items():
        files = [out_dir / f"{name}.{suffix}" for suffix in FORMATS]
        try:
            save_figure(_with_heading(draw, heading), files)
        except Exception as error:  # noqa: BLE001 - a figure is a by-product: the run is written without it
            for file in files:
                if file.is_file():
                    file.unlink()  # a half-written figure
            warnings.warn(f"{files[0]}: figure not drawn ({type(error).__name__}: {error})", FigureWarning, stacklevel=2)
            continue
        paths.append(files[0])
    return paths


def save_figure(draw: Callable[[], Figure], files: list[Path]) -> None:
    """Draw a figure in the paper style and write it to each file (format from the suffix; PNG at 300 dpi).

    The layout is computed once, for the first file, then frozen: the other formats reuse it instead of
    solving the constrained layout again (half the cost of two formats)."""
    import matplotlib

    with matplotlib.rc_context(_FONT):
        figure = draw()
        for k, file in enumerate(files):
            figure.savefig(file, dpi=_DPI, metadata=_metadata(file), **_writer_options(file))
            if k == 0 and figure.get_layout_engine() is not None:
                figure.set_layout_engine("none")


def _writer_options(file: Path) -> dict[str, Any]:
    # zlib level 3 instead of PIL's 6: a third of the PNG time for files about 10% larger.
    return {"pil_kwargs": {"compress_level": 3}} if file.suffix == ".png" else {}


def _metadata(file: Path) -> dict[str, Any]:
    # No creation date in the PDF: the same run writes the same bytes.
    return {"CreationDate": None} if file.suffix == ".pdf" else {}


def _with_heading(draw: Callable[[], Figure], heading: str) -> Callable[[], Figure]:
    def drawn() -> Figure:
        figure = draw()
        if heading:
            figure.suptitle(heading, fontsize="small", color="dimgrey")
        return figure

    return drawn


def _count_phrase(n: int, n_pos: int, level: str) -> str:
    """The second title line: "n = 809 images (144 abnormal)"."""
    return f"n = {n} {_UNITS[level][n != 1]} ({n_pos} abnormal)"


def _new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    figure = Figure(figsize=_FIGURE_SIZE)
    # Fixed margins (fractions of the figure) fitted to _FIGURE_SIZE and _FONT: solving the constrained layout
    # cost more than drawing the figure.
    figure.subplots_adjust(**_MARGINS)
    axes = figure.add_subplot()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _mark_operating_point(axes: Any, x: float, y: float, threshold: float) -> None:
    axes.plot(x, y, "o", color="crimson", markersize=4, label=f"operating point (threshold {threshold:.3f})")


def _roc_figure(sweep: Any, operating: dict[str, float], title: str) -> Figure:
    figure, axes = _new_axes(title, "1 - specificity", "Sensitivity")
    false_positive_rate = np.r_[0, sweep.fp / sweep.n_neg]
    true_positive_rate = np.r_[0, sweep.tp / sweep.n_pos]
    axes.plot(false_positive_rate, true_positive_rate, linewidth=1.2, label=f"ROC (AUROC {operating['auroc']:.3f})")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    _mark_operating_point(axes, 1 - operating["specificity"], operating["sensitivity"], operating["threshold"])
    axes.set(xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right")
    return figure


def _pr_figure(sweep: Any, operating: dict[str, float], title: str) -> Figure:
    figure, axes = _new_axes(title, "Recall (sensitivity)", "Precision (PPV)")
    recall = np.r_[0, sweep.tp / sweep.n_pos]
    precision = np.r_[1, sweep.tp / (sweep.tp + sweep.fp)]
    # "pre": precision at recall r_k holds over (r_{k-1}, r_k], the area that average precision sums.
    axes.step(recall, precision, where="pre", linewidth=1.2, label=f"PR (AUPRC {operating['auprc']:.3f})")
    prevalence = sweep.n_pos / (sweep.n_pos + sweep.n_neg)
    axes.axhline(prevalence, linestyle=":", color="grey", label=f"prevalence {prevalence:.3f} (chance)")
    _mark_operating_point(axes, operating["sensitivity"], operating["ppv"], operating["threshold"])
    axes.set(xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower left")
    return figure


def reliability_bin_count(n: int) -> int:
    """Equal-count bins of the reliability figure for n cases: about 50 a bin, 3 to 15 bins."""
    return int(np.clip(round(n / 50), 3, 15))


def quantile_bins(y: np.ndarray, p: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """Equal-count bins of p: count [B], mean_p [B], frac_pos [B] and its 95% Wilson interval low/high [B].

    Edges are quantiles of p; tied probabilities stay in one bin, so there may be fewer than n_bins bins."""
    edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1)[1:-1]))
    bins = np.searchsorted(edges, p, side="right")
    count = np.bincount(bins, minlength=len(edges) + 1).astype(np.float64)
    kept = count > 0
    count = count[kept]
    mean_p = np.bincount(bins, weights=p, minlength=len(edges) + 1)[kept] / count
    frac_pos = np.bincount(bins, weights=y, minlength=len(edges) + 1)[kept] / count
    low, high = wilson_interval(frac_pos, count)
    return {"count": count.astype(np.int64), "mean_p": mean_p, "frac_pos": frac_pos, "low": low, "high": high}


def wilson_interval(fraction: np.ndarray, n: np.ndarray, z: float = _Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of binomial proportions `fraction` out of `n` trials (arrays of one shape)."""
    denominator = 1 + z**2 / n
    centre = (fraction + z**2 / (2 * n)) / denominator
    half = z * np.sqrt(fraction * (1 - fraction) / n + z**2 / (4 * n**2)) / denominator
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def _reliability_figure(y: np.ndarray, p: np.ndarray, operating: dict[str, float], title: str, level: str) -> Figure:
    bins = quantile_bins(y, p, reliability_bin_count(len(y)))
    figure = Figure(figsize=(_FIGURE_SIZE[0], _FIGURE_SIZE[1] * 1.15))
    figure.subplots_adjust(**(_MARGINS | {"left": 0.17, "bottom": 0.11, "top": 0.85, "hspace": 0.08}))
    curve_axes, count_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    curve_axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    per_bin = int(round(np.median(bins["count"])))
    curve_axes.errorbar(
        bins["mean_p"], bins["frac_pos"], yerr=np.maximum(0, [bins["frac_pos"] - bins["low"], bins["high"] - bins["frac_pos"]]),
        fmt="o-", markersize=3, linewidth=1, capsize=2,
        label=f"{len(bins['count'])} equal-count bins (~{per_bin} {_UNITS[level][1]} each),\n95% Wilson interval per bin",
    )
    curve_axes.plot([], [], " ", label=f"ECE {operating['ece']:.3f} (15 equal-width bins)")
    curve_axes.set(title=title, ylabel="Fraction abnormal", xlim=(0, 1), ylim=(0, 1.01))
    curve_axes.grid(alpha=0.3)
    curve_axes.legend(loc="upper left")
    count_axes.hist(p, bins=20, range=(0, 1), color="grey")
    count_axes.set(xlabel="Predicted probability", ylabel=f"{_UNITS[level][1].capitalize()}\n(20 bins)")
    return figure


def _threshold_figure(sweep: Any, threshold: float, title: str, rule: str) -> Figure:
    figure, axes = _new_axes(title, "Threshold (abnormal when p >= threshold)", "Value")
    rates = confusion_metrics(sweep.tp, sweep.fp, sweep.tn, sweep.fn)
    for metric in ("sensitivity", "specificity", "f1", "kappa"):
        axes.plot(sweep.thresholds, rates[metric], linewidth=1, label=METRIC_LABELS[metric])
    chosen = f"chosen on val ({rule}): {threshold:.3f}" if rule else f"chosen threshold {threshold:.3f}"
    axes.axvline(threshold, color="crimson", linestyle="--", linewidth=1, label=chosen)
    axes.set(xlim=(0, 1), ylim=(min(0.0, float(np.nanmin(rates["kappa"]))), 1.01))
    axes.legend(loc="best")
    return figure


def _body_part_auroc(
    y: np.ndarray, p: np.ndarray, threshold: float, body_parts: np.ndarray | None, result: dict | None, level: str
) -> tuple[dict[str, PartBar], str]:
    """({part: PartBar}, what the interval is): the value, its interval (mean ± sd for a seed summary) and the
    part's n from the result's tables, else computed per part with no interval (NaN bounds). Undefined: NaN."""
    level_result = (result or {}).get(level, result or {})  # a whole result or just this level's entry
    tables = level_result.get("by_body_part") or {}
    if tables:
        parts, band = {}, ""
        for part, table in tables.items():
            leaf = table["auroc"]
            n, n_pos = (_center(table.get(key)) for key in ("n", "n_pos"))
            counts = (int(n) if math.isfinite(n) else -1, int(n_pos) if math.isfinite(n_pos) else -1)
            # dtype=float turns the None of a reloaded metrics.json into NaN.
            if "mean" in leaf:
                center, spread = np.array([leaf["mean"], leaf["sd"]], dtype=float)
                parts[part] = PartBar(center, center - spread, center + spread, *counts)
                band = f"± 1 sd over {leaf.get('n_seeds', 'the')} seeds"
            else:
                center, low, high = np.array([leaf["value"], *(leaf.get("ci") or (None, None))], dtype=float)
                parts[part] = PartBar(center, low, high, *counts)
                band = band or _bootstrap_band(level_result.get("bootstrap"))
        return parts, band
    if body_parts is None:
        return {}, ""
    body_parts = np.asarray(body_parts).astype(str)
    if body_parts.shape != y.shape:
        raise MedembedError(f"body_parts must have one entry per row ({len(y)}); got shape {body_parts.shape}")
    return {
        str(part): PartBar(binary_metrics(y[rows], p[rows], threshold)["auroc"], math.nan, math.nan, int(rows.sum()), int(y[rows].sum()))
        for part in np.unique(body_parts)
        for rows in [body_parts == part]
    }, ""


def _center(leaf: dict | None) -> float:
    if not leaf:
        return math.nan
    value = leaf.get("mean", leaf.get("value"))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _bootstrap_band(bootstrap: dict | None) -> str:
    if not bootstrap or not bootstrap.get("n_resamples"):
        return ""
    confidence = round(100 * (1 - float(bootstrap.get("alpha", 0.05))))
    unit = bootstrap.get("unit", "")
    return f"{confidence}% bootstrap interval\n({bootstrap['n_resamples']} resamples{' of ' + unit + 's' if unit else ''})"


def _undefined_reason(bar: PartBar) -> str:
    if bar.n_pos == 0:
        return "n/a: no abnormal"
    if bar.n >= 0 and bar.n_pos == bar.n:
        return "n/a: no normal"
    return "n/a"


def _bar_label(name: str, bar: PartBar) -> str:
    if bar.n < 0:
        return name
    return f"{name}\nn={bar.n}" + (f"\n{bar.n_pos} abn." if bar.n_pos >= 0 else "")


def _body_part_figure(parts: dict[str, PartBar | tuple[float, float, float]], level: str, band: str = "", title: str = "") -> Figure:
    """AUROC per body part as `draw_bars` draws it, the chance line at 0.5."""
    bars = {name: bar if isinstance(bar, PartBar) else PartBar(*bar) for name, bar in parts.items()}
    figure, axes = _new_axes(title or f"AUROC per body part ({level} level)", "", "AUROC")
    draw_bars(axes, bars, "AUROC", band, chance=0.5)
    figure.subplots_adjust(bottom=0.27 if len(bars) > 5 else 0.2)
    return figure


def draw_bars(axes: Any, bars: dict[str, PartBar], label: str, band: str = "", chance: float | None = None) -> None:
    """One bar per group at its value with n (and abnormal count) under it; an undefined value (NaN) written
    "n/a" (with why, from the counts) over a hatched outline, never a bar at 0; each interval drawn from its low
    to its high bound, named `band` in the legend. For any per-group metric in [0, 1] (body parts, subgroups).

    A percentile bootstrap interval need not contain its point estimate (a skewed metric with few resamples), so
    the interval is drawn on its own, not as distances from the bar's top (which would be negative there)."""
    names = list(bars)
    values, low, high = np.array([(bar.value, bar.low, bar.high) for bar in bars.values()], dtype=np.float64).reshape(-1, 3).T
    x = np.arange(len(names))
    defined = np.isfinite(values)
    axes.bar(x[defined], values[defined], color="steelblue", label=label)
    for k in np.flatnonzero(~defined):
        axes.bar(x[k], 1.0, color="none", edgecolor="lightgrey", hatch="///", linewidth=0.5)
        axes.text(x[k], 0.5, _undefined_reason(bars[names[k]]), rotation=90, ha="center", va="center", color="dimgrey",
                  bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    drawn = np.isfinite(low) & np.isfinite(high)
    if drawn.any():
        low, high = np.minimum(low, high)[drawn], np.maximum(low, high)[drawn]
        # Centred on the interval's midpoint with half its width: the bar spans exactly [low, high].
        axes.errorbar(x[drawn], (low + high) / 2, yerr=(high - low) / 2, fmt="none", ecolor="black", capsize=3,
                      linewidth=0.8, label=band or "interval")
    if chance is not None:
        axes.axhline(chance, linestyle=":", color="grey", label=f"chance ({chance:g})")
    # Room above the bars for the legend; the axis itself is labelled 0 to 1 only.
    axes.set(ylim=(0, 1.38), yticks=np.linspace(0, 1, 6))
    axes.set_xticks(x, [_bar_label(name, bars[name]) for name in names])
    axes.tick_params(axis="x", labelrotation=45 if len(names) > 5 else 0, labelsize=5.5 if len(names) > 5 else 6.5)
    axes.legend(loc="upper center", ncols=2)
