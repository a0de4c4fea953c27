"""Stage 2 end to end: fit a head (or an ensemble, a study pooling) on stores under the protocol, write a run directory.

Train on ``train``, choose everything (the head's hyperparameters, probability calibration, thresholds) on
``val``, report on ``test`` (`medembed.protocol.steps`). The data comes from `medembed.protocol.splits`, the run directory is
`medembed.runs.record`'s, so the CNN and zero-shot runs are evaluated by the same code.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sklearn.metrics import roc_auc_score

from medembed.store.views import bank_path, load_train_views
from medembed.errors import MedembedError
from medembed.protocol.metrics import summarize_seeds
from medembed.scorers.ensemble import make_ensemble
from medembed.scorers.heads import make_head
from medembed.protocol.steps import fit_and_evaluate, val_shortfalls, val_size_warning
from medembed.options.transfer import TransferOptions
from medembed.transfer.conformal import conformal_shortfalls
from medembed.runs.record import RunRecord
from medembed.runs.writer import Evaluation, write_run
from medembed.protocol.splits import load_joined_splits, load_splits, split_sizes
from medembed.store import open_store
from medembed.transfer.sections import fitted_extras
from medembed.scorers.options import AUTO_LEVEL, FitOptions


def choose_level(stores: list[Path], options: FitOptions) -> tuple[str, dict[str, Any]]:
    """The store level whose `options.head` (first seed) reaches the best AUROC on val, and what was tried (levels
    the head cannot read, e.g. a pooled grid for the adapter, are listed as skipped with why). Train fits, val
    chooses: test is never read. Each level is fitted as the run will be: a head that draws views per epoch draws
    them from the store's augmentation bank at that level unless --no-augment-bank."""
    tried: dict[str, float] = {}
    skipped: dict[str, str] = {}
    costs: dict[str, Any] = {}
    drawn: list[str] = []
    for level in open_store(stores[0]).token_shapes:
        try:
            params = level_head_params(options.head, level, stores[0], options.head_params)
        except MedembedError as error:  # the adapter starts only from a full-grid stem or block level
            skipped[level] = str(error)
            continue
        splits, _, _ = load_splits(stores, val_fraction=options.val_fraction, seed=options.seed, level=level)
        head = make_head(options.head, seed=options.seed, **params)
        draws_views = options.augment_bank and getattr(head, "consumes_views", False)
        views = load_train_views(stores, splits["train"].image_id, level)[0] if draws_views else None
        fit_params = {"views": views} if views is not None else {}
        head.fit(splits["train"].X, splits["train"].y, eval_set=[(splits["val"].X, splits["val"].y)], **fit_params)
        if fit_params:
            drawn.append(level)
        tried[level] = float(roc_auc_score(splits["val"].y, head.predict_proba(splits["val"].X)[:, 1]))
        if "cost" in head.selection_:
            costs[level] = head.selection_["cost"]
    if not tried:
        levels = ", ".join(open_store(stores[0]).token_shapes)
        raise MedembedError(
            f"{stores[0]}: --level auto found no level head {options.head!r} can read (the store's levels: {levels or 'none; extract --levels or --tokens'})"
            + (f"; e.g. {next(iter(skipped.values()))}" if skipped else "")
        )
    best = max(tried, key=tried.get)
    return best, {"searched": "level", "val_auroc": tried, "chosen": best, **({"skipped": skipped} if skipped else {}), **({"cost": costs} if costs else {}),
                  **({"augmentation_bank": drawn} if drawn else {})}


def epoch_budget_warnings(fitted: list[Any]) -> list[str]:
    """One line per head, or ensemble member, that used up its -p max_epochs while its val AUROC still rose (in any
    seed): it stopped under-trained, and the line says which parameter gives it more epochs."""
    from medembed.scorers.heads.base import stopped_while_improving

    cut: dict[str, tuple[str, int, list[int]]] = {}
    for one in fitted:
        members = list(zip(one.scorer.member_names(), one.scorer.members_)) if hasattr(one.scorer, "members_") else [("", one.scorer)]
        for member, head in members:
            if stopped_while_improving(head):
                parameter = f"{head.name}.max_epochs" if member else "max_epochs"
                cut.setdefault(member or head.name, (parameter, head.max_epochs, []))[2].append(one.seed)
    return [
        f"{name}: its best val AUROC was at its last epoch ({epochs} of -p {parameter}={epochs}) in seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}: still rising when training stopped; a larger -p {parameter} may fit better"
        for name, (parameter, epochs, seeds) in cut.items()
    ]


