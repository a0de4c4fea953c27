"""Files that are never half-written: atomic text/JSON writes, strict JSON reads, directory swaps, file locks.

Every reader here raises MedembedError naming the file, so a corrupt or foreign file becomes one clear line
at the CLI instead of a traceback.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

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


MAX_JSON_BYTES = 64 * 1024 * 1024  # every JSON file medembed writes is far smaller; a bigger one is refused unread
MAX_JSON_DEPTH = 64  # medembed's own files nest < 10 deep; deeper ones are refused before any code walks them


def read_json(path: Path, what: str = "JSON file") -> Any:
    """Parse `path` as strict JSON (no NaN/Infinity, at most MAX_JSON_BYTES and MAX_JSON_DEPTH deep); a missing,
    unreadable, oversized, too deeply nested or invalid file is a MedembedError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise MedembedError(f"{path}: {size} bytes is too large for a {what} (at most {MAX_JSON_BYTES})")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise MedembedError(f"{path}: file not found (no such {what})") from None
    except IsADirectoryError:
        raise MedembedError(f"{path}: is a directory, not a {what}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MedembedError(f"{path}: not a valid {what} ({error})") from None
    return loads_json(text, f"{path}", what)


def loads_json(text: str, where: str, what: str = "JSON document") -> Any:
    """`text` parsed as strict JSON (see read_json); errors are one MedembedError starting with `where`."""
    if _nesting_depth(text) > MAX_JSON_DEPTH:
        raise MedembedError(f"{where}: not a valid {what} (nested deeper than {MAX_JSON_DEPTH} levels)")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as error:
        raise MedembedError(f"{where}: not a valid {what} ({error})") from None


def _nesting_depth(text: str) -> int:
    """The deepest bracket nesting of JSON `text` outside its strings (an upper bound for invalid text)."""
    brackets = _STRING.sub("", text)
    if "[" not in brackets and "{" not in brackets:
        return 0
    codes = np.frombuffer(brackets.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    steps = np.isin(codes, _OPEN).astype(np.int64) - np.isin(codes, _CLOSE)
    return int(np.cumsum(steps).max())


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN, _CLOSE = np.frombuffer(b"[{", dtype=np.uint8), np.frombuffer(b"]}", dtype=np.uint8)


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


class LockBusy(Exception):
    """Another process holds the lock; `holder` is the pid it wrote into the lock file (or "unknown")."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class ExclusiveLock:
    """An exclusive flock on `path`, which holds the owner's pid; released by the kernel if the owner dies."""

    _TRIES = 5  # a reader asking `is_locked` holds a shared lock for an instant: try again before giving up

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        tries = 0
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                tries += 1
                if tries < self._TRIES:
                    time.sleep(0.02 * tries)
                    continue
                raise LockBusy(holder) from None
            # The previous holder may have unlinked the file between our open and flock: retry on the new one.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = -1


def is_locked(path: Path) -> bool:
    """Whether some process holds the ExclusiveLock on `path` right now (never blocks a writer for long)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
