"""`medembed compare`: run directories of any kind side by side, and each paired against a baseline.

Each run is read from its own run.json (kind, scorer, encoder, thresholds) and the fit's own metrics.json and
predictions.csv, never from its evaluations/ (re-evaluations are the run's, not its fit's). The side-by-side
table shows each run's headline (`medembed.protocol.metrics.headline_leaf`) and the intervals it carries; for two
runs or more, `medembed.protocol.paired` says whether each differs from the baseline (the first run, or
`baseline`) on the same test images.

One table of records (a row per run and level) feeds the CSV, JSON and Parquet outputs; the Markdown is the same
numbers formatted as report.md formats them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medembed.errors import MedembedError
from medembed.options.protocol import MAX_RESAMPLES
from medembed.protocol.metrics import headline_leaf
from medembed.protocol.report import COMPARE_METRICS, LEVELS, compare_table, format_cell, format_number, markdown_table, read_metrics_json
from medembed.runs.record import RunRecord, read_record

FORMATS = ("md", "csv", "json", "parquet")
PAIRED_RESAMPLES = 1000


@dataclass
class ComparedRun:
    """One run as compare reads it: its name in the tables, directory, record and the fit's metrics."""

    name: str
    directory: Path
    record: RunRecord
    metrics: dict[str, Any]


@dataclass
class Comparison:
    """The runs side by side at `level`, and the paired comparisons of each against the baseline (by run name)."""

    level: str
    runs: list[ComparedRun]
    baseline: str | None = None
    paired: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. runs paired on the images both scored (--intersect)


def compare_runs(run_dirs: list[Path], *, level: str = "study", baseline: Path | None = None, paired: bool = True,
                 intersect: bool = False, n_resamples: int = PAIRED_RESAMPLES) -> Comparison:
    """Read the runs (the baseline first: `baseline`, added if not among them, else the first run) and, with
    `paired` and two runs or more, pair each other run with the baseline on the same test images (`intersect`:
    on the images both scored, with a note, instead of refusing different test sets)."""
    if level not in LEVELS:
        raise MedembedError(f"compare: level must be image or study; got {level!r}")
    if not run_dirs:
        raise MedembedError("compare needs at least one run")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or not 1 <= n_resamples <= MAX_RESAMPLES:
        raise MedembedError(f"compare: --bootstrap must be an integer from 1 to {MAX_RESAMPLES:,}; got {n_resamples!r}")
    directories = [Path(d) for d in run_dirs]
    if baseline is not None:
        directories = [Path(baseline)] + [d for d in directories if d.resolve() != Path(baseline).resolve()]
    names = [d.name for d in directories]
    if len(set(names)) < len(names):  # runs of one name in different folders: named by their paths
        names = [str(d) for d in directories]
    names = [name if names[:k].count(name) == 0 else f"{name} ({names[:k].count(name) + 1})" for k, name in enumerate(names)]
    runs = []
    for name, directory in zip(names, directories):
        record = read_record(directory)  # a directory that is not a valid run fails here, naming it
        runs.append(ComparedRun(name, directory, record, read_metrics_json(directory / "metrics.json")))
    comparison = Comparison(level, runs)
    for run in runs:
        if getattr(run.record.options, "seeds", 1) > 1 and paired and len(runs) > 1:
            comparison.notes.append(f"{run.name} was fitted with {run.record.options.seeds} seeds: its paired differences are its first seed's "
                                    "(the scorer and predictions the run keeps)")
    if paired and len(runs) > 1:
        from medembed.protocol.paired import paired_comparison, pair

        base = _scored(runs[0])
        comparison.baseline = runs[0].name
        for run in runs[1:]:
            a, b, notes = pair(base, _scored(run), intersect=intersect)
            comparison.warnings += notes
            comparison.paired[run.name] = paired_comparison(a, b, n_resamples=n_resamples, seed=runs[0].record.protocol.seed)
    return comparison


def _scored(run: ComparedRun) -> Any:
    from medembed.protocol.paired import read_predictions

    record = run.record
    return read_predictions(run.directory / "predictions.csv", name=run.name, image_threshold=record.image_threshold,
                            study_threshold=record.study_threshold, aggregation=record.protocol.aggregation)