def level_head_params(head: str, level: str, store: Path, params: dict[str, Any]) -> dict[str, Any]:
    """`params`, plus for the adapter the encoder, its options and the level it starts from (from the store),
    refused in one line (before any tokens are read) when the adapter cannot start from that level."""
    if head != "adapter":
        return params
    from medembed.scorers.heads.adapter import adapter_start

    opened = open_store(store)
    encoder_options = json.loads(str(opened.attrs.get("encoder_options", "{}")))
    filled = {"encoder": opened.fingerprint["encoder"], "encoder_options": encoder_options, "level": level} | params
    adapter_start(filled["encoder"], filled["encoder_options"], filled["level"])
    return filled


def check_ensemble_levels(stores: list[Path], options: FitOptions) -> None:
    """An ensemble's --level against its stores, before any rows are read: the level count (`block_plan`) and, for
    adapter members, that the adapter can start from each store's level (`level_head_params`)."""
    from medembed.scorers.members import block_plan
    from medembed.scorers.ensemble import parse_heads

    for k, level in block_plan(len(stores), options.level):
        for head in parse_heads(options.head):
            level_head_params(head, level, stores[k], {})


def ensemble_views(stores: list[Path], joined: Any, options: FitOptions) -> tuple[tuple[Any, ...] | None, dict[str, Any], list[str]]:
    """The augmentation views an ensemble's members draw from: one `TrainViews` or None per member block (each
    (store, level) block of --level, else each store's pooled vectors), what run.json records (one entry per
    block) and notes. A member draws views iff its block's store has a bank and `member_draws_views` says its head
    does. Views are of the joined train rows only (`load_train_views` drops the rest)."""
    from medembed.scorers.ensemble import member_draws_views, parse_heads

    sources = [(block["store"], block["level"]) for block in joined.blocks] or [(k, None) for k in range(len(stores))]
    if not any(bank_path(stores[k]).exists() for k, _ in sources):
        return None, {}, []
    if not options.augment_bank:
        return None, {}, ["augmentation bank not used (--no-augment-bank): ensemble members train on the original train images"]
    heads = parse_heads(options.head)
    drawing = [head for head in heads if member_draws_views(make_head(head), options.ensemble)]
    usable = bool(drawing)
    views: list[Any] = []
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    for k, level in sources:
        loaded, record, loaded_notes = load_train_views([stores[k]], joined.splits["train"].image_id, level)  # every bank is checked
        where = stores[k].name + (f" {level}" if level else "")
        used = usable and loaded is not None
        views.append(loaded if used else None)
        records.append({"store": str(stores[k].resolve()), "level": level, "used": used, **(record or {"banks": []})})
        if used:
            notes += [f"{where}: {note}" for note in loaded_notes]
        elif usable:
            notes.append(f"augmentation bank: {where} has none; its members train on the original train images")
    if options.ensemble == "concat":
        notes.append("augmentation bank not used: --ensemble concat members read every store's vectors joined, which no one store's "
                     "views stand in for; they train on the original train images")
    elif not drawing:
        notes.append(f"augmentation bank not used: heads {options.head} do not draw views per epoch (mlp, attention and adapter do); "
                     "ensemble members train on the original train images")
    elif len(drawing) < len(heads):
        others = ", ".join(head for head in heads if head not in drawing)
        notes.append(f"augmentation bank: {', '.join(drawing)} members draw views; {others} members train on the original train images")
    used_any = any(v is not None for v in views)
    return (tuple(views) if used_any else None), {"used": used_any, "blocks": records}, notes


