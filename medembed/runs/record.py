"""run.json: the record of a run of any kind (embedding heads, the CNN, zero-shot), validated when read, and the
loaded run (record, scorer, calibration). `medembed.runs.writer` writes run directories.
"""

from __future__ import annotations

import math
import os
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medembed._version import __version__
from medembed._files import loads_json, read_json, restore_replaced
from medembed.protocol.calibrate import Calibrator
from medembed.errors import MedembedError
from medembed.options import from_dict
from medembed.protocol.steps import Calibration
from medembed.options.baselines import CNNRunOptions
from medembed.options.extract import DTYPES
from medembed.options.protocol import ProtocolOptions
from medembed.scorers.contract import CONSUMES, KINDS, Scorer, load_scorer, positive_scores
from medembed.scorers.options import FitOptions
from medembed.protocol.splits import Split
from medembed.runs.provenance import check_provenance, resolve_moved_inputs

RUN_FILE = "run.json"
SCORER_DIR = "scorer"
FORMAT_VERSION = 2


@dataclass
class RunRecord:
    """Everything run.json holds. `inputs` is {"stores": [...]} for embedding scorers, or {"manifest": ...,
    "image_root": ...} for image scorers; `details` holds what only one kind has (training history, prompts)."""

    kind: str
    scorer: str  # e.g. "logreg", "sklearn:sklearn.svm.SVC", "cnn-efficientnet-lite0", "zeroshot"
    consumes: str
    fingerprint: dict[str, str]
    options: ProtocolOptions  # the typed options of the run's kind (RUN_OPTIONS): FitOptions for fit's kinds
    image_threshold: float
    study_threshold: float
    calibration: dict[str, Any]
    split_sizes: dict[str, dict[str, int]]
    inputs: dict[str, Any]
    encoder_options: dict[str, Any] = field(default_factory=dict)  # how `predict` rebuilds the store's encoder
    preprocess: str = ""  # the PreprocessSpec JSON of the embeddings / pixels
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    medembed_version: str = __version__
    provenance: dict[str, Any] = field(default_factory=dict)  # command line, library versions, git commit (write_run fills it)

    @property
    def protocol(self) -> ProtocolOptions:
        """The protocol options the run was made with (a copy: changing it changes nothing of the record)."""
        return ProtocolOptions.of(self.options)

    @property
    def level(self) -> str:
        """The token level the run's head reads ("" for pooled embeddings and kinds without levels)."""
        return self.options.level if isinstance(self.options, FitOptions) else ""

    @property
    def decisions(self) -> Calibration:
        """The probability calibration and image/study thresholds chosen on val."""
        return Calibration(Calibrator.from_dict(self.calibration), self.image_threshold, self.study_threshold)


# run.json keys and their JSON types; every one is required.
_TYPES: dict[str, type | tuple[type, ...]] = {
    "kind": str, "scorer": str, "consumes": str, "fingerprint": dict, "options": dict,
    "image_threshold": (int, float), "study_threshold": (int, float), "calibration": dict, "split_sizes": dict,
    "inputs": dict, "encoder_options": dict, "preprocess": str, "notes": list, "details": dict,
    "format_version": int, "medembed_version": str,
}
# Keys runs of older medembed versions lack; checked when present.
_OPTIONAL_TYPES: dict[str, type | tuple[type, ...]] = {"provenance": dict}


