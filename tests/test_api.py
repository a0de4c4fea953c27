"""The Python API (`medembed.api`; `open_store` and `load_run` also from `medembed`): the README's example run as written on real FracAtlas
images, the CLI's option names, str or Path everywhere, and one MedembedError for bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medembed import api
from medembed.errors import MedembedError
from tests.conftest import REPO
from tests.test_fit import write_store

# The README's "Python API" example, exactly as printed there: keep the two identical.
README_EXAMPLE = """\
from medembed import api

api.extract("manifest.csv", root="fracatlas", encoder="efficientnet-lite0", out="frac.h5")
data = api.open_store("frac.h5").read().to_numpy()  # embeddings [N, D], image_id, label, split, ...
print(data["embeddings"].shape, "abnormal:", data["label"].sum())
run = api.fit("frac.h5", "runs/frac-logreg", head="logreg", threshold="youden", bootstrap=200)
rows = api.predict(run, "new_xrays/")  # one dict per image: probability, abnormal, error, ...
print(rows[0]["image_id"], rows[0]["probability"], rows[0]["abnormal"])
"""


@pytest.fixture(scope="module")
def example(tmp_path_factory, small_manifest, fracatlas_root):
    """The README example run in a folder laid out as it says: manifest.csv, the images under fracatlas/, and
    three test images copied into new_xrays/. Returns the folder, the example's variables and what it printed."""
    from medembed.data.manifest import read_manifest

    work = tmp_path_factory.mktemp("example")
    shutil.copy(small_manifest, work / "manifest.csv")
    (work / "fracatlas").symlink_to(fracatlas_root)
    manifest = read_manifest(small_manifest)
    (work / "new_xrays").mkdir()
    for path in manifest.path[manifest.split == "test"][:3]:
        shutil.copy(fracatlas_root / path, work / "new_xrays" / Path(path).name)
    done = subprocess.run([sys.executable, "-c", README_EXAMPLE], cwd=work, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300, check=False)  # a fresh interpreter, as a notebook's first cell
    assert done.returncode == 0, done.stderr[-3000:]
    return work, done.stdout


def test_the_readme_example_runs_as_written(example):
    work, printed = example
    first, last = printed.strip().splitlines()[0], printed.strip().splitlines()[-1]
    assert first == "(24, 1280) abnormal: 12"  # 26 rows, the two truncated JPEGs not embedded
    _image_id, probability, abnormal = last.split()
    assert 0 <= float(probability) <= 1 and abnormal in ("0", "1")
    assert (work / "runs" / "frac-logreg" / "report.md").is_file()
    recorded = json.loads((work / "runs" / "frac-logreg" / "run.json").read_text())["options"]
    assert recorded["n_resamples"] == 200 and recorded["threshold"] == "youden"  # bootstrap= is --bootstrap


def test_predict_takes_a_run_path_writes_out_and_types_the_rows(example, tmp_path):
    work, _ = example
    images = sorted((work / "new_xrays").iterdir())
    rows = api.predict(str(work / "runs" / "frac-logreg"), [images[0], str(images[1])], out=tmp_path / "p.csv", batch_size=2)
    assert [row["image_id"] for row in rows] == [images[0].name, images[1].name]
    assert all(isinstance(row["probability"], float) and row["abnormal"] in (0, 1) and row["error"] == "" for row in rows)
    assert (tmp_path / "p.csv").read_text().count("\n") == 3
    same = api.predict(api.load_run(work / "runs" / "frac-logreg"), images[0])
    assert same[0]["probability"] == rows[0]["probability"]


def test_predict_as_frame_is_a_dataframe_of_the_rows(example):
    pd = pytest.importorskip("pandas")
    work, _ = example
    frame = api.predict(work / "runs" / "frac-logreg", work / "new_xrays", as_frame=True)
    assert isinstance(frame, pd.DataFrame) and len(frame) == 3 and frame["probability"].between(0, 1).all()


