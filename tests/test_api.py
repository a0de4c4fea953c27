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


def readme_example() -> str:
    """The README's "Python API" example, read from the README itself: the example run is the one printed."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Python API\n"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("\n```\n")] + "\n"


README_EXAMPLE = readme_example()


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
    env = dict(os.environ, PYTHONPATH=str(REPO), MEDEMBED_CACHE=str(work / "cache"))  # predict's cache, kept out of ~/.cache
    done = subprocess.run([sys.executable, "-c", README_EXAMPLE], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # a fresh interpreter, as a notebook's first cell
    assert done.returncode == 0, done.stderr[-3000:]
    return work, done.stdout


def test_the_readme_example_runs_as_written(example):
    work, printed = example
    first, auroc, last = printed.strip().splitlines()
    assert first == "(24, 1280) abnormal: 12"  # 26 rows, the two truncated JPEGs not embedded
    assert auroc.split()[0] == "AUROC" and 0 <= float(auroc.split()[1]) <= 1
    _image_id, probability, abnormal = last.split()
    assert 0 <= float(probability) <= 1 and abnormal in ("0", "1")
    assert (work / "runs" / "frac-logreg" / "report.md").is_file()
    recorded = json.loads((work / "runs" / "frac-logreg" / "run.json").read_text())["options"]
    assert recorded["n_resamples"] == 200 and recorded["threshold"] == "youden"  # bootstrap= is --bootstrap


def test_predict_takes_a_run_path_writes_out_and_types_the_columns(example, tmp_path):
    pytest.importorskip("pandas")
    work, _ = example
    images = sorted((work / "new_xrays").iterdir())
    frame = api.predict(str(work / "runs" / "frac-logreg"), [images[0], str(images[1])], out=tmp_path / "p.csv",
                        cache_dir=tmp_path / "cache", batch_size=2)
    assert frame["image_id"].tolist() == [images[0].name, images[1].name]
    assert frame["path"].tolist() == [str(images[0]), str(images[1])]  # as given
    assert str(frame["probability"].dtype) == "float64" and str(frame["abnormal"].dtype) == "int64"
    assert frame["probability"].between(0, 1).all() and set(frame["abnormal"]) <= {0, 1} and (frame["error"] == "").all()
    assert (tmp_path / "p.csv").read_text().count("\n") == 3 and frame.attrs["cache"].startswith(str(tmp_path / "cache"))
    run = api.load_run(work / "runs" / "frac-logreg")
    same = run.predict(images[0], cache_dir=tmp_path / "cache", explain=tmp_path / "maps")  # api.predict with the run
    assert same.loc[0, "probability"] == pytest.approx(frame.loc[0, "probability"], abs=1e-6)  # batches of 2 or 1
    assert any(note.startswith("--explain: ") and "nothing written" in note for note in same.attrs["notes"])  # a logreg has no map


def test_predict_on_a_manifest_with_root_carries_its_columns(example, tmp_path):
    pytest.importorskip("pandas")
    work, _ = example
    manifest = tmp_path / "m.csv"
    names = sorted(p.name for p in (work / "new_xrays").iterdir())
    manifest.write_text("image_id,path,label,site\n" + "".join(f"x{k},{name},{k % 2},A\n" for k, name in enumerate(names)))
    frame = api.predict(work / "runs" / "frac-logreg", manifest, root=work / "new_xrays", cache_dir=tmp_path / "cache")
    assert frame["image_id"].tolist() == ["x0", "x1", "x2"] and frame["path"].tolist() == names
    assert frame["label"].tolist() == [0, 1, 0] and (frame["site"] == "A").all()


def test_predict_without_pandas_says_how_to_install_it_before_reading_images(example, monkeypatch, tmp_path):
    work, _ = example
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` now raises ImportError
    with pytest.raises(MedembedError, match=r"api.predict needs pandas.*pip install 'medembed\[api\]'"):
        api.predict(work / "runs" / "frac-logreg", work / "new_xrays", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


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


def test_a_runs_metrics_are_a_dataframe_by_level_and_metric(store, tmp_path):
    pytest.importorskip("pandas")
    run = api.fit(store, tmp_path / "one", head="logreg", bootstrap=20)
    metrics = run.metrics
    assert list(metrics.columns) == ["value", "ci_low", "ci_high"] and metrics.index.names == ["level", "metric"]
    written = json.loads((tmp_path / "one" / "metrics.json").read_text())
    auroc = written["image"]["overall"]["auroc"]
    assert metrics.loc[("image", "auroc")].tolist() == pytest.approx([auroc["value"], *auroc["ci"]])
    assert {"image", "study"} <= set(metrics.index.get_level_values("level")) and metrics.loc[("image", "n"), "ci_low"] != metrics.loc[("image", "n"), "ci_low"]  # NaN: no interval for a count
    seeds = api.load_run(api.fit(store, tmp_path / "two", head="logreg", seeds=2, bootstrap=0).directory).metrics
    summary = json.loads((tmp_path / "two" / "metrics.json").read_text())["over_seeds"]["image"]["overall"]["auroc"]
    assert list(seeds.columns) == ["value", "ci_low", "ci_high", "mean", "sd", "n_seeds"]
    assert seeds.loc[("image", "auroc"), ["mean", "sd", "n_seeds"]].tolist() == pytest.approx([summary["mean"], summary["sd"], 2])


def test_predict_proba_on_embeddings_reproduces_the_runs_test_predictions(store, tmp_path):
    import csv

    run = api.fit(store, tmp_path / "run", head="logreg", bootstrap=0)
    assert isinstance(run, api.Run) and isinstance(api.load_run(tmp_path / "run"), api.Run) and "logreg" in repr(run)
    test = api.open_store(store).read("test")
    p = run.predict_proba(test.embeddings)
    assert p.shape == (40, 2) and np.allclose(p.sum(axis=1), 1)
    with open(tmp_path / "run" / "predictions.csv", newline="") as f:
        written = {row["image_id"]: float(row["probability"]) for row in csv.DictReader(f)}
    assert p[:, 1] == pytest.approx([written[i] for i in test.image_id], abs=1e-6)
    assert run.predict_proba(test.embeddings[:0]).shape == (0, 2)
    for X, message in [
        (test.embeddings[0], r"X must be \[N, D\] embeddings .*got shape \(16,\)"),
        (test.embeddings[:, :8], "X has 8 features but the logreg head was fitted on 16"),
        (np.full((2, 16), np.nan), "2 rows of X are NaN or infinite"),
        ([["a"] * 16], "X must be a numeric"),
    ]:
        with pytest.raises(MedembedError, match=message):
            run.predict_proba(X)


def test_predict_proba_refuses_runs_that_do_not_score_pooled_embeddings(store, tmp_path):
    import dataclasses

    from medembed.runs.record import load_run as load

    loaded = load(api.fit(store, tmp_path / "run", head="logreg", bootstrap=0).directory)
    images = api.Run(dataclasses.replace(loaded, record=dataclasses.replace(loaded.record, kind="cnn", consumes="images")))
    with pytest.raises(MedembedError, match="a cnn run scores images, not embeddings; use run.predict"):
        images.predict_proba(np.zeros((1, 16)))
