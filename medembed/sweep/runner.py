"""Run a sweep: every (encoder, head, label budget, seed) cell under one protocol, appended to results.csv.

Protocol, the same for every cell and the same as `medembed fit`'s: the manifest's own train/val/test rows;
the head is fitted on the budgeted train rows, probability calibration and thresholds are chosen on the whole
val split, metrics and bootstrap intervals are computed on the whole test split with `medembed.fit`'s own
functions. A budget's images are drawn per seed from the manifest's labelled train rows (`budget_subset`), so
every source gets the same images, less any it could not decode. Every cell's bootstrap uses the same seed
(BOOTSTRAP_SEED), so all cells are scored on the same test resamples.

Embedding sources:
- each [[encoders]] entry: its `store`, or OUT/stores/<label>.h5, extracted (or finished) when incomplete;
- each autoencoder baseline: trained once on the train images (no labels: a label budget does not limit it,
  as it does not limit the foundation model's pretraining), its store OUT/stores/<label>.h5 then gets
  the same heads x budgets x seeds as any encoder.
Each CNN baseline fine-tunes EfficientNet-Lite0 per (budget, seed) on the same budgeted train images (head
"finetune", run directories OUT/baselines/<label>-budget<b>-seed<s>/); on a CPU each run takes minutes, so its
budgets default to 1.0 only. A baseline's label is its kind unless the config gives one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from medembed.options.baselines import AutoencoderOptions
from medembed.scorers.baselines.autoencoder import run_autoencoder_baseline, weights_dir
from medembed.options.baselines import CNNOptions
from medembed.baseline import run_cnn_baseline
from medembed._files import read_json
from medembed.errors import MedembedError
from medembed.encoders.runtime import build_encoder
from medembed.extract.runner import extract
from medembed.scorers.options import FitOptions
from medembed.fit import level_head_params
from medembed.scorers.heads import make_head
from medembed.data.manifest import Manifest, read_manifest
from medembed.protocol.steps import fit_and_evaluate, val_shortfalls, val_size_warning
from medembed.protocol.splits import Split, load_joined_splits, load_splits
from medembed.store import open_store
from medembed.sweep.budgets import MIN_PER_CLASS, budget_subset
from medembed.sweep.config import AUTOENCODER, CNN, BaselineSpec, EncoderSpec, EnsembleSpec, SweepConfig, source_label
from medembed.sweep.report import write_report
from medembed.sweep.results import CellKey, ResultsLog, cell_row, read_results, row_key

BOOTSTRAP_SEED = 0
CNN_HEAD = "finetune"
# Options that change how fast a baseline runs, not what it computes: not part of its recorded identity.
_RUNTIME_OPTIONS = ("device", "num_workers", "threads")


@dataclass
class SweepSummary:
    """What one `run_sweep` call did."""

    cells_run: int  # cells fitted (or found unrunnable) in this call
    cells_already_done: int  # cells skipped because results.csv already had them
    results_csv: Path
    results_md: Path
    figures: list[Path]
    seconds: float
    notes: list[str] = field(default_factory=list)


def run_sweep(config: SweepConfig, *, baselines: bool = True, log: Callable[[str], None] | None = None) -> SweepSummary:
    """Run every cell of `config` not yet in OUT/results.csv, then write results.md and the figures.

    `baselines=False` leaves the config's [[baselines]] out (their existing rows stay in the table).
    `log` receives one line per stage and per finished cell.
    """
    log = log or (lambda line: None)
    start = time.perf_counter()
    manifest = read_manifest(config.manifest)
    grid = grid_cells(config)
    with ResultsLog(config.out, _protocol(config)) as results:
        baseline_labels = {spec.label for spec in config.baselines}
        active = [cell for cell in grid if baselines or cell.encoder not in baseline_labels]
        sweep = _Sweep(config, manifest, results, log, total=len(active))
        for head in config.heads:
            # Every parameter, defaults included: a changed medembed default changes the results too.
            results.check_source("heads", head, make_head(head, **config.head_params[head]).get_params())
        for spec in config.encoders:
            single = [cell for cell in _cells_of(grid, spec.label) if cell.head in config.heads]  # ensembles run below
            sweep.run_heads(single, lambda spec=spec: sweep.encoder_store(spec))
            for source, level in spec.level_sources():  # the levels axis: token heads on the same store
                sweep.run_heads(_cells_of(grid, source), lambda spec=spec: sweep.encoder_store(spec), level=level)
        for ensemble in config.ensembles:
            for members in ensemble.sources(config.encoders):
                label = source_label(members)
                sweep.run_ensemble([c for c in grid if (c.encoder, c.head) == (label, ensemble.label)], ensemble, members)
        for spec in (config.baselines_of(AUTOENCODER) if baselines else ()):
            sweep.run_heads(_cells_of(grid, spec.label), lambda spec=spec: sweep.autoencoder_store(spec))
        for spec in (config.baselines_of(CNN) if baselines else ()):
            sweep.run_cnn(_cells_of(grid, spec.label), spec)
        record = results.record
    in_grid = set(grid)
    rows = [row for row in read_results(results.path) if row_key(row) in in_grid]
    results_md, figures = write_report(rows, config, record)
    return SweepSummary(
        cells_run=sweep.cells_run,
        cells_already_done=sweep.cells_already_done,
        results_csv=results.path,
        results_md=results_md,
        figures=figures,
        seconds=time.perf_counter() - start,
        notes=sweep.notes,
    )


def grid_cells(config: SweepConfig) -> list[CellKey]:
    """Every cell the config asks for, baselines included, in the order they run."""
    sources = [spec.label for spec in config.encoders] + [spec.label for spec in config.baselines_of(AUTOENCODER)]
    cells = [
        CellKey(source, head, budget, seed)
        for source in sources for seed in config.seeds for budget in config.budgets for head in config.heads
    ]
    cells += [
        CellKey(source, head, budget, seed)
        for spec in config.encoders for source, _ in spec.level_sources()
        for seed in config.seeds for budget in config.budgets for head in spec.token_heads
    ]
    cells += [
        CellKey(source_label(members), ensemble.label, budget, seed)
        for ensemble in config.ensembles for members in ensemble.sources(config.encoders)
        for seed in config.seeds for budget in config.budgets
    ]
    cells += [
        CellKey(cnn.label, CNN_HEAD, budget, seed)
        for cnn in config.baselines_of(CNN) for seed in cnn.seeds for budget in cnn.budgets
    ]
    return cells


def cnn_run_name(key: CellKey) -> str:
    """The run directory name (under OUT/baselines/) of a CNN baseline's cell: <label>-budget<b>-seed<s>."""
    return f"{key.encoder}-budget{key.budget:g}-seed{key.seed}"


