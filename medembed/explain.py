"""`predict --explain DIR`: one PNG per image of where a token-head run's attention fell, over the image itself.

The rows a prediction scored (their token grids, `[N, T, C]`) give the head's weights per grid cell
(`medembed.runs.attention`); each image is decoded with the run's own preprocessing settings, downscaled to at
most MAX_SIDE px and the weights drawn over it where the cells lie in the original image (padding and stretching
accounted for, `medembed.data.geometry`). File names come from the image ids, made safe (letters, digits, `.`,
`-`, `_`, and a hash of the id so two ids never share a file) and checked to land inside DIR.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medembed.errors import MedembedError
from medembed.runs.attention import map_geometry, no_map_reason, overlay
from medembed.runs.record import Run

MAX_SIDE = 512  # px, the longer side of a written map
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ExplainSummary:
    """What `write_attention_maps` wrote: the PNGs, the images it could not draw (id -> why) and, for runs that
    have no map, the one-line reason (and nothing written)."""

    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    no_map: str = ""


def map_file_name(image_id: str) -> str:
    """A file name for an image id's map: its safe characters (at most 80) and 10 hex digits of its sha256."""
    safe = _UNSAFE.sub("_", str(image_id)).strip("._")[:80] or "image"
    return f"{safe}-{hashlib.sha256(str(image_id).encode('utf-8')).hexdigest()[:10]}.attention.png"


def write_attention_maps(run: Run, rows, paths: dict[str, Path], out_dir: Path) -> ExplainSummary:
    """Write `out_dir`/<id>.attention.png for every row of `rows` (a Split of token rows the run scored) whose
    image file `paths` names (image id -> file). A run whose head has no attention map writes nothing and says
    why in `no_map`."""
    reason = no_map_reason(run.record, run.scorer)
    if reason or rows.X is None or np.ndim(rows.X) != 3:
        return ExplainSummary(no_map=reason or "no attention map: the run's rows hold no token grid")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    real_out = out_dir.resolve()
    geometry = map_geometry(run.record, int(np.shape(rows.X)[1]))
    weights = np.asarray(run.scorer.attention_weights(rows.X), dtype=np.float64)
    summary = ExplainSummary()
    for k, image_id in enumerate(rows.image_id):
        image_id = str(image_id)
        if image_id not in paths:
            summary.failed[image_id] = "no image file for this id"
            continue
        target = out_dir / map_file_name(image_id)
        if not target.resolve().is_relative_to(real_out) or target.is_symlink():
            summary.failed[image_id] = f"{target} would land outside {out_dir}; not written"
            continue
        try:
            _write_bytes(target, attention_png(paths[image_id], weights[k], geometry))
        except (MedembedError, OSError, ValueError) as error:
            summary.failed[image_id] = str(error)
            continue
        summary.written.append(target)
    return summary


def _write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and a rename: a killed run never leaves half a PNG under the map's name."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def attention_png(path: Path, weights: np.ndarray, geometry) -> bytes:
    """PNG bytes of the image at `path` (decoded with the geometry's spec, at most MAX_SIDE px) under its map."""
    from PIL import Image

    pixels = geometry.spec.decode(path)
    original = pixels.shape[:2]
    image = Image.fromarray(np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8))
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    drawn = overlay(np.asarray(image, dtype=np.float64) / 255, weights, geometry, original)
    buffer = io.BytesIO()
    Image.fromarray(drawn).save(buffer, format="PNG")
    return buffer.getvalue()


def explain_note(run: Run, rows, paths: dict[str, Path], out_dir: Path) -> str:
    """`write_attention_maps`, told in one line: what was written where, or why the run has no map."""
    summary = write_attention_maps(run, rows, paths, out_dir)
    if summary.no_map:
        return f"--explain: {summary.no_map}; nothing written to {out_dir}"
    line = f"--explain: wrote {len(summary.written)} attention map{'s' if len(summary.written) != 1 else ''} to {out_dir}"
    if summary.failed:
        image_id, reason = next(iter(summary.failed.items()))
        line += f"; {len(summary.failed)} not drawn (first: {image_id}: {reason})"
    return line
