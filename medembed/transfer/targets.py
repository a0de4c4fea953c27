"""The rows of another site that a run can score: a store (embedding runs) or a manifest and its images (image runs).

A target store must carry the run's fingerprint. One exception is made, and noted: a store whose preprocessing
is the run's own preceded by a `medembed.data.corrupt` corruption (a simulated other site) differs only in its
preprocess hash, which records that corruption.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medembed.errors import MedembedError
from medembed.data.manifest import SPLITS, read_manifest
from medembed.protocol.splits import Split, level_tokens
from medembed.store import EmbeddingTable, fingerprint_mismatch, open_store, read_stores
from medembed.options.transfer import ALL_ROWS



def simulated_shift(run_preprocess: str, store_preprocess: str) -> str | None:
    """"contrast severity 3" when the store's preprocessing is the run's plus a corruption, else None."""
    try:
        run_spec, store_spec = json.loads(run_preprocess), json.loads(store_preprocess)
    except (TypeError, ValueError):
        return None
    corruption = store_spec.pop("corruption", None) if isinstance(store_spec, dict) else None
    if not isinstance(corruption, dict) or store_spec != run_spec:
        return None
    return f"{corruption.get('name')} severity {corruption.get('severity')}"


def check_target_store(run: Any, store_path: Path) -> list[str]:
    """Refuse a store the run cannot score; notes on what was accepted (a simulated shift)."""
    store = open_store(store_path)
    if store.being_written():
        raise MedembedError(store.partial_reason())
    members = run.record.details.get("members") or []  # an ensemble on one store records that store's fingerprint there
    diff = fingerprint_mismatch(members[0]["fingerprint"] if members else run.record.fingerprint, store.fingerprint)
    if not diff:
        return []
    shift = simulated_shift(run.record.preprocess, str(store.attrs.get("preprocess", "")))
    if shift and all(line.startswith("preprocess_hash:") for line in diff):
        return [f"{store_path}: the run's preprocessing under a simulated shift ({shift}); its preprocess hash differs by that alone"]
    raise MedembedError(f"{store_path}: embeddings differ from the ones this run was fitted on ({'; '.join(diff)})")


def target_rows(run: Any, target: Path, root: Path | None = None, split: str = ALL_ROWS, columns_from: Path | None = None) -> tuple[Split, list[str]]:
    """Every row (or one split's) of `target` that the run's scorer can read, labelled or not, and notes.

    Embedding runs take a store; image runs (the CNN) a manifest CSV with the folder `root` of its images."""
    target = Path(target)
    if split != ALL_ROWS and split not in SPLITS:
        raise MedembedError(f"split must be {ALL_ROWS} or one of {', '.join(SPLITS)}; got {split!r}")
    members = run.record.details.get("members") or []
    if len(members) > 1:
        raise MedembedError(f"{run.directory}: an ensemble of {len(members)} encoders' stores scores rows joined across stores; "
                            "validate it at another site with medembed predict on that site's images")
    if run.record.consumes == "embeddings":
        if target.suffix.lower() == ".csv":
            raise MedembedError(f"{target}: a {run.record.kind} run scores embeddings; extract the manifest into a store first (medembed extract) and pass the store")
        notes = check_target_store(run, target)
        table, _ = read_stores([target])
        level = str(run.record.options.get("level") or "")  # a token head reads a level's tokens [N, T, C], not the pooled rows
        if level:
            table = EmbeddingTable(level_tokens([target], level), table.image_id, table.columns)
        rows = Split.from_table(table)
        bad = ~np.isfinite(np.asarray(table.embeddings, dtype=np.float32)).all(axis=1)
        if bad.any():
            raise MedembedError(f"{target}: {int(bad.sum())} embeddings are NaN or infinite, e.g. image ids {table.image_id[bad][:5].tolist()}; re-extract them")
        split_of_row = table.columns["split"].astype(str)
    else:
        if target.suffix.lower() != ".csv" or root is None:
            raise MedembedError(f"{target}: a {run.record.kind} run scores images, not a store; pass its manifest CSV and --root (the folder of its images)")
        manifest = read_manifest(target)
        pixels, decoded, failed = run.scorer.load_images(manifest, Path(root))
        rows = Split.from_manifest(manifest).take(np.flatnonzero(decoded), X=pixels)
        split_of_row = manifest.split[decoded].astype(str)
        notes = [f"{len(failed)} target images could not be read"] if failed else []
    if split != ALL_ROWS:
        rows = rows.take(np.flatnonzero(split_of_row == split))
    if len(rows) == 0:
        raise MedembedError(f"{target}: no rows to score" + ("" if split == ALL_ROWS else f" in split {split!r}"))
    if columns_from is not None:
        rows = with_manifest_columns(rows, Path(columns_from))
    return rows, notes


def with_manifest_columns(rows: Split, manifest_path: Path) -> Split:
    """`rows` with every column of the manifest joined by image id into `rows.extra` ("" where it has no row)."""
    manifest = read_manifest(manifest_path)
    position = {image_id: i for i, image_id in enumerate(manifest.image_id)}
    found = np.array([position.get(i, -1) for i in rows.image_id], dtype=np.intp)
    if (found < 0).all():
        raise MedembedError(f"{manifest_path}: none of the {len(rows)} image ids is in this manifest")
    extra = dict(getattr(rows, "extra", {}) or {})
    for name, values in manifest.columns.items():
        if name in ("image_id", "path"):
            continue
        extra[name] = np.where(found >= 0, np.asarray(values, dtype=object)[np.maximum(found, 0)], "").astype(str)
    rows.extra = extra
    return rows


def labelled(rows: Split) -> Split:
    """The rows with a known label."""
    return rows.take(np.flatnonzero(rows.y >= 0))
