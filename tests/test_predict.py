"""A fitted run applied to new image files end to end, with its own encoder (real EfficientNet-Lite0 weights)."""

import csv
import json
import shutil

import pytest

from medembed.errors import MedembedError
from medembed.options.extract import ExtractOptions
from medembed.encoders.runtime import build_encoder
from medembed.extract.runner import extract
from medembed.scorers.options import FitOptions
from medembed.fit import fit_run
from medembed.data.manifest import read_manifest
from medembed.predict import predict

ENCODER = {"size": 64}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_manifest, fracatlas_root):
    work = tmp_path_factory.mktemp("run")
    extract(read_manifest(small_manifest), fracatlas_root, build_encoder("efficientnet-lite0", ENCODER), work / "s.h5",
            ExtractOptions(batch_size=8, num_workers=0), encoder_options=ENCODER)
    fit_run([work / "s.h5"], work / "run", FitOptions(n_resamples=0))
    return work / "run"


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_scores_a_folder_and_reports_bad_files(tmp_path, run_dir, small_manifest, fracatlas_root):
    manifest = read_manifest(small_manifest)
    images = tmp_path / "new"
    (images / "sub").mkdir(parents=True)
    test_images = manifest.subset(manifest.split == "test").resolve(fracatlas_root)[:3]
    for i, path in enumerate(test_images):
        shutil.copy(path, images / ("sub" if i else "") / path.name)
    (images / "broken.png").write_bytes(b"not an image")
    summary = predict(run_dir, [images], tmp_path / "out.csv", ExtractOptions(batch_size=4, num_workers=0))
    rows = {row["image_id"]: row for row in read_rows(tmp_path / "out.csv")}
    assert (summary.images, summary.scored, summary.failed) == (4, 3, 1)
    assert rows["broken.png"]["probability"] == "" and rows["broken.png"]["error"]
    scored = [r for r in rows.values() if r["probability"]]
    assert all(0 <= float(r["probability"]) <= 1 and r["abnormal"] in ("0", "1") for r in scored)
    # the same images scored through the run's test predictions give the same probabilities
    test_predictions = {r["image_id"]: float(r["probability"]) for r in read_rows(run_dir / "predictions.csv")}
    for path in test_images:
        row = rows["sub/" + path.name] if "sub/" + path.name in rows else rows[path.name]
        assert float(row["probability"]) == pytest.approx(test_predictions[path.stem], abs=1e-3)


def test_predict_on_a_manifest_writes_study_probabilities(tmp_path, run_dir, small_manifest, fracatlas_root):
    manifest = read_manifest(small_manifest)
    local = tmp_path / "m.csv"
    with open(local, "w", newline="") as f:  # a manifest beside its images: paths relative to the CSV's folder
        writer = csv.writer(f)
        writer.writerow(["image_id", "path", "study_id"])
        for image_id, path in list(zip(manifest.image_id, manifest.resolve(fracatlas_root)))[:4]:
            writer.writerow([image_id, str(path), "study-A" if image_id < "IMG0001" else "study-B"])
    summary = predict(run_dir, [local], tmp_path / "out.csv", ExtractOptions(batch_size=4, num_workers=0))
    assert summary.studies_csv is not None
    studies = read_rows(summary.studies_csv)
    assert {s["study_id"] for s in studies} <= {"study-A", "study-B"} and len(studies) >= 1


def test_predict_refuses_an_encoder_that_does_not_match_the_run(tmp_path, run_dir):
    changed = tmp_path / "run"
    shutil.copytree(run_dir, changed)
    info = json.loads((changed / "run.json").read_text())
    info["encoder_options"] = {"size": 96}  # another preprocessing than the run was fitted on
    (changed / "run.json").write_text(json.dumps(info))
    with pytest.raises(MedembedError, match="does not match"):
        predict(changed, [tmp_path], tmp_path / "out.csv")
