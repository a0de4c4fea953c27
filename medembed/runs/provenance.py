"""Where a run came from, as run.json's `provenance`: enough to rerun it and to tell which software made it.

    invocation       {"argv": ["medembed", "fit", ...]} from the CLI, or {"api": "medembed.api.fit",
                     "arguments": {...}} from the Python API (`invoked`); {} when neither set it
    versions         {package: version} of the libraries a result depends on and python's own, read from the
                     installed distributions' metadata (`importlib.metadata`), never by importing them
    git              {"commit": sha, "dirty": bool} when medembed runs from a git checkout; absent otherwise
    relative_inputs  the run's input paths relative to the run directory (same shape as `inputs`, plus
                     "members" for an ensemble's member stores): a run directory moved together with its stores
                     still finds them (`resolve_moved_inputs`)
    created          UTC time the run directory was written (ISO 8601)

Every field is informative except `relative_inputs`, which `medembed.runs.record.read_record` falls back on when an
absolute input path no longer exists. run.json is read back as untrusted input: `check_provenance` validates it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from medembed._version import __version__, package_version
from medembed.errors import MedembedError

# Distributions whose versions change what a run computes; xgboost installs as xgboost-cpu here.
LIBRARIES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "scikit-learn": ("scikit-learn",),
    "xgboost": ("xgboost", "xgboost-cpu"),
    "numpy": ("numpy",),
    "h5py": ("h5py",),
}
GIT_TIMEOUT_S = 3.0  # a slow network file system must not hold a fit back; no answer = no git field
_MAX_TEXT = 4096  # longest string kept from run.json's provenance (an argv item, a path, a version)
_MAX_ITEMS = 1000  # most argv items / arguments / input paths read back

_invocation: ContextVar[dict[str, Any]] = ContextVar("medembed_invocation", default={})


def set_command_line(argv: list[str]) -> None:
    """Record the CLI's command line (`medembed.cli.main` does, before running a command)."""
    _invocation.set({"argv": [str(item) for item in argv]})


@contextlib.contextmanager
def invoked(api: str, **arguments: Any) -> Iterator[None]:
    """Within the block, runs written record the Python API call `api` (e.g. "medembed.api.fit") with its
    `arguments` (paths as text, other values as JSON would hold them)."""
    token = _invocation.set({"api": api, "arguments": {name: _jsonable(value) for name, value in arguments.items()}})
    try:
        yield
    finally:
        _invocation.reset(token)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def library_versions() -> dict[str, str]:
    """{name: version} of python, medembed and LIBRARIES (a library that is not installed is left out)."""
    found = {"python": platform.python_version(), "medembed": __version__}
    installed = {name: package_version(*distributions) for name, distributions in LIBRARIES.items()}
    return found | {name: text for name, text in installed.items() if text}


@functools.lru_cache(maxsize=1)
def git_state(folder: str | None = None) -> dict[str, Any]:
    """{"commit", "dirty"} of the checkout medembed's package folder (or `folder`) is tracked in; {} when it is not
    in one, git is absent, or git does not answer within GIT_TIMEOUT_S."""
    where = Path(folder) if folder else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                                  env=dict(os.environ, GIT_OPTIONAL_LOCKS="0"))  # status must not take the index lock
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    # The package's own files must be tracked: an installed copy inside some other repository is no checkout of medembed.
    if git("ls-files", "--error-unmatch", "--", "__init__.py") is None:
        return {}
    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    if not commit or status is None:
        return {}
    return {"commit": commit.strip(), "dirty": bool(status.strip())}


def relative_path(path: str, run_dir: Path) -> str:
    """`path` relative to the run directory, or "" where it cannot be (another drive)."""
    try:
        return os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())
    except ValueError:
        return ""


