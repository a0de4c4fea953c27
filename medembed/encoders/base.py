"""The one small interface every frozen image encoder implements, and its fingerprint."""

from __future__ import annotations

import abc
import hashlib
from pathlib import Path
from typing import ClassVar

import torch

from medembed.errors import MedembedError
from medembed.images import PreprocessSpec

_HASH_CHUNK = 8 * 1024 * 1024
# (real path, size, mtime_ns) -> sha256: a multi-GB shard is hashed once per process.
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


class EncoderError(MedembedError):
    """A user-fixable encoder problem: unknown name or option, missing checkpoint file, unsupported config."""


class Encoder(abc.ABC):
    """A frozen vision encoder: preprocessing spec, weights, and a forward pass to one vector per image.

    Subclasses set `preprocess`, `dim`, `embedding_kind`, `model_id` and `revision` in `__init__`
    (cheap: config files only, no weights), build the model in `load`, and name the weight files
    they read in `weight_files` so the fingerprint can checksum them.
    """

    name: ClassVar[str]
    preprocess: PreprocessSpec
    dim: int
    embedding_kind: str
    model_id: str
    revision: str

    _weights_sha256: str | None = None

    @abc.abstractmethod
    def load(self, device: torch.device) -> None:
        """Build the model and load its weights onto `device` in eval mode with gradients off."""

    @abc.abstractmethod
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` preprocessed pixels on the model's device -> `[B, dim]` float32 embeddings.

        The caller chooses autocast and inference mode; weights stay float32.
        """

    def embed_with_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Like `embed`, plus the token grids of the levels this encoder was asked for: `{level: [B, T, C]}`.

        The extractor always calls this one; encoders without levels return no tokens.
        """
        return self.embed(pixels), {}

    def token_shapes(self) -> dict[str, tuple[int, int]]:
        """`{level: (T, C)}` for the token grids `embed_with_tokens` returns (empty: pooled embeddings only)."""
        return {}

    @abc.abstractmethod
    def weight_files(self) -> list[Path]:
        """The weight files this encoder reads (all of them, and only them)."""

    def flops_per_image(self) -> float | None:
        """Forward FLOPs for one image (2 x multiply-accumulates), or None when unknown."""
        return None

    def weights_sha256(self) -> str:
        """Checksum of the weight files read (see `files_sha256`), computed once per encoder."""
        if self._weights_sha256 is None:
            self._weights_sha256 = files_sha256(self.weight_files())
        return self._weights_sha256

    def config_sha256(self) -> str:
        """Checksum of the model's architecture definition: the sha256 of a Hugging Face checkpoint's
        config.json bytes (a local directory's revision is just "local", so this tells checkpoints apart);
        '' where an encoder has no such definition."""
        return ""

    def fingerprint(self) -> dict[str, str]:
        """What identifies these embeddings: encoder, model id, revision, weights and config checksums, kind,
        preprocessing. (The autocast precision, also identity, is the runner's: see extract.store_fingerprint.)"""
        return {
            "encoder": self.name,
            "model_id": self.model_id,
            "revision": self.revision,
            "weights_sha256": self.weights_sha256(),
            "config_sha256": self.config_sha256(),
            "embedding_kind": self.embedding_kind,
            "preprocess": self.preprocess.to_json(),
            "preprocess_hash": self.preprocess.hash(),
        }

    def _require_loaded(self, model: torch.nn.Module | None) -> torch.nn.Module:
        if model is None:
            raise EncoderError(f"encoder {self.name!r}: call load(device) before embed()")
        return model


def freeze(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to `device`, eval mode, no gradients: how every encoder holds its model."""
    return model.to(device).eval().requires_grad_(False)


def file_sha256(path: Path) -> str:
    """sha256 hex digest of one file, memoised per process by (real path, size, mtime)."""
    real = Path(path).resolve()
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(real, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def files_sha256(paths: list[Path]) -> str:
    """sha256 of the `sha256sum`-style listing ("<digest>  <name>" lines, sorted by name) of the files read."""
    listing = "".join(f"{file_sha256(path)}  {Path(path).name}\n" for path in sorted(paths, key=lambda p: Path(p).name))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()
