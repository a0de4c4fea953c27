"""The inputs of a run: what its scorer reads, from its own data, from new images, or from another site.

    StoreInputs        one store (or shards of one extraction) with the run's fingerprint; a token head reads
                       its level `[N, T, C]`, every other embedding scorer the pooled `[N, D]`
    JoinedStoreInputs  an ensemble's member stores, joined by image id `[N, D1 + D2 + ...]`, each member checked
                       against its own fingerprint and re-embedded by its own encoder
    ImageInputs        a manifest and the folder of its images, decoded by the scorer (the CNN)

Each has the same three readers:

    rows(split, stores=None)                           the labelled rows of one split of the run's own inputs
                                                       (or of other stores with its fingerprint)
    score(manifest, root, cache, options, preprocess)  new images through the run's encoder(s) into a resumable
                                                       cache store (image runs: decoded pixels), as a `Scored`
    target(path, root, split, columns_from)            another site's rows: a store with the run's fingerprint
                                                       (or a simulated shift of it), or a manifest under `root`

`run_inputs(run)` picks one from run.json; it is the one place that looks at a run's kind and at what it consumes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from medembed.data.manifest import SPLITS, Manifest, read_manifest
from medembed.errors import MedembedError
from medembed.options.extract import DTYPES, ExtractOptions
from medembed.options.transfer import ALL_ROWS
from medembed.protocol.splits import Split, load_joined_splits, load_splits, manifest_splits
from medembed.runs.record import RUN_FILE, Run
from medembed.store import EmbeddingStore, EmbeddingTable, fingerprint_mismatch, level_tokens, open_store, read_stores

if TYPE_CHECKING:  # both import torch, which reading a run's own rows never needs
    from medembed.encoders import Encoder
    from medembed.extract.runner import ExtractSummary


@dataclass
class Scored:
    """What `score` read: the rows it could score (X = what the scorer consumes), why the others could not be
    read, and the extraction's summary for embedding runs (None for image runs)."""

    rows: Split
    failed: dict[str, str]
    extraction: ExtractSummary | None = None


class StoreInputs:
    """An embedding run of one encoder: a store (or shards) with the run's fingerprint."""

    reads_embeddings: ClassVar[bool] = True

    def __init__(self, run: Run) -> None:
        self.run = run
        self._encoder: Encoder | None = None

    @property
    def level(self) -> str:
        """The token level the run's head reads ("" for pooled embeddings)."""
        return self.run.record.level

    def encoder(self) -> Encoder:
        """The run's encoder rebuilt from run.json (once), refused unless it reproduces the run's store fingerprint."""
        if self._encoder is None:
            self._encoder = rebuild_encoder(self.run.record.fingerprint, self.run.record.encoder_options, self.run.directory)
        return self._encoder

    def preprocess_spec(self) -> Any:
        """The preprocessing the run's embeddings were made with (what a corruption is applied on top of)."""
        return self.encoder().preprocess

    def rows(self, split: str = "test", stores: list[Path] | None = None) -> Split:
        """The labelled rows of `split` of the run's stores (or of `stores`, each with the run's fingerprint)."""
        record, options = self.run.record, self.run.record.protocol
        stores = [Path(s) for s in (stores or record.inputs["stores"])]
        for store in stores:
            diff = fingerprint_mismatch(record.fingerprint, open_store(store).fingerprint)
            if diff:
                raise MedembedError(f"{store}: embeddings differ from the ones this run was fitted on ({'; '.join(diff)})")
        splits, _, _ = load_splits(stores, val_fraction=options.val_fraction, seed=options.seed, level=self.level or None)
        return splits[split]

    def score(self, manifest: Manifest, root: Path, cache: Path, options: ExtractOptions, preprocess: Any = None,
              encoder: Encoder | None = None) -> Scored:
        """The rows of `manifest` the run's encoder (or `encoder`) could embed into the resumable store `cache`;
        `preprocess` replaces the images' preprocessing (a corrupted variant for robustness)."""
        record = self.run.record
        rows = Split.from_manifest(manifest)
        encoder = encoder or self.encoder()
        summary, store = _extract_into(cache, manifest, root, encoder, options, record.fingerprint, record.encoder_options, preprocess)
        table = store.read()
        inputs = level_tokens([cache], self.level) if self.level else table.embeddings  # a token head reads the re-extracted level
        return Scored(_rows_held(rows, [(table.image_id, inputs)]), store.failed(), summary)

    def target(self, target: Path, root: Path | None = None, split: str = ALL_ROWS, columns_from: Path | None = None) -> tuple[Split, list[str]]:
        """Every row (or one split's) of the store `target` that the run can score, labelled or not, and notes."""
        record = self.run.record
        return _target(target, split, columns_from, lambda path: _store_target(path, record.kind, record.fingerprint, record.preprocess, self.level))


