"""The data of the protocol: train/val/test splits of a store (or a manifest, or several encoders' stores joined by
image id), checked for leakage and bad values.

Train on ``train``, choose everything on ``val``, report on ``test``. A store without ``val`` has one carved from
``train``, grouped by patient (study where there is none) and stratified by label and body part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medembed.errors import MedembedError
from medembed.data.manifest import SPLITS, Manifest, assign_grouped_split
from medembed.store import EmbeddingTable, fingerprint_mismatch, level_tokens, open_store, read_stores


# Columns Split holds as fields (or drops: label is y); every other column is carried in Split.extra.
_CORE_COLUMNS = ("label", "study_id", "patient_id", "body_part")


@dataclass
class Split:
    """One split's inputs, labels and grouping columns."""

    X: Any  # [N, D] float16 | float32 embeddings, or None for image scorers (pixels come from the images)
    y: np.ndarray  # [N] int8 {0, 1}
    image_id: np.ndarray
    study_id: np.ndarray  # image id where the store has none: each image its own study
    patient_id: np.ndarray  # study id where the store has none: the resampling / grouping unit
    body_part: np.ndarray
    has_patients: bool
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # other manifest columns [N] str (subgroups: view, site)

    @classmethod
    def from_columns(cls, X: Any, label: np.ndarray, image_id: np.ndarray, columns: dict[str, np.ndarray]) -> Split:
        """From aligned columns (a store table's or a manifest's)."""
        image_id = np.asarray(image_id).astype(str)
        study_col, patient_col = (np.asarray(columns[c]).astype(str) for c in ("study_id", "patient_id"))
        study = np.where(study_col != "", study_col, image_id)
        patient = np.where(patient_col != "", patient_col, study)
        extra = {name: np.asarray(values).astype(str) for name, values in columns.items() if name not in _CORE_COLUMNS}
        return cls(X, np.asarray(label).astype(np.int8), image_id, study, patient,
                   np.asarray(columns["body_part"]).astype(str), bool((patient_col != "").any()), extra)

    @classmethod
    def from_table(cls, table: EmbeddingTable) -> Split:
        """The rows of a store table."""
        return cls.from_columns(table.embeddings, table.label, table.image_id, table.columns)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> Split:
        """The rows of a manifest (no embeddings: for scorers that read images)."""
        columns = {"study_id": manifest.study_id, "patient_id": manifest.patient_id, "body_part": manifest.body_part}
        columns |= {name: values for name, values in manifest.columns.items() if name not in ("image_id", "path", "label")}
        return cls.from_columns(None, manifest.label, manifest.image_id, columns)

    def take(self, rows: np.ndarray, X: Any = None) -> Split:
        """The split restricted to `rows` (indices or a mask), with `X` replacing the inputs when given."""
        inputs = X if X is not None else (None if self.X is None else self.X[rows])
        return Split(inputs, self.y[rows], self.image_id[rows], self.study_id[rows], self.patient_id[rows],
                     self.body_part[rows], self.has_patients, {name: values[rows] for name, values in self.extra.items()})

    def __len__(self) -> int:
        return len(self.y)


def split_sizes(splits: dict[str, Split]) -> dict[str, dict[str, int]]:
    """Images, abnormal images and studies per split (what run.json records)."""
    return {
        name: {"images": len(rows), "abnormal": int(rows.y.sum()), "studies": int(len(np.unique(rows.study_id)))}
        for name, rows in splits.items()
    }


def load_splits(
    stores: list[Path], *, val_fraction: float = 0.125, seed: int = 0, level: str | None = None
) -> tuple[dict[str, Split], dict[str, str], list[str]]:
    """Train/val/test splits of one or more stores (one fingerprint), checked for leakage and bad values.

    `level`: X is that token level `[N, T, C]` instead of the pooled embeddings; levels joined by "+"
    (block14+block10@7x7) are concatenated along the channels (they must have the same token count).
    Returns the splits, the fingerprint and notes (e.g. rows dropped for unknown labels, a carved val split).
    """
    stores = [Path(s) for s in stores]
    table, fingerprint = read_stores(stores)
    if level:
        table = EmbeddingTable(level_tokens(stores, level), table.image_id, table.columns)
    notes: list[str] = []
    failed = sum(len(open_store(s).failed()) for s in stores)
    if failed:
        notes.append(f"{failed} images the extractor could not read (the store's failed table) are not scored")
    return table_splits(table, stores, val_fraction=val_fraction, seed=seed, notes=notes), fingerprint, notes


