"""What predict adds per image: the conformal set at the chosen alpha and the OOD score and flag."""

import numpy as np

from medembed.runs.record import load_run
from medembed.transfer.annotate import annotate
from medembed.transfer.conformal import fit_conformal, prediction_sets, set_names
from medembed.options.transfer import TransferOptions
from medembed.transfer.reference import reference_dir, SiteReference
from medembed.runs.inputs import run_inputs


def test_sets_and_ood_flags_follow_the_reference(head_run, target_store):
    run = load_run(head_run)
    rows, _ = run_inputs(run).target(target_store)
    p = run.probabilities(rows)
    cells, notes = annotate(run, rows, p, TransferOptions(alpha=0.2, false_alarm=0.1))
    assert notes == [] and set(cells) == set(rows.image_id)
    reference = SiteReference.load(reference_dir(head_run))
    expected = set_names(prediction_sets(p, fit_conformal(reference.val_p, reference.val_y, 0.2)))
    assert [cells[i][0] for i in rows.image_id] == expected.tolist()
    scores = np.array([float(cells[i][1]) for i in rows.image_id])
    flags = np.array([cells[i][2] == "1" for i in rows.image_id])
    assert flags.any() and (scores[flags].min() > scores[~flags].max())  # one threshold separates flagged from not


def test_a_run_whose_inputs_are_gone_still_predicts_and_says_why(head_run, tmp_path):
    import shutil

    copy = tmp_path / "moved"
    shutil.copytree(head_run, copy)
    shutil.rmtree(copy / "reference")
    run = load_run(copy)
    run.record.inputs["stores"] = [str(tmp_path / "gone.h5")]
    rows, _ = run_inputs(load_run(head_run)).target(head_run.parent / "source.h5")
    cells, notes = annotate(run, rows, run.probabilities(rows))
    assert all(c == ["", "", ""] for c in cells.values())
    assert len(notes) == 1 and "no prediction sets or OOD scores" in notes[0] and "gone.h5" in notes[0]
