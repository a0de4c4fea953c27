"""Ensembles as a sweep axis: [[ensembles]] cells beside the single heads, on each store or on stores joined by
image id; resumed like any cell; config errors name the key."""

from pathlib import Path

import numpy as np
import pytest

from medembed.store import StoreWriter
from medembed.sweep import load_config, read_results, run_sweep
from medembed.sweep.config import SweepConfigError
from tests.sweep.conftest import FINGERPRINT, sweep_toml, write_study

ENSEMBLES = """
[[encoders]]
name = "efficientnet-lite1"
label = "second"
store = "{second}"

[[ensembles]]
label = "heads-mean"
heads = ["logreg", "xgboost"]
combine = "mean"
params = {{ "xgboost.n_estimators" = 15 }}

[[ensembles]]
label = "joined-stack"
heads = ["logreg"]
combine = "stack"
encoders = ["synthetic", "second"]
folds = 3
"""


def second_store(directory: Path, first: Path) -> Path:
    """The same images as `first` embedded by "another encoder" (a second signal direction, 8-d)."""
    from medembed.store import open_store

    table = open_store(first).read()
    rng = np.random.default_rng(7)
    embeddings = rng.standard_normal((len(table), 8)) + 1.2 * table.label[:, None] * rng.standard_normal(8)
    path = directory / "second.h5"
    with StoreWriter(path, dim=8, fingerprint={**FINGERPRINT, "encoder": "efficientnet-lite1", "preprocess_hash": "second"}) as writer:
        writer.append(table.image_id.tolist(), embeddings, {k: table.columns[k].tolist() for k in ("label", "study_id", "patient_id", "body_part", "split")})
    return path


def ensemble_config(tmp_path: Path, extra: str | None = None) -> Path:
    manifest, store = write_study(tmp_path)
    second = second_store(tmp_path, store)
    path = tmp_path / "sweep.toml"
    path.write_text(sweep_toml(manifest, store, tmp_path / "out", heads='["logreg"]', seeds="[0]") + (extra or ENSEMBLES).format(second=second))
    return path


def test_ensemble_cells_sit_beside_the_single_heads_and_resume(tmp_path):
    config = load_config(ensemble_config(tmp_path))
    summary = run_sweep(config)
    rows = read_results(summary.results_csv)
    cells = sorted((r["encoder"], r["head"], r["budget"]) for r in rows)
    assert cells == sorted(
        [(e, "logreg", b) for e in ("synthetic", "second") for b in (0.3, 1.0)]
        + [(e, "heads-mean", b) for e in ("synthetic", "second") for b in (0.3, 1.0)]
        + [("synthetic+second", "joined-stack", b) for b in (0.3, 1.0)]
    )
    for row in rows:
        assert row["note"] == "" and row["study_auroc"] > 0.7, row
    # Every source gets the same budgeted train images.
    by_budget = {}
    for row in rows:
        by_budget.setdefault(row["budget"], set()).add(row["train_images"])
    assert all(len(sizes) == 1 for sizes in by_budget.values())
    markdown = summary.results_md.read_text()
    assert "joined-stack" in markdown and "synthetic+second" in markdown and "heads-mean" in markdown
    assert run_sweep(config).cells_run == 0


@pytest.mark.parametrize("entry, message", [
    ('[[ensembles]]\nlabel = "x"\nheads = ["logreg"]\ncombine = "mean"\nencoders = ["nope"]\n', "ensembles[0].encoders: 'nope' is not the label"),
    ('[[ensembles]]\nlabel = "x"\nheads = ["logreg"]\ncombine = "concat"\n', "ensembles[0]: --ensemble concat joins the features of several stores"),
    ('[[ensembles]]\nlabel = "logreg"\nheads = ["logreg", "mlp"]\n', "ensembles[0].label: 'logreg' must be"),
    ('[[ensembles]]\nlabel = "x"\nheads = ["logreg", "mlp"]\ncombine = "vote"\n', "ensembles[0].combine: 'vote' is not one of concat, mean, stack"),
])
def test_an_ensemble_the_sweep_cannot_run_is_refused_naming_its_key(tmp_path, entry, message):
    with pytest.raises(SweepConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(ensemble_config(tmp_path, '[[encoders]]\nname = "efficientnet-lite1"\nlabel = "second"\nstore = "{second}"\n' + entry))
