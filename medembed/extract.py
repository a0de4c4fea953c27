"""The batch runner: a frozen encoder over every image of a manifest, into an HDF5 embedding store.

DataLoader workers decode and preprocess (the encoder's picklable PreprocessSpec) while the main process
runs the model: bf16 autocast on CUDA, fp32 on CPU, under ``torch.inference_mode``; the precision used is
part of the store fingerprint, so a store is never continued in another precision. The run is resumable:
ids already in the store (or recorded as failed) are skipped, and every batch is durable once appended.
Unreadable images never stop the run; they go to the store's ``failed`` table with their reason. A file
that does not exist is not a bad image: it is counted as missing and tried again by the next run (and if
no image of the manifest exists under the root, the run is refused: wrong --root). Before anything runs,
the manifest passes its own error checks (duplicate ids, bad labels or splits, leakage). A resumed run
refreshes the stored manifest columns (label, split, ...) of rows already embedded, so an edited manifest
does not need a re-extraction.

Several GPUs: ``torchrun --nproc-per-node N -m cli.main extract ...`` (or the ``medembed`` entry point
under torchrun) gives each rank a disjoint shard of the manifest written to its own shard store; rank 0
merges the shards into the output store at the end.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medembed.encoders import Encoder, get_encoder
from medembed.errors import MedembedError
from medembed.images import ImageDecodeError, PreprocessSpec
from medembed.manifest import Manifest, validate_manifest
from medembed.options import check_choice, check_positive, option
from medembed.store import (
    FINGERPRINT_KEYS,
    PRECISIONS,
    StoreWriter,
    collect_provenance,
    fingerprint_mismatch,
    make_fingerprint,
    merge_stores,
    open_store,
    text_problem,
)

if TYPE_CHECKING:
    from medembed.corrupt import CorruptedPreprocess

CUDA_BATCH, CPU_BATCH = 128, 4


@dataclass
class ExtractOptions:
    """How to run the encoder. Defaults suit both a CPU laptop and one GPU."""

    batch_size: int | None = option(None, f"Images per forward pass (default: {CUDA_BATCH} on CUDA, {CPU_BATCH} on CPU, where small batches stay in cache).", flag="-b")
    num_workers: int | None = option(None, "Decoding worker processes (default: every core but one on a GPU box; a quarter of the cores on a CPU, none on 2 cores).", flag="--workers -j")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    precision: str = option("auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32; recorded in the store's fingerprint.")
    store_dtype: str = option("float16", "Store dtype: float16 | float32.", flag="--dtype")
    compile: bool = option(False, "torch.compile the encoder (GPU, long runs).")
    retry_failed: bool = option(False, "Try again the images an earlier run listed as failed.")
    limit: int | None = option(None, "Embed at most this many new images (smoke tests, benchmarks).")
    allow_absolute: bool = option(False, "Accept absolute paths in the manifest (kept as they are instead of joined to --root).")
    allow_outside_root: bool = option(False, "Accept relative manifest paths whose '..' lead outside --root.")

    def __post_init__(self) -> None:
        check_positive("batch_size", self.batch_size, allow_none=True)
        check_positive("num_workers", self.num_workers, minimum=0, allow_none=True)
        check_positive("limit", self.limit, minimum=0, allow_none=True)
        check_choice("precision", self.precision, ("auto", *PRECISIONS))
        check_choice("store_dtype", self.store_dtype, ("float16", "float32"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise MedembedError(f"option device must be auto, cpu, cuda or cuda:N; got {self.device!r}")


@dataclass
class ExtractSummary:
    """What one run did: counts, time and the reasons images failed."""

    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    failure_reasons: Counter = field(default_factory=Counter)
    store: Path | None = None
    missing: int = 0  # files not found under the root: not recorded as failed, tried again by the next run
    missing_paths: list[str] = field(default_factory=list)  # the first few of them, as resolved
    metadata_updated: int = 0  # stored rows whose manifest columns (label, split, ...) were refreshed
    precision: str = ""  # the autocast precision used (bf16, fp16, fp32)

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        """One-paragraph human summary."""
        missing = f", {self.missing} missing" if self.missing else ""
        lines = [
            f"{self.done} embedded, {self.skipped} skipped (already in the store), {self.failed} failed{missing}, "
            f"of {self.total} images in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s)"
        ]
        lines += [f"  failed: {count} x {reason}" for reason, count in self.failure_reasons.most_common()]
        if self.missing:
            shown = ", ".join(self.missing_paths[:3]) + (" ..." if self.missing > 3 else "")
            lines.append(f"  missing: {self.missing} file(s) not found ({shown}); not recorded as failed, the next run tries them again")
        if self.metadata_updated:
            lines.append(
                f"  metadata: {self.metadata_updated} stored row(s) had their label/split/study/patient/body part "
                "refreshed from the manifest"
            )
        return "\n".join(lines)


MISSING = "file not found"  # the reason a file that does not exist gets: counted as missing, never recorded as failed
# Failure reasons earlier medembed versions recorded for files that were not there: tried again on resume.
_MISSING_REASONS = (MISSING, "broken symbolic link")


class ManifestImages(Dataset):
    """(index, pixels [3, S, S] float32 or None, failure reason) for each manifest row; decoding errors are data.

    A file that does not exist (even one removed during the run, or a symbolic link to nothing) has the reason MISSING.
    """

    def __init__(self, paths: list[Path], spec: PreprocessSpec) -> None:
        self.paths, self.spec = paths, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return index, self.spec.load(self.paths[index]), ""
        except ImageDecodeError as error:
            return index, None, MISSING if not os.path.exists(self.paths[index]) else error.reason
        except Exception as error:  # a decoder bug on one file must not kill a day-long run
            return index, None, f"unexpected decoding error: {type(error).__name__}: {error}"


def init_decode_worker(_: int) -> None:
    # Each decoding worker gets one thread: several workers x several intra-op threads oversubscribe the cores.
    torch.set_num_threads(1)


def collate_images(items: list[tuple[int, np.ndarray | None, str]]) -> tuple[list[int], torch.Tensor | None, list[int], list[str]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    pixels = torch.from_numpy(np.stack([x for _, x in good])) if good else None
    return [i for i, _ in good], pixels, [i for i, _ in bad], [r for _, r in bad]


def build_encoder(name: str, options: dict[str, Any] | None = None) -> Encoder:
    """`get_encoder(name, **options)`, plus the run-level option `lenient_decoding` applied to its preprocessing.

    Lenient decoding lives in the PreprocessSpec, so it changes the preprocess hash and thus the store fingerprint.
    """
    options = dict(options or {})
    lenient = bool(options.pop("lenient_decoding", False))
    encoder = get_encoder(name, **options)
    if lenient:
        encoder.preprocess = replace(encoder.preprocess, lenient_decoding=True)
    return encoder


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available (this rank's GPU under torchrun), else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MedembedError(f"device {device!r} requested but CUDA is not available on this machine")
    return resolved


def default_workers(device: torch.device) -> int:
    """Decoding worker processes: every core but one on a GPU box (the GPU does the model); on a CPU the
    model needs the cores, so a quarter of them decode (none on a 2-core laptop, where decoding in-process
    between batches is fastest: measured in tests/benchmarks/bench_extract.py)."""
    cores = os.cpu_count() or 1
    return max(0, cores - 1) if device.type == "cuda" else cores // 4


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast precision a run uses: "bf16", "fp16" or "fp32" ("auto": bf16 on CUDA, fp32 on CPU)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise MedembedError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The torch autocast dtype of a precision name (None: no autocast, float32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[resolve_precision(precision, device)]


def store_fingerprint(encoder: Encoder, store_dtype: str, precision: str = "fp32") -> dict[str, str]:
    """The store fingerprint of embeddings made by `encoder` in autocast `precision` (a resolved name:
    bf16, fp16 or fp32; see `resolve_precision`) and kept as `store_dtype`."""
    if precision not in PRECISIONS:
        raise MedembedError(f"store_fingerprint needs a resolved precision ({', '.join(PRECISIONS)}), got {precision!r}")
    described = encoder.fingerprint()
    fields = {k: described[k] for k in FINGERPRINT_KEYS if k in described}
    return make_fingerprint(**(fields | {"dtype": store_dtype, "precision": precision}))


def run_provenance(device: torch.device) -> dict[str, str]:
    """What a store records about the environment computing it (not identity): package versions and the GPU."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return collect_provenance(gpu=gpu)


