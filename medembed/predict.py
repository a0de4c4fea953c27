"""A fitted run of any kind applied to new images end to end: inputs -> scorer -> calibration -> threshold -> table.

`score_images` returns the per-image (and per-study) table as typed rows; `predict` writes it (CSV, or Parquet
for a `.parquet` output, through `medembed.tables`) and the Python API hands it to pandas.

Inputs are image files, folders of them, or one manifest CSV whose paths are relative to `root` (default: the
manifest's own folder) or absolute. The output keeps the user's spelling of every path (no symlink is resolved
in ids or paths; one file named twice is scored once) and, for a manifest, carries its label and every other
column after medembed's own.

Embedding runs rebuild the run's own encoder from its record (`medembed.runs.inputs`) and check it against the
run's fingerprint before anything is scored; images go through the same resumable extractor as training data,
into a cache store under `cache_dir` (default `default_cache_dir()`): `<cache_dir>/<run name>-<hash of the run
directory>/<hash of the inputs>.embeddings.h5` (an ensemble: one `.member<k>` store per member beside it). The
inputs' hash covers the root, every id and path and each file's size and modification time, so another set of
files under the same names is never mistaken for this one, and a rerun of an interrupted predict resumes. Image
runs (the CNN) decode with their own preprocessing and cache nothing. Unreadable files are reported per file and
the rest are still scored.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medembed.errors import MedembedError
from medembed.protocol.metrics import aggregate_studies
from medembed.options.extract import ExtractOptions
from medembed.data.manifest import IMAGE_SUFFIXES, Manifest, read_manifest
from medembed.runs.inputs import run_inputs
from medembed.runs.record import Run, load_run
from medembed.tables import sibling, table_format, write_table
from medembed.transfer.annotate import COLUMNS as ANNOTATIONS, annotate
from medembed.options.transfer import TransferOptions

# medembed's own columns of the per-image table; a manifest's columns follow them
COLUMNS = ("image_id", "path", "study_id", "probability", "abnormal", "error", *ANNOTATIONS)
STUDY_COLUMNS = ("study_id", "probability", "abnormal")
CACHE_ENV = "MEDEMBED_CACHE"


@dataclass
class PredictInputs:
    """What is scored: the manifest the extractor reads (ids, paths relative to `root`, the user manifest's
    columns), each image's path as the user gave it [N] str, and the user manifest's columns to carry
    ({} for image files and folders)."""

    manifest: Manifest
    root: Path
    paths: list[str]
    columns: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Predictions:
    """One predict's tables as typed rows (str, int, float; None where an image was not scored) and its counts.

    `header`/`rows`: per image, medembed's COLUMNS then the manifest's (a manifest column named like one of
    medembed's is carried as `manifest_<name>`); `study_header`/`study_rows`: per study (no rows when no study
    is known). `labelled`/`labelled_abnormal`: images whose manifest label is known / is 1; `cache`: the cache
    store (None for image runs)."""

    header: list[str]
    rows: list[list[Any]]
    study_header: list[str]
    study_rows: list[list[Any]]
    images: int
    scored: int
    abnormal: int
    labelled: int = 0
    labelled_abnormal: int = 0
    ood_flagged: int | None = None  # None: no OOD score for this run (an image run, or no reference)
    referred: int = 0  # images whose conformal set is not a single class
    cache: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        """Images that could not be scored."""
        return self.images - self.scored


@dataclass
class PredictSummary:
    """Counts of one prediction run and where its tables went (None: standard output, or no studies table)."""

    images: int
    scored: int
    failed: int
    abnormal: int
    images_csv: Path | None
    studies_csv: Path | None
    ood_flagged: int | None = None
    referred: int = 0
    labelled: int = 0
    labelled_abnormal: int = 0
    cache: Path | None = None
    notes: list[str] = field(default_factory=list)


# -- inputs


def images_manifest(inputs: list[Path], root: Path | None = None) -> PredictInputs:
    """Image files, folders of them (searched recursively) or one manifest CSV (paths relative to `root`,
    default its own folder, or absolute), as what the extractor reads and what the output shows.

    Image ids of files and folders are their paths relative to the folder common to all of them, suffix included
    (x.jpg and x.png are two images); a manifest keeps its own ids."""
    inputs = [Path(i) for i in inputs]
    manifests = [i for i in inputs if i.suffix.lower() == ".csv"]
    if manifests and len(inputs) > 1:
        raise MedembedError(f"{manifests[0]}: a manifest CSV is scored on its own; give it alone, or image files and folders without it")
    if manifests:
        return _manifest_inputs(manifests[0], root)
    if root is not None:
        raise MedembedError("--root is the folder a manifest CSV's paths are relative to; image files and folders are scored as given")
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
    # one file named twice (a folder and a file in it, or a link to it) is scored once, under its first spelling
    first: dict[Path, Path] = {}
    for f in files:
        first.setdefault(f.resolve(), f)
    files = list(first.values())
    absolute = [Path(os.path.abspath(f)) for f in files]  # lexical: links are not followed
    common = Path(os.path.commonpath([f.parent for f in absolute]))
    relative = [f.relative_to(common).as_posix() for f in absolute]
    return PredictInputs(Manifest({"image_id": relative, "path": relative}), common, [str(f) for f in files])


def _manifest_inputs(csv_path: Path, root: Path | None) -> PredictInputs:
    """A manifest's rows re-expressed under the folder common to its images (so extraction's root checks hold),
    with its paths as written and its columns to carry."""
    manifest = read_manifest(csv_path)
    base = Path(root) if root is not None else csv_path.parent
    if root is not None and not base.is_dir():
        raise MedembedError(f"--root {root}: no such folder")
    try:
        manifest.label  # noqa: B018  (validates: 0, 1 or empty)
    except MedembedError as error:
        raise MedembedError(f"{csv_path}: {error}") from None
    ids, counts = np.unique(manifest.image_id, return_counts=True)
    if (counts > 1).any():
        raise MedembedError(f"{csv_path}: image_id {ids[counts > 1][0]!r} is on {counts[counts > 1][0]} rows; each image needs its own id")
    files = [Path(os.path.abspath(base / path)) for path in manifest.path]  # an absolute path ignores base
    if not any(f.exists() for f in files):
        where = "--root" if root is not None else "the manifest's folder (give --root DIR for another)"
        raise MedembedError(f"{csv_path}: none of its {len(files)} images exists (the first: {files[0]}); its paths are relative to {where}")
    common = Path(os.path.commonpath([f.parent for f in files]))
    extracted = Manifest({**manifest.columns, "path": [f.relative_to(common).as_posix() for f in files]})
    return PredictInputs(extracted, common, [str(p) for p in manifest.path], dict(manifest.columns))


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


# -- the cache


def default_cache_dir() -> Path:
    """Where predict caches embeddings: $MEDEMBED_CACHE, else $XDG_CACHE_HOME/medembed/predict, else
    ~/.cache/medembed/predict (a relative XDG_CACHE_HOME is ignored, as the XDG specification says)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "medembed" / "predict"