def relative_inputs(inputs: dict[str, Any], details: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The input paths of a run (its stores, or its manifest and image root, and an ensemble's member stores)
    relative to the run directory `run_dir`."""
    relative: dict[str, Any] = {}
    if isinstance(inputs.get("stores"), list):
        relative["stores"] = [relative_path(store, run_dir) for store in inputs["stores"]]
    for key in ("manifest", "image_root"):
        if isinstance(inputs.get(key), str):
            relative[key] = relative_path(inputs[key], run_dir)
    members = details.get("members")
    if isinstance(members, list) and all(isinstance(m, dict) and isinstance(m.get("store"), str) for m in members):
        relative["members"] = [relative_path(m["store"], run_dir) for m in members]
    return relative


def run_provenance(run_dir: Path, inputs: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
    """run.json's `provenance` for a run directory about to be written at `run_dir` (see the module docstring)."""
    provenance: dict[str, Any] = {
        "invocation": dict(_invocation.get()),
        "versions": library_versions(),
        "relative_inputs": relative_inputs(inputs, details, run_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    git = git_state()
    if git:
        provenance["git"] = dict(git)
    return provenance


# -- reading it back ------------------------------------------------------------------------------------------------


def check_provenance(provenance: Any, where: Path) -> None:
    """Raise one MedembedError naming `where` unless `provenance` has the shape `run_provenance` writes (every
    field optional: runs of older medembed versions have fewer)."""
    def fail(field: str, expected: str, value: Any) -> None:
        raise MedembedError(f"{where}: provenance.{field} must be {expected}, got {value!r:.60}")

    if not isinstance(provenance, dict):
        fail("", "an object", provenance)
    unknown = sorted(set(provenance) - {"invocation", "versions", "git", "relative_inputs", "created"})
    if unknown:
        raise MedembedError(f"{where}: provenance has unexpected keys {unknown}")
    invocation = provenance.get("invocation", {})
    if not isinstance(invocation, dict) or set(invocation) - {"argv", "api", "arguments"}:
        fail("invocation", "an object with argv, or api and arguments", invocation)
    if "argv" in invocation and not _texts(invocation["argv"]):
        fail("invocation.argv", "a list of strings", invocation["argv"])
    if "api" in invocation and not _text(invocation["api"]):
        fail("invocation.api", "a string", invocation["api"])
    if "arguments" in invocation and not (isinstance(invocation["arguments"], dict) and len(invocation["arguments"]) <= _MAX_ITEMS):
        fail("invocation.arguments", "an object", invocation["arguments"])
    versions = provenance.get("versions", {})
    if not isinstance(versions, dict) or len(versions) > _MAX_ITEMS or not all(_text(k) and _text(v) for k, v in versions.items()):
        fail("versions", "an object of version strings", versions)
    git = provenance.get("git", {})
    if not isinstance(git, dict) or set(git) - {"commit", "dirty"} or ("commit" in git and not _text(git["commit"])) \
            or ("dirty" in git and not isinstance(git["dirty"], bool)):
        fail("git", "an object with a commit string and dirty true or false", git)
    if "created" in provenance and not _text(provenance["created"]):
        fail("created", "a string", provenance["created"])
    relative = provenance.get("relative_inputs", {})
    if not isinstance(relative, dict) or set(relative) - {"stores", "members", "manifest", "image_root"}:
        fail("relative_inputs", "an object of stores, members, manifest and image_root", relative)
    for key in ("stores", "members"):
        if key in relative and not _texts(relative[key]):
            fail(f"relative_inputs.{key}", "a list of paths", relative[key])
    for key in ("manifest", "image_root"):
        if key in relative and not _text(relative[key]):
            fail(f"relative_inputs.{key}", "a path", relative[key])


def _text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= _MAX_TEXT


def _texts(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= _MAX_ITEMS and all(_text(item) for item in value)


def resolve_moved_inputs(inputs: dict[str, Any], details: dict[str, Any], provenance: dict[str, Any], run_dir: Path) -> list[str]:
    """Where an absolute input path of a run no longer exists but its path relative to the run directory does
    (the run directory was moved together with its stores), use that one, in place; returns a note per path."""
    relative = provenance.get("relative_inputs", {})
    notes: list[str] = []

    def exists(path: Path) -> bool:
        try:
            return path.exists()
        except OSError:  # a name longer than the OS allows (a tampered run.json): no such file
            return False

    def moved(path: str, rel: str) -> str:
        if not rel or exists(Path(path)):
            return path
        candidate = Path(run_dir) / rel
        if not exists(candidate):
            return path
        notes.append(f"{path} is gone; read {candidate} (its path relative to the run directory)")
        return str(candidate)

    if isinstance(inputs.get("stores"), list) and len(relative.get("stores", [])) == len(inputs["stores"]):
        inputs["stores"] = [moved(path, rel) for path, rel in zip(inputs["stores"], relative["stores"])]
    for key in ("manifest", "image_root"):
        if isinstance(inputs.get(key), str) and key in relative:
            inputs[key] = moved(inputs[key], relative[key])
    members = details.get("members")
    if isinstance(members, list) and len(relative.get("members", [])) == len(members):
        for member, rel in zip(members, relative["members"]):
            if isinstance(member, dict) and isinstance(member.get("store"), str):
                member["store"] = moved(member["store"], rel)
    return notes
