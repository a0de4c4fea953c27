"""The batch runner: a frozen encoder over every image of a manifest, into an HDF5 embedding store.

DataLoader workers decode; on CUDA they send compact integer pixels and the encoder's PreprocessSpec runs on
the GPU (`medembed.extract.device_preprocess`: the same ops, the same spec hash), elsewhere, and for corrupted
variants, the workers preprocess too. The main process runs the model in the overlapped loop of
`medembed.extract.loop` (copies on a side stream, the store written on a thread): bf16 autocast on CUDA,
fp32 on CPU, under ``torch.inference_mode``; the precision used is part of the store fingerprint, so a
store is never continued in another precision. The run is resumable:
ids already in the store (or recorded as failed) are skipped, and every batch is durable once appended.
Unreadable images never stop the run; they go to the store's ``failed`` table with their reason. A file
that does not exist is not a bad image: it is counted as missing and tried again by the next run (and if
no image of the manifest exists under the root, the run is refused: wrong --root). Before anything runs,
the manifest passes its own error checks (duplicate ids, bad labels or splits, leakage). A resumed run
refreshes the stored manifest columns (label, split, ...) of rows already embedded, so an edited manifest
does not need a re-extraction.

Several GPUs: ``torchrun --nproc-per-node N -m medembed.cli.main extract ...`` (or the ``medembed`` entry point
under torchrun) gives each rank a disjoint shard of the manifest written to its own shard store; rank 0
merges the shards into the output store at the end.

`extract_bank` (``extract --augment K``) then embeds K seeded augmented views of every train image into the
store's augmentation bank ``S.views.h5`` (`medembed.data.augment`): the same `extract` over a manifest of views, so
it resumes, records failures, survives a kill and shards across torchrun ranks as any store does; views preprocess
in the decoding workers.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medembed._files import atomic_write_json
from medembed.extract.batch_size import cached, cuda_fits, largest_batch, rounded
from medembed.extract.device_preprocess import PackedBatch, pack, preprocess_packed
from medembed.encoders import Encoder
from medembed.errors import MedembedError
from medembed.extract.loop import DurableWriter, PinnedPool, StageTimes, WriteJob, timed
from medembed.data.augment import SOURCE_COLUMN, VIEW_COLUMN
from medembed.data.images import CompactPixels, ImageDecodeError, PreprocessSpec
from medembed.data.manifest import Manifest, validate_manifest
from medembed.options.extract import CPU_BATCH, CUDA_BATCH, ExtractOptions
from medembed.encoders.runtime import _autocast_dtype, default_workers, resolve_device, resolve_precision, run_provenance, store_fingerprint
from medembed.store import (
    StoreWriter,
    fingerprint_mismatch,
    merge_stores,
    open_store,
    text_problem,
)

if TYPE_CHECKING:
    from medembed.data.augment import AugmentedPreprocess
    from medembed.data.corrupt import CorruptedPreprocess
    from medembed.options.augment import AugmentOptions


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
    batch_size: int = 0  # the batch size used (resolved from auto or the default)
    preprocess_on: str = ""  # where preprocessing ran: "device" (e.g. cuda:0) or "workers"
    stages: StageTimes = field(default_factory=StageTimes)
    profile: bool = False  # format() adds the per-stage table

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
        if self.stages.batches:
            lines.append(f"  batch {self.batch_size}, preprocessing on the {self.preprocess_on}; {self.stages.line()}")
        if self.profile and self.stages.batches:
            lines.append(self.stages.table(self.seconds))
        return "\n".join(lines)


MISSING = "file not found"  # the reason a file that does not exist gets: counted as missing, never recorded as failed
# Failure reasons earlier medembed versions recorded for files that were not there: tried again on resume.
_MISSING_REASONS = (MISSING, "broken symbolic link")


class ManifestImages(Dataset):
    """(index, pixels or None, failure reason) for each manifest row; decoding errors are data. Pixels are the
    preprocessed `[C, S, S]` float32 array, or with `compact` the decoded `CompactPixels` (`spec.decode_compact`).

    A file that does not exist (even one removed during the run, or a symbolic link to nothing) has the reason MISSING.
    With `views` ((source image id, view index) per path) the spec is an `AugmentedPreprocess` and each item that view.
    """

    def __init__(self, paths: list[Path], spec: PreprocessSpec, compact: bool = False, views: list[tuple[str, int]] | None = None) -> None:
        self.paths, self.spec, self.compact, self.views = paths, spec, compact, views

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | CompactPixels | None, str]:
        try:
            path = self.paths[index]
            if self.views is not None:
                return index, self.spec.load_view(path, *self.views[index]), ""
            return index, self.spec.decode_compact(path) if self.compact else self.spec.load(path), ""
        except ImageDecodeError as error:
            return index, None, MISSING if not os.path.exists(self.paths[index]) else error.reason
        except Exception as error:  # a decoder bug on one file must not kill a day-long run
            return index, None, f"unexpected decoding error: {type(error).__name__}: {error}"


def init_decode_worker(_: int) -> None:
    # Each decoding worker gets one thread: several workers x several intra-op threads oversubscribe the cores.
    torch.set_num_threads(1)


def collate_images(items: list[tuple[int, np.ndarray | None, str]]) -> tuple[list[int], torch.Tensor | None, list[int], list[str]]:
    """(good indices, their pixels stacked [B, C, S, S], failed indices, their reasons)."""
    return _collate(items, lambda images: torch.from_numpy(np.stack(images)))


def collate_compact(items: list[tuple[int, CompactPixels | None, str]]) -> tuple[list[int], PackedBatch | None, list[int], list[str]]:
    """As `collate_images`, the compact pixels packed into one buffer (one pinned copy, one transfer)."""
    return _collate(items, pack)


def _collate(items: list[tuple[int, Any, str]], join: Callable[[list], Any]) -> tuple[list[int], Any, list[int], list[str]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    pixels = join([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, [i for i, _ in bad], [r for _, r in bad]


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
        # The ranks only meet at barriers; NCCL refuses two ranks on one GPU, gloo serves them there.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nccl = torch.cuda.is_available() and local <= torch.cuda.device_count()
        if nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if nccl else "gloo")
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
    preprocess: PreprocessSpec | CorruptedPreprocess | AugmentedPreprocess | None = None,
    attrs: dict[str, str] | None = None,
) -> ExtractSummary:
    """Embed every image of `manifest` (paths relative to `root`) into the store `out`, resuming if it exists.

    Under torchrun each rank embeds rows rank::world into its own shard store and rank 0 merges them into
    `out`. `on_progress(n)` is called with the number of images skipped, then after each batch with the number it handled.
    `encoder_options` (what `get_encoder` was given) are recorded so `predict` can rebuild the encoder.
    `preprocess` replaces the encoder's own preprocessing, for loading and in the store fingerprint (e.g. a
    corrupted variant for robustness tests: those embeddings get their own fingerprint). `attrs` are further store
    attributes recorded when the store is created (an augmentation bank's recipe: see `extract_bank`).

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
        **(attrs or {}),
    }
    summary = ExtractSummary(total=len(rows), store=out, precision=precision, profile=options.profile)
    start = time.perf_counter()
    writer = StoreWriter(
        target, dim=encoder.dim, fingerprint=fingerprint, metadata=metadata, provenance=run_provenance(device), tokens=encoder.token_shapes(),
        discard_if_empty=True,  # a first run refused before any row (a wrong --root) leaves no empty store
    )
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
    if options.profile and summary.stages.batches:
        atomic_write_json(target.with_name(target.name + ".profile.json"), profile_document(summary))
    if world > 1:
        summary.metadata_updated = _merge_shards(out, rank, world, manifest)
    return summary