def _cells_of(cells: list[CellKey], source: str) -> list[CellKey]:
    return [cell for cell in cells if cell.encoder == source]


def _protocol(config: SweepConfig) -> dict[str, object]:
    """What every cell shares; a resumed sweep must have the same."""
    return {
        "manifest_sha256": hashlib.sha256(Path(config.manifest).read_bytes()).hexdigest(),
        "threshold": config.threshold,
        "calibration": config.calibration,
        "aggregation": config.aggregation,
        "bootstrap": config.bootstrap,
        "bootstrap_seed": BOOTSTRAP_SEED,
    }


class _Sweep:
    """The state one run_sweep call shares between its stages: config, manifest, results table, counters."""

    def __init__(self, config: SweepConfig, manifest: Manifest, results: ResultsLog, log: Callable[[str], None], total: int) -> None:
        self.config, self.manifest, self.results, self.log = config, manifest, results, log
        self.total = total  # cells this call is responsible for, done before or not
        self.cells_run = self.cells_already_done = 0
        self.notes: list[str] = []
        self.level, self.level_store = "", None  # the token level run_heads is on ("" for pooled embeddings)

    def fit_options(self, head: str = "logreg", level: str = "") -> FitOptions:
        """The protocol as FitOptions; seed 0 carves val identically for every cell where a store has none."""
        c = self.config
        protocol = asdict(replace(c.protocol, seed=BOOTSTRAP_SEED))
        return FitOptions(**protocol, head=head, head_params=c.head_params.get(head, {}), level=level)

    # -- cells of heads on a store -----------------------------------------------------------------------

    def run_heads(self, cells: list[CellKey], store: Callable[[], Path], level: str = "") -> None:
        """Heads on one source's embeddings (or token `level`), the `cells` not done yet; `store()` makes the
        embeddings only when needed."""
        todo = self._todo(cells)
        if not todo:
            return
        label, path = todo[0].encoder, store()
        options = self.fit_options()
        splits, fingerprint, notes = load_splits([path], val_fraction=options.val_fraction, seed=options.seed, level=level or None)
        self.level, self.level_store = level, path
        self.results.check_source("sources", label, {"fingerprint": fingerprint, "notes": notes})
        self.notes += [f"{label}: {note}" for note in notes]
        small = val_size_warning(splits["val"].y, val_shortfalls(splits["val"].y, options))  # every cell chooses on this val
        if small and f"{label}: {small}" not in self.notes:
            self.notes.append(f"{label}: {small}")
        _check_matches_manifest(splits, self.manifest, path, self.config.manifest)
        train_ids = splits["train"].image_id
        for key, chosen in self._budgets(todo):
            self._record(self._fit_cell, key, splits, np.isin(train_ids, chosen))

    def run_ensemble(self, cells: list[CellKey], spec: EnsembleSpec, members: tuple[EncoderSpec, ...]) -> None:
        """An ensemble's cells on one source: the members' stores (joined by image id when several)."""
        from medembed.scorers.ensemble import make_ensemble

        todo = self._todo(cells)
        if not todo:
            return
        paths = [self.encoder_store(member) for member in members]
        options = self.fit_options()
        if len(paths) > 1:
            joined = load_joined_splits(paths, val_fraction=options.val_fraction, seed=options.seed)
            splits, widths = joined.splits, joined.widths
            self.results.check_source("sources", todo[0].encoder, {"fingerprint": joined.fingerprint, "notes": joined.notes})
            self.notes += [f"{todo[0].encoder}: {note}" for note in joined.notes]
        else:  # one store: the same rows (and sources record) as its single heads
            splits, fingerprint, notes = load_splits(paths, val_fraction=options.val_fraction, seed=options.seed)
            widths = (open_store(paths[0]).dim,)
            self.results.check_source("sources", todo[0].encoder, {"fingerprint": fingerprint, "notes": notes})
        _check_matches_manifest(splits, self.manifest, paths[0], self.config.manifest)

        def new_scorer(seed: int):
            return make_ensemble(",".join(spec.heads), spec.params, spec.combine, widths, spec.folds, seed)

        # Its identity across sources: widths depend on the source, the seed on the cell. Member heads' parameters
        # with every default, as for single heads.
        members = new_scorer(0)
        identity = {k: v for k, v in members.get_params().items() if k not in ("widths", "seed")}
        identity["head_params"] = {head: make_head(head, **(members.head_params or {}).get(head, {})).get_params() for head in members.heads}
        self.results.check_source("heads", spec.label, identity)
        train_ids = splits["train"].image_id
        for key, chosen in self._budgets(todo):
            self._record(self._fit_cell, key, splits, np.isin(train_ids, chosen), new_scorer)

    def _fit_cell(self, key: CellKey, splits: dict[str, Split], mask: np.ndarray, ensemble: Callable[[int], object] | None = None) -> dict:
        """One cell: a head (or, with `ensemble(seed)`, an ensemble fitted with the train patients as its
        stacking groups) on the budgeted train rows `mask`."""
        train, test = _rows(splits["train"], mask), splits["test"]
        counts = {"train_images": len(train), "train_abnormal": int(train.y.sum()), "test_images": len(test)}
        short = _short_of_classes(train.y)
        if short:
            return cell_row(key, None, note=short, **counts)
        level = "" if ensemble else self.level
        options = self.fit_options() if ensemble else self.fit_options(key.head, level)  # an ensemble's label is no head
        started = time.perf_counter()
        params = level_head_params(options.head, level, self.level_store, options.head_params) if level else options.head_params
        scorer = ensemble(key.seed) if ensemble else make_head(options.head, seed=key.seed, **params)
        fit_params = {"groups": train.patient_id} if ensemble else None
        minority = int(min(train.y.sum(), len(train.y) - train.y.sum()))
        if ensemble and scorer.combine == "stack" and minority < scorer.folds:
            return cell_row(key, None, note=f"stacking's {scorer.folds} folds need {scorer.folds} train images of each class, the budget has {minority}", **counts)
        fitted = fit_and_evaluate(scorer, {**splits, "train": train}, options, key.seed, bootstrap_seed=BOOTSTRAP_SEED, fit_params=fit_params)
        seconds = time.perf_counter() - started
        metrics = fitted.metrics
        thresholds = {"image_threshold": fitted.calibration.image_threshold, "study_threshold": fitted.calibration.study_threshold}
        return cell_row(key, metrics, fit_seconds=seconds, **counts, **thresholds)

    # -- embedding sources -------------------------------------------------------------------------------

    def encoder_store(self, spec: EncoderSpec) -> Path:
        """The store of `spec`: the given one (checked complete), else OUT/stores/<label>.h5, extracted as needed."""
        if spec.store is not None:
            store = open_store(spec.store)
            if store.fingerprint.get("encoder") != spec.name:
                raise MedembedError(f"{spec.store}: holds {store.fingerprint.get('encoder')!r} embeddings, the config names encoder {spec.name!r}")
            missing = self._missing_images(spec.store)
            if missing:
                raise MedembedError(
                    f"{spec.store}: {missing} of the manifest's images are neither embedded nor listed as failed "
                    "(an extraction still running, or stopped?); finish it with `medembed extract`, or drop `store` to let the sweep extract"
                )
            return spec.store
        path = self.config.out / "stores" / f"{spec.label}.h5"
        self._check_store_options(path, spec.options)
        if not path.exists() or self._missing_images(path):
            self.log(f"extracting {spec.label} into {path}")
            summary = extract(
                self.manifest, self._root(f"extracting {spec.label}"), build_encoder(spec.name, spec.options), path,
                self.config.extract, encoder_options=spec.options,
            )
            self.log(summary.format())
        return path

    def autoencoder_store(self, spec: BaselineSpec) -> Path:
        """OUT/stores/<label>.h5 of an autoencoder baseline, trained and written unless it is there already."""
        path, options = self.config.out / "stores" / f"{spec.label}.h5", spec.options
        expected = dataclasses.asdict(AutoencoderOptions(**options))
        trained = weights_dir(path) / "model.json"
        self._check_store_options(path, expected, read_json(trained, "autoencoder model.json")["options"] if trained.exists() else None)
        if path.exists():
            missing = self._missing_images(path)
            if missing:
                raise MedembedError(f"{path}: lacks {missing} of the manifest's images (a sweep stopped while writing it?); delete it to train the autoencoder again")
            return path
        self.log(f"training the autoencoder baseline {spec.label} into {path}")
        run = run_autoencoder_baseline(self.config.manifest, self._root("training the autoencoder"), path, AutoencoderOptions(**options), log=self.log)
        self.log(f"{spec.label}: {run.embedded} images embedded in {run.seconds['total']:.0f} s")
        return path

    def _check_store_options(self, path: Path, expected: dict, recorded: dict | None = None) -> None:
        """A sweep-made store must have been made with the options the config now gives (`recorded`: the ones it
        was made with, when they are not its encoder options)."""
        if not path.exists():
            return
        if recorded is None:
            recorded = json.loads(str(open_store(path).attrs.get("encoder_options", "{}")))
        differ = sorted(k for k in set(recorded) | set(expected) if k not in _RUNTIME_OPTIONS and recorded.get(k) != expected.get(k))
        if differ:
            raise MedembedError(
                f"{path} was made with other options ({', '.join(f'{k}: {recorded.get(k)!r} vs {expected.get(k)!r} now' for k in differ)}); "
                "give this encoder another `label`, or delete the store"
            )

    def _missing_images(self, path: Path) -> int:
        """How many manifest images the store neither holds nor lists as failed, not counting images whose file
        is missing under the root (extract reports and retries those; they do not make a store unfinished)."""
        store = open_store(path)
        present = store.image_ids() | set(store.failed())
        absent = ~np.isin(self.manifest.image_id, np.array(sorted(present), dtype=object))
        if self.config.root is None or not absent.any():
            return int(absent.sum())
        paths = self.manifest.subset(np.flatnonzero(absent)).resolve(self.config.root, allow_absolute=True, allow_outside_root=True)
        return sum(path.exists() for path in paths)

    def _root(self, purpose: str) -> Path:
        if self.config.root is None:
            raise MedembedError(f"{self.config.source}: root: {purpose} needs the images; set `root` to the folder the manifest's paths are relative to")
        return self.config.root

    # -- the CNN baselines -------------------------------------------------------------------------------

    def run_cnn(self, cells: list[CellKey], spec: BaselineSpec) -> None:
        """Fine-tune the CNN of `spec` for the `cells` not done yet, on the same budgeted train rows the heads get."""
        todo = self._todo(cells)
        if not todo:
            return
        identity = {k: v for k, v in dataclasses.asdict(CNNOptions(**spec.options)).items() if k not in _RUNTIME_OPTIONS + ("seed",)}
        self.results.check_source("sources", spec.label, {"options": identity})
        for key, chosen in self._budgets(todo):
            self._record(self._cnn_cell, key, spec.options, chosen)

    def _cnn_cell(self, key: CellKey, options: dict, chosen: np.ndarray) -> dict:
        out = self.config.out / "baselines" / cnn_run_name(key)
        run = run_cnn_baseline(
            self.config.manifest, self._root(f"the CNN baseline {key.encoder}"), out, CNNOptions(**options, seed=key.seed), self.fit_options(),
            log=lambda line: self.log(f"  {key}: {line}"), train_ids=chosen,
        )
        sizes = json.loads((out / "run.json").read_text())["split_sizes"]
        return cell_row(
            key, run.metrics,
            train_images=sizes["train"]["images"], train_abnormal=sizes["train"]["abnormal"], test_images=sizes["test"]["images"],
            fit_seconds=run.seconds["decode"] + run.seconds["train"],
        )

    # -- bookkeeping -------------------------------------------------------------------------------------

    def _budgets(self, cells: list[CellKey]) -> Iterator[tuple[CellKey, np.ndarray]]:
        """Each cell with the image ids [K] its budget and seed label: drawn from the manifest's labelled train
        rows, so every source (each store, the CNN) gets the same images, less those it could not decode."""
        train = self.manifest.subset((self.manifest.split == "train") & (self.manifest.label >= 0))
        for seed in sorted({cell.seed for cell in cells}):
            masks = budget_subset(train.group_ids(), train.label, sorted({cell.budget for cell in cells}), seed)
            for cell in cells:
                if cell.seed == seed:
                    yield cell, train.image_id[masks[cell.budget]]

    def _todo(self, cells: list[CellKey]) -> list[CellKey]:
        """The `cells` results.csv does not have yet."""
        todo = [cell for cell in cells if not self.results.has(cell)]
        self.cells_already_done += len(cells) - len(todo)
        return todo

    def _record(self, compute: Callable[..., dict], key: CellKey, *args: object) -> None:
        """Compute one cell's row (`compute(key, *args)`), append it to results.csv and log it."""
        started = time.perf_counter()
        row = compute(key, *args)
        self.results.append(row)
        self.cells_run += 1
        done = f"[{self.cells_run + self.cells_already_done}/{self.total}]"
        if row["note"]:
            self.notes.append(f"{key}: {row['note']}")
            self.log(f"{done} {key}: not run: {row['note']}")
        else:
            self.log(f"{done} {key}: {time.perf_counter() - started:.1f} s, study AUROC {row['study_auroc']:.3f}, kappa {row['study_kappa']:.3f}")


