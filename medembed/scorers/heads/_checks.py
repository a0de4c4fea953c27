"""Validation of what users hand to a head: embedding arrays, labels and hyperparameters.

Every check raises MedembedError with a message naming the argument and what is wrong, so the CLI can print
it instead of a traceback deep inside numpy, scikit-learn, torch or XGBoost.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from medembed.errors import MedembedError

_MAX_ROWS_NAMED = 10
MAX_JOBS = 4096  # threads; torch and XGBoost overflow on absurd counts


def check_embeddings(X: Any, what: str) -> np.ndarray:
    """Return `X` as a C-contiguous `[N, D] float32` array; refuse other ranks, empty arrays and NaN/inf rows."""
    array = np.asarray(X)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise MedembedError(f"{what} must be a non-empty [N, D] embedding array, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise MedembedError(f"{what} must hold real numbers, got dtype {array.dtype}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported below
        array = np.ascontiguousarray(array, dtype=np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad_rows.size:
        first = ", ".join(str(row) for row in bad_rows[:_MAX_ROWS_NAMED])
        raise MedembedError(
            f"{what} has {bad_rows.size} row(s) with NaN or infinite values (as float32); first row indices: {first}"
        )
    return array


def check_labels(y: Any, n_rows: int, what: str) -> np.ndarray:
    """Return `y` as a `[N] int64` array of 0/1 with both classes present and one label per embedding row."""
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.shape[0] != n_rows:
        raise MedembedError(f"{what} must be 1-D with one label per embedding row ({n_rows}), got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
        raise MedembedError(f"{what} must hold 0/1 labels, got dtype {labels.dtype}")
    outside = np.flatnonzero((labels != 0) & (labels != 1))
    if outside.size:
        first = ", ".join(str(row) for row in outside[:_MAX_ROWS_NAMED])
        raise MedembedError(f"{what} has {outside.size} label(s) outside {{0, 1}} (or NaN); first rows: {first}")
    labels = labels.astype(np.int64)
    n_positive = int(labels.sum())
    if n_positive in (0, n_rows):
        only = "abnormal (1)" if n_positive else "normal (0)"
        raise MedembedError(f"{what} holds only {only} labels ({n_rows} rows); a head needs both classes")
    return labels


def check_bool(name: str, value: Any) -> bool:
    """Return `value` if it is a bool, else raise naming the parameter."""
    if not isinstance(value, (bool, np.bool_)):
        raise MedembedError(f"head parameter {name!r} must be true or false, got {value!r}")
    return bool(value)


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """Return `value` as an int >= `minimum` (and <= `maximum`); bools and non-integral floats are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise MedembedError(f"head parameter {name!r} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise MedembedError(f"head parameter {name!r} must be at most {maximum}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, low: float, high: float, *, low_inclusive: bool = True) -> float:
    """Return `value` as a finite float in [low, high] (or (low, high] when `low_inclusive` is false)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise MedembedError(f"head parameter {name!r} must be a number, got {value!r}")
    number = float(value)
    above_low = number >= low if low_inclusive else number > low
    if not (np.isfinite(number) and above_low and number <= high):
        bracket = "[" if low_inclusive else "("
        raise MedembedError(f"head parameter {name!r} must lie in {bracket}{low}, {high}], got {value!r}")
    return number


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """Return `value` if it is one of `choices`, else raise listing them."""
    if not any(value is choice or (isinstance(value, str) and value == choice) for choice in choices):
        raise MedembedError(f"head parameter {name!r} must be one of {list(choices)}, got {value!r}")
    return value


def check_sequence(name: str, values: Any) -> list[Any]:
    """Return `values` as a non-empty list; a string or scalar is refused (a common slip for `hidden=512`)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise MedembedError(f"head parameter {name!r} must be a list of numbers, got {values!r}")
    items = list(values)
    if not items:
        raise MedembedError(f"head parameter {name!r} must not be empty")
    return items


def set_training_params(head: Any, *, lr: Any, weight_decay: Any, batch_size: Any, max_epochs: Any, patience: Any, n_jobs: Any) -> None:
    """Validate the optimiser and early-stopping hyperparameters every torch-trained head has, and keep them on
    `head` as given (scikit-learn's contract: parameters stored unmodified under their own names)."""
    check_float("lr", lr, 0.0, 10.0, low_inclusive=False)
    check_float("weight_decay", weight_decay, 0.0, 10.0)
    check_int("batch_size", batch_size, minimum=1)
    check_int("max_epochs", max_epochs, minimum=1)
    check_int("patience", patience, minimum=1)
    if n_jobs is not None:
        check_int("n_jobs", n_jobs, minimum=1, maximum=MAX_JOBS)
    head.lr, head.weight_decay, head.batch_size, head.max_epochs, head.patience, head.n_jobs = (
        lr, weight_decay, batch_size, max_epochs, patience, n_jobs
    )
