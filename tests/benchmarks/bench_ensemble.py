"""Single heads against ensembles on FracAtlas: study-level test AUROC and kappa (95% bootstrap CI of seed 0,
mean ± sd over 3 seeds), fit time per seed and store size, for the EfficientNet-Lite0/1/2 stores.

    python tests/benchmarks/bench_ensemble.py --l0 work/fracatlas-effl0.h5 --l1 work/ensemble/fracatlas-effl1.h5 \
        --l2 work/ensemble/fracatlas-effl2.h5 --out work/ensemble/bench          (or `make bench-ensemble`)

Every row is one `medembed fit` (same split, same protocol: threshold f1 chosen on val, no calibration, 1000
bootstrap resamples, seeds 0-2 of the heads) whose command is printed beside it. Results are appended to
OUT/results.json as each row finishes, so a rerun skips rows already measured. "beats" compares a row's mean
AUROC with the best single head's: yes when the gap exceeds the larger of the two rows' seed sds.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from _fit_rows import metric_cells, timed_fit

from medembed.scorers.options import FitOptions

SEEDS = 3


@dataclass(frozen=True)
class Row:
    name: str
    stores: tuple[str, ...]  # "l0" | "l1" | "l2"
    head: str
    ensemble: str = ""
    folds: int = 5
    study_pooling: str = ""

    def command(self, paths: dict[str, Path]) -> str:
        stores = " ".join(str(paths[s]) for s in self.stores)
        ensemble = f" --ensemble {self.ensemble}" + (f" --ensemble-folds {self.folds}" if self.ensemble == "stack" and self.folds != 5 else "") if self.ensemble else ""
        scorer = f"--study-pooling {self.study_pooling}" if self.study_pooling else f"--head {self.head}{ensemble}"
        return f"medembed fit {stores} {scorer} --seeds {SEEDS} --out runs/{self.name}"


# The most informative rows first: a run stopped early still has the references and the cheap ensembles.
ROWS = (
    Row("l0-logreg", ("l0",), "logreg"),
    Row("l0-mlp", ("l0",), "mlp"),
    Row("l0-xgboost", ("l0",), "xgboost"),
    Row("l0-heads-mean", ("l0",), "logreg,mlp,xgboost", "mean"),
    Row("l012-concat-logreg", ("l0", "l1", "l2"), "logreg", "concat"),
    Row("l012-mean-mlp", ("l0", "l1", "l2"), "mlp", "mean"),
    Row("l012-mean-logreg-mlp", ("l0", "l1", "l2"), "logreg,mlp", "mean"),
    Row("l1-logreg", ("l1",), "logreg"),
    Row("l1-mlp", ("l1",), "mlp"),
    Row("l2-logreg", ("l2",), "logreg"),
    Row("l2-mlp", ("l2",), "mlp"),
    Row("l012-stack-logreg-mlp", ("l0", "l1", "l2"), "logreg,mlp", "stack", folds=3),
    Row("l012-concat-mlp", ("l0", "l1", "l2"), "mlp", "concat"),
    Row("l0-heads-stack", ("l0",), "logreg,mlp,xgboost", "stack", folds=3),
    # FracAtlas has one image per study: attention pooling has one image to weigh, so this is an image-level figure.
    Row("l0-study-attention", ("l0",), "logreg", study_pooling="attention"),
)

def measure(row: Row, paths: dict[str, Path], out: Path) -> dict:
    options = FitOptions(head=row.head, ensemble=row.ensemble, ensemble_folds=row.folds, study_pooling=row.study_pooling, seeds=SEEDS)
    return {
        "name": row.name, "command": row.command(paths), "single": not row.ensemble,
        "store_mb": sum(paths[s].stat().st_size for s in row.stores) / 1e6,
        **timed_fit([paths[s] for s in row.stores], out / "runs" / row.name, options),
    }


def table(results: list[dict]) -> str:
    singles = [r for r in results if r["single"]]
    best = max(singles, key=lambda r: r["auroc_mean"]) if singles else None
    lines = [
        "| run | study AUROC mean ± sd (3 seeds) | seed 0 [95% CI] | kappa mean ± sd | seed 0 [95% CI] | fit s/seed | store MB | beats best single | command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if best is None or r is best:
            verdict = "(best single)" if r is best else ""
        else:
            gap = r["auroc_mean"] - best["auroc_mean"]
            verdict = f"{'yes' if gap > max(r['auroc_sd'], best['auroc_sd']) else 'no'} ({gap:+.3f})"
        lines.append(
            f"| {r['name']} | {metric_cells(r)} | {r['fit_seconds_per_seed']:.1f} | {r['store_mb']:.1f} | {verdict} | `{r['command']}` |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l0", type=Path, default=Path("work/fracatlas-effl0.h5"))
    parser.add_argument("--l1", type=Path, default=Path("work/ensemble/fracatlas-effl1.h5"))
    parser.add_argument("--l2", type=Path, default=Path("work/ensemble/fracatlas-effl2.h5"))
    parser.add_argument("--out", type=Path, default=Path("work/ensemble/bench"))
    parser.add_argument("--only", nargs="*", help="Measure only these rows (names as in the table).")
    args = parser.parse_args()
    paths = {"l0": args.l0, "l1": args.l1, "l2": args.l2}
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {r["name"] for r in results}
    for row in ROWS:
        if row.name in done or (args.only and row.name not in args.only):
            continue
        result = measure(row, paths, args.out)
        results.append(result)
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{row.name}: AUROC {result['auroc_mean']:.3f} ± {result['auroc_sd']:.3f}, kappa {result['kappa_mean']:.3f}, {result['fit_seconds_per_seed']:.1f} s/seed", flush=True)
    order = {row.name: i for i, row in enumerate(ROWS)}
    markdown = table(sorted(results, key=lambda r: order.get(r["name"], len(order))))
    (args.out / "results.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