def table_splits(table: EmbeddingTable, stores: list[Path], *, val_fraction: float, seed: int, notes: list[str]) -> dict[str, Split]:
    """Train/val/test splits of rows read from `stores` (named in errors), checked; appends to `notes`."""
    if len(table) == 0:
        raise MedembedError(f"{', '.join(map(str, stores))}: the store has no rows")
    labelled = table.label >= 0
    if not labelled.any():
        raise MedembedError(f"{stores[0]}: the store has no labels (label column is all unknown); fit needs labelled rows")
    if not labelled.all():
        notes.append(f"{int((~labelled).sum())} rows without a label left out")
        table = table.subset(labelled)
    bad = ~np.isfinite(table.embeddings.astype(np.float32)).reshape(len(table), -1).all(axis=1)
    if bad.any():
        raise MedembedError(f"{int(bad.sum())} embeddings are NaN or infinite, e.g. image ids {table.image_id[bad][:5].tolist()}; re-extract them")
    split = table.columns["split"].astype(str)
    return _named_splits(Split.from_table(table), split, val_fraction, seed, notes, where=str(stores[0]))


@dataclass
class JoinedStores:
    """Splits of the members' embeddings side by side, with what run.json records about each member store."""

    splits: dict[str, Split]
    fingerprint: dict[str, str]  # the members' fingerprints, field by field, joined with " + " (for reports)
    notes: list[str]
    members: list[dict[str, Any]]  # per store: store, fingerprint, encoder_options, preprocess, dim
    widths: tuple[int, ...]
    blocks: list[dict[str, Any]] = field(default_factory=list)  # token-level members' blocks (medembed.scorers.members)


def join_stores(stores: list[Path]) -> tuple[EmbeddingTable, list[str]]:
    """The rows of every store that all of them hold, embeddings side by side `[N, D1 + D2 + ...]` (the first
    store's row order), and notes. Refuses stores with no image in common and ones that disagree on an image's
    label or split."""
    tables = [open_store(s).read() for s in stores]
    common = set(tables[0].image_id.tolist())
    for table in tables[1:]:
        common &= set(table.image_id.tolist())
    if not common:
        raise MedembedError(
            f"{stores[0]} and {', '.join(map(str, stores[1:]))} share no image ids; an ensemble joins stores of the same images "
            "(extract every encoder from one manifest)"
        )
    order = [image_id for image_id in tables[0].image_id.tolist() if image_id in common]
    joined = []
    for store, table in zip(stores, tables):
        position = {image_id: i for i, image_id in enumerate(table.image_id.tolist())}
        joined.append(table.subset(np.array([position[i] for i in order], dtype=np.int64)))
    first = joined[0]
    for store, table in zip(stores[1:], joined[1:]):
        for column in ("label", "split"):
            differ = np.flatnonzero(table.columns[column] != first.columns[column])
            if len(differ):
                examples = ", ".join(f"{first.image_id[i]} ({first.columns[column][i]} vs {table.columns[column][i]})" for i in differ[:3])
                raise MedembedError(
                    f"{store}: {len(differ)} images have another {column} than in {stores[0]}, e.g. {examples}; "
                    "the members must be extracted from one manifest"
                )
    notes = []
    left_out = sum(len(t) for t in tables) - len(tables) * len(order)
    if left_out:
        notes.append(f"{len(order)} images are in every member store; {left_out} member rows of images missing from another member left out")
    failed = set().union(*(open_store(s).failed() for s in stores))
    if failed:
        notes.append(f"{len(failed)} images an extractor could not read (a member store's failed table) are not scored")
    dtype = np.result_type(*(t.embeddings.dtype for t in joined))
    return EmbeddingTable(np.hstack([t.embeddings.astype(dtype) for t in joined]), first.image_id, dict(first.columns)), notes


def load_joined_splits(stores: list[Path], *, val_fraction: float, seed: int, level: str = "") -> JoinedStores:
    """Train/val/test splits of several encoders' stores joined by image id (one store: its own rows). With `level`
    (an ensemble's --level, `medembed.scorers.members.block_plan`) each split's X is a `MemberInputs`: the pooled
    rows plus each (store, level) block's tokens."""
    from medembed.scorers.members import block_sources

    stores = [Path(s) for s in stores]
    blocks = block_sources(stores, level) if level else []  # a missing level is refused before any rows are read
    opened = [open_store(s) for s in stores]
    check_distinct_members(opened, tokens_asked=bool(level))
    table, notes = join_stores(stores)
    splits = table_splits(table, stores, val_fraction=val_fraction, seed=seed, notes=notes)
    if blocks:
        from medembed.scorers.members import MemberInputs, gather_blocks

        gathered = gather_blocks(np.concatenate([rows.image_id for rows in splits.values()]), [(stores[b["store"]], b["level"]) for b in blocks])
        ends = np.cumsum([len(rows) for rows in splits.values()])
        splits = {name: replace(rows, X=MemberInputs(rows.X, tuple(tokens[end - len(rows):end] for tokens in gathered)))
                  for (name, rows), end in zip(splits.items(), ends)}
    members = [
        {
            "store": str(path.resolve()), "fingerprint": dict(store.fingerprint), "dim": int(store.dim),
            "encoder_options": _encoder_options(store), "preprocess": str(store.attrs.get("preprocess", "")),
        }
        for path, store in zip(stores, opened)
    ]
    keys = list(dict.fromkeys(k for store in opened for k in store.fingerprint))
    fingerprint = {k: " + ".join(str(s.fingerprint.get(k, "")) for s in opened) for k in keys} if len(opened) > 1 else dict(opened[0].fingerprint)
    return JoinedStores(splits, fingerprint, notes, members, tuple(m["dim"] for m in members), blocks)


