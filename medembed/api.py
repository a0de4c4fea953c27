"""The Python API for notebooks: each CLI command as one function (`open_store` and `load_run` also from `medembed`).

    from medembed import api
    api.extract("manifest.csv", root="fracatlas", out="frac.h5")
    data = api.open_store("frac.h5").read().to_numpy()
    run = api.fit("frac.h5", "runs/frac", head="logreg", bootstrap=200)
    run.metrics                          # DataFrame: (level, metric) x value, ci_low, ci_high (mean, sd over seeds)
    run.predict_proba(data["embeddings"])  # [N, 2] calibrated probabilities of embeddings
    frame = api.predict(run, "new_xrays/")  # DataFrame: one row per image

Every path may be a `str` or a `pathlib.Path`. Options are keywords named as the CLI's flags
(`bootstrap=` for `--bootstrap`, `param=` for `-p`, `workers=` for `--workers`, `dtype=` for `--dtype`) or as the
option dataclasses' fields (`n_resamples=`, `head_params=`, ...): the dataclasses are the one description of
what a command can be told, and they validate the values. Bad input is one MedembedError.

This module imports only the option dataclasses; each function imports the stage it runs, and pandas is imported
only to make a DataFrame (`pip install 'medembed[api]'`).
"""

from __future__ import annotations

import dataclasses
import os
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
    from medembed.runs.record import Run as RecordRun
    from medembed.store import EmbeddingStore

__all__ = ["Run", "evaluate", "extract", "fit", "load_run", "open_store", "predict"]

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
    from medembed.runs import record

    return run.directory if isinstance(run, (Run, record.Run)) else _path(run, "run")


# -- a run


class Run:
    """A run directory of any kind, loaded: what `fit` and `load_run` return.

        directory, record, scorer, calibration   as `medembed.runs.record.Run` (record: run.json's options,
                                                 thresholds, calibration)
        metrics                                  metrics.json as a DataFrame (read each time: evaluate rewrites it)
        predict_proba(X)                         calibrated probabilities of pooled embeddings [N, D] -> [N, 2]
        predict(images_or_manifest, ...)         `api.predict` with this run
    """

    def __init__(self, loaded: RecordRun) -> None:
        self._loaded = loaded

    def __repr__(self) -> str:
        record = self._loaded.record
        return f"Run({str(self.directory)!r}, kind={record.kind!r}, scorer={record.scorer!r})"

    @property
    def directory(self) -> Path:
        return self._loaded.directory

    @property
    def record(self) -> Any:
        return self._loaded.record

    @property
    def scorer(self) -> Any:
        return self._loaded.scorer

    @property
    def calibration(self) -> Any:
        return self._loaded.calibration

    @property
    def metrics(self) -> Any:
        """The run's metrics.json as a pandas DataFrame indexed by (level, metric): level "image" or "study", one
        row per metric (auroc, sensitivity, ..., n, threshold); columns value, ci_low, ci_high (the bootstrap
        interval, NaN without one) and, for a run of several seeds, mean, sd and n_seeds over the seeds."""
        from medembed.protocol.report import LEVELS, read_metrics_json
        from medembed.tables import import_pandas

        pd = import_pandas("Run.metrics")
        result = read_metrics_json(self.directory / "metrics.json")
        over_seeds = result.get("over_seeds") or {}
        nan = float("nan")
        index, rows = [], []
        for level in LEVELS:
            if level not in result:
                continue
            seeds = (over_seeds.get(level) or {}).get("overall", {})
            for metric, leaf in result[level]["overall"].items():
                ci = leaf.get("ci") or [None, None]
                row = {"value": leaf.get("value"), "ci_low": ci[0], "ci_high": ci[1]}
                summary = seeds.get(metric) or (leaf if "mean" in leaf else None)
                if over_seeds or "mean" in leaf:
                    row |= {"mean": (summary or {}).get("mean"), "sd": (summary or {}).get("sd"), "n_seeds": (summary or {}).get("n_seeds")}
                index.append((level, metric))
                rows.append({key: nan if value is None else float(value) for key, value in row.items()})
        return pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["level", "metric"]))

    def predict_proba(self, X: Any, *, study_id: Any = None, body_part: Any = None) -> Any:
        """Calibrated probabilities [N, 2] float64 (normal, abnormal; the sklearn convention) of embeddings `X`
        [N, D] (an ensemble of stores: its members' embeddings side by side), as `predict` computes them from
        images; `[:, 1] >= record.image_threshold` is its decision. For runs that score pooled embeddings: a CNN
        (images), a token head (a level's tokens) or a study-pooling head (whole studies) are refused, with what
        to use instead. `study_id` / `body_part` ([N] str) for a scorer that reads them."""
        import numpy as np

        from medembed.scorers.contract import positive_scores

        record = self.record
        if record.consumes != "embeddings":
            raise MedembedError(f"{self.directory}: a {record.kind} run scores images, not embeddings; use run.predict(images)")
        if record.level:
            raise MedembedError(f"{self.directory}: a token head reads level {record.level!r}'s tokens [N, T, C], not pooled embeddings; use run.predict(images)")
        try:
            X = np.asarray(X, dtype=np.float32)
        except (TypeError, ValueError):
            raise MedembedError(f"predict_proba: X must be a numeric [N, D] array; got {type(X).__name__}") from None
        if X.ndim != 2:
            raise MedembedError(f"predict_proba: X must be [N, D] embeddings (one row per image); got shape {X.shape}")
        if not np.isfinite(X).all():
            rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
            raise MedembedError(f"predict_proba: {len(rows)} rows of X are NaN or infinite, e.g. rows {rows[:5].tolist()}")
        if not len(X):
            return np.zeros((0, 2))
        columns = {name: np.asarray(values).astype(str) for name, values in (("study_id", study_id), ("body_part", body_part)) if values is not None}
        for name, values in columns.items():
            if values.shape != (len(X),):
                raise MedembedError(f"predict_proba: {name} must hold one value per row of X ({len(X)}); got shape {values.shape}")
        try:
            raw = positive_scores(self.scorer, X, columns)
        except (ValueError, RuntimeError) as error:  # e.g. X of another width than the run's embeddings
            raise MedembedError(f"predict_proba: X of shape {X.shape} does not fit this run's scorer ({str(error).splitlines()[0][:200]})") from None
        p = np.asarray(self.calibration.calibrator.transform(raw), dtype=np.float64)
        return np.column_stack([1 - p, p])

    def predict(self, images_or_manifest: PathLike | Sequence[PathLike], **options: Any) -> Any:
        """`api.predict(this run, images_or_manifest, **options)`: a DataFrame of one row per image."""
        return predict(self, images_or_manifest, **options)