def _rows(split: Split, mask: np.ndarray) -> Split:
    """The rows of `split` selected by a [N] bool mask."""
    return split.take(mask)


def _short_of_classes(y: np.ndarray) -> str:
    """Why a budgeted train set cannot be fitted ('' when it can)."""
    counts = {"abnormal": int(y.sum()), "normal": int(len(y) - y.sum())}
    short = [f"{n} {name}" for name, n in counts.items() if n < MIN_PER_CLASS]
    return f"the budgeted train rows hold only {' and '.join(short)} image(s); at least {MIN_PER_CLASS} of each class are needed" if short else ""


def _check_matches_manifest(splits: dict[str, Split], manifest: Manifest, store: Path, manifest_path: Path) -> None:
    """Every store row must be a manifest image with the same label and split (val may be carved from train)."""
    expected = dict(zip(manifest.image_id, zip(manifest.split, manifest.label.tolist())))
    carved = not (manifest.split == "val").any()
    wrong = []
    for name, rows in splits.items():
        for image_id, label in zip(rows.image_id, rows.y.tolist()):
            split, manifest_label = expected.get(image_id, (None, None))
            if manifest_label != label or not (split == name or (carved and (split, name) == ("train", "val"))):
                wrong.append(f"{image_id} (store {name}/{label}, manifest {split or 'absent'}/{manifest_label})")
    if wrong:
        raise MedembedError(
            f"{store}: {len(wrong)} rows disagree with {manifest_path} on split or label, e.g. {', '.join(wrong[:3])}; "
            "it was extracted from another manifest"
        )
