"""The inputs of an ensemble whose members read token levels: one block per (member store, level), row-aligned.

    medembed fit effl0.h5 effl1.h5 --ensemble mean --head attention --level block14     each store's block14
    medembed fit effl0.h5 effl1.h5 --ensemble mean --head attention --level block14,block19   one level per store
    medembed fit effl0.h5 --ensemble mean --head adapter --level block12,block14        one store, two levels

`--level` of an ensemble is one level (every store's), one level per store (in order), or, with one store,
several levels of it. Every (store, level) pair is a block; each --head (and each of --ensemble-seeds seeds) is
a member on each block. Levels differ in shape (`[50, 192]` beside `[5, 1280]`), so the blocks are kept apart
rather than concatenated: `MemberInputs` holds them with the members' pooled embeddings side by side, which is
what code that treats a scorer's input as one matrix (the transfer reference's OOD part) sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medembed.errors import MedembedError


def ensemble_level_names(level: str) -> list[str]:
    """An ensemble's --level names (comma-separated; "" reads the pooled embeddings: none), refused in one line when
    they name auto: what can be refused before the stores are known."""
    levels = [part.strip() for part in str(level).split(",") if part.strip()]
    if "auto" in levels:
        raise MedembedError("an ensemble's --level names its levels (one for every store, one per store, or several of one store); auto is not searched")
    return levels


def block_plan(n_stores: int, level: str) -> list[tuple[int, str]]:
    """The ensemble's blocks `(store index, level)` for `--level` (comma-separated; "" reads the pooled embeddings: no blocks)."""
    levels = ensemble_level_names(level)
    if not levels:
        return []
    if len(levels) == 1:
        return [(k, levels[0]) for k in range(n_stores)]
    if len(levels) == n_stores and n_stores > 1:  # one per store: two encoders' stores may name the same level
        return list(enumerate(levels))
    if n_stores == 1:
        if len(set(levels)) != len(levels):
            raise MedembedError(f"--level {level!r} names a level of the store twice")
        return [(0, name) for name in levels]
    raise MedembedError(
        f"--level {level!r} names {len(levels)} levels for {n_stores} stores; give one level (every store's), one per store in "
        "order, or several levels of one store"
    )


@dataclass
class MemberInputs:
    """An ensemble's rows: `pooled` `[N, D1 + D2 + ...]` (each member store's pooled embedding, side by side) and
    `blocks`, one `[N, T, C]` token array per (store, level) block, in block order."""

    pooled: np.ndarray
    blocks: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if any(len(block) != len(self.pooled) for block in self.blocks):
            raise MedembedError(f"an ensemble's blocks hold {[len(b) for b in self.blocks]} rows, its pooled embeddings {len(self.pooled)}")

    def __len__(self) -> int:
        return len(self.pooled)

    def __getitem__(self, rows: Any) -> MemberInputs:
        return MemberInputs(self.pooled[rows], tuple(block[rows] for block in self.blocks))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The pooled embeddings (for code that needs one matrix per row, such as an OOD reference)."""
        return np.asarray(self.pooled, dtype=dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.pooled.shape


def gather_blocks(image_id: np.ndarray, sources: list[tuple[Path, str]]) -> tuple[np.ndarray, ...]:
    """For rows `image_id` (each in every source store), the tokens of each `(store, level)` source in that row
    order (levels joined by "+" concatenated along C, as for a single token head)."""
    from medembed.store import level_tokens
    from medembed.store import open_store

    blocks = []
    for path, level in sources:
        tokens = level_tokens([path], level)
        position = {name: i for i, name in enumerate(open_store(path).read().image_id.tolist())}
        missing = [name for name in image_id[:5] if name not in position]
        if missing:
            raise MedembedError(f"{path}: level {level!r} has no row for image ids {missing}")
        blocks.append(tokens[np.array([position[name] for name in image_id.tolist()], dtype=np.int64)])
    return tuple(blocks)


def block_sources(stores: list[Path], level: str) -> list[dict[str, Any]]:
    """Each block's source as an ensemble records it: store index, level, `[T, C]`, and the store's encoder and
    encoder options (an adapter member starts from them)."""
    import json

    from medembed.store import open_store

    sources = []
    for k, name in block_plan(len(stores), level):
        store = open_store(stores[k])
        parts = [part.strip() for part in name.split("+")]
        missing = [part for part in parts if part not in store.token_shapes]
        if missing:
            have = ", ".join(store.token_shapes) or "none (extract with --levels or --tokens)"
            raise MedembedError(f"{store.path}: no token level {missing[0]!r}; its levels: {have}")
        shapes = [store.token_shapes[part] for part in parts]
        if len({shape[0] for shape in shapes}) > 1:
            raise MedembedError(f"levels {name!r} cannot be concatenated: their token counts differ; pool them to one grid (@RxC)")
        sources.append({
            "store": k, "level": name, "token_shape": [int(shapes[0][0]), int(sum(shape[1] for shape in shapes))],
            "encoder": str(store.fingerprint["encoder"]), "encoder_options": json.loads(str(store.attrs.get("encoder_options", "{}"))),
        })
    return sources
