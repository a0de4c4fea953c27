"""The run's reference: written by fit, read back without pickle, rebuilt for runs that predate it, damage named."""

import shutil

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.runs.record import load_run
from medembed.transfer.reference import REFERENCE_DIR, SiteReference, run_reference


def test_fit_writes_the_reference_and_it_reads_back(head_run):
    reference = SiteReference.load(head_run / REFERENCE_DIR)
    run = load_run(head_run)
    assert reference.has_embeddings and reference.train_sample.shape[1] == 16
    assert len(reference.val_p) == len(reference.val_y) == len(reference.val_ood) == run.record.split_sizes["val"]["images"]
    assert reference.n_train == run.record.split_sizes["train"]["images"] == len(reference.train_sample)  # under SAMPLE_SIZE: all of it
    assert "## Conformal prediction sets" in (head_run / "report.md").read_text()


def test_a_run_without_reference_gets_one_built_from_its_inputs(head_run, tmp_path):
    copy = tmp_path / "old-run"
    shutil.copytree(head_run, copy)
    shutil.rmtree(copy / REFERENCE_DIR)
    rebuilt = run_reference(load_run(copy))
    original = SiteReference.load(head_run / REFERENCE_DIR)
    assert np.allclose(rebuilt.val_p, original.val_p) and np.array_equal(rebuilt.train_sample, original.train_sample)
    assert (copy / REFERENCE_DIR / "reference.npz").is_file()


def test_damaged_reference_is_one_line(head_run, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(head_run, copy)
    (copy / REFERENCE_DIR / "reference.npz").write_bytes(b"not an npz file")
    with pytest.raises(MedembedError, match="reference.npz: cannot be read"):
        run_reference(load_run(copy))


def test_evaluate_on_other_stores_still_works_when_the_reference_cannot_be_built(head_run, tmp_path):
    import json

    from medembed.evaluate import evaluate_run

    copy = tmp_path / "moved"
    shutil.copytree(head_run, copy)
    shutil.rmtree(copy / REFERENCE_DIR)
    record = json.loads((copy / "run.json").read_text())
    record["inputs"]["stores"] = [str(tmp_path / "gone.h5")]
    (copy / "run.json").write_text(json.dumps(record))
    metrics = evaluate_run(copy, stores=[head_run.parent / "source.h5"], n_resamples=0)
    assert metrics["image"]["overall"]["auroc"]["value"] > 0.9
    report = (copy / "evaluations" / "test-on-source-bootstrap0" / "report.md").read_text()
    assert "Unavailable:" in report and "gone.h5" in report
