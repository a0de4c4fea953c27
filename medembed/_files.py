"""Files that are never half-written: atomic text/JSON writes, strict JSON reads, directory swaps, file locks.

Every reader here raises MedembedError naming the file, so a corrupt or foreign file becomes one clear line
at the CLI instead of a traceback. Every rename is followed by an fsync of its folder, so a write that returned
survives a power cut, not only a crash.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from medembed.errors import MedembedError


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a fsync'd temporary file in the same folder and a rename."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write` on a binary handle of a temporary file in `path`'s folder, fsync it and rename it to `path`:
    readers see the old file or the whole new one, never a part (a failure removes the temporary file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(folder: Path) -> None:
    """fsync `folder` itself, which makes the renames and creations of its entries durable (a no-op on the few
    file systems that cannot fsync a folder)."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (a staging directory about to be swapped in: whatever wrote
    its files, they are on disk before the rename that publishes them). About 1 ms per file on ext4."""
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            if stat.S_ISREG(os.lstat(path).st_mode):  # not links, never a FIFO an open would block on
                descriptor = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
        fsync_directory(Path(parent))


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
    so a failed write never loses the previous contents or leaves a mix of old and new files. The swap is two
    renames (`target` aside to `.NAME.old-PID`, staging to `target`); a process killed between them leaves only
    the aside copy, which `restore_replaced` (called here first, and by every reader of a run) renames back.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_replaced(target)
    _remove_abandoned(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-{os.getpid()}-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists() and not target.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
        raise MedembedError(f"{target}: exists and is not a directory; choose another --out")
    _fsync_tree(staging)
    previous = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        if target.exists():
            os.replace(target, previous)
        os.replace(staging, target)  # a kill before this line leaves only `previous`: restore_replaced's case
    except BaseException:  # an error or Ctrl-C between the renames: put the previous contents back now
        if previous.exists() and not os.path.lexists(target):
            os.replace(previous, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_directory(target.parent)  # both renames are durable
    shutil.rmtree(previous, ignore_errors=True)


def _aside_copies(target: Path, kind: str) -> list[tuple[Path, int]]:
    """(path, writer pid) of the `.NAME.<kind>-PID...` folders replaced_directory left beside `target`."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{kind}-(\d+)(?:-.*)?")
    try:
        names = os.listdir(target.parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            found.append((target.parent / name, int(match.group(1))))
    return found


def _process_alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine); a process of another user counts as alive."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # not a pid any process can have
        return False
    return True


def restore_replaced(target: Path) -> bool:
    """Undo a swap of `target` that a killed process left half done; whether it restored one.

    When `target` is missing and `.NAME.old-PID` is beside it, the process PID moved the previous contents aside
    and died before moving the new ones in: the aside copy is renamed back. A live writer's copy (its PID is
    running) is left alone: it is between its two renames and finishes them itself.
    """
    target = Path(target)
    if os.path.lexists(target):
        return False
    aside = [(path, pid, _process_alive(pid)) for path, pid in _aside_copies(target, "old")]
    stale = [(path, pid) for path, pid, alive in aside if not alive]
    if not stale or any(alive for *_, alive in aside):  # a live writer mid-swap puts its own new contents in place
        return False
    newest = max(stale, key=lambda item: _ctime(item[0]))[0]  # the rename aside changed its ctime
    try:
        os.rename(newest, target)
    except OSError:  # another reader restored it first, or `target` appeared meanwhile: theirs stands
        return False
    fsync_directory(target.parent)
    return True


def _ctime(path: Path) -> float:
    try:
        return path.stat().st_ctime
    except FileNotFoundError:
        return -math.inf


def _remove_abandoned(target: Path) -> None:
    """Remove the staging folders of dead writers of `target` (a kill while writing leaves them) and, once
    `target` is in place (restore_replaced ran first), their aside copies: swaps that completed."""
    for kind in ("new", "old") if os.path.isdir(target) else ("new",):
        for path, pid in _aside_copies(target, kind):
            if not _process_alive(pid):
                shutil.rmtree(path, ignore_errors=True)


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
