"""Stage 2 end to end: fit a head on a store under the protocol, write a run directory; re-evaluate any run.

Train on ``train``, choose everything (the head's hyperparameters, probability calibration, thresholds) on
``val``, report on ``test`` (`medembed.protocol`). The data comes from `medembed.splits`, the run directory is
`medembed.runs`'s, so the CNN and zero-shot runs are evaluated by the same code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from medembed.errors import MedembedError
from medembed.evaluate import summarize_seeds
from medembed.heads import TOKEN_HEADS, make_head
from medembed.manifest import read_manifest
from medembed.options import check_choice, check_positive, option
from medembed.protocol import ProtocolOptions, evaluate_split, fit_and_evaluate
from medembed.runs import Evaluation, Run, RunRecord, load_run, write_evaluation, write_run
from medembed.splits import Split, load_splits, manifest_splits, split_sizes
from medembed.store import fingerprint_mismatch, open_store
from medembed.transfer.options import TransferOptions
from medembed.transfer.reference import run_reference
from medembed.transfer.sections import fitted_extras, source_sections
from medembed.transfer.subgroups import check_columns
from medembed.transfer.targets import with_manifest_columns


@dataclass
class FitOptions(ProtocolOptions):
    """Everything `medembed fit` can be told; stored in run.json so a run is reproducible."""

    head: str = option("logreg", "Head: logreg | mlp | xgboost | sklearn:MODULE.CLASS (any scikit-learn classifier).")
    head_params: dict[str, Any] = option(help="Head hyperparameter key=value, e.g. -p hidden=[256] -p dropout=0.2.", flag="--param -p", factory=dict)
    seeds: int = option(1, "Fit N times with seeds seed..seed+N-1 and report mean ± sd.")
    ensemble: str = option("", "Ensemble: concat (several encoders' stores, joined by image id, one feature vector) | mean | stack (heads per store and per --head, e.g. --head logreg,mlp,xgboost; stack: a logistic meta-model on out-of-fold train predictions).")
    ensemble_folds: int = option(5, "With --ensemble stack: folds of the out-of-fold train predictions the meta-model is fitted on.")
    level: str = option("", "Token level the head reads instead of the pooled embeddings (heads attention | concat | adapter): a store level (block14), levels with one token count joined by + (block14+block10@7x7), or auto (the best val AUROC of the store's levels).")
    study_pooling: str = option("", "Learned study pooling instead of a head: attention (gated attention over a study's image embeddings, trained on train studies; -p sets hidden, attention, max_epochs...). Every image gets its study's score.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("seeds", self.seeds)
        if not isinstance(self.head_params, dict):
            raise MedembedError(f"option head_params must be a mapping, got {self.head_params!r}")
        if (self.study_pooling or self.ensemble) and self.level:
            raise MedembedError(f"--level {self.level} is read by token heads; {'--study-pooling' if self.study_pooling else '--ensemble'} reads the pooled embeddings")
        if self.study_pooling:
            from medembed.study_pooling import make_study_pooling

            if self.ensemble:
                raise MedembedError("option study_pooling replaces the head; it cannot be combined with --ensemble")
            make_study_pooling(self.study_pooling, self.head_params, self.seed)
            return
        if self.ensemble:
            from medembed.ensemble import COMBINES, parse_heads, split_head_params

            check_choice("ensemble", self.ensemble, COMBINES)
            check_positive("ensemble_folds", self.ensemble_folds, minimum=2)
            heads = parse_heads(self.head)
            for head, params in split_head_params(heads, self.head_params).items():
                make_head(head, **params)
            return
        if "," in self.head:
            raise MedembedError(f"option head {self.head!r} names several heads; combine them with --ensemble mean or --ensemble stack")
        make_head(self.head, **self.head_params)  # an unknown head or a bad hyperparameter fails here, before any fit
        check_level_head(self.head, self.level)


def check_level_head(head: str, level: str) -> None:
    """Token heads read a level, the other heads the pooled embeddings: refuse a mismatch before any fit."""
    if head in TOKEN_HEADS and not level:
        raise MedembedError(f"head {head!r} reads a token level; name one with --level (e.g. block14, final@2x2, auto)")
    if level and head not in TOKEN_HEADS:
        raise MedembedError(f"head {head!r} reads the pooled embeddings; --level {level} needs one of {', '.join(TOKEN_HEADS)}")
    if level == AUTO_LEVEL and head == "adapter":
        raise MedembedError("the adapter starts from one block's output; name it with --level (e.g. block14), not auto")


AUTO_LEVEL = "auto"


def choose_level(stores: list[Path], options: FitOptions) -> tuple[str, dict[str, Any]]:
    """The store level whose `options.head` (first seed) reaches the best AUROC on val, and what was tried.
    Train fits, val chooses: test is never read."""
    tried: dict[str, float] = {}
    for level in open_store(stores[0]).token_shapes:
        splits, _, _ = load_splits(stores, val_fraction=options.val_fraction, seed=options.seed, level=level)
        head = make_head(options.head, seed=options.seed, **options.head_params)
        head.fit(splits["train"].X, splits["train"].y, eval_set=[(splits["val"].X, splits["val"].y)])
        tried[level] = float(roc_auc_score(splits["val"].y, head.predict_proba(splits["val"].X)[:, 1]))
    if not tried:
        raise MedembedError(f"{stores[0]}: --level auto needs a store with token levels (extract --levels or --tokens)")
    best = max(tried, key=tried.get)
    return best, {"searched": "level", "val_auroc": tried, "chosen": best}


def level_head_params(head: str, level: str, store: Path, params: dict[str, Any]) -> dict[str, Any]:
    """`params`, plus for the adapter the encoder, its options and the level it starts from (from the store)."""
    if head != "adapter":
        return params
    opened = open_store(store)
    encoder_options = json.loads(str(opened.attrs.get("encoder_options", "{}")))
    return {"encoder": opened.fingerprint["encoder"], "encoder_options": encoder_options, "level": level} | params


def fit_run(stores: list[Path], out: Path, options: FitOptions) -> dict[str, Any]:
    """Fit, calibrate and evaluate on the stores; write the run directory `out`. Returns the test metrics."""
    stores = [Path(s) for s in stores]
    for store in stores:
        if open_store(store).being_written():  # its splits would be a moving subset: refuse rather than fit on it
            raise MedembedError(open_store(store).partial_reason())
    if options.ensemble:  # several encoders' stores are joined by image id, not concatenated as shards
        from medembed.ensemble import load_joined_splits, make_ensemble

        joined = load_joined_splits(stores, val_fraction=options.val_fraction, seed=options.seed)
        splits, fingerprint, notes = joined.splits, joined.fingerprint, joined.notes
        new_scorer = lambda seed: make_ensemble(options.head, options.head_params, options.ensemble, joined.widths, options.ensemble_folds, seed)  # noqa: E731
        fit_params = {"groups": splits["train"].patient_id}
    else:
        level_choice = None
        if options.level == AUTO_LEVEL:
            options.level, level_choice = choose_level(stores, options)
        splits, fingerprint, notes = load_splits(stores, val_fraction=options.val_fraction, seed=options.seed, level=options.level or None)
        head_params = level_head_params(options.head, options.level, stores[0], options.head_params)
        new_scorer = lambda seed: make_head(options.head, seed=seed, **head_params)  # noqa: E731
        fit_params = None
        if level_choice:
            notes.append(f"--level auto chose {options.level} (val AUROC {level_choice['val_auroc'][options.level]:.3f} of {len(level_choice['val_auroc'])} levels)")
    if options.study_pooling:  # trained over train studies, early-stopped on val studies
        from medembed.study_pooling import make_study_pooling

        new_scorer = lambda seed: make_study_pooling(options.study_pooling, options.head_params, seed)  # noqa: E731
        fit_params = {"study_id": splits["train"].study_id, "eval_study_id": splits["val"].study_id}
    notes += [reason for reason in (open_store(s).partial_reason() for s in stores) if reason]
    fitted = [
        fit_and_evaluate(new_scorer(options.seed + k), splits, options, options.seed + k, fit_params=fit_params)
        for k in range(options.seeds)
    ]
    best = fitted[0]
    metrics = best.metrics if len(fitted) == 1 else {**best.metrics, "over_seeds": summarize_seeds([f.metrics for f in fitted])}
    store = open_store(stores[0])
    record = RunRecord(
        kind="ensemble" if options.ensemble else "study-pooling" if options.study_pooling else "head",
        scorer=f"{options.ensemble}:{options.head}" if options.ensemble else f"study-pooling:{options.study_pooling}" if options.study_pooling else options.head,
        consumes="embeddings",
        fingerprint=fingerprint,
        options=asdict(options),
        image_threshold=best.calibration.image_threshold,
        study_threshold=best.calibration.study_threshold,
        calibration=best.calibration.calibrator.to_dict(),
        split_sizes=split_sizes(splits),
        inputs={"stores": [str(s.resolve()) for s in stores]},
        # an ensemble of several encoders keeps each member's in details.members
        encoder_options=json.loads(str(store.attrs.get("encoder_options", "{}"))) if not (options.ensemble and len(stores) > 1) else {},
        preprocess=str(store.attrs.get("preprocess", "")) if not (options.ensemble and len(stores) > 1) else "",
        notes=notes,
        details={
            "seeds": [{"seed": f.seed, "selection": getattr(f.scorer, "selection_", {})} for f in fitted],
            **({"members": joined.members} if options.ensemble else {}),
            **({"level_selection": level_choice} if not options.ensemble and level_choice else {}),
        },
    )
    extras = fitted_extras(best, splits, options.seed, options.n_resamples)
    write_run(out, record, best.scorer, Evaluation(best.p_test, splits["test"], metrics), extras=extras)
    return metrics


def run_level(run: Run) -> str:
    """The token level a run's head reads ("" for pooled embeddings)."""
    return str(run.record.options.get("level") or "")


