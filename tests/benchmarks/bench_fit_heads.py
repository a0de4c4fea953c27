"""Head fitting cost: each head's fit, val search included, on a synthetic MURA-sized store.

Targets: every head fits in <= 60 s with peak memory <= 2 GB on a 2-core machine. The "official notebook
recipe" (scikit-learn's LogisticRegression(max_iter=250) on raw embeddings: no scaling, no search) is timed
on the same data for comparison. Each head runs in a fresh subprocess, so its peak RSS is its own.
Run: python tests/benchmarks/bench_fit_heads.py [--rows 40561 --dim 1152 --heads logreg mlp xgboost --n-jobs 1]
On a machine shared with other busy processes, --n-jobs 1 is much faster for the MLP and XGBoost: their
OpenMP threads wait on each other whenever one of them is descheduled.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from medembed.scorers.options import HEAD_NAMES
from medembed.scorers.heads import make_head

NOTEBOOK = "notebook"
TARGET_SECONDS = 60.0
TARGET_PEAK_MB = 2048.0
_CHUNK = 4096


def synthetic_store(rows: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`[rows, dim] float16` embeddings and `[rows]` 0/1 labels (40% abnormal, MURA's rate).

    Two Gaussian classes whose means differ along one random direction (a weak signal), on top of
    per-feature scales and a 32-factor shared component so that features correlate like real embeddings.
    Generated in chunks so the float64 temporaries stay small.
    """
    rng = np.random.default_rng(seed)
    labels = (rng.random(rows) < 0.4).astype(np.int64)
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    loadings = rng.standard_normal((32, dim)) * 0.5
    scales = np.exp(rng.normal(0.0, 0.5, dim))
    embeddings = np.empty((rows, dim), np.float16)
    for start in range(0, rows, _CHUNK):
        stop = min(rows, start + _CHUNK)
        block = rng.standard_normal((stop - start, dim)) * scales + rng.standard_normal((stop - start, 32)) @ loadings
        block += np.outer(labels[start:stop] - 0.5, direction) * 1.5
        embeddings[start:stop] = block
    return embeddings, labels


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(head: str, rows: int, dim: int, n_jobs: int | None) -> dict:
    """Fit one head (or the notebook recipe) on an 80/10/10 split; return timings, memory and AUROCs."""
    X, y = synthetic_store(rows, dim, seed=0)
    n_train, n_val = int(rows * 0.8), int(rows * 0.1)
    train, val, test = slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, rows)
    baseline_mb = peak_rss_mb()
    start, start_cpu = time.perf_counter(), time.process_time()
    if head == NOTEBOOK:
        model = LogisticRegression(max_iter=250).fit(X[train], y[train])
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        chosen, val_scores, test_scores = "-", model.decision_function(X[val]), model.decision_function(X[test])
    else:
        params = {"n_jobs": n_jobs} if n_jobs and "n_jobs" in make_head(head).param_names() else {}
        fitted = make_head(head, **params).fit(X[train], y[train], X[val], y[val])
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        chosen = f"{fitted.selection_['searched']}={fitted.selection_['chosen']:.4g}"
        val_scores, test_scores = fitted.predict_proba(X[val])[:, 1], fitted.predict_proba(X[test])[:, 1]
    return {
        "head": head,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_mb": peak_rss_mb(),
        "baseline_mb": baseline_mb,
        "load": os.getloadavg()[0],
        "chosen": chosen,
        "val_auroc": float(roc_auc_score(y[val], val_scores)),
        "test_auroc": float(roc_auc_score(y[test], test_scores)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_561)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--heads", nargs="+", default=list(HEAD_NAMES), choices=list(HEAD_NAMES))
    parser.add_argument("--n-jobs", type=int, help="threads for the heads that take n_jobs (default: all cores)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one head in this process
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_worker(args.worker, args.rows, args.dim, args.n_jobs)))
        return

    results = []
    for head in [NOTEBOOK, *args.heads]:
        command = [sys.executable, __file__, "--worker", head, "--rows", str(args.rows), "--dim", str(args.dim)]
        command += ["--n-jobs", str(args.n_jobs)] if args.n_jobs else []
        completed = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))

    notebook_seconds = results[0]["seconds"]
    print(f"head fit benchmark: {args.rows} x {args.dim} float16 synthetic store, 80/10/10 train/val/test split")
    print(f"targets per head: fit <= {TARGET_SECONDS:.0f} s, peak RSS <= {TARGET_PEAK_MB:.0f} MB")
    print(
        f"{'head':<10}{'fit s':>8}{'cpu s':>8}{'x notebook':>12}{'peak MB':>9}{'data MB':>9}{'load':>6}  "
        f"{'chosen':<16}{'val AUC':>8}{'test AUC':>9}  target"
    )
    for result in results:
        ok = result["seconds"] <= TARGET_SECONDS and result["peak_mb"] <= TARGET_PEAK_MB
        status = "-" if result["head"] == NOTEBOOK else "ok" if ok else "MISSED"
        print(
            f"{result['head']:<10}{result['seconds']:>8.1f}{result['cpu_seconds']:>8.1f}"
            f"{result['seconds'] / notebook_seconds:>12.2f}{result['peak_mb']:>9.0f}{result['baseline_mb']:>9.0f}"
            f"{result['load']:>6.1f}  {result['chosen']:<16}{result['val_auroc']:>8.3f}{result['test_auroc']:>9.3f}"
            f"  {status}"
        )
    print("cpu s: user+sys over all threads; peak MB: the process at its peak; data MB: its peak before fitting")
    print(f"load: 1-min load average after the fit ({os.cpu_count()} cores; above that, other work slowed the fit)")

if __name__ == "__main__":
    main()
