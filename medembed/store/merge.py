"""Joining shard stores into one: `merge_stores` (one fingerprint, one set of token levels, disjoint ids)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medembed.store.reader import open_store
from medembed.store.schema import (
    FINGERPRINT_KEYS,
    ProvenanceWarning,
    StoreError,
    _describe_levels,
    fingerprint_mismatch,
    provenance_differences,
)
from medembed.store.writer import StoreWriter, consolidate_store


def merge_stores(inputs: Sequence[Path | str], out: Path | str) -> Path:
    """Join shard stores (one fingerprint, one set of token levels, disjoint ids) into the store `out`, one
    plain file; `merge_stores([s], s)` consolidates the store `s` in place (see `consolidate_store`).

    `out` may already exist (a resumed distributed run): it must have the same fingerprint, and rows it
    already holds are skipped. Ids present in two inputs are refused. Inputs created in different
    environments warn (ProvenanceWarning); `out` records the first input's provenance.
    """
    if not inputs:
        raise StoreError("merge needs at least one input store")
    if len(inputs) == 1 and Path(out).exists() and Path(inputs[0]).resolve() == Path(out).resolve():
        return consolidate_store(out)
    stores = [open_store(p) for p in inputs]
    for store in stores[1:]:
        diff = fingerprint_mismatch(stores[0].fingerprint, store.fingerprint)
        if diff:
            raise StoreError(f"refusing to mix {stores[0].path} and {store.path}: fingerprints differ ({'; '.join(diff)})")
        if store.token_shapes != stores[0].token_shapes:
            raise StoreError(
                f"refusing to merge {stores[0].path} and {store.path}: token levels differ "
                f"({_describe_levels(stores[0].token_shapes)} vs {_describe_levels(store.token_shapes)})"
            )
    ids, counts = np.unique(np.concatenate([s.read_columns().image_id.astype(str) for s in stores]), return_counts=True)
    if (counts > 1).any():
        raise StoreError(f"shard stores overlap: image ids in more than one shard: {ids[counts > 1][:5].tolist()} ({int((counts > 1).sum())} in all)")
    for store in stores[1:]:
        differences = provenance_differences(stores[0].provenance, store.provenance)
        if differences:
            warnings.warn(
                f"merging stores made in different environments: {stores[0].path} vs {store.path}: {'; '.join(differences)}",
                ProvenanceWarning,
                stacklevel=2,
            )
    skip = {"fingerprint", "schema_version", "dim", "created", "medembed_version", "provenance", "token_levels",
            "layout", "segments", "next_segment", *FINGERPRINT_KEYS}
    metadata = {k: v for k, v in stores[0].attrs.items() if k not in skip}
    metadata["merged_from"] = json.dumps([str(s.path) for s in stores])
    failed: dict[str, str] = {}
    for store in stores:
        failed.update(store.failed())
    with StoreWriter(
        out, dim=stores[0].dim, fingerprint=stores[0].fingerprint, metadata=metadata, provenance=stores[0].provenance,
        tokens=stores[0].token_shapes, consolidate=True,
    ) as writer:
        for store in stores:
            table = store.read()
            todo = np.flatnonzero([i not in writer.done_ids(include_failed=False) for i in table.image_id])
            grids = {level: store.read_tokens(level, todo) for level in store.token_shapes}
            table = table.subset(todo)
            for start in range(0, len(table), 8192):
                part = slice(start, start + 8192)
                chunk = table.subset(part)
                writer.append(chunk.image_id, chunk.embeddings, chunk.columns, tokens={level: g[part] for level, g in grids.items()})
        failed = {k: v for k, v in failed.items() if k not in writer.done_ids(include_failed=False)}
        if failed:
            writer.add_failed(list(failed), list(failed.values()))
    return Path(out)
