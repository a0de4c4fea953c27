"""The augmentation bank beside a store (``S.h5`` -> ``S.views.h5``, `extract --augment K`): where it lives, the
train views a head that trains in epochs draws from, and what `medembed info` says about it. Every bank is
untrusted input, checked against its store before a view is read. The views themselves are `medembed.data.augment`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medembed.data.augment import SOURCE_COLUMN, VIEW_COLUMN, AugmentedPreprocess, AugmentRecipe, parse_view_id
from medembed.data.images import PreprocessSpec
from medembed.errors import MedembedError


def bank_path(store: Path | str) -> Path:
    """Where the augmentation bank of `store` lives: ``S.h5`` -> ``S.views.h5``."""
    store = Path(store)
    return store.with_name(f"{store.stem}.views{store.suffix or '.h5'}")


@dataclass
class TrainViews:
    """Embedded views of train rows, for a head that trains in epochs: `X` `[M, ...]` (the pooled vectors or a
    token level, like the train split's X), `row` `[M]` the train row each view is of, and the bank's recipe."""

    X: np.ndarray
    row: np.ndarray
    recipe: AugmentRecipe

    def check(self, n_rows: int, shape: tuple[int, ...]) -> None:
        """Refuse views that do not fit `n_rows` train rows of inputs shaped `shape` (per row), in one line."""
        row = np.asarray(self.row)
        if self.X.shape[1:] != tuple(shape) or row.shape != (len(self.X),):
            raise MedembedError(f"views of shape {self.X.shape} (rows {row.shape}) do not fit train inputs [N, {', '.join(map(str, shape))}]")
        if not np.issubdtype(row.dtype, np.integer) or (len(row) and (row.min() < 0 or row.max() >= n_rows)):
            raise MedembedError(f"views name train rows outside 0..{n_rows - 1}")

    def draw(self, n_rows: int, rng: np.random.Generator) -> np.ndarray:
        """For each of `n_rows` train rows one choice among its original and its views, uniformly: an index into
        `concatenate([X_train, views.X])` (i for the original of row i, n_rows + m for view m)."""
        counts = np.bincount(self.row, minlength=n_rows)
        order = np.argsort(self.row, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pick = np.floor(rng.random(n_rows) * (counts + 1)).astype(np.intp)  # 0: the original
        chosen = np.arange(n_rows, dtype=np.intp)
        has_view = pick > 0
        chosen[has_view] = n_rows + order[starts[has_view] + pick[has_view] - 1]
        return chosen

    def subset(self, rows: np.ndarray) -> TrainViews:
        """The views of train rows `rows` (distinct indices, or a boolean mask), re-indexed so that `row` counts
        within the subset (view of `rows[j]` -> row j); views of other rows are dropped. For a fit on part of
        train, such as a stacked ensemble's out-of-fold members."""
        rows = np.asarray(rows)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.intp, copy=False)
        if rows.ndim != 1 or len(np.unique(rows)) != len(rows) or (len(rows) and rows.min() < 0):
            raise MedembedError("a subset of train views needs distinct non-negative row indices")
        size = int(max(rows.max(initial=-1), np.asarray(self.row).max(initial=-1))) + 1
        position = np.full(size, -1, dtype=np.intp)
        position[rows] = np.arange(len(rows), dtype=np.intp)
        row = position[np.asarray(self.row, dtype=np.intp)]
        kept = row >= 0
        return TrainViews(self.X[kept], row[kept], self.recipe)

    def record(self) -> dict[str, Any]:
        """What run.json records about the views a fit drew from."""
        return {"recipe": self.recipe.to_dict(), "views": int(len(self.X)),
                "train_rows_with_views": int(len(np.unique(self.row))), "choices_per_row": "the original or one of its views, uniformly, per epoch"}


