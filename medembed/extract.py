"""The batch runner: a frozen encoder over every image of a manifest, into an HDF5 embedding store.

DataLoader workers decode and preprocess (the encoder's picklable PreprocessSpec) while the main process
runs the model: bf16 autocast on CUDA, fp32 on CPU, under ``torch.inference_mode``. The run is resumable:
ids already in the store (or recorded as failed) are skipped, and every batch is durable once appended.
Unreadable images never stop the run; they go to the store's ``failed`` table with their reason.

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
from medembed.manifest import Manifest
from medembed.store import FINGERPRINT_KEYS, StoreWriter, fingerprint_mismatch, make_fingerprint, merge_stores, open_store

if TYPE_CHECKING:
    from medembed.corrupt import CorruptedPreprocess


@dataclass
class ExtractOptions:
    """How to run the encoder. Defaults suit both a CPU laptop and one GPU."""

    batch_size: int | None = None  # None: 128 on CUDA, 4 on CPU (small batches stay in cache: faster on CPU)
    num_workers: int | None = None  # None: see default_workers
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp16" | "fp32"
    store_dtype: str = "float16"
    compile: bool = False
    retry_failed: bool = False
    limit: int | None = None  # embed at most this many new images (smoke tests, benchmarks)


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

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        """One-paragraph human summary."""
        lines = [
            f"{self.done} embedded, {self.skipped} skipped (already in the store), {self.failed} failed, "
            f"of {self.total} images in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s)"
        ]
        lines += [f"  failed: {count} x {reason}" for reason, count in self.failure_reasons.most_common()]
        return "\n".join(lines)


class ManifestImages(Dataset):
    """(index, pixels [3, S, S] float32 or None, failure reason) for each manifest row; decoding errors are data."""

    def __init__(self, paths: list[Path], spec: PreprocessSpec) -> None:
        self.paths, self.spec = paths, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return index, self.spec.load(self.paths[index]), ""
        except ImageDecodeError as error:
            return index, None, error.reason
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


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    choices = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if precision not in choices:
        raise MedembedError(f"precision must be one of auto, {', '.join(choices)}; got {precision!r}")
    return choices[precision]


def store_fingerprint(encoder: Encoder, store_dtype: str) -> dict[str, str]:
    """The store fingerprint of embeddings made by `encoder` and kept as `store_dtype`."""
    described = encoder.fingerprint()
    return make_fingerprint(**{k: described[k] for k in FINGERPRINT_KEYS if k in described}, dtype=store_dtype)


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
    """
    options = options or ExtractOptions()
    out = Path(out)
    rank, world = _distributed()
    spec = preprocess if preprocess is not None else encoder.preprocess
    fingerprint = store_fingerprint(encoder, options.store_dtype) | {"preprocess_hash": spec.hash()}
    already = _ids_in(out, fingerprint) if world > 1 else set()
    rows = np.arange(len(manifest))[rank::world]
    target = shard_path(out, rank, world) if world > 1 else out
    metadata = {
        "preprocess": spec.to_json(),
        "manifest_rows": len(manifest),
        "image_root": str(root),
        "encoder_options": json.dumps(encoder_options or {}, sort_keys=True),
    }
    summary = ExtractSummary(total=len(rows), store=out)
    start = time.perf_counter()
    with StoreWriter(target, dim=encoder.dim, fingerprint=fingerprint, metadata=metadata) as writer:
        done = writer.done_ids(include_failed=not options.retry_failed) | already
        ids = manifest.image_id
        todo = [int(r) for r in rows if ids[r] not in done]
        summary.skipped = len(rows) - len(todo)
        if on_progress and summary.skipped:
            on_progress(summary.skipped)
        if options.limit is not None:
            todo = todo[: options.limit]
        if todo:
            _run(manifest.subset(np.asarray(todo)), root, encoder, spec, writer, options, summary, on_progress)
    summary.seconds = time.perf_counter() - start
    if world > 1:
        _merge_shards(out, rank, world)
    return summary


def _ids_in(path: Path, fingerprint: dict[str, str]) -> set[str]:
    """Ids an existing merged store already holds (a resumed distributed run skips them)."""
    if not path.exists():
        return set()
    store = open_store(path)
    diff = fingerprint_mismatch(store.fingerprint, fingerprint)
    if diff:
        raise MedembedError(f"{path} was written with another encoder or preprocessing ({'; '.join(diff)}); write to a new store")
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
) -> None:
    device = resolve_device(options.device)
    autocast = _autocast_dtype(options.precision, device)
    encoder.load(device)
    embed = torch.compile(encoder.embed) if options.compile else encoder.embed
    workers = options.num_workers if options.num_workers is not None else default_workers(device)
    batch_size = options.batch_size or (128 if device.type == "cuda" else 4)
    loader = DataLoader(
        ManifestImages(todo.resolve(root), spec),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_images,
        worker_init_fn=init_decode_worker,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    columns = {name: todo.label if name == "label" else getattr(todo, name) for name in ("label", "study_id", "patient_id", "body_part", "split")}
    ids = todo.image_id
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # Decoding workers and the model's threads share the cores; oversubscribed threads stall each other.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))
    try:
        with torch.inference_mode():
            for good, pixels, bad, reasons in loader:
                failed = {str(ids[i]): reason for i, reason in zip(bad, reasons)}
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
                    on_progress(len(good) + len(failed))
    finally:
        torch.set_num_threads(threads)


def _merge_shards(out: Path, rank: int, world: int) -> None:
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        shards = [shard_path(out, r, world) for r in range(world)]
        merge_stores(shards, out)
        for shard in shards:
            shard.unlink()
    dist.barrier()