def check_manifest(manifest: Manifest, *, allow_absolute: bool = False, allow_outside_root: bool = False) -> None:
    """Refuse, in one line naming the rows, a manifest with errors (duplicate ids, bad labels or splits, leakage,
    refused paths, ids or columns HDF5 cannot store) before any image is embedded."""
    report = validate_manifest(
        manifest, root=None, check_files=False, allow_absolute=allow_absolute, allow_outside_root=allow_outside_root
    )
    errors = [str(problem) for problem in report.errors]
    for name in ("image_id", "study_id", "patient_id", "body_part", "split"):
        values = manifest.image_id if name == "image_id" else getattr(manifest, name)
        bad = [(row, value, text_problem(value)) for row, value in enumerate(values) if text_problem(value)]
        if bad:
            shown = ", ".join(f"row {row + 1} {value!r} ({problem})" for row, value, problem in bad[:3])
            errors.append(f"error: [unstorable_{name}] {len(bad)} {name} value(s) cannot be stored in HDF5: {shown}")
    if errors:
        raise MedembedError(f"manifest has {len(errors)} error(s), fix them before extracting: {'; '.join(errors)}")


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1); initialises the process group when needed."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def shard_path(out: Path, rank: int, world: int) -> Path:
    """Where rank `rank` of `world` writes its shard store."""
    return out.with_name(f"{out.stem}.rank{rank}of{world}{out.suffix}")


