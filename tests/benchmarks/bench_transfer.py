"""Site transfer measured on FracAtlas: a run fitted on clean FracAtlas, applied to a shifted copy of its test split.

The "other hospital" is the project's deterministic corruptions (`medembed.data.corrupt`) at severity 3 (contrast,
gamma, noise, blur) applied to the FracAtlas **test split only** (817 images per corruption; extraction on 2 CPU
cores takes minutes per corruption). Clearly foreign inputs for the OOD score are generated here: synthetic
non-radiographs, tight crops of test radiographs (an unfamiliar field of view) and heavy corruption (severity 5).

Run from the repository root (``make bench-transfer``):

    python tests/benchmarks/bench_transfer.py extract   # target and foreign stores under work/transfer/ (resumable)
    python tests/benchmarks/bench_transfer.py measure   # the figures, as Markdown, to stdout and work/transfer/figures.md

`measure` fits a logistic-regression head on `work/fracatlas-effl0.h5` (EfficientNet-Lite0) with the default
protocol, then: the operating point at each target with the source thresholds vs after recalibration on N = 10,
25, 50, 100, 200 labelled target images (seeds; evaluated on the rest of the target), conformal coverage at
alpha 0.1 and 0.05 on the clean test split over seeds of the val/test draw, the OOD score's AUROC (test vs
foreign), and the drift p-value on clean test vs each target.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sklearn.metrics import roc_auc_score

from medembed.data.corrupt import CorruptedPreprocess
from medembed.protocol.metrics import binary_metrics
from medembed.options.extract import ExtractOptions
from medembed.encoders.runtime import build_encoder
from medembed.extract.runner import extract
from medembed.scorers.options import FitOptions
from medembed.fit import fit_run
from medembed.data.manifest import Manifest, read_manifest
from medembed.runs.record import load_run
from medembed.scorers.contract import positive_scores
from medembed.store import read_stores
from medembed.transfer.conformal import coverage, fit_conformal, prediction_sets
from medembed.transfer.drift import prevalence_shift, shift_test
from medembed.transfer.ood import embedding_matrix, ood_threshold
from medembed.options.recalibrate import RecalibrateOptions
from medembed.transfer.recalibrate import recalibration_curve
from medembed.transfer.reference import run_reference
from medembed.runs.inputs import labelled, run_inputs

WORK = Path("work/transfer")
SOURCE_STORE = Path("work/fracatlas-effl0.h5")
MANIFEST = Path("data_manifests/fracatlas.csv")
TARGETS = ("contrast", "gamma", "noise", "blur")
TARGET_SEVERITY = 3
HEAVY = ("noise", "contrast")
N_FOREIGN = 100  # images per foreign kind
LABELLED = (10, 25, 50, 100, 200)


def target_store(corruption: str) -> Path:
    return WORK / "targets" / f"{corruption}-{TARGET_SEVERITY}.h5"


def foreign_stores() -> dict[str, Path]:
    """Foreign kind -> its store."""
    return {
        "synthetic non-radiographs": WORK / "foreign" / "synthetic.h5",
        "tight crops": WORK / "foreign" / "crops.h5",
        **{f"heavy {c} (severity 5)": WORK / "foreign" / f"heavy-{c}-5.h5" for c in HEAVY},
    }


def test_manifest(manifest_path: Path) -> Manifest:
    manifest = read_manifest(manifest_path)
    return manifest.subset((manifest.split == "test") & (manifest.label >= 0))


def synthetic_images(folder: Path, n: int, seed: int = 0) -> Manifest:
    """Colour photographs they are not, but clearly not radiographs: gradients, checkerboards, colour blobs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = []
    for k in range(n):
        side = int(rng.integers(256, 640))
        yy, xx = np.mgrid[0:side, 0:side] / side
        kind = k % 3
        if kind == 0:  # colour gradient
            image = np.stack([xx, yy, 1 - xx * yy], axis=-1) * rng.uniform(0.5, 1.0, 3)
        elif kind == 1:  # checkerboard in two random colours
            cells = int(rng.integers(4, 16))
            board = ((xx * cells).astype(int) + (yy * cells).astype(int)) % 2
            image = np.where(board[..., None] == 1, rng.random(3), rng.random(3))
        else:  # colour blobs on noise
            image = rng.random((side, side, 3)) * 0.3
            for _ in range(6):
                cx, cy, r = rng.random(), rng.random(), rng.uniform(0.05, 0.3)
                image[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.random(3)
        name = f"synthetic{k:04d}.png"
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / name)
        ids.append(name)
    return Manifest({"image_id": ids, "path": ids})