def check_distinct_members(opened: list[Any], *, tokens_asked: bool) -> None:
    """Refuse ensemble members that hold the same pooled embeddings: one fingerprint (shards of one extraction), or
    fingerprints that differ only in `levels` (one encoder extracted twice with other token levels: its pooled
    vectors are the same, so concatenating or averaging them adds nothing but a duplicate). Members read for their
    token levels (`tokens_asked`) may be such stores: their levels are what differs."""
    for k, store in enumerate(opened):
        for other in opened[:k]:
            differ = fingerprint_mismatch(other.fingerprint, store.fingerprint)
            if not differ:
                raise MedembedError(
                    f"{store.path} and {other.path} hold embeddings of one fingerprint (shards of one extraction?); an ensemble joins "
                    "stores of different encoders; fit shards without --ensemble"
                )
            if not tokens_asked and all(line.startswith("levels:") for line in differ):
                raise MedembedError(
                    f"{store.path} and {other.path} hold the same pooled embeddings (one encoder and preprocessing; their fingerprints "
                    f"differ only in token levels, {differ[0].removeprefix('levels: ')}); an ensemble of them joins duplicates: "
                    "fit one of them, or ensemble stores of different encoders"
                )


def _encoder_options(store: Any) -> dict[str, Any]:
    return json.loads(str(store.attrs.get("encoder_options", "{}")))


def manifest_splits(manifest: Manifest, *, val_fraction: float = 0.125, seed: int = 0) -> tuple[dict[str, Split], np.ndarray, list[str]]:
    """Train/val/test splits of a manifest's labelled rows, for scorers that read images; also each split row's
    manifest row index (`rows[name]` as one array per split, concatenated in SPLITS order) and notes."""
    usable = (manifest.label >= 0) & np.isin(manifest.split, SPLITS)
    notes = [f"{int((~usable).sum())} rows without a label or split left out"] if not usable.all() else []
    kept = np.flatnonzero(usable)
    if not len(kept):
        raise MedembedError("the manifest has no labelled rows with a train/val/test split")
    rows = Split.from_manifest(manifest.subset(kept))
    splits = _named_splits(rows, manifest.split[kept].astype(str), val_fraction, seed, notes, where="the manifest")
    return splits, kept, notes


def _named_splits(rows: Split, split: np.ndarray, val_fraction: float, seed: int, notes: list[str], where: str) -> dict[str, Split]:
    if not (split == "test").any():
        raise MedembedError(f"{where} has no test split; build the manifest with a split column (train/val/test)")
    if not (split == "val").any():
        split = _carve_val(rows, split, val_fraction, seed, notes)
    splits = {name: rows.take(split == name) for name in SPLITS}
    _check_no_leakage(splits)
    for name in ("train", "val"):
        if len(np.unique(splits[name].y)) < 2:
            raise MedembedError(f"the {name} split has a single class ({len(splits[name])} rows, all label {splits[name].y[:1].tolist()}); both classes are needed")
    return splits


def _carve_val(rows: Split, split: np.ndarray, val_fraction: float, seed: int, notes: list[str]) -> np.ndarray:
    train = split == "train"
    strata = np.char.add(rows.y[train].astype(str), rows.body_part[train])
    carved = assign_grouped_split(rows.patient_id[train], strata, {"train": 1 - val_fraction, "val": val_fraction}, seed=seed)
    split = split.copy()
    split[train] = carved
    unit = "patient" if rows.has_patients else "study"
    notes.append(f"no val split in the store: {int((carved == 'val').sum())} train images carved into val, grouped by {unit}")
    return split


def _check_no_leakage(splits: dict[str, Split]) -> None:
    seen: dict[str, str] = {}
    for name, rows in splits.items():
        for patient in np.unique(rows.patient_id):
            if patient in seen and seen[patient] != name:
                unit = "patient" if rows.has_patients else "study"
                raise MedembedError(f"leakage: {unit} {patient!r} is in both {seen[patient]} and {name}; fix the manifest's split")
            seen[patient] = name