def about(record: RunRecord) -> dict[str, str]:
    """What a run is, as the table's columns: its kind, scorer (the head, ensemble, CNN or zero-shot) and encoder
    (the store fingerprint's, with the token level a head reads)."""
    encoder = record.fingerprint.get("encoder", "") or record.fingerprint.get("model_id", "")
    return {
        "Kind": record.kind,
        "Scorer": record.scorer,
        "Encoder": encoder + (f" @ {record.level}" if record.level else ""),
        "Seeds": str(getattr(record.options, "seeds", 1)),
    }


def comparison_markdown(comparison: Comparison) -> str:
    """The side-by-side table at the comparison's level, then the paired differences against the baseline."""
    results = {run.name: run.metrics for run in comparison.runs}
    table = compare_table(results, level=comparison.level, about={run.name: about(run.record) for run in comparison.runs})
    lines = [f"{comparison.level} level", "", table.rstrip("\n")]
    if comparison.paired:
        lines += ["", paired_markdown(comparison)]
    if comparison.warnings or comparison.notes:
        lines += ["", *[f"- {note}" for note in comparison.warnings + comparison.notes]]
    return "\n".join(lines) + "\n"


def paired_markdown(comparison: Comparison) -> str:
    """The paired differences of each run against the baseline, at image and study level."""
    header = ["Run", "Level", "Images", "AUROC (run vs baseline)", "Δ AUROC [CI]", "p (bootstrap)", "p (DeLong)",
              "Kappa (run vs baseline)", "Δ kappa [CI]", "p (bootstrap)"]
    rows, settings = [], set()
    for name, result in comparison.paired.items():
        for level, entry in result["levels"].items():
            auroc, kappa = entry["auroc"], entry["kappa"]
            settings.add((result["n_resamples"], result["alpha"], entry["unit"]))
            rows.append([
                name, level, f"{entry['n']} ({entry['n_pos']} abnormal)" if level == "image" else f"{entry['n']} studies",
                f"{format_number(auroc['b'], 'auroc')} vs {format_number(auroc['a'], 'auroc')}", _difference(auroc), _p(auroc["p_value"]), _p(auroc["delong"]["p_value"]),
                f"{format_number(kappa['b'], 'kappa')} vs {format_number(kappa['a'], 'kappa')}", _difference(kappa), _p(kappa["p_value"]),
            ])
    described = "; ".join(
        f"{round(100 * (1 - alpha))}% percentile interval of {n} paired resamples of {'studies' if unit == 'study' else unit + 's'}"
        for n, alpha, unit in sorted(settings)
    )
    note = (
        f"Δ = run − {comparison.baseline}, both runs scored on the same resamples ({described}); p two-sided, the bootstrap's "
        "the smallest level at which its interval excludes 0. DeLong's test takes the bootstrap's unit as its clusters "
        "(Obuchowski's variance), so several images of one patient are not independent evidence; each run's own calibrated "
        "thresholds decide its kappa."
    )
    return "\n".join([f"## Paired differences against {comparison.baseline}", "", *markdown_table(header, rows), "", note])


def _difference(entry: dict[str, Any]) -> str:
    """"+0.013 [−0.004, 0.031]": the difference signed, its interval as every interval is printed."""
    text = format_cell({"value": entry["difference"], "ci": entry["ci"]}, "difference")
    return f"+{text}" if text[0].isdigit() and not text.startswith("0.000") else text