def cache_store(cache_dir: Path, run: Run, key: str) -> Path:
    """The cache store of `run` on the inputs of hash `key`: `<cache_dir>/<run name>-<hash>/<key>.embeddings.h5`.

    The folders are made private (0700) where predict creates them. Refused: a run folder that is a link, or
    holding a link (a store and its ensemble members are then always files of the cache itself, never a file
    elsewhere that a link in a shared cache points at)."""
    cache_dir = Path(cache_dir).expanduser()
    if cache_dir.exists() and not cache_dir.is_dir():
        raise MedembedError(f"--cache-dir {cache_dir}: not a folder")
    run_path = str(Path(run.directory).resolve())
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(run_path).name)[:40] or "run"
    folder = cache_dir / f"{name}-{hashlib.sha256(run_path.encode()).hexdigest()[:12]}"
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.is_symlink():
            raise MedembedError(f"{folder}: a link in the predict cache; remove it (the cache holds only its own files)")
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as error:
        raise MedembedError(f"--cache-dir {cache_dir}: cannot create the cache folder ({error.strerror or error})") from None
    for entry in folder.iterdir():
        if entry.is_symlink():
            raise MedembedError(f"{entry}: a link in the predict cache; remove it (the cache holds only its own files)")
    store = folder / f"{key}.embeddings.h5"
    if not store.resolve().is_relative_to(folder.resolve()):  # defensive: key is hex, name sanitised
        raise MedembedError(f"{store}: outside the cache folder {folder}")
    return store


# -- scoring


