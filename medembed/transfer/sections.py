"""Report sections (Markdown) and figures of the transfer kit, and the numbers behind them.

Every number comes from the statistic modules (`conformal`, `ood`, `drift`, `subgroups`); this module gathers
them for one evaluated set of rows and formats them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from medembed.protocol.report import format_cell, format_interval, markdown_table, write_metrics_json
from medembed.protocol.splits import Split
from medembed.transfer.conformal import coverage, fit_conformal, prediction_sets
from medembed.transfer.ood import embedding_matrix, ood_threshold
from medembed.options.transfer import TransferOptions
from medembed.transfer.reference import NO_EMBEDDINGS, SiteReference
from medembed.transfer.subgroups import subgroup_figure, subgroup_metrics

COMPARED = ("auroc", "sensitivity", "specificity", "kappa", "f1", "ppv", "npv", "brier", "ece")


def conformal_summary(reference: SiteReference, p: np.ndarray, y: np.ndarray, alphas: tuple[float, ...]) -> dict[str, Any]:
    """{alpha: {"marginal" | "class_conditional": coverage(...)}} of sets calibrated on the reference's val."""
    result = {}
    for alpha in alphas:
        result[f"{alpha:g}"] = {
            variant: coverage(prediction_sets(p, fit_conformal(reference.val_p, reference.val_y, alpha, conditional)), y)
            for variant, conditional in (("marginal", False), ("class_conditional", True))
        }
    return result


def ood_scores(reference: SiteReference, X: Any, false_alarm: float) -> tuple[np.ndarray, float] | None:
    """Per-row OOD scores [N] and the flag threshold at `false_alarm`; None without an embedding reference."""
    matrix = embedding_matrix(X) if reference.has_embeddings and X is not None else None
    if matrix is None:
        return None
    return reference.ood_model().score(matrix), ood_threshold(reference.val_ood, false_alarm)


def source_sections(directory: Path, reference: SiteReference | None, rows: Split, p: np.ndarray, threshold: float,
                    options: TransferOptions, n_resamples: int, seed: int, unavailable: str = "") -> list[str]:
    """The run's own evaluated split: conformal coverage, OOD false alarms, subgroups (with --by). Writes
    transfer.json and figures/subgroups.png into `directory`; returns the report sections. Without a reference
    (its inputs unreadable: `unavailable` says why) only the subgroups are computed."""
    result: dict[str, Any] = {}
    if reference is not None:
        result["conformal"] = conformal_summary(reference, p, rows.y, options.alphas)
        scored = ood_scores(reference, rows.X, options.false_alarm)
        if scored is not None:
            scores, cut = scored
            result["ood"] = {"false_alarm": options.false_alarm, "threshold": cut, "flagged": float((scores > cut).mean()), "n": len(scores)}
    if options.columns:
        result["subgroups"] = subgroup_metrics(p, rows, options.columns, threshold, n_resamples, seed)
        save_subgroup_figure(directory, result["subgroups"])
    write_metrics_json(result, Path(directory) / "transfer.json")
    if reference is None:
        sections = [f"## Conformal prediction sets and OOD score\n\nUnavailable: {unavailable}"]
    else:
        sections = [conformal_markdown(result["conformal"], where="this split")]
        sections.append(ood_markdown(result.get("ood"), where="this split (in distribution: the flagged share is the false-alarm rate)"))
    if "subgroups" in result:
        sections.append(subgroups_markdown(result["subgroups"]))
    return sections


def save_subgroup_figure(directory: Path, result: dict[str, Any]) -> None:
    """figures/subgroups.png (300 dpi) and .pdf; a figure that cannot be drawn is one FigureWarning, not a failure."""
    import warnings

    from medembed.protocol.figures import FORMATS, FigureWarning, save_figure

    figures = Path(directory) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    files = [figures / f"subgroups.{suffix}" for suffix in FORMATS]
    try:
        save_figure(lambda: subgroup_figure(result), files)
    except Exception as error:  # noqa: BLE001 - a figure is a by-product: the report is written without it
        for file in files:
            file.unlink(missing_ok=True)
        warnings.warn(f"{files[0]}: figure not drawn ({type(error).__name__}: {error})", FigureWarning, stacklevel=2)