def _p(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


RECORD_INFO = ("run", "directory", "level", "kind", "scorer", "encoder", "seeds", "n_resamples", "resampled", "alpha")
PAIRED_COLUMNS = ("baseline", "paired_images", "paired_resamples", "paired_unit",
                  "auroc_difference", "auroc_difference_low", "auroc_difference_high", "auroc_p_bootstrap", "auroc_p_delong",
                  "kappa_difference", "kappa_difference_low", "kappa_difference_high", "kappa_p_bootstrap")
RECORD_COLUMNS = RECORD_INFO + tuple(
    f"{metric}{suffix}" for metric in COMPARE_METRICS for suffix in ("", "_sd", "_low", "_high", "_first_seed")
) + PAIRED_COLUMNS


def comparison_records(comparison: Comparison) -> list[dict[str, Any]]:
    """One record per run and level (each level the run's metrics have), with RECORD_COLUMNS: plain numbers
    (None where undefined or not applicable). A metric's value is the run's headline (the mean over seeds for a run
    of several), _sd its sd over seeds, _low/_high and _first_seed the first seed's interval and value."""
    records = []
    for run in comparison.runs:
        info = about(run.record)
        for level in LEVELS:
            if level not in run.metrics:
                continue
            bootstrap = run.metrics[level].get("bootstrap") or {}
            record: dict[str, Any] = {
                "run": run.name, "directory": str(run.directory), "level": level, "kind": info["Kind"], "scorer": info["Scorer"],
                "encoder": info["Encoder"], "seeds": int(info["Seeds"]), "n_resamples": _int(bootstrap.get("n_resamples")),
                "resampled": bootstrap.get("unit") if bootstrap.get("n_resamples") else None, "alpha": _float(bootstrap.get("alpha")),
            }
            for metric in COMPARE_METRICS:
                leaf = headline_leaf(run.metrics, level, metric) or {}
                ci = leaf.get("ci") or [None, None]
                record |= {
                    metric: _float(leaf["mean"] if "mean" in leaf else leaf.get("value")), f"{metric}_sd": _float(leaf.get("sd")),
                    f"{metric}_low": _float(ci[0]), f"{metric}_high": _float(ci[1]), f"{metric}_first_seed": _float(leaf.get("value")),
                }
            record |= dict.fromkeys(PAIRED_COLUMNS)
            result = comparison.paired.get(run.name)
            if result is not None and level in result["levels"]:
                entry = result["levels"][level]
                record |= {
                    "baseline": comparison.baseline, "paired_images": result["images"], "paired_resamples": result["n_resamples"],
                    "paired_unit": entry["unit"], "auroc_p_delong": _float(entry["auroc"]["delong"]["p_value"]),
                }
                for metric in ("auroc", "kappa"):
                    record |= {
                        f"{metric}_difference": _float(entry[metric]["difference"]), f"{metric}_difference_low": _float(entry[metric]["ci"][0]),
                        f"{metric}_difference_high": _float(entry[metric]["ci"][1]), f"{metric}_p_bootstrap": _float(entry[metric]["p_value"]),
                    }
            records.append(record)
    return records


def _float(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def write_comparison(comparison: Comparison, fmt: str = "md", out: Path | None = None) -> str | None:
    """The comparison in `fmt`: md and json are returned as text (and written to `out` when given); csv is written to
    `out`, else to standard output; parquet needs `out` (a .parquet path)."""
    if fmt not in FORMATS:
        raise MedembedError(f"compare: --format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    from medembed._files import atomic_write_text

    if fmt == "md":
        text = comparison_markdown(comparison)
    elif fmt == "json":
        document = {"level": comparison.level, "baseline": comparison.baseline, "runs": comparison_records(comparison),
                    "notes": comparison.warnings + comparison.notes}
        text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    else:
        from medembed.tables import PARQUET_SUFFIX, write_table

        is_parquet = out is not None and Path(out).suffix.lower() == PARQUET_SUFFIX
        if fmt == "parquet" and not is_parquet:
            raise MedembedError("compare: --format parquet needs --out FILE.parquet (Parquet is binary, not for the terminal)")
        if fmt == "csv" and is_parquet:
            raise MedembedError(f"{out}: a .parquet path is written as Parquet; give --format parquet, or another name for CSV")
        rows = [[record[column] for column in RECORD_COLUMNS] for record in comparison_records(comparison)]
        write_table(out, RECORD_COLUMNS, rows, float_format=".6g")  # standard output for an `out` of None
        return None
    if out is not None:
        atomic_write_text(Path(out), text)
    return text

