"""Corruption robustness end to end: a logreg run on real FracAtlas images, re-extracted under corruptions."""

import json
import shutil

import numpy as np
import pytest

from medembed.data.corrupt import CorruptedPreprocess
from medembed.encoders import get_encoder
from medembed.errors import MedembedError
from medembed.options.extract import ExtractOptions
from medembed.extract.runner import extract
from medembed.scorers.options import FitOptions
from medembed.fit import fit_run
from medembed.data.manifest import Manifest, build_fracatlas, read_manifest, write_manifest
from medembed.options.robustness import RobustnessOptions
from medembed.robustness import evaluate_corruptions
from medembed.store import open_store

ENCODER_OPTIONS = {"size": 64}  # EfficientNet-Lite0 at 64 px: real weights, a fraction of the 224-px cost
EXTRACT = ExtractOptions(batch_size=16, num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def tiny_run(fracatlas_root, tmp_path_factory):
    """30 FracAtlas images (train 12, val 8, test 10; both classes everywhere), embedded and fitted with logreg."""
    manifest, _ = build_fracatlas(fracatlas_root)
    abnormal = np.flatnonzero(manifest.label == 1)[:15]
    normal = np.flatnonzero(manifest.label == 0)[:15]
    split = ["train"] * 6 + ["val"] * 4 + ["test"] * 5
    columns = {name: values[np.r_[abnormal, normal]] for name, values in manifest.columns.items()}
    columns["split"] = np.array(split + split, dtype=object)
    small = Manifest(columns)
    directory = tmp_path_factory.mktemp("robustness")
    write_manifest(small, directory / "manifest.csv")
    encoder = get_encoder("efficientnet-lite0", **ENCODER_OPTIONS)
    extract(small, fracatlas_root, encoder, directory / "store.h5", EXTRACT, encoder_options=ENCODER_OPTIONS)
    fit_run([directory / "store.h5"], directory / "run", FitOptions(head="logreg", n_resamples=20))
    return directory


def test_corruption_sweep_reports_every_condition_and_resumes(tiny_run, fracatlas_root):
    run = tiny_run / "run"
    options = RobustnessOptions(extract=EXTRACT, n_resamples=20)
    seen = []
    result = evaluate_corruptions(
        run, tiny_run / "manifest.csv", fracatlas_root, ["noise", "jpeg"], [1, 5], options,
        on_extracted=lambda condition, read: seen.append((condition.name, read.extraction.done if read.extraction else "store")),
    )
    # the clean images are the run's own store's (same fingerprint): never embedded again
    assert seen == [("clean", "store"), ("noise-1", 10), ("noise-5", 10), ("jpeg-1", 10), ("jpeg-5", 10)]
    assert result["images"] == 10 and result["notes"] == [f"clean condition: the run's own store ({(tiny_run / 'store.h5').resolve()}), not embedded again"]
    assert not (run / "corrupt" / "clean.h5").exists()

    # The clean condition reproduces the run's own test metrics (same encoder, head, calibration, thresholds).
    fitted = json.loads((run / "metrics.json").read_text())
    assert result["clean"]["image"]["auroc"]["value"] == pytest.approx(fitted["image"]["overall"]["auroc"]["value"], abs=1e-6)
    assert result["clean"]["study"]["kappa"]["value"] == pytest.approx(fitted["study"]["overall"]["kappa"]["value"], abs=1e-6)
    conditions = {(c["corruption"], c["severity"]): c for c in result["conditions"]}
    assert sorted(conditions) == [("jpeg", 1), ("jpeg", 5), ("noise", 1), ("noise", 5)]
    assert conditions[("jpeg", 5)]["parameter"] == 7 and conditions[("jpeg", 5)]["parameter_unit"].startswith("JPEG quality")
    for condition in conditions.values():
        for metric in ("auroc", "kappa", "brier"):
            change = condition["metrics"]["image"][metric]["value"] - result["clean"]["image"][metric]["value"]
            assert condition["change"]["image"][metric] == pytest.approx(change, nan_ok=True)

    # Each corrupted store has its own fingerprint, its embeddings differ from the clean ones, and severity 5
    # moves them further than severity 1.
    stores = {name: open_store(run / "corrupt" / f"{name}.h5") for name in ("noise-1", "noise-5", "jpeg-1", "jpeg-5")}
    stores["clean"] = open_store(tiny_run / "store.h5")
    assert len({s.fingerprint["preprocess_hash"] for s in stores.values()}) == 5
    clean = stores["clean"].read()
    clean = clean.subset(np.flatnonzero(clean.columns["split"] == "test"))
    order = np.argsort(clean.image_id.astype(str))
    for corruption in ("noise", "jpeg"):
        moved = []
        for severity in (1, 5):
            table = stores[f"{corruption}-{severity}"].read()
            table = table.subset(np.argsort(table.image_id.astype(str)))
            moved.append(float(np.abs(table.embeddings.astype(np.float32) - clean.embeddings[order]).mean()))
        assert 0 < moved[0] < moved[1]

    written = json.loads((run / "robustness.json").read_text())
    assert written["conditions"][0]["corruption"] == "noise" and written["images"] == 10
    report = (run / "robustness.md").read_text()
    assert "| jpeg | 5 | quality 7 |" in report and "| noise | 1 | sd 0.08 (intensity 0-1) |" in report
    assert "Δ AUROC" in report and "## Study level" in report and "- **blur** (Gaussian sigma, px on a 224-px reference" in report
    assert (run / "figures" / "robustness.png").stat().st_size > 10_000

    # A rerun finds every store complete and embeds nothing; the same numbers come out.
    seen.clear()
    again = evaluate_corruptions(
        run, tiny_run / "manifest.csv", fracatlas_root, ["noise", "jpeg"], [1, 5], options,
        on_extracted=lambda condition, read: seen.append(read.extraction.done if read.extraction else "store"),
    )
    assert seen == ["store"] + [0] * 4
    assert again["conditions"][3]["metrics"]["image"]["auroc"] == result["conditions"][3]["metrics"]["image"]["auroc"]


def test_corrupted_extraction_uses_the_wrapper_and_refuses_mixing_with_clean(tiny_run, fracatlas_root):
    manifest = read_manifest(tiny_run / "manifest.csv")
    encoder = get_encoder("efficientnet-lite0", **ENCODER_OPTIONS)
    wrapped = CorruptedPreprocess(encoder.preprocess, "contrast", 5)
    store = tiny_run / "contrast.h5"
    extract(manifest.subset(np.arange(3)), fracatlas_root, encoder, store, EXTRACT, preprocess=wrapped)
    written = open_store(store)
    assert written.fingerprint["preprocess_hash"] == wrapped.hash() != encoder.preprocess.hash()
    assert json.loads(written.attrs["preprocess"])["corruption"]["name"] == "contrast"
    with pytest.raises(MedembedError, match="preprocess_hash"):
        extract(manifest.subset(np.arange(3, 5)), fracatlas_root, encoder, store, EXTRACT)


def test_unknown_corruption_and_missing_test_split_are_refused_before_extracting(tiny_run, fracatlas_root, tmp_path):
    run = tiny_run / "run"
    with pytest.raises(MedembedError, match="unknown corruption 'fog'"):
        evaluate_corruptions(run, tiny_run / "manifest.csv", fracatlas_root, ["fog"], [1], RobustnessOptions(extract=EXTRACT))
    assert not (run / "corrupt" / "fog-1.h5").exists()
    manifest = read_manifest(tiny_run / "manifest.csv")
    write_manifest(manifest.subset(manifest.split != "test"), tmp_path / "no_test.csv")
    with pytest.raises(MedembedError, match="no rows with split=test"):
        evaluate_corruptions(run, tmp_path / "no_test.csv", fracatlas_root, ["blur"], [1], RobustnessOptions(extract=EXTRACT))


def test_failed_images_are_named_once_and_a_store_without_them_is_embedded_again(tiny_run, fracatlas_root, tmp_path):
    """Two truncated JPEGs added to the test split: the run's store does not hold them, so the clean images are
    embedded again (into RUN/corrupt/clean.h5); their failure is named under clean and not repeated per corruption."""
    from tests.conftest import TRUNCATED

    full, _ = build_fracatlas(fracatlas_root)
    manifest = read_manifest(tiny_run / "manifest.csv")
    broken = full.subset(np.flatnonzero(np.isin(full.image_id, TRUNCATED)))
    columns = {name: np.concatenate([manifest.columns[name], broken.columns[name] if name != "split" else np.array(["test"] * len(broken), dtype=object)])
               for name in manifest.columns}
    write_manifest(Manifest(columns), tmp_path / "with_broken.csv")
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    lines: list[str] = []
    result = evaluate_corruptions(run, tmp_path / "with_broken.csv", fracatlas_root, ["noise", "gamma"], [1], RobustnessOptions(extract=EXTRACT, n_resamples=0), log=lines.append)
    assert (run / "corrupt" / "clean.h5").exists() and result["images"] == 10
    assert lines[0].startswith("clean       10 embedded") and all(image_id in lines[0] for image_id in TRUNCATED)
    for line in lines[1:]:
        assert "(2 of them named above)" in line and "failed:" not in line and not any(image_id in line for image_id in TRUNCATED), line