def validate_record(document: Any, path: Path) -> RunRecord:
    """A RunRecord from parsed run.json, or one MedembedError naming the file and the first problem."""
    if not isinstance(document, dict):
        raise MedembedError(f"{path}: expected a JSON object, got {type(document).__name__}")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise MedembedError(f"{path}: run format {version!r} is not supported by this medembed (it reads {FORMAT_VERSION}); refit the run")
    for key, kind in _TYPES.items():
        if key not in document:
            raise MedembedError(f"{path}: missing key {key!r}")
        value = document[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise MedembedError(f"{path}: {key!r} must be {_type_name(kind)}, got {value!r:.60}")
    for key, kind in _OPTIONAL_TYPES.items():
        if key in document and not isinstance(document[key], kind):
            raise MedembedError(f"{path}: {key!r} must be {_type_name(kind)}, got {document[key]!r:.60}")
    check_provenance(document.get("provenance", {}), path)
    unknown = sorted(set(document) - set(_TYPES) - set(_OPTIONAL_TYPES))
    if unknown:
        raise MedembedError(f"{path}: unexpected keys {unknown}")
    if document["kind"] not in KINDS:
        raise MedembedError(f"{path}: unknown run kind {document['kind']!r}; medembed knows {', '.join(KINDS)}")
    if document["consumes"] not in CONSUMES:
        raise MedembedError(f"{path}: 'consumes' must be one of {', '.join(CONSUMES)}")
    for key in ("image_threshold", "study_threshold"):
        value = float(document[key])
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise MedembedError(f"{path}: {key} {document[key]!r} is not a probability in [0, 1]")
    record = RunRecord(**(document | {"options": _typed_options(document["kind"], document["options"], path)}))
    try:
        Calibrator.from_dict(record.calibration)
    except (MedembedError, KeyError, TypeError, ValueError) as error:
        raise MedembedError(f"{path}: calibration: {error}") from None
    for check in (_check_inputs, _check_fingerprint, _check_split_sizes, _check_notes, _check_preprocess):
        check(record, path)
    return record


# The options each run kind records, read back into their dataclass (run.json format 2 keeps them as an object).
RUN_OPTIONS: dict[str, type[ProtocolOptions]] = {
    "head": FitOptions, "ensemble": FitOptions, "study-pooling": FitOptions, "cnn": CNNRunOptions, "zeroshot": ProtocolOptions,
}


def _typed_options(kind: str, options: dict[str, Any], path: Path) -> ProtocolOptions:
    """run.json's options as the dataclass of the run's kind: each field of its JSON type first (so a tampered
    value is named, not a TypeError deep in a check), then the dataclass's own validation."""
    cls = RUN_OPTIONS[kind]
    if cls is ProtocolOptions:  # zero-shot runs written from fit's options kept its other fields, which never applied
        options = {name: value for name, value in options.items() if name in ProtocolOptions.__dataclass_fields__ or name not in FitOptions.__dataclass_fields__}
    for option in dataclasses.fields(cls):
        if option.name not in options:
            continue
        value = options[option.name]
        default = option.default if option.default is not dataclasses.MISSING else option.default_factory()
        kinds = (int, float) if isinstance(default, float) else (type(default),) if default is not None else None
        if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise MedembedError(f"{path}: options.{option.name} must be {_type_name(kinds)}, got {value!r:.60}")
    _check_level(options.get("level", ""), path)
    return from_dict(cls, options, f"{path}: options")


MAX_PATH = 4096  # longer store or manifest paths than the OS allows are refused here, not by the file system


def _check_inputs(record: RunRecord, path: Path) -> None:
    """inputs: the stores (a non-empty list of paths) or the manifest and image root the run was fitted on."""
    wanted = ("stores",) if record.consumes == "embeddings" else ("manifest", "image_root")
    for key in wanted:
        if key not in record.inputs:
            raise MedembedError(f"{path}: inputs must name the {key} the run was fitted on")
    if record.consumes == "embeddings":
        stores = record.inputs["stores"]
        if not isinstance(stores, list) or not stores or not all(isinstance(s, str) and 0 < len(s) <= MAX_PATH for s in stores):
            raise MedembedError(f"{path}: inputs.stores must be a non-empty list of store paths, got {stores!r:.60}")
    else:
        for key in wanted:
            if not isinstance(record.inputs[key], str) or not 0 < len(record.inputs[key]) <= MAX_PATH:
                raise MedembedError(f"{path}: inputs.{key} must be a path, got {record.inputs[key]!r:.60}")


def _check_fingerprint(record: RunRecord, path: Path) -> None:
    """fingerprint: strings only; an embedding run's names an encoder and a store dtype medembed has."""
    for key, value in record.fingerprint.items():
        if not isinstance(value, str):
            raise MedembedError(f"{path}: fingerprint.{key} must be a string, got {value!r:.60}")
    if record.consumes == "embeddings" and record.kind != "ensemble":
        for key in ("encoder", "dtype"):
            if not record.fingerprint.get(key):
                raise MedembedError(f"{path}: fingerprint.{key} is missing; an embedding run records the store it was fitted on")
    dtype = record.fingerprint.get("dtype")
    if dtype and record.kind != "ensemble" and dtype not in DTYPES:
        raise MedembedError(f"{path}: fingerprint.dtype {dtype!r:.40} is not a store dtype ({', '.join(DTYPES)})")


def _check_level(level: Any, path: Path) -> None:
    """options.level: "" or token level names (each looked up in the store's own levels when read)."""
    if not isinstance(level, str):
        raise MedembedError(f"{path}: options.level must be a string of level names, got {level!r:.60}")
    if not level:
        return
    from medembed.encoders.levels import parse_level  # imports torch: only for runs on token levels

    for name in (part.strip() for part in level.replace(",", "+").split("+")):  # an ensemble's levels are comma-separated
        if name and name != "auto":
            try:
                parse_level(name)
            except MedembedError as error:
                raise MedembedError(f"{path}: options.level: {error}") from None


def _check_split_sizes(record: RunRecord, path: Path) -> None:
    """split_sizes: {split: {"images": n, "abnormal": n}} with non-negative integers (the report lists them)."""
    for split, sizes in record.split_sizes.items():
        if not isinstance(sizes, dict) or not all(
            isinstance(sizes.get(key), int) and not isinstance(sizes.get(key), bool) and sizes[key] >= 0 for key in ("images", "abnormal")
        ):
            raise MedembedError(f"{path}: split_sizes.{split} must hold non-negative integers images and abnormal")


def _check_notes(record: RunRecord, path: Path) -> None:
    if not all(isinstance(note, str) for note in record.notes):
        raise MedembedError(f"{path}: notes must be a list of strings")


def _check_preprocess(record: RunRecord, path: Path) -> None:
    """preprocess: "" or the PreprocessSpec as a JSON object (strict, bounded nesting)."""
    if record.preprocess and not isinstance(loads_json(record.preprocess, f"{path}: preprocess", "preprocessing spec"), dict):
        raise MedembedError(f"{path}: preprocess must be a JSON object (the preprocessing spec)")


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", dict: "an object", list: "a list", int: "an integer", float: "a number", bool: "true or false"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(dict.fromkeys(names[k] for k in kinds))


@dataclass
class Run:
    """A loaded run directory: its record, scorer and calibration."""

    directory: Path
    record: RunRecord
    scorer: Scorer

    @property
    def calibration(self) -> Calibration:
        return self.record.decisions

    def probabilities(self, rows: Split) -> np.ndarray:
        """Calibrated abnormality probability per row of `rows` (whose X the scorer consumes), [N] float64."""
        raw = positive_scores(self.scorer, rows.X, {"body_part": rows.body_part, "study_id": rows.study_id})
        return self.calibration.calibrator.transform(raw)


def read_record(run_dir: Path) -> RunRecord:
    """A run directory's validated run.json (first restoring a run a writer killed mid-swap left aside)."""
    restore_replaced(Path(run_dir))
    path = Path(run_dir) / RUN_FILE
    if not Path(run_dir).is_dir():
        raise MedembedError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise MedembedError(f"{run_dir}: not a medembed run directory (no {RUN_FILE})")
    record = validate_record(read_json(path, "run.json"), path)
    record.notes += resolve_moved_inputs(record.inputs, record.details, record.provenance, Path(run_dir))
    return record


def load_run(run_dir: Path) -> Run:
    """A run directory's record and fitted scorer."""
    record = read_record(run_dir)
    check_contained(Path(run_dir))
    scorer = load_scorer(record.kind, Path(run_dir) / SCORER_DIR)
    if scorer.consumes != record.consumes:
        raise MedembedError(f"{run_dir}: run.json says the scorer consumes {record.consumes}, the saved scorer {scorer.consumes}")
    return Run(Path(run_dir), record, scorer)


def check_contained(run_dir: Path) -> None:
    """Refuse a run directory holding a link that leads outside it: every file a scorer reads (its weights,
    members, reference) is then the run's own, never a file elsewhere on this machine that a shared run points at."""
    root = Path(run_dir).resolve()
    for folder, names, files in os.walk(root):  # links are not followed: each one is checked instead
        for name in names + files:
            entry = Path(folder) / name
            if entry.is_symlink() and not entry.resolve().is_relative_to(root):
                raise MedembedError(f"{entry}: links outside the run directory {run_dir} (to {os.readlink(entry)}); a run's files must be its own")
