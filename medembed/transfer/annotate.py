"""What `predict` adds per image: the conformal prediction set and the OOD score with its flag."""

from __future__ import annotations

from typing import Any

import numpy as np

from medembed.errors import MedembedError
from medembed.protocol.splits import Split
from medembed.runs.inputs import run_inputs
from medembed.transfer.conformal import fit_conformal, prediction_sets, set_names
from medembed.options.transfer import TransferOptions
from medembed.transfer.reference import NO_EMBEDDINGS, run_reference
from medembed.transfer.sections import ood_scores

COLUMNS = ("prediction_set", "ood_score", "ood")


def annotate(run: Any, rows: Split, p: np.ndarray, options: TransferOptions | None = None) -> tuple[dict[str, list[str]], list[str]]:
    """{image_id: [prediction_set, ood_score, ood flag]} for the scored rows ("" where unavailable) and one-line
    notes on what is unavailable and why (a run whose reference cannot be read or built still predicts)."""
    options = options or TransferOptions()
    cells = {image_id: ["", "", ""] for image_id in rows.image_id}
    if not len(rows):
        return cells, []
    try:
        reference = run_reference(run)
    except MedembedError as error:
        return cells, [f"no prediction sets or OOD scores: {error}"]
    notes = []
    quantiles = fit_conformal(reference.val_p, reference.val_y, options.alpha, options.class_conditional)
    names = set_names(prediction_sets(p, quantiles))
    scored = ood_scores(reference, rows.X if run_inputs(run).reads_embeddings else None, options.false_alarm)
    if scored is None:
        notes.append(f"no OOD scores: {NO_EMBEDDINGS}")
    for k, image_id in enumerate(rows.image_id):
        cells[image_id][0] = str(names[k])
        if scored is not None:
            cells[image_id][1:] = [f"{scored[0][k]:.4f}", str(int(scored[0][k] > scored[1]))]
    return cells, notes
