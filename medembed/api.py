"""The Python API for notebooks: each CLI command as one function (`open_store` and `load_run` also from `medembed`).

    from medembed import api
    api.extract("manifest.csv", root="fracatlas", out="frac.h5")
    data = api.open_store("frac.h5").read().to_numpy()
    run = api.fit("frac.h5", "runs/frac", head="logreg", bootstrap=200)
    rows = api.predict(run, "new_xrays/")

Every path may be a `str` or a `pathlib.Path`. Options are keywords named as the CLI's flags
(`bootstrap=` for `--bootstrap`, `param=` for `-p`, `workers=` for `--workers`, `dtype=` for `--dtype`) or as the
option dataclasses' fields (`n_resamples=`, `head_params=`, ...): the dataclasses are the one description of
what a command can be told, and they validate the values. Bad input is one MedembedError.

This module imports only the option dataclasses; each function imports the stage it runs.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medembed.encoders.choice import EncoderChoice
from medembed.errors import MedembedError
from medembed.options import long_flags, parse_key_values
from medembed.options.extract import PREDICT_EXTRACT_SKIPS, ExtractOptions
from medembed.options.transfer import PREDICT_SKIPS, TransferOptions
from medembed.scorers.options import FitOptions

if TYPE_CHECKING:
    from medembed.extract.runner import ExtractSummary
    from medembed.runs.record import Run
    from medembed.store import EmbeddingStore

__all__ = ["evaluate", "extract", "fit", "load_run", "open_store", "predict"]

SPLITS = ("train", "val", "test")
PathLike = str | os.PathLike


# -- paths and options


def _path(value: Any, what: str) -> Path:
    """`value` as a Path, or a MedembedError naming `what` when it is not a str or os.PathLike."""
    if isinstance(value, (str, os.PathLike)) and str(value) != "":
        return Path(value)
    raise MedembedError(f"{what} must be a path (str or pathlib.Path); got {value!r}")


def _paths(value: Any, what: str) -> list[Path]:
    """One path or a list of them, as a non-empty list of Paths."""
    if isinstance(value, (str, os.PathLike)):
        return [_path(value, what)]
    if isinstance(value, Sequence) and value:
        return [_path(item, what) for item in value]
    raise MedembedError(f"{what} must be a path or a non-empty list of paths (str or pathlib.Path); got {value!r}")


def _keywords(cls: type, skip: Sequence[str] = ()) -> dict[str, str]:
    """keyword -> field of the options dataclass `cls`: each field's name and its CLI long flags spelled as
    keywords (`--bootstrap` -> bootstrap, `--ood-rate` -> ood_rate); `skip`ped fields are not accepted."""
    names: dict[str, str] = {}
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        names[field.name] = field.name
        for flag in long_flags(field):
            names[flag.removeprefix("--").replace("-", "_")] = field.name
    return names


def _route(given: dict[str, Any], where: str, *groups: tuple[type, Sequence[str]]) -> list[dict[str, Any]]:
    """Sort keyword options into the fields of each (options dataclass, skipped fields) group, in order; an
    unknown keyword, or one option given under two names (bootstrap= and n_resamples=), is a MedembedError."""
    tables = [_keywords(cls, skip) for cls, skip in groups]
    routed: list[dict[str, Any]] = [{} for _ in groups]
    spelled: dict[tuple[int, str], str] = {}
    for key, value in given.items():
        for k, table in enumerate(tables):
            if key in table:
                name = table[key]
                if (k, name) in spelled:
                    raise MedembedError(f"{where}: {spelled[k, name]}= and {key}= are the same option; give one of them")
                routed[k][name], spelled[k, name] = value, key
                break
        else:
            accepted = sorted({name for table in tables for name in table})
            raise MedembedError(f"{where}: unknown option {key}=; it accepts {', '.join(accepted)}")
    return routed


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """The options dataclass from keyword values (their validation runs); `key=value` strings accepted for the
    mapping fields (`param=["C=0.5"]` as `-p C=0.5`), str for Path fields."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    values = dict(values)
    for name, value in values.items():
        if fields[name].default_factory is dict and isinstance(value, (str, list, tuple)):
            values[name] = parse_key_values([value] if isinstance(value, str) else value, f"{where}: {name}")
        elif "Path" in str(fields[name].type) and isinstance(value, str):
            values[name] = Path(value)
    try:
        return cls(**values)
    except TypeError as error:  # a value of the wrong type that the validation compares or iterates
        raise MedembedError(f"{where}: {error}") from None


