"""A fitted run of any kind applied to new images end to end: inputs -> scorer -> calibration -> threshold -> CSV.

Embedding runs rebuild the run's own encoder from its record and check it against the run's fingerprint before
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medembed._csv import text_cell
from medembed._files import atomic_write_text
from medembed.encoders import Encoder
from medembed.errors import MedembedError
from medembed.protocol.metrics import aggregate_studies
from medembed.options.extract import ExtractOptions
from medembed.extract.runner import ExtractSummary, extract
from medembed.encoders.runtime import build_encoder, store_fingerprint
from medembed.data.manifest import IMAGE_SUFFIXES, Manifest, read_manifest
from medembed.runs.record import STORE_DTYPES, Run, load_run
from medembed.protocol.splits import Split, level_tokens
from medembed.store import fingerprint_mismatch, open_store
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


def run_encoder(run: Run) -> Encoder:
    """An embedding run's encoder rebuilt from run.json, refused unless it reproduces the run's store fingerprint."""
    if run.record.kind == "ensemble":
        raise MedembedError(f"{run.directory} is an ensemble: its members' encoders are rebuilt by medembed predict; this tool takes single-encoder runs")
    return rebuild_encoder(run.record.fingerprint, run.record.encoder_options, run.directory)


def rebuild_encoder(fingerprint: dict[str, str], encoder_options: dict[str, Any], run_dir: Path) -> Encoder:
    """The encoder that made embeddings of `fingerprint` (with `encoder_options`), refused unless it reproduces it.

    Both come from a run's files: the encoder is looked up in medembed's registry (`get_encoder`), its options
    are that encoder's own constructor arguments, and any value they refuse is one line naming the run."""
    where = Path(run_dir) / "run.json"
    name, dtype = fingerprint.get("encoder"), fingerprint.get("dtype")
    if not isinstance(name, str) or not name or dtype not in STORE_DTYPES:
        raise MedembedError(f"{where}: the fingerprint must name the encoder and a store dtype ({', '.join(STORE_DTYPES)}), got {name!r:.40} and {dtype!r:.40}")
    if not isinstance(encoder_options, dict):
        raise MedembedError(f"{where}: encoder_options must be an object")
    try:
        encoder = build_encoder(name, dict(encoder_options))
    except (TypeError, ValueError, KeyError, AttributeError) as error:  # an option value of the wrong type or range
        raise MedembedError(f"{where}: encoder_options do not build encoder {name!r} ({str(error).splitlines()[0][:200]})") from None
    expected = store_fingerprint(encoder, fingerprint["dtype"], fingerprint.get("precision") or "fp32")
    diff = fingerprint_mismatch(fingerprint, expected)
    if diff:
        raise MedembedError(
            f"the encoder available here does not match the one run {run_dir} was fitted on ({'; '.join(diff)}); "
            "install the same model weights and medembed version"
        )
    return encoder


def run_precision(run: Run) -> str:
    """The autocast precision the run's embeddings were computed in (fp32 for stores that predate the field)."""
    return run.record.fingerprint.get("precision") or "fp32"


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


@dataclass
class Scored:
    """What `score_images` read: the rows it could score (X = what the scorer consumes), why the others could
    not be read, and the extraction's summary for embedding runs (None for image runs)."""

    rows: Split
    failed: dict[str, str]
    extraction: ExtractSummary | None = None


def score_images(
    run: Run, manifest: Manifest, root: Path, cache: Path, options: ExtractOptions, preprocess: Any = None, encoder: Encoder | None = None
) -> Scored:
    """The rows of `manifest` that `run`'s scorer could read, as a Split holding what it consumes, and why the
    others could not be read. Embedding runs extract into the store `cache` (resumable) with `encoder` (default:
    `run_encoder(run)`); `preprocess` replaces the images' preprocessing (a corrupted variant for robustness)."""
    if run.record.kind == "ensemble":  # each member's encoder into its own cache store, joined by image id
        from medembed.scorers.ensemble import score_member_images

        return score_member_images(run, manifest, root, cache, options, preprocess)
    rows = Split.from_manifest(manifest)
    if run.record.consumes == "images":
        pixels, decoded, failed = run.scorer.load_images(manifest, root, preprocess)
        return Scored(rows.take(np.flatnonzero(decoded), X=pixels), failed)
    encoder = encoder or run_encoder(run)
    options = replace(options, store_dtype=run.record.fingerprint["dtype"], precision=run_precision(run))
    summary = extract(manifest, root, encoder, cache, options, encoder_options=run.record.encoder_options, preprocess=preprocess)
    from medembed.fit import run_level

    store = open_store(cache)
    table = store.read()
    level = run_level(run)  # a token head reads the re-extracted level, not the pooled vector
    inputs = level_tokens([cache], level) if level else table.embeddings
    position = {image_id: i for i, image_id in enumerate(table.image_id)}
    keep = np.array([i for i, image_id in enumerate(rows.image_id) if image_id in position], dtype=np.int64)
    X = inputs[[position[rows.image_id[i]] for i in keep]] if len(keep) else inputs[:0]
    return Scored(rows.take(keep, X=X), store.failed(), summary)


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
        scored = score_images(run, manifest, root, cache, options)
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
