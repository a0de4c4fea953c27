"""Strict JSON for saved heads: finite numbers only, written atomically, read back with typed checks.

Parsing JSON runs no code, unlike unpickling; the checks here make a tampered file fail loudly instead of
producing a head that silently predicts garbage (NaN weights, wrong lengths).
"""

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from medembed.errors import MedembedError


class HeadLoadError(MedembedError):
    """A saved head is missing, truncated, tampered with or not a medembed head at all."""


def write_json(path: Path, document: Any) -> None:
    """Write `document` to `path` via a temporary file and rename, so a crash never leaves half a file."""
    text = json.dumps(document, indent=1, allow_nan=False)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _refuse_constant(token: str) -> float:
    raise ValueError(f"non-finite number {token}")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):  # e.g. 1e999 parses to inf
        raise ValueError(f"non-finite number {token}")
    return value


def read_json(path: Path) -> Any:
    """Parse `path` as strict JSON (no NaN/Infinity, no overflowing numbers); any failure is a HeadLoadError."""
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except FileNotFoundError:
        raise HeadLoadError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise HeadLoadError(f"{path}: not a valid medembed JSON file ({error})") from None


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