def _run_dir(run: Any) -> Path:
    """The directory of a run given as a loaded run (what `fit` and `load_run` return) or as its path."""
    from medembed.runs.record import Run

    return run.directory if isinstance(run, Run) else _path(run, "run")


def _frame(rows: list[dict[str, Any]], what: str) -> Any:
    try:
        import pandas as pd
    except ImportError:
        raise MedembedError(f"{what} needs pandas, which is not installed: pip install pandas") from None
    return pd.DataFrame(rows)


# -- the commands


def open_store(path: PathLike) -> EmbeddingStore:
    """An embedding store for reading (`medembed info`'s view of it): `.read(split=None)` gives its rows as an
    EmbeddingTable, whose `.to_numpy()` and `.to_pandas()` hand them to numpy or pandas."""
    from medembed.store import open_store as open_

    return open_(_path(path, "store"))


def load_run(path: PathLike) -> Run:
    """A run directory (any kind: fit, baseline cnn, zeroshot): `.record` (run.json: options, thresholds,
    calibration), `.scorer`, `.directory`."""
    from medembed.runs.record import load_run as load

    return load(_path(path, "run"))


def extract(manifest: PathLike, root: PathLike, encoder: str = "efficientnet-lite0", *, out: PathLike,
            lenient: bool = False, **options: Any) -> ExtractSummary:
    """`medembed extract`: embed every image of a manifest (paths relative to `root`) into the store `out`,
    resuming it if it exists. The default encoder runs offline (the CLI's default is MedSigLIP, from the hub).

    `options` are the encoder's (`model=`, `revision=`, `option={"size": 320}`, `levels=`, `tokens=`, `views=`)
    and the extractor's (`batch_size=`, `workers=`, `device=`, `precision=`, `dtype=`, `limit=`, ...).
    Returns the summary: counts of embedded, skipped, failed and missing images, `.format()` in words."""
    manifest, root, out = _path(manifest, "manifest"), _path(root, "root"), _path(out, "out")
    chosen, running = _route(options, "extract", (EncoderChoice, ("encoder",)), (ExtractOptions, ()))
    choice = _build(EncoderChoice, {"encoder": encoder, **chosen}, "extract")
    extract_options = _build(ExtractOptions, running, "extract")
    from medembed.data.manifest import read_manifest
    from medembed.encoders.runtime import build_encoder

    encoder_options = choice.encoder_options() | ({"lenient_decoding": True} if lenient else {})
    table = read_manifest(manifest)
    built = build_encoder(choice.encoder, encoder_options)
    # imported after the encoder is built: a hub model that cannot be had fails before torch is imported
    from medembed.extract.runner import extract as run_extract

    return run_extract(table, root, built, out, extract_options, encoder_options=encoder_options)


def fit(stores: PathLike | Sequence[PathLike], out: PathLike, **options: Any) -> Run:
    """`medembed fit`: fit a head on train, choose everything on val, evaluate on test; write the run directory
    `out` (metrics.json, report.md, figures, predictions.csv) and return it loaded (as `load_run` does).

    `options` are fit's flags: `head=`, `param=` (a dict, or `["C=0.5"]` as `-p`), `seeds=`, `threshold=`,
    `calibration=`, `aggregation=`, `bootstrap=`, `seed=`, `ensemble=`, `level=`, ... (`medembed fit --help`)."""
    paths, out = _paths(stores, "stores"), _path(out, "out")
    (values,) = _route(options, "fit", (FitOptions, ()))
    fit_options = _build(FitOptions, values, "fit")
    from medembed.fit import fit_run
    from medembed.runs.provenance import invoked

    with invoked("medembed.api.fit", stores=[str(p) for p in paths], out=str(out), **options):  # run.json's provenance
        fit_run(paths, out, fit_options)
    return load_run(out)