def fit_run(stores: list[Path], out: Path, options: FitOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fit, calibrate and evaluate on the stores; write the run directory `out`. Returns the test metrics. `log`
    receives what the fit chose on its own (the level of --level auto)."""
    stores = [Path(s) for s in stores]
    for store in stores:
        if open_store(store).being_written():  # its splits would be a moving subset: refuse rather than fit on it
            raise MedembedError(open_store(store).partial_reason())
    views_record: dict[str, Any] = {}
    if options.ensemble:  # several encoders' stores are joined by image id, not concatenated as shards
        check_ensemble_levels(stores, options)
        joined = load_joined_splits(stores, val_fraction=options.val_fraction, seed=options.seed, level=options.level)
        splits, fingerprint, notes = joined.splits, joined.fingerprint, joined.notes
        new_scorer = lambda seed: make_ensemble(options.head, options.head_params, options.ensemble, joined.widths, options.ensemble_folds, seed,  # noqa: E731
                                                blocks=joined.blocks, member_seeds=options.ensemble_seeds)
        fit_params = {"groups": splits["train"].patient_id}
        member_views, views_record, view_notes = ensemble_views(stores, joined, options)
        notes += view_notes
        if member_views is not None:
            fit_params["views"] = member_views
    else:
        level_choice = None
        if options.level == AUTO_LEVEL:  # the chosen level is what the run records (the caller's options stay as given)
            chosen, level_choice = choose_level(stores, options)
            options = replace(options, level=chosen)
        head_params = level_head_params(options.head, options.level, stores[0], options.head_params)  # refuses first
        splits, fingerprint, notes = load_splits(stores, val_fraction=options.val_fraction, seed=options.seed, level=options.level or None)
        new_scorer = lambda seed: make_head(options.head, seed=seed, **head_params)  # noqa: E731
        fit_params = None
        views, views_record, view_notes = load_train_views(stores, splits["train"].image_id, options.level or None) if options.augment_bank else (None, {}, [])
        if not options.augment_bank and any(bank_path(s).exists() for s in stores):
            notes.append("augmentation bank not used (--no-augment-bank): the head trains on the original train images")
        if views is not None:  # the store's augmentation bank: heads that train in epochs draw from it
            if getattr(new_scorer(options.seed), "consumes_views", False) and not options.study_pooling:
                fit_params, views_record["used"] = {"views": views}, True
                notes += view_notes
            else:
                views_record["used"] = False
                notes.append(f"augmentation bank not used: head {options.study_pooling or options.head} does not draw views per epoch "
                             f"(mlp, attention and adapter do); it trains on the {len(splits['train'])} original train images")
        if level_choice:
            notes.append(f"--level auto chose {options.level} (val AUROC {level_choice['val_auroc'][options.level]:.3f} of {len(level_choice['val_auroc'])} levels)")
            if log:
                log(notes[-1])
    if options.study_pooling:  # trained over train studies, early-stopped on val studies
        from medembed.scorers.study_pooling import make_study_pooling

        new_scorer = lambda seed: make_study_pooling(options.study_pooling, options.head_params, seed)  # noqa: E731
        fit_params = {"study_id": splits["train"].study_id, "eval_study_id": splits["val"].study_id}
    notes += [reason for reason in (open_store(s).partial_reason() for s in stores) if reason]
    fitted = [
        fit_and_evaluate(new_scorer(options.seed + k), splits, options, options.seed + k, fit_params=fit_params)
        for k in range(options.seeds)
    ]
    best = fitted[0]
    for line in epoch_budget_warnings(fitted):  # on the console and in the report's notes
        warnings.warn(line, stacklevel=2)
        notes.append(line)
    members, member_sections = None, []
    if options.ensemble:  # what each member brings, beside the ensemble (test is read, never chosen on)
        from medembed.protocol.members import member_aurocs, members_line, members_section

        members = member_aurocs(fitted, splits["test"], options.aggregation, best.scorer.member_reads([s.name for s in stores]))
        member_sections = [members_section(members, options.ensemble)]
        if log:
            log(members_line(members))
    # Several seeds: the first seed's result (its scorer is the one the run keeps) and, beside it, the summary over
    # seeds that stands for the run wherever its headline is shown (medembed.protocol.metrics.headline_leaf).
    over_seeds = {"over_seeds": {**summarize_seeds([f.metrics for f in fitted]), "seeds": [f.seed for f in fitted]}} if len(fitted) > 1 else {}
    metrics = {**best.metrics, **over_seeds}
    val_y = splits["val"].y  # what val was too small to choose (thresholds, calibration, the report's conformal sets)
    small = val_size_warning(val_y, val_shortfalls(val_y, options) + conformal_shortfalls(val_y, TransferOptions().alphas))
    if small:  # on the console (after the fit: a refusal of the options stays the only line) and in the report's notes
        warnings.warn(small, stacklevel=2)
        notes.append(small)
    store = open_store(stores[0])
    record = RunRecord(
        kind="ensemble" if options.ensemble else "study-pooling" if options.study_pooling else "head",
        scorer=f"{options.ensemble}:{options.head}" if options.ensemble else f"study-pooling:{options.study_pooling}" if options.study_pooling else options.head,
        consumes="embeddings",
        fingerprint=fingerprint,
        options=options,
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
            **({"augmentation": views_record} if views_record else {}),
            **({"member_aurocs": members} if members else {}),
        },
    )
    extras = fitted_extras(best, splits, options.seed, options.n_resamples, sections=member_sections)
    write_run(out, record, best.scorer, Evaluation(best.p_test, splits["test"], metrics), extras=extras)
    return metrics
