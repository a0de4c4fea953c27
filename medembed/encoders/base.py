"""The one small interface every frozen image encoder implements, and its fingerprint."""

from __future__ import annotations

import abc
import hashlib
from pathlib import Path
from typing import ClassVar

import torch

from medembed.encoders.views import VIEW_REDUCTIONS, VIEWS_LEVEL, apply_view, parse_views
from medembed.data.images import PreprocessSpec
from medembed.encoders.registry import EncoderError
from medembed.encoders.levels import (
    LevelError,
    LevelSpec,
    canonical_levels,
    requested_levels,
    token_count,
    tokens_from_map,
)

_HASH_CHUNK = 8 * 1024 * 1024
# (real path, size, mtime_ns) -> sha256: a multi-GB shard is hashed once per process.
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


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

    # -- levels (token grids) and test-time views: configured by `configure_tokens`, shared by every encoder --

    levels: tuple[LevelSpec, ...] = ()  # resolved specs, in the order asked
    views: tuple[str, ...] = ()  # canonical test-time view names (medembed.encoders.views)
    view_reduce: str = "mean"

    @classmethod
    def levels_help(cls) -> str:
        """The levels in words, without building the encoder (what `medembed encoders list` prints)."""
        return "none"

    def level_names(self) -> list[str]:
        """The levels this encoder can store (`block14`, `layer8`, `final`, ...), in forward order; [] for none."""
        return []

    def level_map_shapes(self) -> dict[str, tuple[int, int, int]]:
        """`{level: (C, H, W)}`: each level's feature map for one image, known without loading weights."""
        return {}

    def level_maps(self, pixels: torch.Tensor, names: set[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`[B, 3, S, S]` -> (the `embed` output `[B, dim]`, `{level: [B, C, H, W]}` for `names`), in one forward."""
        raise EncoderError(f"encoder {self.name!r} has no intermediate levels")

    def configure_tokens(
        self,
        levels: str | list[str] | None = None,
        tokens: str | list[str] | None = None,
        views: str | list[str] | None = None,
        view_reduce: str = "mean",
    ) -> None:
        """Ask for token levels (`levels="block14,block10@7x7"`, `tokens="2x2"` = `final@2x2`) and test-time views
        (`views="hflip"`, their embeddings averaged, or also all kept with `view_reduce="all"`)."""
        self.levels = tuple(dict.fromkeys(self.resolve_level(spec) for spec in requested_levels(levels, tokens)))
        self.views = parse_views(views)
        if view_reduce not in VIEW_REDUCTIONS:
            raise EncoderError(f"view_reduce must be one of {', '.join(VIEW_REDUCTIONS)}, got {view_reduce!r}")
        self.view_reduce = view_reduce

    def resolve_level(self, spec: LevelSpec) -> LevelSpec:
        """`spec` with a negative index counted from the end of this encoder's levels of that name; refused when
        the encoder has no such level or the grid is finer than the level's own."""
        names = self.level_names()
        if spec.index is not None and spec.index < 0:
            indexed = sorted(int(n[len(spec.base):]) for n in names if n.startswith(spec.base) and n[len(spec.base):].isdigit())
            if len(indexed) < -spec.index:
                raise LevelError(f"encoder {self.name!r} has {len(indexed)} '{spec.base}' levels; {spec.canonical()} is out of range")
            spec = LevelSpec(spec.base, indexed[spec.index], spec.grid)
        if spec.name not in names:
            shown = describe_levels(names) if names else "none"
            raise LevelError(f"encoder {self.name!r} has no level {spec.name!r}; its levels: {shown}")
        _, height, width = self.level_map_shapes()[spec.name]
        if spec.grid is not None and (spec.grid[0] > height or spec.grid[1] > width):
            raise LevelError(f"level {spec.canonical()}: {spec.name} is a {height}x{width} map; a finer grid would repeat cells")
        return spec

    def embed_with_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Like `embed`, plus the token grids of the levels this encoder was asked for: `{level: [B, T, C]}`.

        The extractor always calls this one; encoders without levels or views return no tokens. Level tokens come
        from the original image; with views the pooled embedding is the mean over the original and its views.
        """
        if self.levels:
            pooled, maps = self.level_maps(pixels, {spec.name for spec in self.levels})
        else:
            pooled, maps = self.embed(pixels), {}
        tokens = {spec.canonical(): tokens_from_map(maps[spec.name], spec.grid).float() for spec in self.levels}
        if self.views:
            seen = torch.stack([pooled] + [self.embed(apply_view(pixels, view)) for view in self.views], dim=1)
            pooled = seen.mean(dim=1)
            if self.view_reduce == "all":
                tokens[VIEWS_LEVEL] = torch.cat([pooled.unsqueeze(1), seen], dim=1).float()
        return pooled.float(), tokens

    def token_shapes(self) -> dict[str, tuple[int, int]]:
        """`{level: (T, C)}` for the token grids `embed_with_tokens` returns (empty: pooled embeddings only)."""
        maps = self.level_map_shapes()
        shapes = {spec.canonical(): (token_count(maps[spec.name][1:], spec.grid), maps[spec.name][0]) for spec in self.levels}
        if self.views and self.view_reduce == "all":
            shapes[VIEWS_LEVEL] = (2 + len(self.views), self.dim)
        return shapes

    def levels_fingerprint(self) -> str:
        """The fingerprint's `levels`: the canonical level specs, then `views` when every view is stored ("" for none)."""
        stored = canonical_levels(list(self.levels))
        if self.views and self.view_reduce == "all":
            stored = f"{stored},{VIEWS_LEVEL}" if stored else VIEWS_LEVEL
        return stored

    def pooled_kind(self) -> str:
        """`embedding_kind` plus the views averaged into it ("global_avg_pool+mean(hflip)"): views change the vector."""
        return f"{self.embedding_kind}+mean({','.join(self.views)})" if self.views else self.embedding_kind

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
            "embedding_kind": self.pooled_kind(),
            "preprocess": self.preprocess.to_json(),
            "preprocess_hash": self.preprocess.hash(),
            "levels": self.levels_fingerprint(),
        }

    def _require_loaded(self, model: torch.nn.Module | None) -> torch.nn.Module:
        if model is None:
            raise EncoderError(f"encoder {self.name!r}: call load(device) before embed()")
        return model


def describe_levels(names: list[str]) -> str:
    """Level names with runs of one base collapsed: "stem, block0..block15, final"."""
    groups: dict[str, list[int]] = {}
    plain: list[str] = []
    for name in names:
        base = name.rstrip("0123456789")
        if base != name:
            groups.setdefault(base, []).append(int(name[len(base):]))
            if base not in plain:
                plain.append(base)
        else:
            plain.append(name)
    return ", ".join(f"{item}{min(groups[item])}..{item}{max(groups[item])}" if item in groups else item for item in plain)


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