def extract(
    manifest: Manifest,
    root: Path,
    encoder: Encoder,
    out: Path,
    options: ExtractOptions | None = None,
    on_progress: Callable[[int], None] | None = None,
    encoder_options: dict | None = None,
    preprocess: PreprocessSpec | CorruptedPreprocess | None = None,
) -> ExtractSummary:
    """Embed every image of `manifest` (paths relative to `root`) into the store `out`, resuming if it exists.

    Under torchrun each rank embeds rows rank::world into its own shard store and rank 0 merges them into
    `out`. `on_progress(n)` is called with the number of images skipped, then after each batch with the number it handled.
    `encoder_options` (what `get_encoder` was given) are recorded so `predict` can rebuild the encoder.
    `preprocess` replaces the encoder's own preprocessing, for loading and in the store fingerprint (e.g. a
    corrupted variant for robustness tests: those embeddings get their own fingerprint).

    Refused before anything runs: a manifest with errors (see `check_manifest`), a store with another
    fingerprint (encoder, preprocessing, precision, ...), and a root under which none of the images to
    embed exists. Files that do not exist are counted in `missing` and tried again by the next run; the
    manifest columns of rows already stored are refreshed from `manifest` (`metadata_updated`).
    """
    options = options or ExtractOptions()
    out = Path(out)
    check_manifest(manifest, allow_absolute=options.allow_absolute, allow_outside_root=options.allow_outside_root)
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    rank, world = _distributed()
    spec = preprocess if preprocess is not None else encoder.preprocess
    fingerprint = store_fingerprint(encoder, options.store_dtype, precision) | {"preprocess_hash": spec.hash()}
    already = _ids_in(out, fingerprint) if world > 1 else set()
    rows = np.arange(len(manifest))[rank::world]
    target = shard_path(out, rank, world) if world > 1 else out
    metadata = {
        "preprocess": spec.to_json(),
        "manifest_rows": len(manifest),
        "image_root": str(root),
        "encoder_options": json.dumps(encoder_options or {}, sort_keys=True),
    }
    summary = ExtractSummary(total=len(rows), store=out, precision=precision)
    start = time.perf_counter()
    writer = StoreWriter(target, dim=encoder.dim, fingerprint=fingerprint, metadata=metadata, provenance=run_provenance(device))
    with writer:
        if world == 1:
            summary.metadata_updated = refresh_metadata(writer, manifest)
        # An earlier run may have recorded a missing file as failed: it is tried again like any missing file.
        retry = {i for i, reason in writer.failed.items() if reason in _MISSING_REASONS}
        done = (writer.done_ids(include_failed=not options.retry_failed) - retry) | (already - retry)
        ids = manifest.image_id
        todo = [int(r) for r in rows if ids[r] not in done]
        summary.skipped = len(rows) - len(todo)
        if on_progress and summary.skipped:
            on_progress(summary.skipped)
        todo = _drop_missing(manifest, root, todo, rows, summary, options)
        if on_progress and summary.missing:
            on_progress(summary.missing)
        if options.limit is not None:
            todo = todo[: options.limit]
        if todo:
            _run(manifest.subset(np.asarray(todo)), root, encoder, spec, writer, options, summary, on_progress, device)
    summary.seconds = time.perf_counter() - start
    if world > 1:
        summary.metadata_updated = _merge_shards(out, rank, world, manifest)
    return summary


def refresh_metadata(writer: StoreWriter, manifest: Manifest) -> int:
    """Bring the stored manifest columns (label, study_id, patient_id, body_part, split) of rows already in
    the store up to date with `manifest` (the columns are metadata, not embeddings); rows whose values
    changed, logged crash-safely and applied on the writer's next fold."""
    stored = writer.done_ids(include_failed=False)
    rows = np.asarray([i for i, image_id in enumerate(manifest.image_id) if image_id in stored], dtype=np.intp)
    if len(rows) == 0:
        return 0
    part = manifest.subset(rows)
    return writer.update_columns(part.image_id, store_columns(part))


def store_columns(manifest: Manifest) -> dict[str, np.ndarray]:
    """The manifest columns a store keeps beside each embedding (the one place that says which)."""
    return {name: manifest.label if name == "label" else getattr(manifest, name) for name in ("label", "study_id", "patient_id", "body_part", "split")}