def test_predict_as_frame_without_pandas_says_how_to_install_it(example, monkeypatch):
    work, _ = example
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` now raises ImportError
    with pytest.raises(MedembedError, match="pip install pandas"):
        api.predict(work / "runs" / "frac-logreg", work / "new_xrays", as_frame=True)


def test_extract_refuses_bad_input_in_one_line(example, tmp_path):
    work, _ = example
    with pytest.raises(MedembedError, match="unknown encoder 'nope'"):
        api.extract(work / "manifest.csv", work / "fracatlas", "nope", out=tmp_path / "s.h5")
    with pytest.raises(MedembedError, match="unknown option batchsize=; it accepts .*batch_size"):
        api.extract(work / "manifest.csv", work / "fracatlas", out=tmp_path / "s.h5", batchsize=2)
    with pytest.raises(MedembedError, match="option batch_size must be"):
        api.extract(work / "manifest.csv", work / "fracatlas", out=tmp_path / "s.h5", batch_size=0)
    with pytest.raises(MedembedError, match="manifest must be a path"):
        api.extract(None, work / "fracatlas", out=tmp_path / "s.h5")
    with pytest.raises(MedembedError, match="no-such.csv"):
        api.extract(tmp_path / "no-such.csv", work / "fracatlas", out=tmp_path / "s.h5")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("store") / "s.h5")


def test_open_store_to_numpy_and_the_table_it_came_from(store):
    table = api.open_store(str(store)).read()
    data = table.to_numpy()
    assert set(data) == {"embeddings", "image_id", "label", "study_id", "patient_id", "body_part", "split"}
    assert data["embeddings"].shape == (120, 16) and data["label"].dtype == np.int8
    assert list(data["image_id"][:2]) == ["p0_img0", "p0_img1"] and data["split"][0] == "train"
    assert np.array_equal(data["embeddings"], table.embeddings)


def test_to_pandas_one_column_of_embeddings(store):
    pd = pytest.importorskip("pandas")
    frame = api.open_store(store).read("test").to_pandas()
    assert isinstance(frame, pd.DataFrame) and len(frame) == 40
    assert list(frame.columns) == ["image_id", "label", "study_id", "patient_id", "body_part", "split", "embedding"]
    assert np.stack(frame["embedding"]).shape == (40, 16)


def test_to_pandas_without_pandas_says_how_to_install_it(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MedembedError, match=r"to_pandas needs pandas.*pip install pandas"):
        api.open_store(store).read().to_pandas()


def test_fit_names_options_as_the_cli_or_the_dataclass_and_evaluate_reproduces_it(store, tmp_path):
    run = api.fit(store, tmp_path / "a", head="logreg", bootstrap=20, param={"max_iter": 200}, seeds=1)
    again = api.fit([str(store)], str(tmp_path / "b"), head="logreg", n_resamples=20, head_params=["max_iter=200"])
    assert run.record.options == again.record.options and run.record.options.n_resamples == 20
    assert run.record.options.head_params == {"max_iter": 200}
    metrics = api.evaluate(run)
    written = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["image"]["overall"]["auroc"]["value"] == pytest.approx(written["image"]["overall"]["auroc"]["value"])
    val = api.evaluate(tmp_path / "b", split="val", bootstrap=0)
    assert "ci" not in val["image"]["overall"]["auroc"] or val["image"]["overall"]["auroc"]["ci"] is None


@pytest.mark.parametrize(("options", "message"), [
    ({"bootstrap": 10, "n_resamples": 10}, "bootstrap= and n_resamples= are the same option"),
    ({"bootstrp": 10}, "unknown option bootstrp=; it accepts .*bootstrap"),
    ({"bootstrap": -1}, r"n_resamples \(--bootstrap\)|n_resamples must be"),
    ({"head": "nope"}, "unknown head 'nope'"),
    ({"param": {"C": 1}}, "unknown parameter"),
    ({"param": ["max_iter"]}, "expected key=value"),
    ({"seeds": "2"}, "seeds must be an integer"),
])
def test_fit_refuses_bad_options_before_reading_the_store(tmp_path, options, message):
    with pytest.raises(MedembedError, match=message):
        api.fit(tmp_path / "missing.h5", tmp_path / "run", **options)


def test_bad_paths_are_one_medembed_error(store, tmp_path):
    for call, message in [
        (lambda: api.open_store(123), "store must be a path"),
        (lambda: api.open_store(tmp_path / "missing.h5"), "no such store"),
        (lambda: api.load_run(str(tmp_path)), "not a medembed run directory"),
        (lambda: api.fit([], tmp_path / "run"), "stores must be a path or a non-empty list"),
        (lambda: api.fit(store, None), "out must be a path"),
        (lambda: api.fit(tmp_path / "missing.h5", tmp_path / "run"), "no such store"),
        (lambda: api.evaluate(tmp_path / "nope"), "no such run directory"),
        (lambda: api.evaluate(tmp_path / "nope", split="holdout"), "split must be one of train, val, test"),
        (lambda: api.predict(tmp_path / "nope", tmp_path), "no such run directory"),
    ]:
        with pytest.raises(MedembedError, match=message):
            call()


def test_open_store_and_load_run_are_exported_from_medembed_without_heavy_imports():
    script = "import sys, medembed\nassert 'h5py' not in sys.modules and 'torch' not in sys.modules\nfrom medembed import open_store, load_run, api\nassert open_store is api.open_store and load_run is api.load_run\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