def crop_images(test: Manifest, root: Path, folder: Path, n: int, seed: int = 0) -> Manifest:
    """A quarter-side crop of n test radiographs at a random place: bone texture without a recognisable limb."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = []
    for row in rng.permutation(len(test)):
        if len(ids) == n:
            break
        try:
            with Image.open(root / test.path[row]) as image:
                image = image.convert("L")
        except OSError:  # FracAtlas's truncated JPEGs: take the next image
            continue
        side = min(image.size) // 4
        x, y = int(rng.integers(0, image.size[0] - side)), int(rng.integers(0, image.size[1] - side))
        name = f"crop{len(ids):04d}.png"
        image.crop((x, y, x + side, y + side)).save(folder / name)
        ids.append(name)
    return Manifest({"image_id": ids, "path": ids})


def run_extraction(root: Path) -> None:
    """Every target and foreign store (each resumes if it exists)."""
    encoder = build_encoder("efficientnet-lite0", {})
    options = ExtractOptions(device="cpu")
    test = test_manifest(MANIFEST)
    jobs: list[tuple[str, Manifest, Path, Path, object]] = []
    for corruption in TARGETS:
        jobs.append((f"target {corruption}-{TARGET_SEVERITY}", test, root, target_store(corruption),
                     CorruptedPreprocess(encoder.preprocess, corruption, TARGET_SEVERITY)))
    stores = foreign_stores()
    synthetic = synthetic_images(WORK / "foreign" / "synthetic", N_FOREIGN)
    crops = crop_images(test, root, WORK / "foreign" / "crops", N_FOREIGN)
    jobs.append(("synthetic", synthetic, WORK / "foreign" / "synthetic", stores["synthetic non-radiographs"], None))
    jobs.append(("crops", crops, WORK / "foreign" / "crops", stores["tight crops"], None))
    heavy_rows = test.subset(np.random.default_rng(1).choice(len(test), N_FOREIGN, replace=False))
    for corruption in HEAVY:
        jobs.append((f"heavy {corruption}-5", heavy_rows, root, stores[f"heavy {corruption} (severity 5)"],
                     CorruptedPreprocess(encoder.preprocess, corruption, 5)))
    for name, manifest, folder, store, preprocess in jobs:
        store.parent.mkdir(parents=True, exist_ok=True)
        summary = extract(manifest, folder, encoder, store, options, preprocess=preprocess)
        print(f"{name}: {summary.format()}", flush=True)


def source_run(seed: int = 0) -> Path:
    """The source run: a logistic head on clean FracAtlas, default protocol (fitted once, then reused)."""
    run = WORK / "runs" / "frac-logreg"
    if not (run / "run.json").is_file():
        fit_run([SOURCE_STORE], run, FitOptions(head="logreg", seed=seed))
    return run


def _mean_sd(values: list[float]) -> str:
    values = np.asarray(values, dtype=float)
    return f"{np.nanmean(values):.3f} ± {np.nanstd(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def operating_point_table(run_dir: Path, seeds: int) -> list[str]:
    """Per target: source thresholds vs recalibrated on N labelled target images (mean ± sd over seeds, on the
    target images not labelled), with the clean test's operating point as the goal. Two refits: the run's own
    rule (f1) with Platt calibration, and the threshold that restores the source's val specificity."""
    run = load_run(run_dir)
    clean, val = run_inputs(run).rows("test"), run_inputs(run).rows("val")
    goal = binary_metrics(clean.y, run.probabilities(clean), run.calibration.image_threshold)
    source_specificity = binary_metrics(val.y, run.probabilities(val), run.calibration.image_threshold)["specificity"]
    refits = {
        "f1 + platt": RecalibrateOptions(labelled=LABELLED[0]),
        f"specificity:{source_specificity:.3f}": RecalibrateOptions(labelled=LABELLED[0], calibration="none", threshold=f"specificity:{source_specificity:.3f}"),
    }
    lines = ["### Operating point at the target: source thresholds vs recalibrated", "",
             f"Clean FracAtlas test (the goal): sensitivity {goal['sensitivity']:.3f}, specificity {goal['specificity']:.3f}, "
             f"kappa {goal['kappa']:.3f} at the source threshold {run.calibration.image_threshold:.3f}. Target rows: the 809 readable test "
             f"images under each corruption. N labelled images are a grouped, stratified sample; the other 809 − N are evaluated; mean ± sd "
             f"over {seeds} seeds. Refits: the run's own rule (f1) with Platt calibration, and `--calibration none --threshold "
             f"specificity:{source_specificity:.3f}` (the source's val specificity). N = 0: the source thresholds on all 809.", "",
             "| target | N | refit | sensitivity (source → refit) | specificity (source → refit) | kappa (source → refit) |",
             "|---|---:|---|---:|---:|---:|"]
    for corruption in TARGETS:
        rows, _ = run_inputs(run).target(target_store(corruption))
        rows = labelled(rows)
        raw = positive_scores(run.scorer, rows.X, {"body_part": rows.body_part})
        full = binary_metrics(rows.y, run.probabilities(rows), run.calibration.image_threshold)
        lines.append(f"| {corruption}-{TARGET_SEVERITY} | 0 | none | {full['sensitivity']:.3f} | {full['specificity']:.3f} | {full['kappa']:.3f} |")
        curves = {name: recalibration_curve(run, rows, raw, list(LABELLED), seeds, options) for name, options in refits.items()}
        for n in LABELLED:
            for name, curve in curves.items():
                draws = [d for d in curve["draws"] if d["n"] == n and "after" in d]
                cells = [f"{_mean_sd([d['before'][m] for d in draws])} → {_mean_sd([d['after'][m] for d in draws])}" for m in ("sensitivity", "specificity", "kappa")]
                lines.append(f"| {corruption}-{TARGET_SEVERITY} | {n} | {name} | " + " | ".join(cells) + " |")
    return lines