def score_images(run_dir: Path, inputs: list[Path], options: ExtractOptions | None = None,
                 transfer: TransferOptions | None = None, root: Path | None = None,
                 cache_dir: Path | None = None, explain: Path | None = None) -> Predictions:
    """Score images with a run of any kind: the per-image table (probability, decision, conformal set, OOD score
    and flag at `transfer`'s alpha and false-alarm rate, then the manifest's columns) and the per-study one.
    `explain`: a folder for one attention-map PNG per image (`medembed.explain`; a note says what was written)."""
    run = load_run(Path(run_dir))
    given = images_manifest([Path(i) for i in inputs], None if root is None else Path(root))
    manifest = given.manifest
    options = options or ExtractOptions()
    reader = run_inputs(run)
    cache = None
    if reader.reads_embeddings:
        cache = cache_store(Path(cache_dir) if cache_dir is not None else default_cache_dir(), run, inputs_key(manifest, given.root))
    scored = reader.score(manifest, given.root, cache, options)
    rows, failed = scored.rows, scored.failed
    p = run.probabilities(rows) if len(rows) else np.zeros(0)
    by_id = dict(zip(rows.image_id.tolist(), p.tolist()))
    threshold = run.calibration.image_threshold
    annotations, notes = annotate(run, rows, p, transfer)
    carried = _carried_columns(given.columns)
    files = manifest.resolve(given.root)
    if explain is not None:
        from medembed.explain import explain_note

        notes.append(explain_note(run, rows, dict(zip(manifest.image_id.tolist(), files)), Path(explain)))
    table = []
    for k, (image_id, path, study) in enumerate(zip(manifest.image_id, given.paths, manifest.study_id)):
        probability = by_id.get(image_id)
        prediction_set, ood_score, ood = annotations.get(image_id, ["", "", ""])
        error = "" if probability is not None else failed.get(image_id) or ("no such file" if not files[k].exists() else "not processed")
        table.append([
            image_id, path, study, probability, None if probability is None else int(probability >= threshold), error,
            prediction_set, float(ood_score) if ood_score != "" else None, int(ood) if ood != "" else None,
            *(values[k] for values in carried.values()),
        ])
    study_rows = []
    if (manifest.study_id != "").any() and len(rows):
        studies = aggregate_studies(p, np.zeros(len(rows), dtype=np.int8), rows.study_id, how=run.record.protocol.aggregation)
        study_rows = [[str(s), float(prob), int(prob >= run.calibration.study_threshold)] for s, prob in zip(studies.study_ids, studies.p)]
    labels = manifest.label if "label" in given.columns else np.full(len(manifest), -1, dtype=np.int8)
    flags = [cells[2] for cells in annotations.values() if cells[2] != ""]
    return Predictions(
        [*COLUMNS, *carried], table, list(STUDY_COLUMNS), study_rows, len(manifest), len(by_id),
        sum(prob >= threshold for prob in by_id.values()), int((labels >= 0).sum()), int((labels == 1).sum()),
        sum(flag == "1" for flag in flags) if flags else None,
        sum(cells[0] in ("both", "empty") for cells in annotations.values()), cache, notes,
    )


def _carried_columns(columns: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    """The manifest's columns for the output, in its order: label as int (None where unknown), the rest as text;
    image_id, path and study_id are medembed's own columns already, and a name medembed uses gets `manifest_`."""
    carried: dict[str, list[Any]] = {}
    for name, values in columns.items():
        if name in ("image_id", "path", "study_id"):
            continue
        out = name
        while out in COLUMNS or out in carried:
            out = f"manifest_{out}"
        carried[out] = [int(v) if v != "" else None for v in values] if name == "label" else [str(v) for v in values]
    return carried


def predict(run_dir: Path, inputs: list[Path], out: Path | None, options: ExtractOptions | None = None,
            transfer: TransferOptions | None = None, root: Path | None = None, cache_dir: Path | None = None,
            explain: Path | None = None) -> PredictSummary:
    """`score_images`, written: the per-image table to `out` (CSV, or Parquet for `.parquet`; standard output
    when None) and, when studies are known and `out` is a file, the per-study one to `<out>_studies.<suffix>`."""
    table_format(out)  # no pyarrow for a .parquet output: refused before any image is read
    result = score_images(run_dir, inputs, options, transfer, root, cache_dir, explain)
    write_table(out, result.header, result.rows)
    studies = None
    if out is not None and result.study_rows:
        studies = sibling(out, "_studies")
        write_table(studies, result.study_header, result.study_rows)
    return PredictSummary(result.images, result.scored, result.failed, result.abnormal, None if out is None else Path(out), studies,
                          result.ood_flagged, result.referred, result.labelled, result.labelled_abnormal, result.cache, result.notes)
