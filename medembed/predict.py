"""A fitted run of any kind applied to new images end to end: inputs -> scorer -> calibration -> threshold -> CSV.

Embedding runs rebuild the run's own encoder from its record (`medembed.runs.inputs`) and check it against the run's fingerprint before
anything is scored; images go through the same resumable extractor as training data, into a cache store beside
the output named by a hash of the inputs (so another set of files under the same names is never mistaken for
this one). Image runs (the CNN) decode with their own preprocessing. Unreadable files are reported per file
and the rest are still scored.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medembed._csv import text_cell
from medembed._files import atomic_write_text
from medembed.errors import MedembedError
from medembed.protocol.metrics import aggregate_studies
from medembed.options.extract import ExtractOptions
from medembed.data.manifest import IMAGE_SUFFIXES, Manifest, read_manifest
from medembed.runs.inputs import run_inputs
from medembed.runs.record import load_run
from medembed.transfer.annotate import COLUMNS as ANNOTATIONS, annotate
from medembed.options.transfer import TransferOptions


@dataclass
class PredictSummary:
    """Counts of one prediction run and where its CSVs went (None: standard output)."""

    images: int
    scored: int
    failed: int
    abnormal: int
    images_csv: Path | None
    studies_csv: Path | None
    ood_flagged: int | None = None  # None: no OOD score for this run (an image run, or no reference)
    referred: int = 0  # images whose conformal set is not a single class
    notes: list[str] = field(default_factory=list)


def images_manifest(inputs: list[Path]) -> tuple[Manifest, Path]:
    """A manifest of image files, folders of them (searched recursively) or one manifest CSV; and its root.

    Image ids are the paths relative to the common folder, suffix included (x.jpg and x.png are two images)."""
    if len(inputs) == 1 and inputs[0].suffix.lower() == ".csv":
        # The user names these files to score: absolute paths and paths relative to the CSV's folder are both
        # taken, re-expressed under their common folder (so extraction's root checks hold).
        manifest = read_manifest(inputs[0])
        files = [Path(os.path.abspath(inputs[0].parent / path)) for path in manifest.path]
        root = Path(os.path.commonpath([f.parent for f in files]))
        return Manifest({**manifest.columns, "path": [str(f.relative_to(root)) for f in files]}), root
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.exists():
            files.append(item)
        else:
            raise MedembedError(f"{item}: no such file or folder")
    if not files:
        raise MedembedError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(map(str, inputs))}")
    files = list(dict.fromkeys(f.resolve() for f in files))
    root = Path(os.path.commonpath([f.parent for f in files]))
    relative = [str(f.relative_to(root)) for f in files]
    return Manifest({"image_id": relative, "path": relative}), root


def inputs_key(manifest: Manifest, root: Path) -> str:
    """A hash of what is being scored: the root, every id and path, and each file's size and modification time."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode())
    for image_id, path in zip(manifest.image_id, manifest.resolve(root)):
        try:
            stat = path.stat()
            state = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            state = "missing"
        digest.update(f"\0{image_id}\0{path}\0{state}".encode())
    return digest.hexdigest()[:16]


def predict(run_dir: Path, inputs: list[Path], out_csv: Path | None, options: ExtractOptions | None = None,
            transfer: TransferOptions | None = None) -> PredictSummary:
    """Score images with a run of any kind; writes `out_csv` (per image, with its conformal prediction set and
    OOD score and flag at `transfer`'s alpha and false-alarm rate; standard output when None) and, when studies
    are known and `out_csv` is a file, `<out>_studies.csv`."""
    run = load_run(run_dir)
    manifest, root = images_manifest([Path(i) for i in inputs])
    options = options or ExtractOptions()
    with tempfile.TemporaryDirectory(prefix="medembed-predict-") as scratch:
        folder = Path(out_csv).parent if out_csv is not None else Path(scratch)
        name = Path(out_csv).stem if out_csv is not None else "predict"
        cache = folder / f"{name}.{inputs_key(manifest, root)}.embeddings.h5"
        folder.mkdir(parents=True, exist_ok=True)
        scored = run_inputs(run).score(manifest, root, cache, options)
    rows, failed = scored.rows, scored.failed
    p = run.probabilities(rows) if len(rows) else np.zeros(0)
    by_id = dict(zip(rows.image_id, p))
    threshold = run.calibration.image_threshold
    annotations, notes = annotate(run, rows, p, transfer)
    table = [
        [text_cell(i), text_cell(path), text_cell(study), f"{by_id[i]:.6f}" if i in by_id else "",
         int(by_id[i] >= threshold) if i in by_id else "", text_cell(failed.get(i, "" if i in by_id else "not processed")),
         *annotations.get(i, ["", "", ""])]
        for i, path, study in zip(manifest.image_id, manifest.path, manifest.study_id)
    ]
    _write_rows(out_csv, ["image_id", "path", "study_id", "probability", "abnormal", "error", *ANNOTATIONS], table)
    studies_csv = None
    if out_csv is not None and (manifest.study_id != "").any() and len(rows):
        studies = aggregate_studies(p, np.zeros(len(rows), dtype=np.int8), rows.study_id, how=run.record.protocol.aggregation)
        studies_csv = Path(out_csv).with_name(Path(out_csv).stem + "_studies.csv")
        _write_rows(
            studies_csv,
            ["study_id", "probability", "abnormal"],
            [[text_cell(s), f"{prob:.6f}", int(prob >= run.calibration.study_threshold)] for s, prob in zip(studies.study_ids, studies.p)],
        )
    abnormal = int(sum(prob >= threshold for prob in by_id.values()))
    flags = [cells[2] for cells in annotations.values() if cells[2] != ""]
    referred = sum(cells[0] in ("both", "empty") for cells in annotations.values())
    return PredictSummary(len(manifest), len(by_id), len(manifest) - len(by_id), abnormal, out_csv, studies_csv,
                          sum(flag == "1" for flag in flags) if flags else None, referred, notes)


def _write_rows(path: Path | None, header: list[str], rows: list[list]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    if path is None:
        sys.stdout.write(buffer.getvalue())
        sys.stdout.flush()
    else:
        atomic_write_text(Path(path), buffer.getvalue())
