"""Pooled heads against token heads on intermediate levels and the adapter, on FracAtlas: study-level (= image-level:
FracAtlas has one image per study) test AUROC and kappa (95% bootstrap CI of seed 0, mean ± sd over 3 seeds),
fit time per seed and the level's store bytes per image, from one EfficientNet-Lite0 store with several levels.

    medembed extract data_manifests/fracatlas.csv --root ../shared/data/fracatlas -e efficientnet-lite0 \
        --levels block15,block14,block10@7x7,final@4x4 --tokens 2x2 --out work/tokens/fracatlas-effl0-levels.h5
    python tests/benchmarks/bench_levels.py --store work/tokens/fracatlas-effl0-levels.h5 --out work/tokens/bench
                                                                                  (or `make bench-levels`)

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

SEEDS = 3


@dataclass(frozen=True)
class Row:
    name: str
    head: str
    level: str = ""
    params: dict = field(default_factory=dict)

    def command(self, store: Path) -> str:
        level = f" --level {self.level}" if self.level else ""
        params = "".join(f" -p {key}={value}" for key, value in self.params.items())
        return f"medembed fit {store} --head {self.head}{level}{params} --seeds {SEEDS} --out runs/{self.name}"


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
)


def bytes_per_image(store: Path, level: str) -> int:
    """float16 bytes one image's inputs take: the pooled vector, or the level's tokens (levels joined by +)."""
    opened = open_store(store)
    itemsize = np.dtype(opened.dtype).itemsize
    if not level:
        return opened.dim * itemsize
    return sum(int(np.prod(opened.token_shapes[name])) * itemsize for name in level.split("+"))


def measure(row: Row, store: Path, out: Path) -> dict:
    options = FitOptions(head=row.head, level=row.level, head_params=dict(row.params), seeds=SEEDS)
    return {
        "name": row.name, "command": row.command(store), "bytes_per_image": bytes_per_image(store, row.level),
        **timed_fit([store], out / "runs" / row.name, options),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| features + head | test AUROC mean ± sd (3 seeds) | seed 0 [95% CI] | kappa mean ± sd | seed 0 [95% CI] | fit s/seed | bytes/image | command |",
        "|---|---|---|---|---|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {metric_cells(r)} | {r['fit_seconds_per_seed']:.1f} | {r['bytes_per_image']:,} | `{r['command']}` |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("work/tokens/fracatlas-effl0-levels.h5"))
    parser.add_argument("--out", type=Path, default=Path("work/tokens/bench"))
    parser.add_argument("--only", nargs="*", help="Measure only these rows (names as in the table).")
    parser.add_argument("--table", action="store_true", help="Only assemble the table of the rows measured so far.")
    args = parser.parse_args()
    rows_dir = args.out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    for row in ROWS if not args.table else ():
        path = rows_dir / f"{row.name}.json"
        if path.exists() or (args.only and row.name not in args.only):
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
