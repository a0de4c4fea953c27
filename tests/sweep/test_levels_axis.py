"""The sweep's levels axis: token heads on a store's levels as sources "<label>:<level>" beside the pooled heads."""

import numpy as np
import pytest

from medembed.store import StoreWriter, make_fingerprint
from medembed.sweep.config import SweepConfigError, load_config
from medembed.sweep.results import read_results
from medembed.sweep.runner import grid_cells, run_sweep
from tests.sweep.conftest import synthetic_rows, sweep_toml, write_study

LEVELS_FINGERPRINT = make_fingerprint(encoder="efficientnet-lite0", model_id="synthetic", embedding_kind="pooled", preprocess_hash="p", dtype="float32", levels="grid")


def level_store(directory, columns):
    """A store whose level `grid` [1 + 4, 4] marks abnormal rows in one cell; the pooled vectors carry no signal."""
    rng = np.random.default_rng(1)
    labels = np.asarray(columns["label"], dtype=int)
    cells = rng.standard_normal((len(labels), 4, 4)).astype(np.float32)
    cells[labels == 1, rng.integers(0, 4, int(labels.sum())), 0] += 4.0
    tokens = np.concatenate([cells.mean(axis=1, keepdims=True), cells], axis=1)
    path = directory / "levels.h5"
    with StoreWriter(path, dim=4, fingerprint=LEVELS_FINGERPRINT, tokens={"grid": (5, 4)}) as writer:
        writer.append(columns["image_id"], rng.standard_normal((len(labels), 4)), {k: columns[k] for k in ("label", "study_id", "patient_id", "body_part", "split")}, tokens={"grid": tokens})
    return path


def test_levels_axis_runs_token_heads_beside_the_pooled_heads(tmp_path):
    columns = synthetic_rows()
    manifest, _ = write_study(tmp_path, columns)
    store = level_store(tmp_path, columns)
    toml = sweep_toml(manifest, store, tmp_path / "out", heads='["logreg"]', budgets="[1.0]", seeds="[0]")
    toml += 'levels = ["grid"]\ntoken_heads = ["concat"]\n'
    (tmp_path / "sweep.toml").write_text(toml)
    config = load_config(tmp_path / "sweep.toml")
    assert [(c.encoder, c.head) for c in grid_cells(config)] == [("synthetic", "logreg"), ("synthetic:grid", "concat")]
    run_sweep(config)
    rows = {(row["encoder"], row["head"]): row for row in read_results(tmp_path / "out" / "results.csv")}
    assert float(rows[("synthetic:grid", "concat")]["image_auroc"]) > 0.8 > float(rows[("synthetic", "logreg")]["image_auroc"])


def test_unknown_token_head_names_the_key(tmp_path):
    manifest, store = write_study(tmp_path)
    (tmp_path / "sweep.toml").write_text(sweep_toml(manifest, store, tmp_path / "out") + 'levels = ["grid"]\ntoken_heads = ["lstm"]\n')
    with pytest.raises(SweepConfigError, match=r"encoders\[0\]\.token_heads.*unknown token head 'lstm'"):
        load_config(tmp_path / "sweep.toml")
