"""A fitted run applied to new image files end to end, with its own encoder (real EfficientNet-Lite0 weights):
folders and manifests, the user's paths and columns carried, the cache in one place, CSV and Parquet."""

import csv
import json
import os
import shutil
import stat
import sys

import pytest

from medembed.errors import MedembedError
from medembed.options.extract import ExtractOptions
from medembed.encoders.runtime import build_encoder
from medembed.extract.runner import extract
from medembed.scorers.options import FitOptions
from medembed.fit import fit_run
from medembed.data.manifest import read_manifest
from medembed.predict import default_cache_dir, predict, score_images

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
    summary = predict(run_dir, [images], tmp_path / "out.csv", ExtractOptions(batch_size=4, num_workers=0), cache_dir=tmp_path / "cache")
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
    summary = predict(run_dir, [local], tmp_path / "out.csv", ExtractOptions(batch_size=4, num_workers=0), cache_dir=tmp_path / "cache")
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
        predict(changed, [tmp_path], tmp_path / "out.csv", cache_dir=tmp_path / "cache")


FAST = ExtractOptions(batch_size=4, num_workers=0)


@pytest.fixture(scope="module")
def beside(tmp_path_factory, small_manifest, fracatlas_root):
    """A manifest CSV beside a folder of four test images: labels (the fourth unknown), a patient column, a
    column named like one of medembed's (`probability`) and one a spreadsheet would run as a formula."""
    manifest = read_manifest(small_manifest)
    folder = tmp_path_factory.mktemp("beside")
    (folder / "imgs").mkdir()
    test = manifest.subset(manifest.split == "test")
    with open(folder / "m.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "path", "label", "patient_id", "probability", "site"])
        for k, (image_id, source) in enumerate(list(zip(test.image_id, test.resolve(fracatlas_root)))[:4]):
            shutil.copy(source, folder / "imgs" / source.name)
            writer.writerow([image_id, f"imgs/{source.name}", test.label[k] if k < 3 else "", f"p{k}", "0.9", "=HYPERLINK(1)"])
    return folder


def test_a_manifest_carries_its_labels_and_columns_and_keeps_its_paths(beside, run_dir, tmp_path):
    out = tmp_path / "out" / "preds.csv"
    summary = predict(run_dir, [beside / "m.csv"], out, FAST, cache_dir=tmp_path / "cache")
    with open(out, newline="") as f:
        header = next(csv.reader(f))
    assert header == ["image_id", "path", "study_id", "probability", "abnormal", "error", "prediction_set", "ood_score", "ood",
                      "label", "patient_id", "manifest_probability", "site"]
    rows = read_rows(out)
    manifest = read_manifest(beside / "m.csv")
    assert [r["image_id"] for r in rows] == list(manifest.image_id) and [r["path"] for r in rows] == list(manifest.path)
    assert [r["label"] for r in rows] == list(manifest.columns["label"]) and {r["manifest_probability"] for r in rows} == {"0.9"}
    assert {r["site"] for r in rows} == {"'=HYPERLINK(1)"}  # CSV-injection safe
    assert (summary.scored, summary.labelled) == (4, 3) and summary.labelled_abnormal == int((manifest.label == 1).sum())
    assert sorted(p.name for p in out.parent.iterdir()) == ["preds.csv"]  # no cache store beside the output
    stores = list((tmp_path / "cache").glob("*/*.embeddings.h5"))
    assert stores == [summary.cache] and stat.S_IMODE(summary.cache.parent.stat().st_mode) == 0o700
    # the same images again: the cached store is reused (its embeddings not recomputed), the probabilities the same
    written = summary.cache.stat().st_mtime_ns
    again = score_images(run_dir, [str(beside / "m.csv")], FAST, cache_dir=tmp_path / "cache")
    assert again.cache == summary.cache and summary.cache.stat().st_mtime_ns == written
    assert [row[3] for row in again.rows] == pytest.approx([float(r["probability"]) for r in rows], abs=1e-6)
    assert [row[9] for row in again.rows] == [int(v) if v else None for v in manifest.columns["label"]]  # typed rows


def test_root_places_a_manifest_elsewhere_and_a_wrong_one_says_so(beside, run_dir, tmp_path):
    moved = tmp_path / "m.csv"
    shutil.copy(beside / "m.csv", moved)
    with pytest.raises(MedembedError, match=r"m\.csv: none of its 4 images exists .*relative to the manifest's folder \(give --root DIR"):
        predict(run_dir, [moved], tmp_path / "p.csv", FAST, cache_dir=tmp_path / "cache")
    summary = predict(run_dir, [moved], tmp_path / "p.csv", FAST, root=beside, cache_dir=tmp_path / "cache")
    assert summary.scored == 4 and [r["path"] for r in read_rows(tmp_path / "p.csv")][0].startswith("imgs/")
    with pytest.raises(MedembedError, match="--root .*no such folder"):
        predict(run_dir, [moved], None, FAST, root=tmp_path / "nope", cache_dir=tmp_path / "cache")
    with pytest.raises(MedembedError, match="--root is the folder a manifest CSV"):
        predict(run_dir, [beside / "imgs"], None, FAST, root=beside, cache_dir=tmp_path / "cache")


def test_bad_manifests_are_one_line_naming_the_file(beside, run_dir, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,path,label\na,imgs/x.png,abnormal\n")
    with pytest.raises(MedembedError, match=r"bad\.csv: label must be 0, 1 or empty"):
        predict(run_dir, [bad], None, FAST, cache_dir=tmp_path / "cache")
    bad.write_text("image_id,path\na,imgs/x.png\na,imgs/y.png\n")
    with pytest.raises(MedembedError, match=r"bad\.csv: image_id 'a' is on 2 rows"):
        predict(run_dir, [bad], None, FAST, cache_dir=tmp_path / "cache")
    with pytest.raises(MedembedError, match="a manifest CSV is scored on its own"):
        predict(run_dir, [bad, beside / "imgs"], None, FAST, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before anything was cached


def test_a_folder_keeps_the_users_spelling_of_links_and_scores_a_file_once(beside, run_dir, tmp_path):
    images = tmp_path / "new"
    images.mkdir()
    first, second = sorted((beside / "imgs").iterdir())[:2]
    shutil.copy(first, images / "real.jpg")
    (images / "alias.jpg").symlink_to(second)  # reported as alias.jpg, not the target's name
    (images / "twice.jpg").symlink_to(images / "real.jpg")  # the same file as real.jpg: scored once
    result = score_images(run_dir, [images, images / "real.jpg"], FAST, cache_dir=tmp_path / "cache")
    assert [row[0] for row in result.rows] == ["alias.jpg", "real.jpg"]
    assert [row[1] for row in result.rows] == [str(images / "alias.jpg"), str(images / "real.jpg")]
    assert result.header[-1] == "ood" and all(row[5] == "" for row in result.rows)


def test_parquet_output_is_typed_with_its_studies_table(beside, run_dir, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    manifest = tmp_path / "studies.csv"
    rows = read_rows(beside / "m.csv")
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "path", "study_id", "label"])
        for k, row in enumerate(rows):
            writer.writerow([row["image_id"], beside / row["path"], f"s{k // 2}", row["label"]])
    summary = predict(run_dir, [manifest], tmp_path / "out" / "p.parquet", FAST, cache_dir=tmp_path / "cache")
    assert summary.studies_csv == tmp_path / "out" / "p_studies.parquet"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p.parquet", "p_studies.parquet"]
    table = pq.read_table(tmp_path / "out" / "p.parquet")
    types = dict(zip(table.schema.names, map(str, table.schema.types)))
    assert types["probability"] == "double" and types["abnormal"] == "int64" and types["label"] == "int64"
    assert types["image_id"] == types["path"] == types["error"] == "string" and types["ood_score"] == "double"
    assert table.column("path").to_pylist() == [str(beside / r["path"]) for r in rows]
    studies = pq.read_table(tmp_path / "out" / "p_studies.parquet").to_pydict()
    assert sorted(studies["study_id"]) == ["s0", "s1"] and all(v in (0, 1) for v in studies["abnormal"])


def test_parquet_without_pyarrow_is_refused_before_any_image_is_read(beside, run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(MedembedError, match=r"p\.parquet: writing Parquet needs pyarrow.*pip install 'medembed\[parquet\]'"):
        predict(run_dir, [beside / "m.csv"], tmp_path / "p.parquet", FAST, cache_dir=tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []


def test_a_link_in_the_cache_is_refused(beside, run_dir, tmp_path):
    summary = predict(run_dir, [beside / "imgs"], tmp_path / "p.csv", FAST, cache_dir=tmp_path / "cache")
    (tmp_path / "elsewhere.h5").write_bytes(b"")
    (summary.cache.parent / "x.member0.embeddings.h5").symlink_to(tmp_path / "elsewhere.h5")
    with pytest.raises(MedembedError, match="a link in the predict cache"):
        predict(run_dir, [beside / "imgs"], tmp_path / "p.csv", FAST, cache_dir=tmp_path / "cache")


def test_the_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDEMBED_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MEDEMBED_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "medembed" / "predict"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # ignored, as the XDG specification says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "medembed" / "predict"
    assert os.path.isabs(default_cache_dir())