@dataclass
class BankSummary:
    """What `extract_bank` did: the views run's own summary, and the bank's size in views."""

    path: Path
    recipe_text: str
    train_images: int
    views_per_image: int
    run: ExtractSummary

    def format(self) -> str:
        run = self.run
        missing = f", {run.missing} missing" if run.missing else ""
        lines = [
            f"augmentation bank {self.path}: {run.done} view(s) embedded, {run.skipped} skipped (already in the bank), "
            f"{run.failed} failed{missing}, of {run.total} = {self.views_per_image} x {self.train_images} train images, in "
            f"{run.seconds:.1f} s ({run.images_per_second:.1f} views/s); val and test get no views",
            f"  recipe: {self.recipe_text}",
        ]
        lines += [f"  failed: {count} x {reason}" for reason, count in run.failure_reasons.most_common()]
        return "\n".join(lines)


def view_manifest(manifest: Manifest, views: int) -> Manifest:
    """One row per view 1..`views` of each train image of `manifest`: id `<image id>#view<k>`, the image's path and
    columns, and SOURCE_COLUMN / VIEW_COLUMN; refused when the manifest has columns of those names."""
    from medembed.data.augment import view_id

    clash = [name for name in (SOURCE_COLUMN, VIEW_COLUMN) if name in manifest.columns]
    if clash:
        raise MedembedError(f"the manifest has a column {clash[0]!r}, which an augmentation bank uses for itself; rename it to extract with --augment")
    train = np.flatnonzero(manifest.split == "train")
    rows = np.repeat(train, views)
    index = np.tile(np.arange(1, views + 1), len(train))
    part = manifest.subset(rows)
    columns = dict(part.columns)
    columns["image_id"] = np.array([view_id(i, k) for i, k in zip(part.image_id, index)], dtype=object)
    columns[SOURCE_COLUMN] = part.image_id
    columns[VIEW_COLUMN] = np.array([str(k) for k in index], dtype=object)
    return Manifest(columns)