def load_train_views(stores: list[Path], train_ids: np.ndarray, level: str | None) -> tuple[TrainViews | None, dict[str, Any], list[str]]:
    """The views in the banks of `stores` (shards of one extraction) of the train rows `train_ids`, as X of
    `level` (pooled when None), with what run.json records and notes; (None, {}, []) when no store has a bank.

    Every bank is checked (untrusted input) against its store: its recipe, its fingerprint (the store's, with the
    recipe's preprocess hash), the store fingerprint it records, its dim and levels, and each row's id against its
    source and view columns and the recipe's K; one line refuses a bad bank, shards of which some have a bank and
    some none, or banks of different recipes. Views of images that are not train rows here (the manifest moved
    them to val or test, or they failed) are left out, so val and test never see a view.
    """
    from medembed.store.reader import open_store
    from medembed.store.schema import fingerprint_mismatch

    stores = [Path(s) for s in stores]
    banks = [bank_path(s) for s in stores]
    present = [b.exists() for b in banks]
    if not any(present):
        return None, {}, []
    if not all(present):
        raise MedembedError(f"refusing to mix shards with and without an augmentation bank: {banks[present.index(False)]} is missing "
                            f"but {banks[present.index(True)]} exists; extract every shard with the same --augment")
    recipes, tables = [], []
    for store_path, path in zip(stores, banks):
        recipe, X, ids = _read_bank(open_store(store_path), open_store(path), level, fingerprint_mismatch)
        recipes.append(recipe)
        tables.append((X, ids))
    for path, recipe in zip(banks[1:], recipes[1:]):
        if recipe != recipes[0]:
            raise MedembedError(f"refusing to mix augmentation banks of different recipes: {banks[0]} ({recipes[0].describe()}) and {path} ({recipe.describe()})")
    position = {image_id: k for k, image_id in enumerate(np.asarray(train_ids).astype(str).tolist())}
    X = np.concatenate([x for x, _ in tables])
    sources = np.concatenate([s for _, s in tables])
    row = np.array([position.get(s, -1) for s in sources.tolist()], dtype=np.intp)
    kept = row >= 0
    views = TrainViews(X[kept], row[kept], recipes[0])
    notes = [f"augmentation bank: {int(kept.sum())} views of {len(np.unique(row[kept]))} train images ({recipes[0].describe()})"]
    if (~kept).any():
        notes.append(f"augmentation bank: {int((~kept).sum())} views of images that are not train rows here left out (val and test never use views)")
    record = {"banks": [str(b.resolve()) for b in banks], **views.record()}
    return views, record, notes


def _read_bank(store: Any, bank: Any, level: str | None, mismatch: Any) -> tuple[AugmentRecipe, np.ndarray, np.ndarray]:
    """(recipe, X of `level`, each row's source image id) of the bank of `store`, every structure checked."""
    where = str(bank.path)
    if bank.being_written():
        raise MedembedError(f"{where}: an extraction is writing this augmentation bank now; wait for it to finish")
    if "augment" not in bank.attrs:
        raise MedembedError(f"{where}: not an augmentation bank (no recipe recorded); move it away or rename it")
    recipe = AugmentRecipe.from_json(bank.attrs["augment"], where)
    try:
        spec = PreprocessSpec.from_dict(json.loads(str(store.attrs.get("preprocess", ""))))
    except (ValueError, TypeError, KeyError, MedembedError):
        raise MedembedError(f"{store.path}: its preprocessing is not a plain spec (a corrupted variant?), so it has no augmentation bank; move {where} away") from None
    expected = dict(store.fingerprint) | {"preprocess_hash": AugmentedPreprocess(spec, recipe).hash()}
    differ = mismatch(expected, bank.fingerprint)
    if differ:
        raise MedembedError(f"{where} is not the augmentation bank of {store.path} or of its recipe (fingerprints differ: {'; '.join(differ)}); re-extract it with --augment")
    try:
        recorded = json.loads(str(bank.attrs.get("source_fingerprint", "")))
    except json.JSONDecodeError:
        recorded = None
    if not isinstance(recorded, dict) or mismatch(dict(store.fingerprint), recorded):
        raise MedembedError(f"{where}: the store fingerprint it records is not {store.path}'s; re-extract the bank with --augment")
    if bank.dim != store.dim:
        raise MedembedError(f"{where}: dim {bank.dim}, but {store.path} has dim {store.dim}")
    table = bank.read()
    for name in (SOURCE_COLUMN, VIEW_COLUMN):
        if name not in table.columns:
            raise MedembedError(f"{where}: the augmentation bank lacks its column {name!r}")
    parsed = [parse_view_id(i) for i in table.image_id.astype(str).tolist()]
    source, view = table.columns[SOURCE_COLUMN].astype(str), table.columns[VIEW_COLUMN].astype(str)
    bad = [k for k, p in enumerate(parsed) if p is None or p[0] != source[k] or str(p[1]) != view[k] or p[1] > recipe.views]
    if bad:
        raise MedembedError(f"{where}: {len(bad)} row(s) are not views 1..{recipe.views} of their source image, e.g. {table.image_id[bad[0]]!r} "
                            f"(source {source[bad[0]]!r}, view {view[bad[0]]!r}); re-extract the bank")
    if level:
        from medembed.store.reader import level_tokens

        X = level_tokens([bank.path], level)
    else:
        X = table.embeddings
    if not np.isfinite(X.astype(np.float32)).reshape(len(X), -1).all():
        raise MedembedError(f"{where}: some views are NaN or infinite; re-extract the bank")
    train = table.columns["split"].astype(str) == "train"
    return recipe, X[train], source[train]


