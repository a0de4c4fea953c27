"""Store throughput: append synthetic embeddings in extractor-sized batches, folding a segment every 50,000
rows, and print the seconds each 50,000 rows took from the first segment to the last (a linear store keeps
this curve flat), the write rate, the consolidation into one plain file, and the read rates.

Targets (issue 10): seconds per 50,000 rows flat from the 1st to the 40th segment; write >= 200 MB/s.
Run: make bench-store   (python tests/benchmarks/bench_store.py --rows 2000000 --dim 1152 --batch 500)
     a quick look: python tests/benchmarks/bench_store.py --rows 200000
Reads are timed after the files' pages were dropped from the page cache (posix_fadvise DONTNEED after
fsync), so they come from the disk, not from memory.
"""

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from medembed.store import StoreWriter, make_fingerprint, open_store


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (what the store costs, whatever else the machine runs)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def drop_cache(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of every file under `folder` (they are fsync'd, so clean)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def stream_embeddings(path: Path, block: int) -> int:
    """Read every embedding with plain h5py in blocks of `block` rows (through the index when segmented); bytes read."""
    total = 0
    with h5py.File(path, "r") as f:
        dataset = f["embeddings"]
        for start in range(0, dataset.shape[0], block):
            total += dataset[start : start + block].nbytes
    return total


def batch_columns(start: int, stop: int) -> tuple[list[str], dict]:
    ids = [f"MURA-v1.1/train/XR_WRIST/patient{i // 3:07d}/study1_positive/image{i % 3 + 1}.png" for i in range(start, stop)]
    return ids, {
        "label": [i % 2 for i in range(start, stop)],
        "split": ["train"] * (stop - start),
        "study_id": [i.rsplit("/", 1)[0] for i in ids],
        "patient_id": [f"patient{i // 3:07d}" for i in range(start, stop)],
        "body_part": ["wrist"] * (stop - start),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--fold-every", type=int, default=50_000)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--dir", type=Path, default=None, help="Where to write the store (default: a temporary folder).")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    pool = rng.standard_normal((4096, args.dim)).astype(args.dtype)  # batches are views of this pool: no generation cost
    fingerprint = make_fingerprint(encoder="bench", model_id="random", embedding_kind="pooler_output", dtype=args.dtype)
    row_mb = args.dim * np.dtype(args.dtype).itemsize / 1e6
    megabytes = args.rows * row_mb
    print(
        f"store benchmark: {args.rows} x {args.dim} {args.dtype} ({megabytes:.1f} MB of embeddings), "
        f"batches of {args.batch}, a segment every {args.fold_every} rows"
    )

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench.h5"
        per_segment: list[float] = []  # seconds of each 50,000 rows: their appends to the log and their fold
        folds: list[float] = []  # the fold alone: what the old design made grow (it copied the whole store)
        cpus: list[float] = []  # CPU seconds of each 50,000 rows (appends + fold): immune to other jobs' load
        window_cpu = 0.0
        window, window_rows = 0.0, 0
        # The fold is called here at each boundary (what fold_every_rows does inside append), to time it apart.
        # consolidate=False: the run's own close would consolidate (it wrote every row); timed separately below.
        writer = StoreWriter(path, dim=args.dim, fingerprint=fingerprint, fold_every_rows=args.rows + 1, consolidate=False)
        cpu_before, batch_cpu = cpu_seconds(), 0.0
        for start in range(0, args.rows, args.batch):
            stop = min(start + args.batch, args.rows)
            began_cpu = cpu_seconds()
            ids, columns = batch_columns(start, stop)
            offset = start % (len(pool) - args.batch)
            embeddings = pool[offset : offset + stop - start]
            batch_cpu += cpu_seconds() - began_cpu  # making the batch is not the store's cost
            began, began_cpu = time.perf_counter(), cpu_seconds()
            writer.append(ids, embeddings, columns)
            window += time.perf_counter() - began
            window_cpu += cpu_seconds() - began_cpu
            window_rows += stop - start
            if stop % args.fold_every == 0 or stop == args.rows:
                began, began_cpu = time.perf_counter(), cpu_seconds()
                writer.flush()
                folds.append(time.perf_counter() - began)
                cpus.append(window_cpu + cpu_seconds() - began_cpu)
                per_segment.append(window + folds[-1])
                print(
                    f"  segment {len(per_segment):3d}  rows {stop:>9}  {per_segment[-1]:6.2f} s (fold {folds[-1]:5.2f} s)  "
                    f"{window_rows * row_mb / per_segment[-1]:7.1f} MB/s  CPU {cpus[-1]:5.2f} s",
                    flush=True,
                )
                window, window_rows, window_cpu = 0.0, 0, 0.0
        began = time.perf_counter()
        writer.close()
        per_segment[-1] += time.perf_counter() - began
        write_s = sum(per_segment)
        write_cpu = cpu_seconds() - cpu_before - batch_cpu
        store = open_store(path)
        assert store.segmented and store.committed_rows == args.rows and len(store.segments) == len(per_segment)

        drop_cache(Path(tmp))
        began = time.perf_counter()
        read_bytes = stream_embeddings(path, args.fold_every)
        segmented_read_s = time.perf_counter() - began
        drop_cache(Path(tmp))
        began = time.perf_counter()
        columns_table = open_store(path).read_columns()
        columns_s = time.perf_counter() - began
        assert len(columns_table) == args.rows

        began, began_cpu = time.perf_counter(), cpu_seconds()
        with StoreWriter(path, dim=args.dim, fingerprint=fingerprint, consolidate=True):
            pass
        consolidate_s, consolidate_cpu = time.perf_counter() - began, cpu_seconds() - began_cpu
        assert not open_store(path).segmented
        size_mb = path.stat().st_size / 1e6
        drop_cache(Path(tmp))
        began = time.perf_counter()
        plain_bytes = stream_embeddings(path, args.fold_every)
        plain_read_s = time.perf_counter() - began
        assert read_bytes == plain_bytes == int(round(megabytes * 1e6))

    first, last = per_segment[: min(5, len(per_segment))], per_segment[-min(5, len(per_segment)) :]
    full = per_segment[:-1] if args.rows % args.fold_every else per_segment  # the last window may be short
    print(
        f"curve: seconds per {args.fold_every} rows, segments 1-{len(first)} median {statistics.median(first):.2f} s, "
        f"segments {len(per_segment) - len(last) + 1}-{len(per_segment)} median {statistics.median(last):.2f} s "
        f"(last/first {statistics.median(last) / statistics.median(first):.2f}); min {min(full):.2f} s, max {max(full):.2f} s "
        f"over {len(full)} full segments  [{'flat' if statistics.median(last) <= 1.5 * statistics.median(first) else 'GROWS'}]"
    )
    print(
        f"folds alone: segments 1-{len(first)} median {statistics.median(folds[:len(first)]):.2f} s, "
        f"segments {len(per_segment) - len(last) + 1}-{len(per_segment)} median {statistics.median(folds[-len(last):]):.2f} s"
    )
    print(
        f"CPU seconds per {args.fold_every} rows (what the other jobs on the machine cannot inflate): segments 1-{len(first)} "
        f"median {statistics.median(cpus[:len(first)]):.2f} s, segments {len(per_segment) - len(last) + 1}-{len(per_segment)} "
        f"median {statistics.median(cpus[-len(last):]):.2f} s (last/first {statistics.median(cpus[-len(last):]) / statistics.median(cpus[:len(first)]):.2f})"
    )
    rate = megabytes / write_s
    print(f"  write (append to the log + fold to segments, fsync'd): {write_s:7.2f} s  {rate:7.1f} MB/s   target >= 200 MB/s  [{'ok' if rate >= 200 else 'MISSED'}]")
    print(f"  write CPU (user + system of this process, batch making excluded): {write_cpu:7.2f} s  {megabytes / write_cpu:7.1f} MB per CPU second; load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"  read embeddings through the index (plain h5py, {args.fold_every}-row blocks, from disk): {segmented_read_s:6.2f} s  {megabytes / segmented_read_s:7.1f} MB/s")
    print(f"  read ids + columns of every row (medembed read_columns, from disk): {columns_s:6.2f} s")
    print(f"  consolidate {len(per_segment)} segments into one plain file (once, fsync'd): {consolidate_s:6.2f} s  {megabytes / consolidate_s:7.1f} MB/s ({consolidate_cpu:.2f} CPU s)")
    print(f"  read embeddings of the plain file (from disk): {plain_read_s:6.2f} s  {megabytes / plain_read_s:7.1f} MB/s")
    print(f"  plain file size: {size_mb:.1f} MB")


if __name__ == "__main__":
    main()