def run_rows(run: Run, split: str = "test", stores: list[Path] | None = None) -> Split:
    """The labelled rows of `split` that `run`'s scorer consumes: from its stores (or others with the same
    fingerprint) for embedding scorers, from its manifest's images for image scorers."""
    record, options = run.record, run.record.protocol
    if record.kind == "ensemble":  # member stores joined by image id, each checked against its own fingerprint
        from medembed.ensemble import ensemble_rows

        return ensemble_rows(run, split, stores)
    if record.consumes == "embeddings":
        stores = [Path(s) for s in (stores or record.inputs["stores"])]
        for store in stores:
            diff = fingerprint_mismatch(record.fingerprint, open_store(store).fingerprint)
            if diff:
                raise MedembedError(f"{store}: embeddings differ from the ones this run was fitted on ({'; '.join(diff)})")
        splits, _, _ = load_splits(stores, val_fraction=options.val_fraction, seed=options.seed, level=run_level(run) or None)
        return splits[split]
    if stores:
        raise MedembedError(f"{run.directory}: a {record.kind} run scores images, not stores; evaluate it on its manifest")
    manifest = read_manifest(Path(record.inputs["manifest"]))
    splits, kept, _ = manifest_splits(manifest, val_fraction=options.val_fraction, seed=options.seed)
    wanted = manifest.subset(kept[np.isin(manifest.image_id[kept], splits[split].image_id)])
    pixels, decoded, _ = run.scorer.load_images(wanted, Path(record.inputs["image_root"]))
    by_id = {image_id: i for i, image_id in enumerate(splits[split].image_id)}
    return splits[split].take(np.array([by_id[i] for i in wanted.image_id[decoded]], dtype=np.int64), X=pixels)