def bank_summary(store_path: Path | str) -> dict[str, Any] | None:
    """What `medembed info` says about the augmentation bank of a store (None when it has none): its path, recipe,
    views per split, the bytes its rows hold (views x (dim + token grids) x dtype size) and the bytes on disk, and
    the problems `check` finds (the same checks `fit` makes before it reads views)."""
    from medembed.store.reader import open_store
    from medembed.store.schema import fingerprint_mismatch

    path = bank_path(store_path)
    if not path.exists():
        return None
    store = open_store(store_path)
    try:
        bank = open_store(path)
        summary = bank.summary()
    except MedembedError as error:  # not a store at all: say so beside the store's own summary
        return {"path": str(path), "recipe": "(unreadable)", "views_per_image": 0, "views": 0, "train_images": 0, "views_by_split": {},
                "row_bytes": 0, "view_bytes": 0, "bytes_on_disk": path.stat().st_size, "failed": 0, "problems": [str(error)], "readable": False}
    row_bytes = np.dtype(bank.dtype).itemsize * (bank.dim + sum(t * c for t, c in bank.token_shapes.values()))
    views = int(summary["rows"])
    train = int(store.summary()["splits"].get("train", {}).get("rows", 0))
    folder = path.parent / f"{path.name}.segments"
    on_disk = path.stat().st_size + (sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0)
    problems: list[str] = []
    try:
        recipe = _read_bank(store, bank, None, fingerprint_mismatch)[0]
        recipe_text, k = recipe.describe(), recipe.views
    except MedembedError as error:
        problems.append(str(error))
        recipe_text, k = "(unreadable)", 0
    return {
        "path": str(path), "recipe": recipe_text, "views_per_image": k, "views": views, "train_images": train,
        "views_by_split": {name: counts["rows"] for name, counts in summary["splits"].items()},
        "row_bytes": row_bytes, "view_bytes": views * row_bytes, "bytes_on_disk": on_disk, "failed": int(summary["failed"]),
        "problems": problems, "readable": True,
    }


def format_bank(bank: dict[str, Any]) -> list[str]:
    """The `medembed info` lines of `bank_summary`."""
    by_split = ", ".join(f"{name} {rows}" for name, rows in bank["views_by_split"].items()) or "none"
    lines = [
        f"{'views':<12} {bank['path']}: augmentation bank, {bank['recipe']}",
        f"{'':<12} {bank['views']} views ({by_split}; K={bank['views_per_image']} x {bank['train_images']} train images; val and test get none), "
        f"{bank['failed']} failed",
        f"{'':<12} {bank['view_bytes']:,} bytes of rows ({bank['row_bytes']:,} per view: K x the train split's rows), "
        f"{bank['bytes_on_disk']:,} bytes on disk",
    ]
    return lines + [f"{'':<12} problem: {problem}" for problem in bank["problems"]]