def _rate(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def conformal_markdown(result: dict[str, Any], where: str) -> str:
    """Coverage per class and refer rate per alpha and variant."""
    rows = [
        [alpha, variant.replace("_", "-"), f"{1 - float(alpha):.2f}", _rate(c["coverage"]), _rate(c["coverage_normal"]),
         _rate(c["coverage_abnormal"]), _rate(c["refer_rate"]), _rate(c["share_empty"])]
        for alpha, variants in result.items() for variant, c in variants.items()
    ]
    header = ["alpha", "quantiles", "nominal", "coverage", "normal", "abnormal", "refer rate", "empty sets"]
    return "\n".join([
        "## Conformal prediction sets", "",
        f"Split-conformal sets calibrated on the run's val, evaluated on {where}: each image gets {{normal}}, {{abnormal}} "
        "or, when the model cannot tell at this alpha, {both} (refer). Coverage = share of images whose true label is in the set.",
        "", *markdown_table(header, rows),
    ])


def ood_markdown(result: dict[str, Any] | None, where: str) -> str:
    if result is None:
        return "## Out-of-distribution score\n\n" + NO_EMBEDDINGS + "."
    return "\n".join([
        "## Out-of-distribution score", "",
        f"Mahalanobis distance to the run's train embeddings; flagged above {result['threshold']:.2f}, the val quantile at a "
        f"{result['false_alarm']:.0%} false-alarm rate. Flagged on {where}: {result['flagged']:.1%} of {result['n']} images.",
    ])


def subgroups_markdown(result: dict[str, Any]) -> str:
    lines = ["## Subgroups", "", "Image level at the run's threshold; 95% bootstrap intervals within each group. Figure: figures/subgroups.png."]
    for column, entry in result.items():
        metrics = ("n", "n_pos", "auroc", "sensitivity", "specificity", "kappa")
        lines += ["", f"### By {column}", ""]
        lines += markdown_table([column, *metrics], [[g, *(format_cell(m[k], k) for k in metrics)] for g, m in entry["groups"].items()])
        gaps = entry["largest_gap"]
        if gaps:
            lines += ["", "Largest gaps: " + "; ".join(f"{k} {v['gap']:.3f} ({v['high']} vs {v['low']})" for k, v in gaps.items()) + "."]
    return "\n".join(lines)


def comparison_markdown(comparison: dict[str, Any], source_name: str, target_name: str) -> str:
    lines = ["## External validation", "",
             f"The run's calibration and thresholds applied unchanged. Δ = {target_name} − {source_name} (the run's own test), "
             "95% interval from independent bootstrap resamples of both."]
    for level, metrics in comparison.items():
        rows = [[m, _rate(v["source"]), _rate(v["target"]), _signed(v["difference"]), _interval(v["difference_ci"])] for m, v in metrics.items()]
        lines += ["", f"### {level.capitalize()} level", ""] + markdown_table(["metric", source_name, target_name, "Δ", "Δ 95% CI"], rows)
    return "\n".join(lines)


def drift_markdown(drift: dict[str, Any]) -> str:
    lines = ["## Drift (no labels needed)", ""]
    shift = drift.get("shift")
    if shift:
        lines.append(f"- Embedding shift vs the run's train sample: MMD² {shift['mmd2']:.4f}, permutation p = {shift['p_value']:.4f} "
                     f"({shift['permutations']} permutations; {shift['n_reference']} reference and {shift['n_target']} target rows).")
    else:
        lines.append(f"- Embedding shift: {drift.get('unavailable', NO_EMBEDDINGS)}.")
    prevalence = drift["prevalence"]
    lines.append(f"- Predicted prevalence: {prevalence['target_called_abnormal']:.1%} called abnormal here vs {prevalence['source_called_abnormal']:.1%} "
                 f"on the run's val (ratio {_rate(prevalence['called_ratio'])}); mean probability {prevalence['target_mean_probability']:.3f} vs "
                 f"{prevalence['source_mean_probability']:.3f}.")
    return "\n".join(lines)


def _signed(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.3f}".replace("-", "\u2212")  # as format_interval writes it


def _interval(ci: list[float] | None) -> str:
    return "n/a" if not ci or any(v is None or math.isnan(v) for v in ci) else format_interval(ci)


def fitted_extras(fitted: Any, splits: dict[str, Split], seed: int, n_resamples: int, options: TransferOptions | None = None,
                  sections: list[str] | tuple[str, ...] = ()) -> Any:
    """What a fit adds to its run directory, for one `medembed.protocol.steps.Fitted` of any scorer: the reference (val
    scores; a train-embedding sample for embedding scorers) and the report sections of the test split, then
    `sections` (finished ones the fit wrote, e.g. an ensemble's Members). Returned as the `extras` callable
    `medembed.runs.writer.write_run` takes."""
    from medembed.scorers.contract import positive_scores
    from medembed.transfer.reference import REFERENCE_DIR, build_reference

    val = splits["val"]
    p_val = fitted.calibration.calibrator.transform(positive_scores(fitted.scorer, val.X, {"body_part": val.body_part, "study_id": val.study_id}))
    train = splits["train"] if getattr(fitted.scorer, "consumes", "embeddings") == "embeddings" else None  # pixels are no embedding space
    reference = build_reference(p_val, val, train, seed=seed)

    def extras(directory: Path) -> list[str]:
        reference.save(Path(directory) / REFERENCE_DIR)
        return source_sections(directory, reference, splits["test"], fitted.p_test, fitted.calibration.image_threshold,
                               options or TransferOptions(), n_resamples, seed) + list(sections)

    return extras
