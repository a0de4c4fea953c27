"""Store throughput: append a MURA-sized set of embeddings in extractor-sized batches, then read it back.

Targets (issue 2): write >= 200 MB/s, full read <= 1 s on a 2-core machine.
Run: make bench-store   (or: python tests/benchmarks/bench_store.py --rows 40561 --dim 1152 --batch 256)
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from medembed.store import StoreWriter, make_fingerprint, open_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_561)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    data = rng.standard_normal((args.rows, args.dim)).astype(args.dtype)
    ids = [f"MURA-v1.1/train/XR_WRIST/patient{i // 3:05d}/study1_positive/image{i % 3 + 1}" for i in range(args.rows)]
    columns = {
        "label": (np.arange(args.rows) % 2).tolist(),
        "split": ["train"] * args.rows,
        "study_id": [i.rsplit("/", 1)[0] for i in ids],
        "patient_id": [f"patient{i // 3:05d}" for i in range(args.rows)],
        "body_part": ["wrist"] * args.rows,
    }
    fingerprint = make_fingerprint(encoder="bench", model_id="random", embedding_kind="pooler_output", dtype=args.dtype)
    megabytes = data.nbytes / 1e6

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        start = time.perf_counter()
        with StoreWriter(path, dim=args.dim, fingerprint=fingerprint) as writer:
            for s in range(0, args.rows, args.batch):
                writer.append(ids[s : s + args.batch], data[s : s + args.batch], {k: v[s : s + args.batch] for k, v in columns.items()})
        write_s = time.perf_counter() - start

        start = time.perf_counter()
        table = open_store(path).read()
        read_s = time.perf_counter() - start
        assert np.array_equal(table.embeddings, data) and len(table) == args.rows
        size_mb = path.stat().st_size / 1e6

    print(f"store benchmark: {args.rows} x {args.dim} {args.dtype} ({megabytes:.1f} MB of embeddings), batches of {args.batch}")
    print(f"  write (append + fold, fsync'd): {write_s:6.2f} s  {megabytes / write_s:7.1f} MB/s   target >= 200 MB/s  [{'ok' if megabytes / write_s >= 200 else 'MISSED'}]")
    print(f"  full read (embeddings + ids + columns): {read_s:6.2f} s  {megabytes / read_s:7.1f} MB/s   target <= 1 s  [{'ok' if read_s <= 1 else 'MISSED'}]")
    print(f"  file size: {size_mb:.1f} MB")


if __name__ == "__main__":
    main()
