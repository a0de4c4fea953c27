"""Recalibration on a few labelled target images: the sample, the refit restoring the operating point, RUN2, the curve."""

import json

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.runs.record import load_run
from medembed.protocol.splits import Split
from medembed.options.recalibrate import RecalibrateOptions
from medembed.transfer.recalibrate import labelled_sample, recalibrate
from medembed.transfer.reference import REFERENCE_DIR, SiteReference


def _rows(n_patients=40, images=3):
    patient = np.repeat([f"p{k}" for k in range(n_patients)], images)
    y = np.repeat((np.arange(n_patients) % 4 == 0).astype(np.int8), images)  # a quarter abnormal
    ids = np.array([f"i{k}" for k in range(len(y))])
    return Split(None, y, ids, patient, patient, np.full(len(y), "hand"), True)


def test_sample_takes_whole_patients_of_both_classes_near_n():
    rows = _rows()
    chosen = labelled_sample(rows, 30, seed=1)
    patients = set(rows.patient_id[chosen])
    assert all((rows.patient_id == p).sum() == (rows.patient_id[chosen] == p).sum() for p in patients)  # whole patients
    assert 30 <= len(chosen) <= 32 and set(rows.y[chosen]) == {0, 1}
    assert rows.y[chosen].sum() == pytest.approx(0.25 * len(chosen), abs=3)  # stratified by label
    assert not np.array_equal(chosen, labelled_sample(rows, 30, seed=2))
    with pytest.raises(MedembedError, match="some must remain"):
        labelled_sample(rows, len(rows), seed=0)


def test_recalibration_restores_the_operating_point_on_a_shifted_site(head_run, target_store, tmp_path):
    out = tmp_path / "run2"
    options = RecalibrateOptions(labelled=40, n_resamples=0, curve="10,40", curve_seeds=2)
    result = recalibrate(head_run, target_store, out, options)
    before, after = result["before"]["image"]["overall"], result["after"]["image"]["overall"]
    # The shift pushes every score up: source thresholds call too many abnormal; refitted ones do not.
    assert after["specificity"]["value"] > before["specificity"]["value"] + 0.1
    assert after["kappa"]["value"] > before["kappa"]["value"]
    assert result["labelled"] + result["evaluated"] == 240
    run2 = load_run(out)
    assert run2.record.calibration["kind"] == "platt" and run2.record.details["recalibration"]["labelled"] == result["labelled"]
    assert len(SiteReference.load(out / REFERENCE_DIR).val_p) == result["labelled"]  # conformal sets from the target sample
    assert "## Recalibration" in (out / "report.md").read_text()
    curve = json.loads((out / "curve.json").read_text())
    assert set(curve["summary"]) == {"10", "40"} and curve["summary"]["40"]["draws"] == 2
    assert (out / "figures" / "recalibration_curve.png").is_file()


def test_marked_rows_are_the_labelled_ones(head_run, target_store, tmp_path):
    marks = tmp_path / "marks.csv"
    ids = [f"p{p}_img{k}" for p in range(0, 18) for k in range(2)]
    marks.write_text("image_id,path,labelled\n" + "".join(f"{i},{i}.png,yes\n" for i in ids))
    from medembed.options.transfer import TransferOptions

    result = recalibrate(head_run, target_store, tmp_path / "run2", RecalibrateOptions(labelled_column="labelled", n_resamples=0),
                         transfer=TransferOptions(columns_from=marks))
    assert result["labelled"] == 36 and result["chosen_by"] == "the rows marked in labelled"


def test_the_cnn_is_recalibrated_through_its_probabilities(cnn_run, fracatlas_subset, fracatlas_root, tmp_path):
    options = RecalibrateOptions(labelled=12, n_resamples=0, calibration="none", split="test")
    result = recalibrate(cnn_run, fracatlas_subset, tmp_path / "cnn2", options, root=fracatlas_root)
    assert result["labelled"] + result["evaluated"] == 16
    assert load_run(tmp_path / "cnn2").record.kind == "cnn"


def test_recalibrate_never_writes_over_its_source_run(tmp_path):
    for out in (tmp_path / "run", tmp_path / "run" / "inside"):
        with pytest.raises(MedembedError, match="is the source run .* recalibrate writes a new run"):
            recalibrate(tmp_path / "run", tmp_path / "target.h5", out)
    assert not (tmp_path / "run").exists()