class JoinedStoreInputs:
    """An ensemble run: its member stores joined by image id, each with its member's fingerprint and encoder."""

    reads_embeddings: ClassVar[bool] = True

    def __init__(self, run: Run) -> None:
        self.run = run

    def members(self) -> list[dict[str, Any]]:
        """The member stores run.json records (store, fingerprint, encoder_options), checked."""
        return run_members(self.run.record.details, self.run.directory / RUN_FILE)

    def encoders(self) -> list[Encoder]:
        """Each member's encoder rebuilt from run.json, refused unless it reproduces that member's fingerprint."""
        return [rebuild_encoder(m["fingerprint"], m.get("encoder_options", {}), self.run.directory) for m in self.members()]

    def preprocess_spec(self) -> Any:
        """Refused: the members were embedded by several encoders, each with its own preprocessing."""
        raise MedembedError(f"{self.run.directory} is an ensemble: its members' encoders are rebuilt by medembed predict; this tool takes single-encoder runs")

    def rows(self, split: str = "test", stores: list[Path] | None = None) -> Split:
        """The rows of `split` of the member stores (or `stores`, one per member in the same order, each with its
        member's fingerprint) joined by image id."""
        run = self.run
        members = self.members()
        stores = [Path(s) for s in (stores or [m["store"] for m in members])]
        if len(stores) != len(members):
            raise MedembedError(f"{run.directory} is an ensemble of {len(members)} stores; give {len(members)} --store, one per member in order, not {len(stores)}")
        for k, (store, member) in enumerate(zip(stores, members)):
            diff = fingerprint_mismatch(member["fingerprint"], open_store(store).fingerprint)
            if diff:
                raise MedembedError(f"{store}: embeddings differ from member {k} of this ensemble ({'; '.join(diff)})")
        options = run.record.protocol
        return load_joined_splits(stores, val_fraction=options.val_fraction, seed=options.seed, level=run.record.level).splits[split]

    def score(self, manifest: Manifest, root: Path, cache: Path, options: ExtractOptions, preprocess: Any = None,
              encoders: list[Encoder] | None = None) -> Scored:
        """The rows of `manifest` every member could embed, their embeddings joined as the ensemble consumes them;
        one resumable cache store per member in `cache`'s folder (`member_cache`)."""
        if preprocess is not None:
            raise MedembedError(f"{self.run.directory} is an ensemble of several encoders; corrupted re-reads (--corrupt) take single-encoder runs")
        members = self.members()
        encoders = encoders or self.encoders()
        rows = Split.from_manifest(manifest)
        tables, failed, summary = [], {}, None
        for k, (member, encoder) in enumerate(zip(members, encoders)):
            summary, store = _extract_into(member_cache(cache, k), manifest, root, encoder, options, member["fingerprint"], member.get("encoder_options", {}))
            table = store.read()
            tables.append((table.image_id, table.embeddings))
            for image_id, reason in store.failed().items():
                failed.setdefault(image_id, f"member {k}: {reason}")
        held = _rows_held(rows, tables)
        if self.run.record.level:  # token-level members read their re-extracted levels beside the pooled rows
            from medembed.scorers.members import MemberInputs, block_plan, gather_blocks

            sources = [(member_cache(cache, k), level) for k, level in block_plan(len(members), self.run.record.level)]
            held.X = MemberInputs(held.X, gather_blocks(held.image_id, sources))
        return Scored(held, failed, summary)

    def target(self, target: Path, root: Path | None = None, split: str = ALL_ROWS, columns_from: Path | None = None) -> tuple[Split, list[str]]:
        """An ensemble on one store: every row (or one split's) of the store `target` with that store's fingerprint."""
        def read(path: Path) -> tuple[Split, np.ndarray, list[str]]:
            members = self.members()
            if self.run.record.level:
                raise MedembedError(f"{self.run.directory}: an ensemble of token-level members (--level {self.run.record.level}) is validated at another "
                                    "site with medembed predict on that site's images")
            if len(members) > 1:
                raise MedembedError(f"{self.run.directory}: an ensemble of {len(members)} encoders' stores scores rows joined across stores; "
                                    "validate it at another site with medembed predict on that site's images")
            record = self.run.record
            return _store_target(path, record.kind, members[0]["fingerprint"], record.preprocess, level="")

        return _target(target, split, columns_from, read)


