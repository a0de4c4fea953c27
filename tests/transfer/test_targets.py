"""Which target rows a run can score: fingerprint checks, the simulated-shift exception, joined manifest columns."""

import json

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.runs.record import load_run
from medembed.store import make_fingerprint
from medembed.runs.inputs import run_inputs, simulated_shift
from tests.test_fit import write_store

SPEC = {"size": 224, "mean": [0.5], "version": 1}


def test_simulated_shift_is_the_runs_preprocessing_plus_a_corruption_only():
    corrupted = json.dumps({**SPEC, "corruption": {"name": "blur", "severity": 3, "parameter": 3.0, "version": 1}})
    assert simulated_shift(json.dumps(SPEC), corrupted) == "blur severity 3"
    assert simulated_shift(json.dumps(SPEC), json.dumps({**SPEC, "size": 96, "corruption": {"name": "blur"}})) is None
    assert simulated_shift(json.dumps(SPEC), json.dumps(SPEC)) is None and simulated_shift("", "not json") is None


def test_target_store_rows_carry_the_manifest_columns(head_run, target_store):
    rows, notes = run_inputs(load_run(head_run)).target(target_store)
    assert len(rows) == 240 and notes == []
    assert set(rows.extra["site"]) == {"north", "south"}


def test_another_encoders_store_is_refused(head_run, tmp_path):
    other = write_store(tmp_path / "other.h5", fingerprint=make_fingerprint(encoder="other", model_id="m", embedding_kind="pooled", preprocess_hash="p", dtype="float32"))
    with pytest.raises(MedembedError, match="other.h5: embeddings differ.*encoder"):
        run_inputs(load_run(head_run)).target(other)


def test_a_manifest_for_an_embedding_run_and_a_bad_split_are_one_line(head_run, target_store, tmp_path):
    with pytest.raises(MedembedError, match="extract the manifest into a store first"):
        run_inputs(load_run(head_run)).target(tmp_path / "m.csv")
    with pytest.raises(MedembedError, match="split must be all or one of"):
        run_inputs(load_run(head_run)).target(target_store, split="holdout")
    with pytest.raises(MedembedError, match="no rows to score in split 'train'"):
        run_inputs(load_run(head_run)).target(target_store, split="train")


def test_columns_from_a_manifest_join_by_image_id(head_run, target_store, tmp_path):
    manifest = tmp_path / "views.csv"
    manifest.write_text("image_id,path,view\np0_img0,a.png,lateral\np1_img1,b.png,frontal\n")
    rows, _ = run_inputs(load_run(head_run)).target(target_store, columns_from=manifest)
    view = dict(zip(rows.image_id, rows.extra["view"]))
    assert view["p0_img0"] == "lateral" and view["p1_img1"] == "frontal" and view["p2_img0"] == ""
    assert np.array_equal(np.unique(rows.extra["site"]), ["north", "south"])  # the store's own columns are kept


def test_extraction_keeps_every_further_manifest_column_but_not_paths():
    from medembed.extract.runner import store_columns
    from medembed.data.manifest import Manifest

    manifest = Manifest({"image_id": ["a"], "path": ["x/a.png"], "label": ["1"], "split": ["test"], "frontal": ["1"], "site": ["north"]})
    columns = store_columns(manifest)
    assert columns["frontal"].tolist() == ["1"] and columns["site"].tolist() == ["north"]
    assert "path" not in columns and "image_id" not in columns and columns["label"].tolist() == [1]