# -- the commands


def open_store(path: PathLike) -> EmbeddingStore:
    """An embedding store for reading (`medembed info`'s view of it): `.read(split=None)` gives its rows as an
    EmbeddingTable, whose `.to_numpy()` and `.to_pandas()` hand them to numpy or pandas."""
    from medembed.store import open_store as open_

    return open_(_path(path, "store"))


def load_run(path: PathLike) -> Run:
    """A run directory (any kind: fit, baseline cnn, zeroshot) as a `Run`: `.metrics`, `.predict_proba(X)`,
    `.predict(images)`, `.record` (run.json: options, thresholds, calibration), `.scorer`, `.directory`."""
    from medembed.runs.record import load_run as load

    return Run(load(_path(path, "run")))


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
             bootstrap: int | None = None, root: PathLike | None = None, **options: Any) -> dict[str, Any]:
    """`medembed evaluate`: recompute a run's metrics on its test split (or `split`, or other `stores` with its
    fingerprint) into RUN/evaluations/NAME/ (metrics.json, report and figures; the fit's own are left as they are,
    see `medembed.evaluate.evaluation_name`). `run` is a loaded run or its directory;
    `bootstrap` resamples (default: the run's); `root` the folder of report.html's gallery images (as `--root`);
    `options` the transfer kit's (`alpha=`, `by=`, `ood_rate=`, ...).
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
                        n_resamples=bootstrap, transfer=transfer, image_root=None if root is None else Path(root))


def predict(run: Any, images_or_manifest: PathLike | Sequence[PathLike], root: PathLike | None = None,
            cache_dir: PathLike | None = None, *, out: PathLike | None = None, explain: PathLike | None = None,
            **options: Any) -> Any:
    """`medembed predict`: score image files, folders of images or one manifest CSV with a run's own encoder,
    calibration and thresholds. `run` is a `Run` or its directory.

    `root`: the folder a manifest's relative paths are under (default: the manifest's folder); `cache_dir`: where
    the embeddings are cached (default: `$MEDEMBED_CACHE`, `$XDG_CACHE_HOME/medembed/predict` or
    `~/.cache/medembed/predict`); `out`: also write the table there (CSV, or Parquet for `.parquet`; studies to
    `<out>_studies`); `explain`: a folder for attention maps (token-head runs). `options` are predict's other
    flags (`batch_size=`, `workers=`, `device=`, `alpha=`, `ood_rate=`, ...).

    Returns a pandas DataFrame, one row per image: image_id, path (as given), study_id, probability (NaN where the
    image could not be read), abnormal, error, prediction_set, ood_score, ood, then a manifest's label and other
    columns. `.attrs["notes"]`: what predict noted (e.g. no OOD scores, and why); `.attrs["cache"]`: the cache
    store (None for image runs). The per-study table is what `out=` writes beside it."""
    directory, inputs = _run_dir(run), _paths(images_or_manifest, "images_or_manifest")
    running, transferring = _route(options, "predict", (ExtractOptions, PREDICT_EXTRACT_SKIPS), (TransferOptions, PREDICT_SKIPS))
    extract_options, transfer = _build(ExtractOptions, running, "predict"), _build(TransferOptions, transferring, "predict")
    root = None if root is None else _path(root, "root")
    cache_dir = None if cache_dir is None else _path(cache_dir, "cache_dir")
    out = None if out is None else _path(out, "out")
    explain = None if explain is None else _path(explain, "explain")
    from medembed.predict import score_images
    from medembed.tables import import_pandas, sibling, table_format, table_frame, write_table

    import_pandas("api.predict")  # no pandas (or no pyarrow for a .parquet out): said before any image is read
    table_format(out)
    result = score_images(directory, inputs, extract_options, transfer, root=root, cache_dir=cache_dir, explain=explain)
    if out is not None:
        write_table(out, result.header, result.rows)
        if result.study_rows:
            write_table(sibling(out, "_studies"), result.study_header, result.study_rows)
    frame = table_frame(result.header, result.rows, "api.predict")
    frame.attrs["notes"] = list(result.notes)
    frame.attrs["cache"] = None if result.cache is None else str(result.cache)
    return frame
