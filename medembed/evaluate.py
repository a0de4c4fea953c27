"""Re-evaluate any run directory: its own test split (or other splits, other stores with its fingerprint), with
the transfer sections.

Every evaluation is written beside the fit's own results, never over them: into RUN/evaluations/NAME/, NAME
saying what was asked (`evaluation_name`: e.g. ``test-bootstrap200-by-site``), with its own metrics.json,
report.md, figures/, predictions.csv, transfer.json and evaluation.json (what was asked, in full). The run's
metrics.json and report.md stay those of its fit, which `compare` reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from medembed._files import atomic_write_json, replaced_directory
from medembed.errors import MedembedError
from medembed.options import check_positive, long_flags
from medembed.options.transfer import TransferOptions
from medembed.protocol.steps import evaluate_split
from medembed.runs.inputs import run_inputs, with_manifest_columns
from medembed.runs.record import RUN_FILE, load_run
from medembed.runs.writer import Evaluation, write_evaluation
from medembed.transfer.reference import run_reference
from medembed.transfer.sections import source_sections
from medembed.transfer.subgroups import check_columns

EVALUATIONS_DIR = "evaluations"
_MAX_NAME = 120  # longer names (many stores, long column lists) end in a hash of the whole name instead
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")


def evaluation_name(split: str = "test", stores: list[Path] | None = None, n_resamples: int | None = None,
                    transfer: TransferOptions | None = None) -> str:
    """The folder name of an evaluation, from what was asked: the split, then each option given that differs
    from its default, as its flag and value: ``test``, ``test-bootstrap200-by-site``, ``val-on-other``.

    Deterministic, and safe as one path component: characters other than letters, digits and ``._+=-`` become
    ``_``; a name longer than 120 characters keeps its first 100 and a hash of the whole."""
    parts = [split]
    if stores:
        parts.append("on-" + "+".join(Path(store).stem for store in stores))
    if n_resamples is not None:
        parts.append(f"bootstrap{n_resamples}")
    transfer = transfer or TransferOptions()
    defaults = TransferOptions()
    for option in dataclasses.fields(TransferOptions):
        value = getattr(transfer, option.name)
        if value == getattr(defaults, option.name):
            continue
        flag = long_flags(option)[0].lstrip("-")
        if isinstance(value, bool):
            parts.append(flag)
        elif option.name == "by":
            parts.append(f"{flag}-" + "-".join(transfer.columns))
        elif isinstance(value, Path):
            parts.append(f"{flag}-{value.stem}")
        elif isinstance(value, float):
            parts.append(f"{flag}{value:g}")
        else:
            parts.append(f"{flag}{value}")
    name = _UNSAFE.sub("_", "-".join(parts))
    if len(name) > _MAX_NAME:
        name = f"{name[:100]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def evaluation_directory(run_dir: Path, name: str) -> Path:
    """RUN/evaluations/NAME, refused unless it stays inside the run's evaluations folder (a real folder, not a link)."""
    folder = Path(run_dir) / EVALUATIONS_DIR
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise MedembedError(f"{folder}: must be a folder of the run, not a link or a file")
    target = folder / name
    if name in ("", ".", "..") or "/" in name or target.resolve().parent != folder.resolve():
        raise MedembedError(f"{target}: an evaluation's folder must lie directly in {folder}")
    if target.is_symlink():
        raise MedembedError(f"{target}: is a link; an evaluation is written into a folder of the run's own")
    return target


def ensemble_members_sections(run: Any, rows: Any, p: Any, metrics: dict[str, Any], stores: list[Path] | None) -> list[str]:
    """An ensemble's Members section for this evaluation (of the scorer the run keeps, its first seed's); [] for
    any other run. Its stores are named by their file names only (run.json is read as text, nothing is opened)."""
    if run.record.kind != "ensemble":
        return []
    from medembed.protocol.members import member_aurocs, members_section
    from medembed.protocol.steps import Fitted
    from medembed.runs.inputs import run_members

    names = [Path(s).name for s in (stores or [m["store"] for m in run_members(run.record.details, run.directory / RUN_FILE)])]
    fitted = Fitted(run.scorer, run.calibration, p, metrics, run.record.protocol.seed)
    table = member_aurocs([fitted], rows, run.record.protocol.aggregation, run.scorer.member_reads(names))
    return [members_section(table, run.scorer.combine)]


def evaluate_run(
    run_dir: Path, stores: list[Path] | None = None, split: str = "test", n_resamples: int | None = None, transfer: TransferOptions | None = None,
    image_root: Path | None = None,
) -> dict[str, Any]:
    """Re-evaluate any run directory on its inputs (or other stores with the same fingerprint), with the transfer
    sections (conformal coverage, OOD false alarms, subgroups of `transfer.by`); writes metrics, report, figures
    and predictions into RUN/evaluations/`evaluation_name(...)`/ (the fit's own files are left as they are).
    report.html's gallery reads the images under `image_root` (default: the root the evaluated store recorded).
    Returns the metrics."""
    run = load_run(run_dir)
    options = run.record.protocol
    if n_resamples is not None:
        check_positive("bootstrap", n_resamples, minimum=0)
        options = replace(options, n_resamples=n_resamples)
    transfer = transfer or TransferOptions()
    out = evaluation_directory(run_dir, evaluation_name(split, stores, n_resamples, transfer))
    rows = run_inputs(run).rows(split, stores)
    p = run.probabilities(rows)
    if transfer.columns_from is not None:
        rows = with_manifest_columns(rows, transfer.columns_from)
    check_columns(rows, transfer.columns)  # a wrong --by fails before the bootstrap
    metrics = evaluate_split(p, rows, run.calibration, options, seed=options.seed)
    try:
        reference, unavailable = run_reference(run), ""
    except MedembedError as error:  # e.g. --store given and the run's own store gone: the metrics still come
        reference, unavailable = None, str(error)
    members = ensemble_members_sections(run, rows, p, metrics, stores)
    extras = lambda directory: source_sections(  # noqa: E731
        directory, reference, rows, p, run.calibration.image_threshold, transfer, options.n_resamples, options.seed, unavailable) + members
    record = run.record
    if stores:  # the evaluated stores' images, not the fit's, are what report.html's gallery shows
        record = replace(record, inputs={**record.inputs, "stores": [str(Path(s).resolve()) for s in stores]})
    seeds = getattr(record.options, "seeds", 1)
    if seeds > 1:  # the run keeps one scorer: its headline's mean ± sd cannot be re-evaluated
        record = replace(record, notes=[*record.notes, f"fitted with {seeds} seeds; the run keeps the first seed's scorer, evaluated here"])
    asked = {
        "run": str(Path(run_dir)), "split": split, "stores": [str(Path(s).resolve()) for s in stores] if stores else None,
        "n_resamples": options.n_resamples, "transfer": {f.name: getattr(transfer, f.name) for f in dataclasses.fields(TransferOptions)},
    }
    with replaced_directory(out) as staging:
        write_evaluation(staging, record, Evaluation(p, rows, metrics), title=f"{Path(run_dir).name}, {out.name}", extras=extras,
                         scorer=run.scorer, image_root=None if image_root is None else Path(image_root))
        atomic_write_json(staging / "evaluation.json", asked)
    return metrics