def check_bank_recipe(out: Path, augment: AugmentOptions) -> Path:
    """The bank path of store `out`; refused in one line when a bank is there with another recipe (or none)."""
    from medembed.data.augment import AugmentRecipe
    from medembed.store.views import bank_path

    recipe = AugmentRecipe.from_options(augment)
    path = bank_path(out)
    if path.exists():
        recorded = open_store(path).attrs.get("augment")
        if recorded is None:
            raise MedembedError(f"{path} is a store but not an augmentation bank (no recipe recorded); move it away to extract with --augment")
        old = AugmentRecipe.from_json(recorded, str(path))
        if old != recipe:
            raise MedembedError(f"{path} holds views of another recipe ({old.describe()}; this run: {recipe.describe()}); "
                                "delete the bank or extract into another --out")
    return path


def extract_bank(
    manifest: Manifest,
    root: Path,
    encoder: Encoder,
    out: Path,
    options: ExtractOptions | None,
    augment: AugmentOptions,
    on_progress: Callable[[int], None] | None = None,
    encoder_options: dict | None = None,
) -> BankSummary:
    """Embed `augment.augment` seeded views of every train image of `manifest` into the augmentation bank of the
    store `out` (`medembed.data.augment.bank_path`), resuming it if it exists; the main store must exist already
    (extract it first) and have this run's fingerprint. Refused in one line: a bank with another recipe, and a main
    store of another encoder or preprocessing. Under torchrun the views are sharded across the ranks like any
    manifest (`extract`), after the main store's merge: every rank reads the merged store."""
    from medembed.data.augment import AugmentedPreprocess, AugmentRecipe

    options = options or ExtractOptions()
    out = Path(out)
    path = check_bank_recipe(out, augment)
    recipe = AugmentRecipe.from_options(augment)
    if not out.exists():
        raise MedembedError(f"{out}: no store to augment; its originals are extracted first (no image was embedded)")
    main = open_store(out)
    precision = resolve_precision(options.precision, resolve_device(options.device))
    source = store_fingerprint(encoder, options.store_dtype, precision) | {"preprocess_hash": encoder.preprocess.hash()}
    diff = fingerprint_mismatch(main.fingerprint, source)
    if diff:
        raise MedembedError(f"{out} was written with another encoder, preprocessing or precision than this run ({'; '.join(diff)}); its bank must match it")
    views = view_manifest(manifest, recipe.views)
    if not len(views):
        raise MedembedError(f"the manifest has no train images to augment ({len(manifest)} rows, none with split 'train')")
    attrs = {"augment": recipe.to_json(), "source_fingerprint": json.dumps(dict(main.fingerprint), sort_keys=True), "source_store": out.name}
    run = extract(views, root, encoder, path, options, on_progress, encoder_options, preprocess=AugmentedPreprocess(encoder.preprocess, recipe), attrs=attrs)
    return BankSummary(path, recipe.describe(), int((manifest.split == "train").sum()), recipe.views, run)


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
    """The manifest columns a store keeps beside each embedding (the one place that says which): the standard
    ones, and every further column (view, site, sex: subgroups) as an extra column; not the machine's paths."""
    standard = {name: manifest.label if name == "label" else getattr(manifest, name) for name in ("label", "study_id", "patient_id", "body_part", "split")}
    return standard | {name: values for name, values in manifest.columns.items() if name not in standard and name not in ("image_id", "path")}


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
    """Embed `todo` into `writer` through the overlapped loop; `summary` counts only what the store holds."""
    autocast = _autocast_dtype(options.precision, device)
    encoder.load(device)
    compact = preprocess_on_device(spec, options.preprocess_on)
    embed = _embed_function(encoder, options.compile, device)
    batch_size = resolve_batch_size(options.batch_size, encoder, spec, device, autocast)
    summary.batch_size = batch_size
    summary.preprocess_on = f"{device} device" if compact else "decoding workers"
    workers = options.num_workers if options.num_workers is not None else default_workers(device)
    paths = _resolve(todo, root, options)
    views = None
    if hasattr(spec, "load_view"):  # an augmentation bank: each row is one view of a train image
        views = [(str(source), int(view)) for source, view in zip(todo.columns[SOURCE_COLUMN], todo.columns[VIEW_COLUMN])]
    loader = DataLoader(
        ManifestImages(paths, spec, compact=compact, views=views),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_compact if compact else collate_images,
        worker_init_fn=init_decode_worker,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    step = _Step(encoder, spec if compact else None, embed, device, autocast, writer.dtype, paths, todo.image_id,
                 batch_size if options.compile and device.type == "cuda" else None, summary.stages)
    durable = DurableWriter(writer.append, todo.image_id, store_columns(todo), str(writer.path), summary.stages)

    def acknowledge() -> None:
        for ack in durable.acks():
            summary.done += ack.done
            summary.failed += len(ack.failed)
            summary.failure_reasons.update(ack.failed.values())
            summary.missing += len(ack.vanished)
            summary.missing_paths += ack.vanished[: max(0, 5 - len(summary.missing_paths))]
            if on_progress:
                on_progress(ack.done + len(ack.failed) + len(ack.vanished))

    threads = torch.get_num_threads()
    if device.type == "cpu":
        # Decoding workers and the model's threads share the cores; oversubscribed threads stall each other.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))
    try:
        with torch.inference_mode():
            staged = None
            for batch in timed(loader, summary.stages):
                following = step.stage(batch)  # its copy to the device overlaps the model on the batch before
                if staged is not None:
                    durable.submit(step.launch(staged))
                    acknowledge()
                staged = following
            if staged is not None:
                durable.submit(step.launch(staged))
        durable.close()
    except BaseException:
        durable.close(raise_error=False)  # what is queued is computed: written, unless the store failed
        raise
    finally:
        acknowledge()
        torch.set_num_threads(threads)


def preprocess_on_device(spec: PreprocessSpec | CorruptedPreprocess, place: str) -> bool:
    """Whether pad/resize/normalise run on the model's device (workers then only decode): "device" or
    "workers" as asked; "auto" is the device on CUDA and on a CPU alike, where it measured faster too
    (`tests/benchmarks/bench_extract.py --part cpu`: workers that only decode leave the cores to the model).
    A corrupted variant (corruptions act on the decoded float image, in the workers) always preprocesses
    in the workers."""
    if not isinstance(spec, PreprocessSpec):
        return False
    return place in ("device", "auto")


def resolve_batch_size(requested: int | str | None, encoder: Encoder, spec: PreprocessSpec | CorruptedPreprocess,
                       device: torch.device, autocast: torch.dtype | None) -> int:
    """The batch size a run uses: the one asked for; by default CUDA_BATCH on CUDA, CPU_BATCH on a CPU;
    "auto": on CUDA the largest that fits (see `medembed.extract.batch_size`, cached), on a CPU the CPU default."""
    if isinstance(requested, int):
        return requested
    if requested is None or device.type != "cuda":
        return CUDA_BATCH if device.type == "cuda" else CPU_BATCH
    size = spec.to_dict()["size"]
    key = "|".join([
        torch.cuda.get_device_name(device), str(torch.cuda.get_device_properties(device).total_memory), encoder.name,
        encoder.model_id, encoder.config_sha256(), f"{size}px", str(autocast), f"torch {torch.__version__}",
        json.dumps(encoder.token_shapes(), sort_keys=True),
    ])
    fits = cuda_fits(encoder.embed_with_tokens, (3, size, size), device, autocast)
    return cached(key, lambda: rounded(largest_batch(fits)))


def _embed_function(encoder: Encoder, compile_model: bool, device: torch.device) -> Callable:
    """`encoder.embed_with_tokens`, torch.compile-d when asked: on CUDA with CUDA graphs ("reduce-overhead";
    the loop pads every batch to one shape so a single graph is replayed)."""
    if not compile_model:
        return encoder.embed_with_tokens
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(encoder.embed_with_tokens, mode=mode, dynamic=False)


@dataclass
class _Staged:
    """A loaded batch whose pixels are on (or on their way to) the device."""

    good: list[int]
    pixels: torch.Tensor | PackedBatch | None
    bad: list[int]
    reasons: list[str]
    copied: Any = None  # CUDA event: the host-to-device copy is done
    copy_seconds: Callable[[], float] | None = None


class _Step:
    """The per-batch work of the loop: `stage` starts the host-to-device copy, `launch` queues preprocessing,
    the model and the copy back (asynchronous on CUDA) and returns the WriteJob for the writer thread."""

    def __init__(self, encoder: Encoder, device_spec: PreprocessSpec | None, embed: Callable, device: torch.device,
                 autocast: torch.dtype | None, store_dtype: str, paths: list[Path], ids: np.ndarray,
                 static_batch: int | None, stages: StageTimes) -> None:
        self.encoder, self.device_spec, self.embed, self.device, self.autocast = encoder, device_spec, embed, device, autocast
        self.token_dtype = getattr(torch, store_dtype)
        self.paths, self.ids, self.static_batch, self.stages = paths, ids, static_batch, stages
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.pool = PinnedPool() if self.cuda else None

    def stage(self, batch: tuple) -> _Staged:
        good, pixels, bad, reasons = batch
        if not self.cuda or pixels is None:
            return _Staged(good, pixels, bad, reasons)
        start, copied = _event(), _event()
        with torch.cuda.stream(self.copy_stream):
            start.record()
            moved = pixels.to(self.device, non_blocking=True)
            copied.record()
        # the compute stream uses these bytes: the allocator must not hand them out before it is done
        (moved.buffer if isinstance(moved, PackedBatch) else moved).record_stream(torch.cuda.current_stream(self.device))
        return _Staged(good, moved, bad, reasons, copied, lambda: start.elapsed_time(copied) / 1e3)

    def launch(self, staged: _Staged) -> WriteJob:
        failed = {str(self.ids[i]): reason for i, reason in zip(staged.bad, staged.reasons) if reason != MISSING}
        vanished = [str(self.paths[i]) for i, reason in zip(staged.bad, staged.reasons) if reason == MISSING]
        if staged.pixels is None:
            empty = torch.zeros((0, self.encoder.dim))
            # a batch of failed images still names every level the store holds, with no rows
            no_tokens = {level: torch.zeros((0, *shape), dtype=self.token_dtype) for level, shape in self.encoder.token_shapes().items()}
            return WriteJob([], empty, no_tokens, torch.zeros(0, dtype=torch.bool), failed, vanished)
        if self.cuda:
            return self._launch_cuda(staged, failed, vanished)
        clock = [time.perf_counter()]
        pixels = self._pixels(staged.pixels)
        clock.append(time.perf_counter())
        pooled, tokens, finite = self._model(pixels)
        clock.append(time.perf_counter())
        for stage, begin, end in zip(("preprocess", "model"), clock, clock[1:]):
            self.stages.add(stage, end - begin)
        return WriteJob(staged.good, pooled.float(), {k: v.to(self.token_dtype) for k, v in tokens.items()}, finite, failed, vanished)

    def _launch_cuda(self, staged: _Staged, failed: dict[str, str], vanished: list[str]) -> WriteJob:
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(staged.copied)
        marks = [_event() for _ in range(4)]
        marks[0].record()
        pixels = self._pixels(staged.pixels)
        marks[1].record()
        pooled, tokens, finite = self._model(pixels)
        marks[2].record()
        pool = self.pool
        host = pool.take(tuple(pooled.shape), torch.float32)
        host.copy_(pooled, non_blocking=True)
        host_tokens = {}
        for level, grid in tokens.items():
            host_tokens[level] = pool.take(tuple(grid.shape), self.token_dtype)
            host_tokens[level].copy_(grid, non_blocking=True)
        host_finite = pool.take(tuple(finite.shape), torch.bool)
        host_finite.copy_(finite, non_blocking=True)
        marks[3].record()
        copy_seconds = staged.copy_seconds

        def timings() -> dict[str, float]:
            seconds = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
            return {"H2D": copy_seconds(), "preprocess": seconds[0], "model": seconds[1], "D2H": seconds[2]}

        buffers = [host, host_finite, *host_tokens.values()]
        return WriteJob(staged.good, host, host_tokens, host_finite, failed, vanished, marks[3], timings, lambda: pool.give(buffers))

    def _pixels(self, pixels: torch.Tensor | PackedBatch) -> torch.Tensor:
        """The encoder's input `[B, 3, S, S]`: preprocessed here from a packed batch, padded to the static
        batch shape when CUDA graphs replay one (the padding rows are dropped with the rows past `good`)."""
        if self.device_spec is not None:
            pixels = preprocess_packed(self.device_spec, pixels)
        if self.static_batch and len(pixels) < self.static_batch:
            pixels = torch.cat([pixels, pixels.new_zeros((self.static_batch - len(pixels), *pixels.shape[1:]))])
        return pixels

    def _model(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(pooled [B, D], tokens {level: [B, T, C]}, finite [B]: the row's embedding and tokens are finite in the store dtype)."""
        if self.static_batch:
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs were copied out already
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            pooled, tokens = self.embed(pixels)
        finite = torch.isfinite(pooled).all(dim=1)
        for grid in tokens.values():
            finite &= torch.isfinite(grid.to(self.token_dtype)).flatten(1).all(dim=1)
        return pooled, tokens, finite


def _event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def profile_document(summary: ExtractSummary) -> dict[str, Any]:
    """What --profile writes beside the store: the run's counts, settings and per-stage seconds."""
    return {
        "images_embedded": summary.done,
        "wall_seconds": summary.seconds,
        "images_per_second": summary.images_per_second,
        "batch_size": summary.batch_size,
        "precision": summary.precision,
        "preprocess_on": summary.preprocess_on,
        "stages": summary.stages.to_dict(),
    }


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
        with StoreWriter(out, dim=store.dim, fingerprint=store.fingerprint, provenance=store.provenance, tokens=store.token_shapes) as writer:
            updated = refresh_metadata(writer, manifest)
    dist.barrier()
    return updated
