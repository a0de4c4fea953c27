"""Files that are never half-written: atomic text/JSON writes, strict JSON reads, directory swaps.

Every reader here raises MedembedError naming the file, so a corrupt or foreign file becomes one clear line
at the CLI instead of a traceback.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medembed.errors import MedembedError


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a fsync'd temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, document: Any) -> None:
    """Write `document` as indented JSON (finite numbers only) atomically."""
    atomic_write_text(path, json.dumps(document, indent=2, allow_nan=False, default=str) + "\n")


def _refuse_constant(token: str) -> float:
    raise ValueError(f"non-finite number {token}")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError(f"non-finite number {token}")
    return value


def read_json(path: Path, what: str = "JSON file") -> Any:
    """Parse `path` as strict JSON (no NaN/Infinity); a missing, unreadable or invalid file is a MedembedError."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except FileNotFoundError:
        raise MedembedError(f"{path}: file not found (no such {what})") from None
    except IsADirectoryError:
        raise MedembedError(f"{path}: is a directory, not a {what}") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise MedembedError(f"{path}: not a valid {what} ({error})") from None


@contextmanager
def replaced_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside `target`; on success it replaces `target` as a whole.

    On any error the staging directory is removed and `target` (an earlier run, say) is left exactly as it was,
    so a failed write never loses the previous contents or leaves a mix of old and new files.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists() and not target.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
        raise MedembedError(f"{target}: exists and is not a directory; choose another --out")
    previous = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)