def evaluate_run(
    run_dir: Path, stores: list[Path] | None = None, split: str = "test", n_resamples: int | None = None, transfer: TransferOptions | None = None
) -> dict[str, Any]:
    """Re-evaluate any run directory on its inputs (or other stores with the same fingerprint); rewrites its
    metrics, report, figures and predictions, with the transfer sections (conformal coverage, OOD false alarms,
    subgroups of `transfer.by`). Returns the metrics."""
    run = load_run(run_dir)
    options = run.record.protocol
    if n_resamples is not None:
        check_positive("bootstrap", n_resamples, minimum=0)
        options.n_resamples = n_resamples
    rows = run_rows(run, split, stores)
    p = run.probabilities(rows)
    transfer = transfer or TransferOptions()
    if transfer.columns_from is not None:
        rows = with_manifest_columns(rows, transfer.columns_from)
    check_columns(rows, transfer.columns)  # a wrong --by fails before the bootstrap
    metrics = evaluate_split(p, rows, run.calibration, options, seed=options.seed)
    try:
        reference, unavailable = run_reference(run), ""
    except MedembedError as error:  # e.g. --store given and the run's own store gone: the metrics still come
        reference, unavailable = None, str(error)
    extras = lambda directory: source_sections(  # noqa: E731
        directory, reference, rows, p, run.calibration.image_threshold, transfer, options.n_resamples, options.seed, unavailable)
    write_evaluation(Path(run_dir), run.record, Evaluation(p, rows, metrics), extras=extras)
    return metrics