class ImageInputs:
    """A run whose scorer reads images: its manifest and image root, decoded with the scorer's own preprocessing."""

    reads_embeddings: ClassVar[bool] = False

    def __init__(self, run: Run) -> None:
        self.run = run

    def preprocess_spec(self) -> Any:
        """The scorer's own image preprocessing (what a corruption is applied on top of)."""
        return self.run.scorer.image_spec

    def rows(self, split: str = "test", stores: list[Path] | None = None) -> Split:
        """The labelled rows of `split` of the run's manifest, X their decoded pixels (images that fail are left out)."""
        run, record, options = self.run, self.run.record, self.run.record.protocol
        if stores:
            raise MedembedError(f"{run.directory}: a {record.kind} run scores images, not stores; evaluate it on its manifest")
        manifest = read_manifest(Path(record.inputs["manifest"]))
        splits, kept, _ = manifest_splits(manifest, val_fraction=options.val_fraction, seed=options.seed)
        wanted = manifest.subset(kept[np.isin(manifest.image_id[kept], splits[split].image_id)])
        pixels, decoded, _ = run.scorer.load_images(wanted, Path(record.inputs["image_root"]))
        by_id = {image_id: i for i, image_id in enumerate(splits[split].image_id)}
        return splits[split].take(np.array([by_id[i] for i in wanted.image_id[decoded]], dtype=np.int64), X=pixels)

    def score(self, manifest: Manifest, root: Path, cache: Path, options: ExtractOptions, preprocess: Any = None) -> Scored:
        """The rows of `manifest` the scorer could decode (no cache: pixels are decoded each time); `preprocess`
        replaces its preprocessing (a corrupted variant for robustness)."""
        pixels, decoded, failed = self.run.scorer.load_images(manifest, root, preprocess)
        return Scored(Split.from_manifest(manifest).take(np.flatnonzero(decoded), X=pixels), failed)

    def target(self, target: Path, root: Path | None = None, split: str = ALL_ROWS, columns_from: Path | None = None) -> tuple[Split, list[str]]:
        """Every row (or one split's) of the manifest `target` whose image under `root` the scorer could decode."""
        def read(path: Path) -> tuple[Split, np.ndarray, list[str]]:
            if path.suffix.lower() != ".csv" or root is None:
                raise MedembedError(f"{path}: a {self.run.record.kind} run scores images, not a store; pass its manifest CSV and --root (the folder of its images)")
            manifest = read_manifest(path)
            pixels, decoded, failed = self.run.scorer.load_images(manifest, Path(root))
            rows = Split.from_manifest(manifest).take(np.flatnonzero(decoded), X=pixels)
            return rows, manifest.split[decoded].astype(str), [f"{len(failed)} target images could not be read"] if failed else []

        return _target(target, split, columns_from, read)


RunInputs = StoreInputs | JoinedStoreInputs | ImageInputs


def run_inputs(run: Run) -> RunInputs:
    """The inputs of `run`, by what run.json says it reads: an ensemble's joined stores, one store, or images."""
    if run.record.kind == "ensemble":
        return JoinedStoreInputs(run)
    if run.record.consumes == "embeddings":
        return StoreInputs(run)
    return ImageInputs(run)


# -- encoders and stores -------------------------------------------------------------------------------------------


