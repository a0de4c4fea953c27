"""Hub checkpoint resolution without torch: a local directory or a hub id file by file, the hub probe, and
one-line errors naming the cause and the fix. `get_encoder` resolves a hub encoder's config.json with it
before importing torch and transformers, so a model that cannot be had fails in about a second.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from medembed.encoders.registry import EncoderError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# One HEAD request answers within this on any working link; a dropped-packet network would otherwise hold
# every file for huggingface_hub's 10 s etag timeout, then retry for 60 s more.
HUB_PROBE_TIMEOUT_S = 2.0
OFFLINE_CAUSE = "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)"


def offline_mode() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set (read now, not at import time)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def hub_probe_timeout() -> float:
    """Seconds the hub probe waits for an answer: HF_HUB_ETAG_TIMEOUT when set (a slow link), else 2."""
    try:
        return float(os.environ["HF_HUB_ETAG_TIMEOUT"])
    except (KeyError, ValueError):
        return HUB_PROBE_TIMEOUT_S


_HUB_PROBES: dict[tuple[str, str, str | None], str | None] = {}


def hub_problem(model_id: str, revision: str | None = None) -> str | None:
    """Why `model_id` cannot come from the hub right now, in words (unreachable, gated, not found, unauthorised),
    or None when the hub answers for it.

    One HEAD request on its config.json, without huggingface_hub's retries, bounded by `hub_probe_timeout()`
    seconds including the DNS look-up (it runs in a daemon thread). Asked once per endpoint, repository and
    revision in a process.
    """
    key = (constants.ENDPOINT, model_id, revision)
    if key not in _HUB_PROBES:
        _HUB_PROBES[key] = _probe_hub(model_id, revision)
    return _HUB_PROBES[key]


def _probe_hub(model_id: str, revision: str | None) -> str | None:
    timeout = hub_probe_timeout()
    outcome: list[BaseException | None] = []

    def head() -> None:
        try:
            get_hf_file_metadata(hf_hub_url(model_id, "config.json", revision=revision), timeout=timeout)
            outcome.append(None)
        except Exception as error:  # noqa: BLE001 - handed to the caller's thread, which describes it
            outcome.append(error)

    thread = threading.Thread(target=head, name="medembed-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not outcome:
        return f"the Hugging Face hub ({constants.ENDPOINT}) did not answer within {timeout:g} s (a slow link: set HF_HUB_ETAG_TIMEOUT=30)"
    return None if outcome[0] is None else describe_hub_error(outcome[0], model_id, revision)


def describe_hub_error(error: BaseException, model_id: str, revision: str | None = None) -> str | None:
    """The cause of a failed hub request for `model_id`, in one line; None when the hub did answer and the
    repository is readable (a missing file, a malformed id: the download reports those itself)."""
    if isinstance(error, (EntryNotFoundError, HFValidationError)):
        return None
    if isinstance(error, GatedRepoError):
        return (f"the model is gated: accept its terms at {constants.ENDPOINT}/{model_id} with your account, then log in "
                "here (hf auth login, or set HF_TOKEN)")
    if isinstance(error, RevisionNotFoundError):
        return f"the hub has no revision {revision!r} of it"
    if isinstance(error, RepositoryNotFoundError):
        return ("the hub has no such model, or it is private and needs a token with access (hf auth login, or set "
                "HF_TOKEN)")
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else "?"
        if status in (401, 403):
            return f"the hub refused access (HTTP {status}): log in with a token that can read it (hf auth login, or set HF_TOKEN)"
        return f"the Hugging Face hub ({constants.ENDPOINT}) answered HTTP {status}"
    if isinstance(error, OfflineModeIsEnabled):
        return OFFLINE_CAUSE
    detail = " ".join(str(error).split())[:200] or type(error).__name__
    return f"cannot reach the Hugging Face hub ({constants.ENDPOINT}: {detail})"


def hub_fix(model_id: str) -> str:
    """What a user without the model can do instead, in one clause."""
    return (f"download it on a machine with network (hf download {model_id} --local-dir DIR) and pass --model DIR, "
            "or try -e efficientnet-lite0, which runs offline")


@dataclass(frozen=True)
class HFCheckpoint:
    """A checkpoint named by a local directory or a hub id (+ revision), resolved file by file.

    Hub files come from (or go to) the regular Hugging Face cache. Before any download the hub is probed
    once (`hub_problem`: one HEAD, 2 s at most); when it is unreachable, or the model gated or unauthorised,
    files come from the local cache alone, and a file missing there is an EncoderError naming the cause and
    the fix, at once instead of after huggingface_hub's retries. With `local_files_only` (or the offline
    environment flags) the hub is not asked at all.
    """

    model_id: str
    revision: str | None = None
    cache_dir: str | None = None
    local_files_only: bool | None = None

    @property
    def is_local(self) -> bool:
        """Whether `model_id` is an existing directory (then revision and cache are unused)."""
        return Path(self.model_id).expanduser().is_dir()

    @property
    def offline(self) -> bool:
        """Explicit `local_files_only`, else the environment's offline flag, else whether the hub probe has
        already failed for this model in this process (then only the local cache is read)."""
        if self.local_files_only is not None:
            return bool(self.local_files_only)
        return offline_mode() or _HUB_PROBES.get((constants.ENDPOINT, self.model_id, self.revision)) is not None

    def file(self, filename: str, *, required: bool = True) -> Path | None:
        """Local path of `filename` in the checkpoint; None when absent and not `required`."""
        if self.is_local:
            path = Path(self.model_id).expanduser() / filename
            if path.is_file():
                return path
            if required:
                raise EncoderError(f"{self.model_id}: checkpoint directory has no {filename}")
            return None
        return self._hub_file(filename, required)

    def _hub_problem(self) -> str | None:
        """Why the hub cannot serve this checkpoint now (None: it can), probing it on first use."""
        if self.local_files_only is not None:
            return "local_files_only is set" if self.local_files_only else hub_problem(self.model_id, self.revision)
        return OFFLINE_CAUSE if offline_mode() else hub_problem(self.model_id, self.revision)

    def _hub_file(self, filename: str, required: bool) -> Path | None:
        problem = self._hub_problem()
        try:
            return Path(
                hf_hub_download(
                    self.model_id,
                    filename,
                    revision=self.revision,
                    cache_dir=self.cache_dir,
                    local_files_only=problem is not None,
                )
            )
        except LocalEntryNotFoundError as error:  # before EntryNotFoundError, its parent
            if not required:
                return None
            cause = problem or describe_hub_error(error.__cause__ or error, self.model_id, self.revision) or "the hub did not serve it"
            raise EncoderError(
                f"{self.model_id}: {cause}, and its {filename} is not in the local Hugging Face cache; {hub_fix(self.model_id)}"
            ) from None
        except EntryNotFoundError as error:
            if not required:
                return None
            raise EncoderError(f"{self.model_id}: the hub repository has no {filename}") from error
        except HFValidationError as error:
            raise EncoderError(f"{self.model_id}: neither a local directory nor a valid hub id") from error
        except OSError as error:  # the hub answered the probe, then a download failed (gated files, network)
            cause = describe_hub_error(error, self.model_id, self.revision) or " ".join(str(error).split())[:200]
            raise EncoderError(f"{self.model_id}: cannot fetch {filename}: {cause}; {hub_fix(self.model_id)}") from None

    def config_dict(self) -> dict[str, Any]:
        """The parsed config.json."""
        return read_json(self.file("config.json"))

    def config_sha256(self) -> str:
        """sha256 of the config.json bytes (the architecture: layers, sizes, image size, ...)."""
        # base imports torch; only an encoder whose class is loaded asks for this
        from medembed.encoders.base import file_sha256

        return file_sha256(self.file("config.json"))

    def weight_map(self) -> dict[str, str] | None:
        """Tensor name -> shard file name from the safetensors index; None for a single-file checkpoint."""
        index = self.file(SAFETENSORS_INDEX, required=False)
        return None if index is None else read_json(index)["weight_map"]

    def weight_files(self) -> list[Path]:
        """All safetensors files of the checkpoint (every shard, or the single file)."""
        weight_map = self.weight_map()
        if weight_map is not None:
            return [self.file(name) for name in sorted(set(weight_map.values()))]
        single = self.file(SAFETENSORS_SINGLE, required=False)
        if single is None:
            raise EncoderError(f"{self.model_id}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} (need safetensors)")
        return [single]

    def directory(self) -> Path:
        """The local directory holding the checkpoint's files (hub: the cached snapshot)."""
        return self.file("config.json").parent

    def resolved_revision(self) -> str:
        """The hub commit the files came from ("local" for a directory; the requested revision if unknown)."""
        if self.is_local:
            return "local"
        snapshot = self.directory().name
        return snapshot if _COMMIT_RE.match(snapshot) else (self.revision or "main")


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file, naming the file when it is malformed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EncoderError(f"{path}: cannot read JSON ({error})") from error