def evaluate(run: Any, *, stores: PathLike | Sequence[PathLike] | None = None, split: str = "test",
             bootstrap: int | None = None, **options: Any) -> dict[str, Any]:
    """`medembed evaluate`: recompute a run's metrics on its test split (or `split`, or other `stores` with its
    fingerprint) and rewrite its metrics.json, report and figures. `run` is a loaded run or its directory;
    `bootstrap` resamples (default: the run's); `options` the transfer kit's (`alpha=`, `by=`, `ood_rate=`, ...).
    Returns the metrics (metrics.json's document)."""
    if "n_resamples" in options:
        if bootstrap is not None:
            raise MedembedError("evaluate: bootstrap= and n_resamples= are the same option; give one of them")
        bootstrap = options.pop("n_resamples")
    if split not in SPLITS:
        raise MedembedError(f"evaluate: split must be one of {', '.join(SPLITS)}; got {split!r}")
    directory = _run_dir(run)
    (values,) = _route(options, "evaluate", (TransferOptions, ()))
    transfer = _build(TransferOptions, values, "evaluate")
    from medembed.evaluate import evaluate_run

    return evaluate_run(directory, stores=None if stores is None else _paths(stores, "stores"), split=split,
                        n_resamples=bootstrap, transfer=transfer)


# predict's CSV columns that hold numbers (the rest are text); an empty cell is None (the image was not scored)
_FLOATS, _INTS = ("probability", "ood_score"), ("abnormal", "ood")


def predict(run: Any, images_or_manifest: PathLike | Sequence[PathLike], out: PathLike | None = None, *,
            as_frame: bool = False, **options: Any) -> list[dict[str, Any]] | Any:
    """`medembed predict`: score image files, folders of images or one manifest CSV with a run's own encoder,
    calibration and thresholds. `out`: also write the CSV there (and `<out>_studies.csv` when studies are
    known); the embedding cache is kept beside it, or, without `out`, discarded.

    Returns one dict per image (image_id, path, study_id, probability, abnormal, error, prediction_set, ood_score,
    ood; probability and abnormal None for an image that could not be read), or a pandas DataFrame of them with
    `as_frame=True`. `options` are predict's flags (`batch_size=`, `workers=`, `device=`, `alpha=`, `ood_rate=`, ...)."""
    directory, inputs = _run_dir(run), _paths(images_or_manifest, "images_or_manifest")
    running, transferring = _route(options, "predict", (ExtractOptions, PREDICT_EXTRACT_SKIPS), (TransferOptions, PREDICT_SKIPS))
    extract_options, transfer = _build(ExtractOptions, running, "predict"), _build(TransferOptions, transferring, "predict")
    if as_frame:
        _frame([], "predict(as_frame=True)")  # no pandas: say so before any image is read
    from medembed._csv import read_text_cell
    from medembed.predict import predict as run_predict

    with tempfile.TemporaryDirectory(prefix="medembed-predict-") as scratch:
        csv_path = _path(out, "out") if out is not None else Path(scratch) / "predictions.csv"
        run_predict(directory, inputs, csv_path, extract_options, transfer)
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = [
                {key: _typed(key, read_text_cell(value)) for key, value in row.items()}
                for row in csv.DictReader(f)
            ]
    return _frame(rows, "predict(as_frame=True)") if as_frame else rows


def _typed(column: str, cell: str) -> Any:
    if column in _FLOATS:
        return float(cell) if cell != "" else None
    if column in _INTS:
        return int(cell) if cell != "" else None
    return cell