def rebuild_encoder(fingerprint: dict[str, str], encoder_options: dict[str, Any], run_dir: Path) -> Encoder:
    """The encoder that made embeddings of `fingerprint` (with `encoder_options`), refused unless it reproduces it.

    Both come from a run's files: the encoder is looked up in medembed's registry (`get_encoder`), its options
    are that encoder's own constructor arguments, and any value they refuse is one line naming the run."""
    from medembed.encoders.runtime import build_encoder, store_fingerprint  # imports torch: only to embed new images

    where = Path(run_dir) / RUN_FILE
    name, dtype = fingerprint.get("encoder"), fingerprint.get("dtype")
    if not isinstance(name, str) or not name or dtype not in DTYPES:
        raise MedembedError(f"{where}: the fingerprint must name the encoder and a store dtype ({', '.join(DTYPES)}), got {name!r:.40} and {dtype!r:.40}")
    if not isinstance(encoder_options, dict):
        raise MedembedError(f"{where}: encoder_options must be an object")
    try:
        encoder = build_encoder(name, dict(encoder_options))
    except (TypeError, ValueError, KeyError, AttributeError) as error:  # an option value of the wrong type or range
        raise MedembedError(f"{where}: encoder_options do not build encoder {name!r} ({str(error).splitlines()[0][:200]})") from None
    expected = store_fingerprint(encoder, fingerprint["dtype"], embedding_precision(fingerprint))
    diff = fingerprint_mismatch(fingerprint, expected)
    if diff:
        raise MedembedError(
            f"the encoder available here does not match the one run {run_dir} was fitted on ({'; '.join(diff)}); "
            "install the same model weights and medembed version"
        )
    return encoder


def member_cache(cache: Path, k: int) -> Path:
    """Ensemble member `k`'s cache store, in the folder of `cache` (predict's cache folder, never another):
    x.embeddings.h5 -> x.member<k>.embeddings.h5."""
    head, _, rest = Path(cache).name.partition(".")
    return Path(cache).with_name(f"{head}.member{k}.{rest}" if rest else f"{head}.member{k}")


def embedding_precision(fingerprint: dict[str, str]) -> str:
    """The autocast precision embeddings of `fingerprint` were computed in (fp32 for stores that predate the field)."""
    return fingerprint.get("precision") or "fp32"


def run_members(details: dict[str, Any], where: Path) -> list[dict[str, Any]]:
    """The member stores an ensemble run.json records, checked."""
    members = details.get("members")
    if not isinstance(members, list) or not members or not all(
        isinstance(m, dict) and isinstance(m.get("fingerprint"), dict) and isinstance(m.get("store"), str) and 0 < len(m["store"]) <= 4096
        and isinstance(m.get("encoder_options", {}), dict)
        for m in members
    ):
        raise MedembedError(f"{where}: an ensemble run.json needs details.members: one object per store with store, fingerprint and encoder_options")
    return members


def _extract_into(cache: Path, manifest: Manifest, root: Path, encoder: Encoder, options: ExtractOptions, fingerprint: dict[str, str],
                  encoder_options: dict[str, Any], preprocess: Any = None) -> tuple[ExtractSummary, EmbeddingStore]:
    """Embed `manifest`'s images into the resumable store `cache` in the dtype and precision of `fingerprint`."""
    from medembed.extract.runner import extract  # imports torch: only to embed new images

    options = replace(options, store_dtype=fingerprint["dtype"], precision=embedding_precision(fingerprint))
    summary = extract(manifest, root, encoder, cache, options, encoder_options=encoder_options, preprocess=preprocess)
    return summary, open_store(cache)


def _rows_held(rows: Split, tables: list[tuple[np.ndarray, Any]]) -> Split:
    """`rows` restricted to the image ids every (image_id [M], inputs [M, ...]) table holds, in `rows`' order, X
    the tables' inputs of those ids side by side."""
    positions = [{image_id: i for i, image_id in enumerate(image_ids.tolist())} for image_ids, _ in tables]
    keep = np.array([i for i, image_id in enumerate(rows.image_id) if all(image_id in position for position in positions)], dtype=np.int64)
    blocks = [inputs[[position[rows.image_id[i]] for i in keep]] if len(keep) else inputs[:0] for position, (_, inputs) in zip(positions, tables)]
    if len(blocks) == 1:
        return rows.take(keep, X=blocks[0])
    dtype = np.result_type(*(b.dtype for b in blocks))
    return rows.take(keep, X=np.hstack([b.astype(dtype) for b in blocks]))


# -- another site's rows -------------------------------------------------------------------------------------------

# Reads a target (a store or a manifest): its rows, each row's split, and notes.
TargetReader = Callable[[Path], tuple[Split, np.ndarray, list[str]]]


