"""Attention maps of a token-head run: where its head looked, drawn over the original image.

The head's weights over a level's grid cells (`AttentionTokenHead.attention_weights`, `[N, R * C]`) are mapped
back through the run's preprocessing (`medembed.data.geometry`) onto the decoded image, so the warm cells land on
the pixels they pooled. Pooled-embedding heads, concatenating token heads and non-grid levels (test-time views)
have no map: `no_map_reason` says why in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medembed.data.geometry import Placement, attention_on_image, cell_boxes
from medembed.data.images import PreprocessSpec
from medembed.errors import MedembedError

if TYPE_CHECKING:  # record.py writes report.html, which draws these maps: a runtime import would be a circle
    from medembed.runs.record import Run, RunRecord

_ALPHA = 0.5  # how much of the heat colour covers the image


@dataclass(frozen=True)
class MapGeometry:
    """What placing a run's attention on an image needs: the level's grid (R, C), the preprocessing, and the
    feature map's (H, W) the grid pools (None when the encoder cannot say: cells are then equal parts)."""

    grid: tuple[int, int]
    spec: PreprocessSpec
    level: str
    map_shape: tuple[int, int] | None = None

    def boxes(self, height: int, width: int) -> np.ndarray:
        """`[R * C, 4]` (top, left, bottom, right) of each cell in an `height x width` original image."""
        return cell_boxes(Placement.of(height, width, self.spec.pad_to_square), self.grid, self.map_shape)


def no_map_reason(record: RunRecord, scorer: Any) -> str:
    """"" when the run's head has attention weights over a grid level, else the one-line reason it has none."""
    if not hasattr(scorer, "attention_weights"):
        what = f"a pooled-embedding {record.scorer} head" if not record.level else f"the {record.scorer} head"
        return f"no attention map: {what} gives no weight per image region (only the attention token head does)"
    if not record.preprocess:
        return "no attention map: the run does not record its preprocessing, so the grid cannot be placed on the image"
    return ""


def map_geometry(record: RunRecord, token_count: int) -> MapGeometry:
    """The grid of the run's level for `token_count` tokens per image (1 global + R * C cells), and its spec."""
    from medembed.encoders.levels import parse_level  # torch: only for token runs

    names = [part.strip() for part in record.level.split("+") if part.strip()]
    grids = set()
    for name in names:
        spec = parse_level(name)
        if spec.name == "views":
            raise MedembedError(f"level {name!r} holds test-time views, not image regions: it has no attention map")
        if spec.grid is not None:
            grids.add(spec.grid)
        else:  # the level's own grid: a square feature map of a square input
            side = math.isqrt(token_count - 1)
            if side * side != token_count - 1:
                raise MedembedError(f"level {name!r}: {token_count - 1} cells form no square grid; name its grid (NAME@RxC)")
            grids.add((side, side))
    if len(grids) != 1:
        raise MedembedError(f"levels {record.level!r} have different grids {sorted(grids)}: one map cannot place them all")
    grid = grids.pop()
    if grid[0] * grid[1] != token_count - 1:
        raise MedembedError(f"level {record.level!r} is a {grid[0]} x {grid[1]} grid but the rows hold {token_count - 1} cell tokens")
    shapes = {level_map_shape(record.fingerprint.get("encoder", ""), record.encoder_options, parse_level(name).name) for name in names}
    return MapGeometry(grid, PreprocessSpec.from_dict(_spec_fields(record)), record.level, shapes.pop() if len(shapes) == 1 else None)


def level_map_shape(encoder: str, options: dict[str, Any], level: str) -> tuple[int, int] | None:
    """(H, W) of the encoder's `level` feature map at its input size, from its block definitions (no weights
    loaded); None when medembed cannot build that encoder here or it does not know the level."""
    try:
        from medembed.encoders.runtime import build_encoder

        shape = build_encoder(encoder, options).level_map_shapes().get(level)
    except Exception:  # noqa: BLE001 - an encoder not installed here: the map falls back to equal cells
        return None
    return (int(shape[1]), int(shape[2])) if shape else None


def _spec_fields(record: RunRecord) -> dict[str, Any]:
    import json

    return json.loads(record.preprocess)


def attention_weights(run: Run, X: np.ndarray) -> np.ndarray:
    """`[N, R * C]` attention weights of the run's head for `[N, T, C]` token rows."""
    reason = no_map_reason(run.record, run.scorer)
    if reason:
        raise MedembedError(reason)
    return np.asarray(run.scorer.attention_weights(X), dtype=np.float64)


def overlay(pixels: np.ndarray, weights: np.ndarray, geometry: MapGeometry, original: tuple[int, int]) -> np.ndarray:
    """`[h, w, 3] uint8`: the (possibly downscaled) image `pixels` (`[h, w]` or `[h, w, 3]` in [0, 1], a view of
    an `original` = (height, width) image) with the attention heat blended over it (inferno, scaled to the
    image's largest weight) and the grid's cell edges drawn."""
    import matplotlib

    pixels = np.asarray(pixels, dtype=np.float64)
    grey = pixels if pixels.ndim == 2 else pixels.mean(axis=2)
    placement = Placement.of(original[0], original[1], geometry.spec.pad_to_square)
    heat = attention_on_image(weights, placement, geometry.grid, out_shape=grey.shape, map_shape=geometry.map_shape)
    peak = heat.max()
    scaled = heat / peak if peak > 0 else heat
    colour = matplotlib.colormaps["inferno"](scaled)[..., :3]
    blended = (1 - _ALPHA) * grey[..., None] + _ALPHA * colour
    image = np.clip(np.rint(blended * 255), 0, 255).astype(np.uint8)
    rows, cols = grey.shape
    for top, left, bottom, right in geometry.boxes(*original) * np.array([rows / original[0], cols / original[1]] * 2):
        if bottom - top < 1 or right - left < 1:
            continue  # a cell in the zero border
        r0, c0 = int(top), int(left)
        r1, c1 = min(int(math.ceil(bottom)) - 1, rows - 1), min(int(math.ceil(right)) - 1, cols - 1)
        image[[r0, r1], c0 : c1 + 1] = 255
        image[r0 : r1 + 1, [c0, c1]] = 255
    return image