def conformal_table(run_dir: Path, seeds: int) -> list[str]:
    """Coverage vs nominal on test: the run's own val/test, and averaged over seeded re-draws of val/test from
    their pooled images (split-conformal's exchangeable setting); also at each shifted target."""
    run = load_run(run_dir)
    val, test = run_inputs(run).rows("val"), run_inputs(run).rows("test")
    p_val, p_test = run.probabilities(val), run.probabilities(test)
    pooled_p, pooled_y = np.r_[p_val, p_test], np.r_[val.y, test.y]
    lines = ["### Conformal coverage on test", "",
             f"Sets calibrated on val ({len(val)} images), evaluated on test ({len(test)}). Re-drawn: val and test pooled and split again "
             f"at the same sizes, {seeds} seeds, mean ± sd.", "",
             "| alpha | nominal | quantiles | coverage, run's split | coverage, re-drawn | normal | abnormal | refer rate |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for alpha in (0.1, 0.05):
        for conditional in (False, True):
            own = coverage(prediction_sets(p_test, fit_conformal(p_val, val.y, alpha, conditional)), test.y)
            draws = []
            for seed in range(seeds):
                order = np.random.default_rng(seed).permutation(len(pooled_y))
                cal, rest = order[: len(val)], order[len(val):]
                draws.append(coverage(prediction_sets(pooled_p[rest], fit_conformal(pooled_p[cal], pooled_y[cal], alpha, conditional)), pooled_y[rest]))
            lines.append(f"| {alpha:g} | {1 - alpha:.2f} | {'class-conditional' if conditional else 'marginal'} | {own['coverage']:.3f} | "
                         f"{_mean_sd([d['coverage'] for d in draws])} | {_mean_sd([d['coverage_normal'] for d in draws])} | "
                         f"{_mean_sd([d['coverage_abnormal'] for d in draws])} | {_mean_sd([d['refer_rate'] for d in draws])} |")
    lines += ["", "At the shifted targets (val of the source, no recalibration; marginal quantiles):", "",
              "| target | coverage at alpha 0.1 | coverage at alpha 0.05 |", "|---|---:|---:|"]
    for corruption in TARGETS:
        rows = labelled(run_inputs(run).target(target_store(corruption))[0])
        p = run.probabilities(rows)
        cells = [f"{coverage(prediction_sets(p, fit_conformal(p_val, val.y, a)), rows.y)['coverage']:.3f}" for a in (0.1, 0.05)]
        lines.append(f"| {corruption}-{TARGET_SEVERITY} | " + " | ".join(cells) + " |")
    return lines


def ood_table(run_dir: Path) -> list[str]:
    """AUROC of the OOD score at separating clean FracAtlas test images from each kind of foreign input."""
    run = load_run(run_dir)
    reference = run_reference(run)
    model = reference.ood_model()
    test = run_inputs(run).rows("test")
    inside = model.score(embedding_matrix(test.X))
    cut = ood_threshold(reference.val_ood, 0.05)
    lines = ["### OOD score: FracAtlas test vs foreign inputs", "",
             f"Mahalanobis distance to {len(reference.train_sample)} train embeddings; flag threshold {cut:.1f} (val quantile at 5% false alarms). "
             f"FracAtlas test flagged: {(inside > cut).mean():.1%} of {len(inside)}.", "",
             "| foreign inputs | images | AUROC (test vs foreign) | flagged at 5% |", "|---|---:|---:|---:|"]
    everything = []
    for name, store in foreign_stores().items():
        table, _ = read_stores([store])
        outside = model.score(np.asarray(table.embeddings, dtype=np.float64))
        everything.append(outside)
        auroc = roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside])
        lines.append(f"| {name} | {len(outside)} | {auroc:.3f} | {(outside > cut).mean():.1%} |")
    pooled = np.concatenate(everything)
    auroc = roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(pooled))], np.r_[inside, pooled])
    lines.append(f"| all foreign | {len(pooled)} | {auroc:.3f} | {(pooled > cut).mean():.1%} |")
    return lines


