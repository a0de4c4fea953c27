"""Start-up time of the installed `medembed` entry point: the commands a user runs most, each timed as a whole
process over several runs (after a warm-up), median against its target.

Run from the repository root: ``python tests/benchmarks/bench_cli.py`` (options: --runs, --store). `make bench-cli`
runs it. A store for `medembed info` is written to a temporary folder when none is given (a small real store:
the timing is the command's start-up and the store's open, not its size). Prints one row per command: median,
min and max wall seconds, and the ratio of the median to the target.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Targets of issue 19 (seconds, median, idle machine).
TARGETS = {"--help": 0.5, "fit --help": 0.5, "info STORE": 1.0, "encoders list": 1.0}


def medembed() -> str:
    """The entry point installed beside this interpreter (what a user runs), else the one on PATH."""
    found = shutil.which("medembed", path=str(Path(sys.executable).parent)) or shutil.which("medembed")
    if found is None:
        raise SystemExit("no medembed entry point found: run make install first")
    return found


def small_store(folder: Path) -> Path:
    """A 1,000-row, 1,152-d float16 store with train/val/test splits."""
    from medembed.store import StoreWriter, make_fingerprint

    rng = np.random.default_rng(0)
    path = folder / "bench.h5"
    fingerprint = make_fingerprint(encoder="bench", model_id="bench", embedding_kind="pooled", preprocess_hash="0", dtype="float16")
    with StoreWriter(path, dim=1152, fingerprint=fingerprint) as writer:
        ids = np.array([f"img{i:05d}" for i in range(1000)])
        writer.append(ids, rng.standard_normal((1000, 1152)).astype(np.float16), {
            "label": rng.integers(0, 2, 1000), "split": np.array(["train", "val", "test"] * 333 + ["train"]),
        })
    return path


def timed(command: list[str]) -> float:
    """Wall seconds of one run of `command`."""
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "120"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="Counted runs per command (after one warm-up).")
    parser.add_argument("--store", type=Path, default=None, help="Store for `medembed info` (default: a small one, written here).")
    args = parser.parse_args(argv)
    exe = medembed()
    with tempfile.TemporaryDirectory(prefix="medembed-bench-cli-") as scratch:
        store = args.store or small_store(Path(scratch))
        commands = {"--help": ["--help"], "fit --help": ["fit", "--help"], "info STORE": ["info", str(store)], "encoders list": ["encoders", "list"]}
        print(f"{'command':<15} {'median s':>9} {'min s':>7} {'max s':>7} {'target s':>9} {'median/target':>14}")
        failed = 0
        for name, arguments in commands.items():
            timed([exe, *arguments])  # warm-up: the page cache, not the code, is what it warms
            seconds = [timed([exe, *arguments]) for _ in range(args.runs)]
            median = statistics.median(seconds)
            ratio = median / TARGETS[name]
            failed += ratio > 1
            print(f"{name:<15} {median:>9.3f} {min(seconds):>7.3f} {max(seconds):>7.3f} {TARGETS[name]:>9.2f} {ratio:>14.2f}")
    print(f"{len(commands) - failed} of {len(commands)} commands within their target (machine load: {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
