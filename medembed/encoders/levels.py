"""Level specs: which intermediate feature grid of an encoder to store as tokens, and how to pool it.

A level is written `NAME[@RxC]`: NAME is one of the encoder's levels (`medembed encoders list` shows them:
`block14`, `layer:-4` counted from the end, `final`), `@RxC` average-pools the level's feature map to an R x C
grid (adaptive average pooling, as torch's `adaptive_avg_pool2d`); without it the level's own grid is kept.
`--tokens 2x2` is shorthand for `final@2x2`: the regional tokens of the final feature map.

Every level is stored as `[T, C]` tokens: token 0 is the global average of the level's (unpooled) feature
map, tokens 1..R*C the grid cells in row-major order. So a head always has the global token beside the
regional ones (the attention head's "mean token"), and `T = 1 + R * C`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medembed.errors import MedembedError

FINAL = "final"
_LEVEL = re.compile(r"^(?P<base>[a-z][a-z_]*?)(?::?(?P<index>-?\d+))?(?:@(?P<rows>\d+)x(?P<cols>\d+))?$")
_GRID = re.compile(r"^(?P<rows>\d+)x(?P<cols>\d+)$")
MAX_GRID_SIDE = 64  # a 65 x 65 grid of a 7 x 7 map is a typo, not a level


class LevelError(MedembedError):
    """A level spec that cannot be parsed, or that names no level of the encoder."""


@dataclass(frozen=True)
class LevelSpec:
    """One level: `base` (e.g. "block", "layer", "final"), its `index` (None for unindexed levels; negative counts
    from the end until the encoder resolves it) and the `grid` (rows, cols) it is pooled to (None: its own)."""

    base: str
    index: int | None = None
    grid: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """The level without its grid: "block14", "layer-4" (unresolved), "final"."""
        return self.base if self.index is None else f"{self.base}{self.index}"

    def canonical(self) -> str:
        """The spec as stored (dataset name `tokens/<canonical>`, fingerprint): "block10@7x7", "final"."""
        return self.name if self.grid is None else f"{self.name}@{self.grid[0]}x{self.grid[1]}"

    def __str__(self) -> str:
        return self.canonical()


def parse_level(text: str) -> LevelSpec:
    """`"block10@7x7"` -> LevelSpec("block", 10, (7, 7)); `"layer:-4"` -> LevelSpec("layer", -4)."""
    match = _LEVEL.match(str(text).strip().lower())
    if not match:
        raise LevelError(f"level {text!r} is not NAME[@RxC] (e.g. block14, block10@7x7, layer:-4@4x4, final@2x2)")
    grid = None
    if match["rows"] is not None:
        grid = _grid(match["rows"], match["cols"], text)
    index = None if match["index"] is None else int(match["index"])
    return LevelSpec(match["base"], index, grid)


def parse_grid(text: str) -> tuple[int, int]:
    """`"4x4"` -> (4, 4)."""
    match = _GRID.match(str(text).strip().lower())
    if not match:
        raise LevelError(f"token grid {text!r} is not RxC (e.g. 2x2, 4x4)")
    return _grid(match["rows"], match["cols"], text)


def _grid(rows: str, cols: str, text: str) -> tuple[int, int]:
    grid = (int(rows), int(cols))
    if not all(1 <= side <= MAX_GRID_SIDE for side in grid):
        raise LevelError(f"level {text!r}: grid sides must be 1..{MAX_GRID_SIDE}")
    return grid


def split_list(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Items of a comma-separated option (or of a list of them), stripped, empties dropped."""
    if text is None:
        return []
    items = [text] if isinstance(text, str) else list(text)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def requested_levels(levels: str | list[str] | None = None, tokens: str | list[str] | None = None) -> list[LevelSpec]:
    """The levels `--levels` and `--tokens` ask for together (tokens RxC = level final@RxC), duplicates dropped."""
    specs = [parse_level(item) for item in split_list(levels)]
    specs += [LevelSpec(FINAL, None, parse_grid(item)) for item in split_list(tokens)]
    return list(dict.fromkeys(specs))


def canonical_levels(specs: list[LevelSpec]) -> str:
    """The fingerprint's `levels` string: canonical specs joined by commas, in the order asked ("" for none)."""
    return ",".join(spec.canonical() for spec in specs)


def tokens_from_map(feature_map: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, 1 + R*C', C]`: the global average, then the map pooled to `grid` (its own grid when
    None) in row-major order."""
    pooled = feature_map if grid is None else F.adaptive_avg_pool2d(feature_map, grid)
    cells = pooled.flatten(2).transpose(1, 2)
    return torch.cat([feature_map.mean(dim=(2, 3)).unsqueeze(1), cells], dim=1)


def grid_side_tokens(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """Patch tokens `[B, side*side, C]` of a ViT -> its feature map `[B, C, side, side]`."""
    batch, count, channels = tokens.shape
    if count != side * side:
        raise LevelError(f"{count} patch tokens do not form a {side} x {side} grid")
    return tokens.transpose(1, 2).reshape(batch, channels, side, side)


def token_count(map_shape: tuple[int, int], grid: tuple[int, int] | None) -> int:
    """Tokens a level stores for a feature map of `map_shape` (H, W) pooled to `grid`: 1 + cells."""
    rows, cols = grid if grid is not None else map_shape
    return 1 + rows * cols