def drift_table(run_dir: Path, permutations: int) -> list[str]:
    """The shift test's p-value and the predicted prevalence: clean test vs each shifted target."""
    run = load_run(run_dir)
    reference = run_reference(run)
    lines = ["### Drift before labels", "",
             f"MMD² of the rows' embeddings vs the run's train sample ({len(reference.train_sample)}), {permutations} permutations "
             f"(smallest possible p = {1 / (1 + permutations):.4f}); called abnormal at the source threshold vs {(reference.val_p >= run.calibration.image_threshold).mean():.1%} on val.", "",
             "| rows | images | MMD² | p-value | called abnormal | true prevalence |", "|---|---:|---:|---:|---:|---:|"]
    test = run_inputs(run).rows("test")
    sets = [("clean FracAtlas test", test)] + [(f"{c}-{TARGET_SEVERITY}", labelled(run_inputs(run).target(target_store(c))[0])) for c in TARGETS]
    for name, rows in sets:
        shift = shift_test(reference.train_sample, embedding_matrix(rows.X), permutations, seed=0)
        prevalence = prevalence_shift(reference.val_p, run.probabilities(rows), run.calibration.image_threshold)
        lines.append(f"| {name} | {len(rows)} | {shift.mmd2:.4f} | {shift.p_value:.4f} | {prevalence['target_called_abnormal']:.1%} | {rows.y.mean():.1%} |")
    return lines


def measure(seeds: int, permutations: int) -> str:
    run = source_run()
    sections = [operating_point_table(run, seeds), conformal_table(run, max(seeds, 20)), ood_table(run), drift_table(run, permutations)]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("extract", "measure"))
    parser.add_argument("--fracatlas", type=Path, default=Path("../shared/data/fracatlas"))
    parser.add_argument("--seeds", type=int, default=5, help="Seeds of each recalibration sample size (conformal re-draws: at least 20).")
    parser.add_argument("--permutations", type=int, default=1000, help="Permutations of the drift shift test.")
    args = parser.parse_args()
    if not (args.fracatlas / "images").is_dir():
        sys.exit(f"{args.fracatlas}: FracAtlas images not found (pass --fracatlas)")
    if args.stage == "extract":
        run_extraction(args.fracatlas)
    else:
        text = measure(args.seeds, args.permutations)
        (WORK / "figures.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
