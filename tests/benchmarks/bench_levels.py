"""Pooled heads against token heads on intermediate levels and the adapter, on FracAtlas: study-level (= image-level:
FracAtlas has one image per study) test AUROC and kappa (95% bootstrap CI of seed 0, mean ± sd over 3 seeds),
fit time per seed and the level's store bytes per image, from one EfficientNet-Lite0 store with several levels.

    medembed extract data_manifests/fracatlas.csv --root ../shared/data/fracatlas -e efficientnet-lite0 \
        --levels block15,block14,block10@7x7,final@4x4 --tokens 2x2 --out work/tokens/fracatlas-effl0-levels.h5
    python tests/benchmarks/bench_levels.py --store work/tokens/fracatlas-effl0-levels.h5 --out work/tokens/bench
                                                                                  (or `make bench-levels`)

The deeper adapters' rows (`block12`, `block10`: full grids, 19,200 and 44,128 B per image) need a store with
those levels (`--levels block14,block12,block10`); rows whose level the store lacks are skipped and say so.
The augmentation bank's rows (`*-bank`: one of K stored augmented views per train image per epoch) need a store
extracted with `--augment K` (its bank `S.views.h5` beside it); on such a store every other row passes
`--no-augment-bank`, so each row says whether it trained on the bank:

    medembed extract data_manifests/fracatlas.csv --root ../shared/data/fracatlas -e efficientnet-lite0 \
        --levels block14,block12,block10,final@4x4 --augment 4 --out work/tokens/fracatlas-effl0-deep.h5
    python tests/benchmarks/bench_levels.py --store work/tokens/fracatlas-effl0-deep.h5 --out work/tokens/bench-deep

`--epoch-cost` measures instead what one adapter training epoch costs per starting level: real Lite0 weights,
float16 tokens of each level's 224 px shape, a few timed batches of 32 (forward, backward, AdamW step) after
one warm-up batch, extrapolated to FracAtlas's 2,858 train images (no store needed):

    python tests/benchmarks/bench_levels.py --epoch-cost --threads 2

Every row is one `medembed fit` (same split, same protocol: threshold f1 chosen on val, 1000 bootstrap
resamples, seeds 0-2 of the heads) whose command is printed beside it. Each row's result is written to
OUT/rows/NAME.json as it finishes (rows can run in parallel processes with --only; a rerun skips rows measured).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from _fit_rows import metric_cells, timed_fit

from medembed.scorers.options import FitOptions
from medembed.store import open_store
from medembed.store.views import bank_path, bank_summary

SEEDS = 3


@dataclass(frozen=True)
class Row:
    name: str
    head: str
    level: str = ""
    params: dict = field(default_factory=dict)
    ensemble: str = ""
    ensemble_seeds: int = 1
    bank: bool = False  # draw from the store's augmentation bank (extract --augment K); other rows train on the originals

    def command(self, store: Path) -> str:
        level = f" --level {self.level}" if self.level else ""
        params = "".join(f" -p {key}={value}" for key, value in self.params.items())
        ensemble = f" --ensemble {self.ensemble} --ensemble-seeds {self.ensemble_seeds}" if self.ensemble else ""
        bank = "" if self.bank or not bank_path(store).exists() else " --no-augment-bank"
        return f"medembed fit {store} --head {self.head}{level}{params}{ensemble}{bank} --seeds {SEEDS} --out runs/{self.name}"


ROWS = (
    Row("pooled-logreg", "logreg"),
    Row("pooled-mlp", "mlp"),
    Row("block14-attention", "attention", "block14"),
    Row("block10@7x7-attention", "attention", "block10@7x7"),
    Row("final@2x2-concat", "concat", "final@2x2"),
    Row("block15-attention", "attention", "block15"),
    Row("final@2x2-attention", "attention", "final@2x2"),
    Row("final@4x4-attention", "attention", "final@4x4"),
    Row("block14+block10@7x7-attention", "attention", "block14+block10@7x7"),
    Row("block14-adapter", "adapter", "block14"),
    Row("block14-adapter-bn-train", "adapter", "block14", {"bn": "train"}),
    Row("block12-adapter", "adapter", "block12"),
    Row("block10-adapter", "adapter", "block10"),
    Row("block14-adapter-3-seed-mean", "adapter", "block14", ensemble="mean", ensemble_seeds=3),
    # The augmentation bank's rows need a store extracted with --augment K (its S.views.h5 beside it).
    Row("pooled-mlp-bank", "mlp", bank=True),
    Row("block14-attention-bank", "attention", "block14", bank=True),
    Row("final@4x4-attention-bank", "attention", "final@4x4", bank=True),
    Row("block14-adapter-bank", "adapter", "block14", bank=True),
    Row("block14-adapter-bank-bn-train", "adapter", "block14", {"bn": "train"}, bank=True),
    Row("block12-adapter-bank", "adapter", "block12", bank=True),
)
EPOCH_COST_LEVELS = ("block15", "block14", "block12", "block10", "block7", "block4", "stem")
FRACATLAS_TRAIN = 2858


def bytes_per_image(store: Path, level: str) -> int:
    """float16 bytes one image's inputs take: the pooled vector, or the level's tokens (levels joined by +)."""
    opened = open_store(store)
    itemsize = np.dtype(opened.dtype).itemsize
    if not level:
        return opened.dim * itemsize
    return sum(int(np.prod(opened.token_shapes[name])) * itemsize for name in level.split("+"))


def bank_views(store: Path) -> int:
    """Augmented views per train image in the store's bank (0 without one): a bank row's train images take
    (1 + K) x bytes_per_image."""
    summary = bank_summary(store)
    return int(summary["views_per_image"]) if summary else 0


def measure(row: Row, store: Path, out: Path) -> dict:
    options = FitOptions(head=row.head, level=row.level, head_params=dict(row.params), seeds=SEEDS, ensemble=row.ensemble,
                         ensemble_seeds=row.ensemble_seeds, augment_bank=row.bank)
    return {
        "name": row.name, "command": row.command(store), "bytes_per_image": bytes_per_image(store, row.level),
        "bank_views": bank_views(store) if row.bank else 0,
        **timed_fit([store], out / "runs" / row.name, options),
    }


def stored_bytes(row: dict) -> str:
    """The row's bytes per image: the level's, and for a bank row what each train image adds (K views)."""
    k = row.get("bank_views", 0)
    return f"{row['bytes_per_image']:,}" + (f" + {k} × {row['bytes_per_image']:,} per train image (bank)" if k else "")


def table(results: list[dict]) -> str:
    lines = [
        "| features + head | test AUROC mean ± sd (3 seeds) | seed 0 [95% CI] | kappa mean ± sd | seed 0 [95% CI] | fit s/seed | bytes/image | command |",
        "|---|---|---|---|---|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {metric_cells(r)} | {r['fit_seconds_per_seed']:.1f} | {stored_bytes(r)} | `{r['command']}` |"
        )
    return "\n".join(lines)


def epoch_cost(levels: tuple[str, ...], batches: int, threads: int, batch_size: int = 32) -> str:
    """A markdown table: per starting level, its tokens and store bytes, counted forward GFLOP per image, measured
    seconds per training batch and the train epoch over FracAtlas's train split that they extrapolate to."""
    import os
    import time

    import torch

    from medembed.scorers.heads.adapter import AdapterHead, adapter_cost

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lines = [
        f"| starts after | adapts | tokens [T, C] | store B/image (fp16) | forward GFLOP/image | s per batch of {batch_size} (measured) | train epoch s, {FRACATLAS_TRAIN:,} images (extrapolated) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for level in levels:
        head = AdapterHead(encoder="efficientnet-lite0", level=level)
        built, _ = head.start()
        cost = adapter_cost(built, level)
        network = head._network(pretrained=True).train()
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
        tokens = torch.randn(batch_size, *cost["input_tokens"]).half()
        targets = (torch.arange(batch_size) % 2).float()
        seconds = []
        for step in range(batches + 1):  # the first batch warms up (allocations, oneDNN kernel choice)
            started = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(network(tokens).squeeze(1), targets).backward()
            optimizer.step()
            if step:
                seconds.append(time.perf_counter() - started)
        per_batch = float(np.median(seconds))
        lines.append(
            f"| {level} | {cost['adapts']} | {cost['input_tokens']} | {cost['store_bytes_per_image_float16']:,} | {cost['forward_gflop_per_image']:.3f} "
            f"| {per_batch:.2f} | {per_batch * FRACATLAS_TRAIN / batch_size:.0f} |"
        )
        print(lines[-1], flush=True)
    load = os.getloadavg()[0]
    return "\n".join(lines) + f"\n\n({threads} torch threads, median of {batches} batches, load average {load:.1f} on {os.cpu_count()} CPUs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("work/tokens/fracatlas-effl0-levels.h5"))
    parser.add_argument("--out", type=Path, default=Path("work/tokens/bench"))
    parser.add_argument("--only", nargs="*", help="Measure only these rows (names as in the table).")
    parser.add_argument("--table", action="store_true", help="Only assemble the table of the rows measured so far.")
    parser.add_argument("--epoch-cost", action="store_true", help="Measure the adapter's training cost per starting level instead (no store).")
    parser.add_argument("--levels", nargs="*", default=list(EPOCH_COST_LEVELS), help="With --epoch-cost: the starting levels.")
    parser.add_argument("--batches", type=int, default=3, help="With --epoch-cost: timed batches per level.")
    parser.add_argument("--threads", type=int, default=2, help="With --epoch-cost: torch threads.")
    args = parser.parse_args()
    if args.epoch_cost:
        print(epoch_cost(tuple(args.levels), args.batches, args.threads))
        return
    rows_dir = args.out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    levels = open_store(args.store).token_shapes if not args.table else {}
    for row in ROWS if not args.table else ():
        path = rows_dir / f"{row.name}.json"
        if path.exists() or (args.only and row.name not in args.only):
            continue
        if row.level and any(name not in levels for name in row.level.split("+")):
            print(f"{row.name}: skipped, {args.store} has no level {row.level!r} (extract --levels {row.level})", flush=True)
            continue
        result = measure(row, args.store, args.out)
        path.write_text(json.dumps(result, indent=1))
        print(f"{row.name}: AUROC {result['auroc_mean']:.3f} ± {result['auroc_sd']:.3f}, kappa {result['kappa_mean']:.3f}, {result['fit_seconds_per_seed']:.1f} s/seed", flush=True)
    results = [json.loads((rows_dir / f"{row.name}.json").read_text()) for row in ROWS if (rows_dir / f"{row.name}.json").exists()]
    markdown = table(results)
    (args.out / "results.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
