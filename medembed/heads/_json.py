"""Strict JSON for saved heads: finite numbers only, written atomically, read back with typed checks.

Parsing JSON runs no code, unlike unpickling; the checks here make a tampered file fail loudly instead of
producing a head that silently predicts garbage (NaN weights, wrong lengths).
"""

import json
from pathlib import Path
from typing import Any

import numpy as np

from medembed._files import atomic_write_text
from medembed._files import read_json as read_strict_json
from medembed.errors import MedembedError


class HeadLoadError(MedembedError):
    """A saved head is missing, truncated, tampered with or not a medembed head at all."""


def write_json(path: Path, document: Any) -> None:
    """Write `document` to `path` via a temporary file and rename, so a crash never leaves half a file."""
    atomic_write_text(path, json.dumps(document, indent=1, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    """Parse `path` as strict JSON (no NaN/Infinity, no overflowing numbers); any failure is a HeadLoadError."""
    try:
        return read_strict_json(path, "medembed JSON file")
    except MedembedError as error:
        raise HeadLoadError(str(error)) from None


def require(document: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    """Return `document[key]`, refusing a missing key or a value of another JSON type (bools are not numbers)."""
    if key not in document:
        raise HeadLoadError(f"{path}: missing key {key!r}")
    value = document[key]
    numeric = kind in (int, float) or (isinstance(kind, tuple) and set(kind) <= {int, float})
    if not isinstance(value, kind) or (numeric and isinstance(value, bool)):
        raise HeadLoadError(f"{path}: key {key!r} has the wrong type ({type(value).__name__})")
    return value


def float_vector(document: dict[str, Any], key: str, length: int, dtype: type, path: Path) -> np.ndarray:
    """Return `document[key]` as a `[length]` array of `dtype`; refuse other lengths and non-numbers."""
    values = require(document, key, list, path)
    if len(values) != length or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise HeadLoadError(f"{path}: key {key!r} must be a list of {length} numbers")
    with np.errstate(over="ignore"):
        vector = np.asarray(values, dtype=dtype)
    if not np.isfinite(vector).all():  # finite in JSON but overflowing float32
        raise HeadLoadError(f"{path}: key {key!r} has values out of {np.dtype(dtype).name} range")
    return vector
