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
from medembed.scorers.heads._features import Standardizer


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


def checked_standardizer(mean: Any, std: Any, length: int, path: Path, names: tuple[str, str] = ("mean", "std")) -> Standardizer:
    """A Standardizer from saved `mean` and `std` (lists or arrays, saved under `names`) of `length` finite numbers
    each, std > 0 (an all-zero std would turn every prediction into NaN)."""
    stats = {names[0]: _as_list(mean), names[1]: _as_list(std)}
    if not all(isinstance(value, list) for value in stats.values()):
        raise HeadLoadError(f"{path}: {names[0]!r} and {names[1]!r} must be vectors of {length} numbers")
    mean, std = (float_vector(stats, name, length, np.float32, path) for name in names)
    if not (std > 0).all():
        raise HeadLoadError(f"{path}: {names[1]!r} must be positive")
    return Standardizer(mean=mean, std=std)


def _as_list(value: Any) -> Any:
    """A saved array (numpy, or a torch tensor) as the list `float_vector` checks; anything else as it is."""
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    return value.tolist() if isinstance(value, np.ndarray) else value
