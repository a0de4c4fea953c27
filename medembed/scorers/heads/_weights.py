"""Safetensors weight files of saved scorers, checked against what their JSON implies before their data is read.

A weight file is someone else's file: its header (names, dtypes, shapes) is read first and compared with the
shapes head.json implies, so a tampered file with a 25 M-entry tensor or a wrong-shaped one is refused before
anything is allocated for it; the values are then loaded and refused unless finite.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
from safetensors import safe_open

from medembed.scorers.heads._json import HeadLoadError

Shape = tuple[int, ...]
_READ_ERRORS = (safetensors.SafetensorError, OSError, ValueError, RuntimeError)


def tensor_header(path: Path) -> dict[str, tuple[str, Shape]]:
    """name -> (safetensors dtype such as "F32", shape) of every tensor in `path`, from its header only."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            return {key: (part.get_dtype(), tuple(int(n) for n in part.get_shape())) for key, part in slices.items()}
    except _READ_ERRORS as error:
        raise HeadLoadError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None


def check_header(path: Path, header: dict[str, tuple[str, Shape]], expected: dict[str, Shape], dtype: str | None = "F32",
                 what: str = "head.json") -> None:
    """Refuse `header` unless it holds exactly the tensors of `expected` (what `what` implies), each of that shape
    and `dtype` (None: any)."""
    if set(header) != set(expected):
        missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
        raise HeadLoadError(f"{path}: tensors do not match the config ({what}): missing {missing[:6]}, unexpected {extra[:6]}")
    for key, (found_dtype, shape) in header.items():
        if (dtype is not None and found_dtype != dtype) or shape != tuple(expected[key]):
            implied = f"{dtype} {tuple(expected[key])}" if dtype else f"{tuple(expected[key])}"
            raise HeadLoadError(f"{path}: the tensors do not fit {what}: {key!r} is {found_dtype} {shape}, {what} implies {implied}")


def load_finite(path: Path, framework: str = "pt") -> dict[str, Any]:
    """Every tensor of `path` (torch tensors, or numpy arrays for framework="numpy"); NaN or inf is refused."""
    if framework == "pt":
        from safetensors.torch import load_file
    else:
        from safetensors.numpy import load_file
    try:
        tensors = load_file(str(path))
    except _READ_ERRORS as error:
        raise HeadLoadError(f"{path}: not a readable safetensors file ({error})") from None
    for key, tensor in tensors.items():
        values = tensor.numpy() if framework == "pt" else tensor
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise HeadLoadError(f"{path}: tensor {key!r} holds NaN or infinite values")
    return tensors


def read_checked(path: Path, expected: dict[str, Shape], framework: str = "pt") -> dict[str, Any]:
    """The float32 tensors of `path`, refused (HeadLoadError) unless names and shapes are exactly `expected`'s
    (checked on the header, before any data is read) and every value is finite."""
    check_header(path, tensor_header(path), expected)
    return load_finite(path, framework)


def expected_shapes(build: Callable[[], Any]) -> dict[str, Shape]:
    """The state-dict shapes of the torch module `build()` makes, built on the meta device (nothing allocated,
    however large the sizes a tampered head.json names)."""
    import torch

    with torch.device("meta"):
        module = build()
    return {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}