def _resolve(manifest: Manifest, root: Path, options: ExtractOptions) -> list[Path]:
    return manifest.resolve(root, allow_absolute=options.allow_absolute, allow_outside_root=options.allow_outside_root)


def _drop_missing(
    manifest: Manifest, root: Path, todo: list[int], rows: np.ndarray, summary: ExtractSummary, options: ExtractOptions
) -> list[int]:
    """`todo` without the rows whose file does not exist (counted in `summary`); refuses a root under which
    none of them, nor any other image of the manifest, exists (a wrong --root)."""
    if not todo:
        return todo
    paths = _resolve(manifest.subset(np.asarray(todo)), root, options)
    exists = [os.path.exists(p) for p in paths]
    if not any(exists):
        pending = set(todo)
        others = _resolve(manifest.subset(np.asarray([int(r) for r in rows if int(r) not in pending], dtype=np.intp)), root, options)
        if not any(os.path.exists(p) for p in others):
            raise MedembedError(
                f"none of the {len(todo)} images to embed exists under {Path(root).absolute()} "
                f"(the first: {paths[0]}); wrong --root?"
            )
    missing = [str(p) for p, ok in zip(paths, exists) if not ok]
    summary.missing += len(missing)
    summary.missing_paths += missing[:5]
    return [row for row, ok in zip(todo, exists) if ok]


def _ids_in(path: Path, fingerprint: dict[str, str]) -> set[str]:
    """Ids an existing merged store already holds (a resumed distributed run skips them)."""
    if not path.exists():
        return set()
    store = open_store(path)
    diff = fingerprint_mismatch(store.fingerprint, fingerprint)
    if diff:
        raise MedembedError(
            f"{path} was written with another encoder, preprocessing or precision ({'; '.join(diff)}); write to a new store"
        )
    return store.image_ids() | set(store.failed())


def _run(
    todo: Manifest,
    root: Path,
    encoder: Encoder,
    spec: PreprocessSpec | CorruptedPreprocess,
    writer: StoreWriter,
    options: ExtractOptions,
    summary: ExtractSummary,
    on_progress: Callable[[int], None] | None,
    device: torch.device,
) -> None:
    autocast = _autocast_dtype(options.precision, device)
    encoder.load(device)
    embed = torch.compile(encoder.embed) if options.compile else encoder.embed
    workers = options.num_workers if options.num_workers is not None else default_workers(device)
    batch_size = options.batch_size or (CUDA_BATCH if device.type == "cuda" else CPU_BATCH)
    paths = _resolve(todo, root, options)
    loader = DataLoader(
        ManifestImages(paths, spec),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_images,
        worker_init_fn=init_decode_worker,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    columns = store_columns(todo)
    ids = todo.image_id
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # Decoding workers and the model's threads share the cores; oversubscribed threads stall each other.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))
    try:
        with torch.inference_mode():
            for good, pixels, bad, reasons in loader:
                failed = {str(ids[i]): reason for i, reason in zip(bad, reasons) if reason != MISSING}
                vanished = [str(paths[i]) for i, reason in zip(bad, reasons) if reason == MISSING]
                summary.missing += len(vanished)
                summary.missing_paths += vanished[: max(0, 5 - len(summary.missing_paths))]
                embeddings = np.zeros((0, encoder.dim), dtype=np.float32)
                if pixels is not None:
                    pixels = pixels.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                        embeddings = embed(pixels).float().cpu().numpy()
                    finite = np.isfinite(embeddings).all(axis=1)
                    failed.update({str(ids[i]): "non-finite embedding" for i, ok in zip(good, finite) if not ok})
                    good, embeddings = [i for i, ok in zip(good, finite) if ok], embeddings[finite]
                writer.append(ids[good], embeddings, {k: v[good] for k, v in columns.items()}, failed=failed)
                summary.done += len(good)
                summary.failed += len(failed)
                summary.failure_reasons.update(failed.values())
                if on_progress:
                    on_progress(len(good) + len(failed) + len(vanished))
    finally:
        torch.set_num_threads(threads)


def _merge_shards(out: Path, rank: int, world: int, manifest: Manifest) -> int:
    """Rank 0 merges the shard stores into `out` and refreshes its rows' manifest columns; rows refreshed."""
    import torch.distributed as dist

    dist.barrier()
    updated = 0
    if rank == 0:
        shards = [shard_path(out, r, world) for r in range(world)]
        merge_stores(shards, out)
        for shard in shards:
            shard.unlink()
        store = open_store(out)
        with StoreWriter(out, dim=store.dim, fingerprint=store.fingerprint, provenance=store.provenance) as writer:
            updated = refresh_metadata(writer, manifest)
    dist.barrier()
    return updated