def simulated_shift(run_preprocess: str, store_preprocess: str) -> str | None:
    """"contrast severity 3" when the store's preprocessing is the run's plus a corruption, else None."""
    try:
        run_spec, store_spec = json.loads(run_preprocess), json.loads(store_preprocess)
    except (TypeError, ValueError):
        return None
    corruption = store_spec.pop("corruption", None) if isinstance(store_spec, dict) else None
    if not isinstance(corruption, dict) or store_spec != run_spec:
        return None
    return f"{corruption.get('name')} severity {corruption.get('severity')}"


def check_target_store(store_path: Path, fingerprint: dict[str, str], run_preprocess: str) -> list[str]:
    """Refuse a store a run of `fingerprint` cannot score; notes on what was accepted.

    One exception is made, and noted: a store whose preprocessing is the run's own preceded by a
    `medembed.data.corrupt` corruption (a simulated other site) differs only in its preprocess hash."""
    store = open_store(store_path)
    if store.being_written():
        raise MedembedError(store.partial_reason())
    diff = fingerprint_mismatch(fingerprint, store.fingerprint)
    if not diff:
        return []
    shift = simulated_shift(run_preprocess, str(store.attrs.get("preprocess", "")))
    if shift and all(line.startswith("preprocess_hash:") for line in diff):
        return [f"{store_path}: the run's preprocessing under a simulated shift ({shift}); its preprocess hash differs by that alone"]
    raise MedembedError(f"{store_path}: embeddings differ from the ones this run was fitted on ({'; '.join(diff)})")


def _store_target(target: Path, kind: str, fingerprint: dict[str, str], run_preprocess: str, level: str) -> tuple[Split, np.ndarray, list[str]]:
    """Every row of the store `target` (its `level`'s tokens for a token head), each row's split, and notes."""
    if target.suffix.lower() == ".csv":
        raise MedembedError(f"{target}: a {kind} run scores embeddings; extract the manifest into a store first (medembed extract) and pass the store")
    notes = check_target_store(target, fingerprint, run_preprocess)
    table, _ = read_stores([target])
    if level:  # a token head reads a level's tokens [N, T, C], not the pooled rows
        table = EmbeddingTable(level_tokens([target], level), table.image_id, table.columns)
    rows = Split.from_table(table)
    bad = ~np.isfinite(np.asarray(table.embeddings, dtype=np.float32)).all(axis=1)
    if bad.any():
        raise MedembedError(f"{target}: {int(bad.sum())} embeddings are NaN or infinite, e.g. image ids {table.image_id[bad][:5].tolist()}; re-extract them")
    return rows, table.columns["split"].astype(str), notes


def _target(target: Path, split: str, columns_from: Path | None, read: TargetReader) -> tuple[Split, list[str]]:
    """The rows `read(target)` returns (rows, each row's split, notes), restricted to `split`, with the manifest
    `columns_from`'s columns joined; refused when none remain."""
    target = Path(target)
    if split != ALL_ROWS and split not in SPLITS:
        raise MedembedError(f"split must be {ALL_ROWS} or one of {', '.join(SPLITS)}; got {split!r}")
    rows, split_of_row, notes = read(target)
    if split != ALL_ROWS:
        rows = rows.take(np.flatnonzero(split_of_row == split))
    if len(rows) == 0:
        raise MedembedError(f"{target}: no rows to score" + ("" if split == ALL_ROWS else f" in split {split!r}"))
    if columns_from is not None:
        rows = with_manifest_columns(rows, Path(columns_from))
    return rows, notes


def with_manifest_columns(rows: Split, manifest_path: Path) -> Split:
    """`rows` with every column of the manifest joined by image id into `rows.extra` ("" where it has no row)."""
    manifest = read_manifest(manifest_path)
    position = {image_id: i for i, image_id in enumerate(manifest.image_id)}
    found = np.array([position.get(i, -1) for i in rows.image_id], dtype=np.intp)
    if (found < 0).all():
        raise MedembedError(f"{manifest_path}: none of the {len(rows)} image ids is in this manifest")
    extra = dict(getattr(rows, "extra", {}) or {})
    for name, values in manifest.columns.items():
        if name in ("image_id", "path"):
            continue
        extra[name] = np.where(found >= 0, np.asarray(values, dtype=object)[np.maximum(found, 0)], "").astype(str)
    rows.extra = extra
    return rows


def labelled(rows: Split) -> Split:
    """The rows with a known label."""
    return rows.take(np.flatnonzero(rows.y >= 0))
