"""Where a token grid cell lies in the original image: the grid of a level mapped back through the preprocessing.

`PreprocessSpec` turns an `H x W` image into the encoder's `size x size` input by zero-padding it to a centred
`S x S` square (`S = max(H, W)`, the odd pixel bottom/right) or by stretching it, then resizing. A level's grid
(`medembed.encoders.levels`: an `R x C` adaptive average pool of a feature map covering the whole input square)
splits that square into cells; this module maps them back: cell `(r, c)` covers the input fractions
`[floor(r h / R) / h, ceil((r + 1) h / R) / h)` of an `h`-row feature map (adaptive pooling's windows), or
`[r / R, (r + 1) / R)` when the map's size is not known (exact when `h` is a multiple of `R`). Under padding, a
cell's part in the zero border holds no image pixel and is cut off. The spec has no crop step; the test-time
`zoom` views are not grids and have no map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medembed.errors import MedembedError


@dataclass(frozen=True)
class Placement:
    """Where the original `height x width` image sits in the square the encoder sees, in original pixels: the
    square's side and the image's offset in it (both axes; zero and the image's own side when stretched)."""

    height: int
    width: int
    square_rows: float  # the square's side, counted in original rows (S padded, H stretched)
    square_cols: float
    top: float  # rows of zero border above the image (padded), 0 stretched
    left: float

    @classmethod
    def of(cls, height: int, width: int, pad_to_square: bool) -> Placement:
        if height < 1 or width < 1:
            raise MedembedError(f"an image is at least 1 x 1 pixels, got {height} x {width}")
        if not pad_to_square:
            return cls(height, width, float(height), float(width), 0.0, 0.0)
        side = max(height, width)
        return cls(height, width, float(side), float(side), float((side - height) // 2), float((side - width) // 2))


def cell_bounds(cells: int, map_side: int | None = None) -> np.ndarray:
    """`[cells, 2]` (start, end) fractions of the input square each of `cells` grid cells pools along one axis:
    adaptive average pooling's windows on a `map_side` feature map, or equal parts when map_side is None."""
    if cells < 1:
        raise MedembedError(f"a grid has at least one cell per side, got {cells}")
    k = np.arange(cells)
    if map_side is None:
        return np.stack([k / cells, (k + 1) / cells], axis=1)
    starts = np.floor(k * map_side / cells)
    ends = np.array([math.ceil((i + 1) * map_side / cells) for i in k], dtype=np.float64)
    return np.stack([starts / map_side, ends / map_side], axis=1)


def cell_boxes(placement: Placement, grid: tuple[int, int], map_shape: tuple[int, int] | None = None) -> np.ndarray:
    """`[R * C, 4]` boxes (top, left, bottom, right) in original pixel coordinates (continuous, bottom/right
    exclusive), row-major as the level's tokens 1..R*C; a cell wholly in the zero border has zero height or width."""
    rows = cell_bounds(grid[0], map_shape[0] if map_shape else None) * placement.square_rows - placement.top
    cols = cell_bounds(grid[1], map_shape[1] if map_shape else None) * placement.square_cols - placement.left
    rows = np.clip(rows, 0, placement.height)
    cols = np.clip(cols, 0, placement.width)
    return np.array([[r0, c0, r1, c1] for r0, r1 in rows for c0, c1 in cols], dtype=np.float64)


def _membership(pixels: int, original: int, square: float, offset: float, bounds: np.ndarray) -> np.ndarray:
    """`[pixels, cells]` 1.0 where the centre of output pixel i (of `pixels` spanning the `original` side) lies
    in a cell's window."""
    centres = (np.arange(pixels) + 0.5) * (original / pixels)
    fraction = (centres + offset) / square
    return ((bounds[:, 0] <= fraction[:, None]) & (fraction[:, None] < bounds[:, 1])).astype(np.float64)


def attention_on_image(
    weights: np.ndarray, placement: Placement, grid: tuple[int, int], out_shape: tuple[int, int] | None = None,
    map_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """`[rows, cols]` map of the grid cells' `weights` (`[R * C]`, row-major) over the original image, sampled at
    `out_shape` (default the image's own size; a thumbnail's size draws it over the thumbnail): each pixel gets
    the weight of the cell that pooled it (the mean weight where adaptive windows overlap)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (grid[0] * grid[1],):
        raise MedembedError(f"a {grid[0]} x {grid[1]} grid has {grid[0] * grid[1]} cell weights, got shape {weights.shape}")
    out_rows, out_cols = out_shape or (placement.height, placement.width)
    row_member = _membership(out_rows, placement.height, placement.square_rows, placement.top, cell_bounds(grid[0], map_shape[0] if map_shape else None))
    col_member = _membership(out_cols, placement.width, placement.square_cols, placement.left, cell_bounds(grid[1], map_shape[1] if map_shape else None))
    total = row_member @ weights.reshape(grid) @ col_member.T
    covered = np.outer(row_member.sum(axis=1), col_member.sum(axis=1))
    return np.divide(total, covered, out=np.zeros_like(total), where=covered > 0)
