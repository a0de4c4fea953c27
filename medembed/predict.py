"""A fitted run applied to new images end to end: encoder -> head -> calibration -> threshold -> CSV.

The run's own encoder is rebuilt from its fingerprint and checked against it before anything is scored;
images go through the same resumable extractor as training data (a cache store beside the output), so
unreadable files are reported per file and the rest are still scored.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medembed.encoders import Encoder
from medembed.errors import MedembedError
from medembed.evaluate import aggregate_studies
from medembed.extract import ExtractOptions, ExtractSummary, build_encoder, extract, store_fingerprint
from medembed.fit import load_run
from medembed.manifest import IMAGE_SUFFIXES, Manifest, read_manifest
from medembed.store import fingerprint_mismatch, open_store


@dataclass
class PredictSummary:
    """Counts of one prediction run and where its CSVs went."""

    images: int
    scored: int
    failed: int
    abnormal: int
    images_csv: Path
    studies_csv: Path | None
    extraction: ExtractSummary


def run_encoder(run_dir: Path, info: dict) -> Encoder:
    """The run's encoder rebuilt from run.json, refused unless it reproduces the run's store fingerprint."""
    fingerprint = info["fingerprint"]
    encoder = build_encoder(fingerprint["encoder"], info.get("encoder_options", {}))
    diff = fingerprint_mismatch(fingerprint, store_fingerprint(encoder, fingerprint["dtype"]))
    if diff:
        raise MedembedError(
            f"the encoder available here does not match the one run {run_dir} was fitted on ({'; '.join(diff)}); "
            "install the same model weights and medembed version"
        )
    return encoder


def images_manifest(inputs: list[Path]) -> tuple[Manifest, Path]:
    """A manifest of image files, folders of them (searched recursively) or one manifest CSV; and its root."""
    if len(inputs) == 1 and inputs[0].suffix.lower() == ".csv":
        return read_manifest(inputs[0]), inputs[0].parent
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.exists():
            files.append(item)
        else:
            raise MedembedError(f"{item}: no such file or folder")
    if not files:
        raise MedembedError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(map(str, inputs))}")
    files = [f.resolve() for f in files]
    root = Path(os.path.commonpath([f.parent for f in files]))
    relative = [str(f.relative_to(root)) for f in files]
    return Manifest({"image_id": [str(Path(r).with_suffix("")) for r in relative], "path": relative}), root


def predict(run_dir: Path, inputs: list[Path], out_csv: Path, options: ExtractOptions | None = None) -> PredictSummary:
    """Score images with a run; writes `out_csv` (per image) and, when studies are known, `<out>_studies.csv`."""
    run, info = load_run(run_dir)
    fingerprint = info["fingerprint"]
    encoder = run_encoder(run_dir, info)
    manifest, root = images_manifest(inputs)
    cache = out_csv.with_suffix(".embeddings.h5")
    options = options or ExtractOptions(store_dtype=fingerprint["dtype"])
    extraction = extract(manifest, root, encoder, cache, options, encoder_options=info.get("encoder_options", {}))
    store = open_store(cache)
    table = store.read()
    failed = store.failed()
    p = run.probabilities(table.embeddings) if len(table) else np.zeros(0)
    by_id = dict(zip(table.image_id, p))
    decisions = {i: int(prob >= run.calibration.image_threshold) for i, prob in by_id.items()}

    _write_rows(
        out_csv,
        ["image_id", "path", "study_id", "probability", "abnormal", "error"],
        [
            [i, path, study, f"{by_id[i]:.6f}" if i in by_id else "", decisions.get(i, ""), failed.get(i, "" if i in by_id else "not processed")]
            for i, path, study in zip(manifest.image_id, manifest.path, manifest.study_id)
        ],
    )
    studies_csv = None
    if (manifest.study_id != "").any() and len(table):
        scored = np.isin(manifest.image_id, table.image_id)
        ids = manifest.image_id[scored]
        study_ids = np.where(manifest.study_id[scored] != "", manifest.study_id[scored], ids)
        studies = aggregate_studies(np.array([by_id[i] for i in ids]), np.zeros(len(ids), dtype=np.int8), study_ids, how=info["options"]["aggregation"])
        studies_csv = out_csv.with_name(out_csv.stem + "_studies.csv")
        _write_rows(
            studies_csv,
            ["study_id", "probability", "abnormal"],
            [[s, f"{prob:.6f}", int(prob >= run.calibration.study_threshold)] for s, prob in zip(studies.study_ids, studies.p)],
        )
    return PredictSummary(len(manifest), len(by_id), len(failed), sum(decisions.values()), out_csv, studies_csv, extraction)


def _write_rows(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)
