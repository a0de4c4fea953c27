"""run_sweep end to end on a small real store: every cell once, resume, refusals, outputs that open."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medembed.errors import MedembedError
from medembed.sweep import load_config, read_results, run_sweep
from medembed.sweep.results import COLUMNS
from tests.sweep.conftest import sweep_toml, write_study


def config_file(tmp_path: Path, manifest: Path, store: Path, **overrides: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(sweep_toml(manifest, store, tmp_path / "out", **overrides))
    return path


def test_sweep_runs_every_cell_then_resumes_only_the_missing_one(tmp_path, study):
    manifest, store = study
    config = load_config(config_file(tmp_path, manifest, store))
    lines = []
    summary = run_sweep(config, log=lines.append)
    assert (summary.cells_run, summary.cells_already_done) == (8, 0)
    assert sum("study AUROC" in line for line in lines) == 8

    rows = read_results(summary.results_csv)
    assert sorted((r["head"], r["budget"], r["seed"]) for r in rows) == sorted(
        (h, b, s) for h in ("logreg", "xgboost") for b in (0.3, 1.0) for s in (0, 1)
    )
    for row in rows:
        assert row["encoder"] == "synthetic" and row["note"] == ""
        assert row["test_images"] == 36 and row["fit_seconds"] > 0
        assert row["study_auroc_low"] <= row["study_auroc"] <= row["study_auroc_high"]
        assert row["study_auroc"] > 0.7
    full = [r for r in rows if r["budget"] == 1.0]
    small = [r for r in rows if r["budget"] == 0.3]
    assert {r["train_images"] for r in full} == {108} and {r["train_abnormal"] for r in full} == {36}
    assert all(28 <= r["train_images"] < 108 for r in small)
    # Seeds draw different budgets; at the full budget only the head's seed differs.
    assert len({r["train_images"] for r in small} | {tuple(r["study_auroc"] for r in small)}) > 1

    markdown = summary.results_md.read_text()
    assert "## Heads × encoders, 100% of the training labels" in markdown and "| 30% |" in markdown
    assert "| Head | synthetic |" in markdown and "| Budget | Train images | logreg | xgboost |" in markdown
    assert " ± " in markdown
    for figure in summary.figures:
        with Image.open(figure) as image:
            assert image.size[0] > 500

    # Lose one cell's row, as if the sweep had been killed before appending it: only that cell runs again.
    text = summary.results_csv.read_text().splitlines(keepends=True)
    header, body = text[0], text[1:]
    removed = body.pop(3)
    summary.results_csv.write_text(header + "".join(body))
    again = run_sweep(config)
    assert (again.cells_run, again.cells_already_done) == (1, 7)
    rerun = summary.results_csv.read_text().splitlines()[-1].split(",")
    before = removed.rstrip("\n").split(",")
    same = [i for i, column in enumerate(COLUMNS) if column != "fit_seconds"]
    assert [rerun[i] for i in same] == [before[i] for i in same]

    assert run_sweep(config).cells_run == 0


def test_a_torn_last_line_is_dropped_and_rerun(tmp_path, study):
    manifest, store = study
    config = load_config(config_file(tmp_path, manifest, store, heads='["logreg"]', budgets="[1.0]", seeds="[0, 1]"))
    summary = run_sweep(config)
    text = summary.results_csv.read_text()
    summary.results_csv.write_text(text[: len(text) - 40])  # the machine died mid-write
    assert run_sweep(config).cells_run == 1
    assert len(read_results(summary.results_csv)) == 2


def test_a_changed_protocol_or_head_is_refused_on_resume(tmp_path, study):
    manifest, store = study
    run_sweep(load_config(config_file(tmp_path, manifest, store, heads='["logreg"]', budgets="[1.0]", seeds="[0]")))
    with pytest.raises(MedembedError, match="threshold: 'f1' then, 'youden' now"):
        run_sweep(load_config(config_file(tmp_path, manifest, store, heads='["logreg"]', budgets="[1.0]", seeds="[0]", threshold='"youden"')))
    tweaked = config_file(tmp_path, manifest, store, heads='["logreg"]', budgets="[1.0]", seeds="[0]")
    tweaked.write_text(tweaked.read_text().replace("[[encoders]]", "[head_params.logreg]\nmax_iter = 50\n[[encoders]]"))
    with pytest.raises(MedembedError, match="logreg's rows were computed with"):
        run_sweep(load_config(tweaked))
    # Adding seeds or budgets to the same protocol is a resume, not a change.
    grown = run_sweep(load_config(config_file(tmp_path, manifest, store, heads='["logreg"]', budgets="[0.5, 1.0]", seeds="[0]")))
    assert (grown.cells_run, grown.cells_already_done) == (1, 1)


def test_a_train_split_short_of_a_class_is_noted_not_fitted(tmp_path):
    manifest, store = write_study(tmp_path)
    rows = read_manifest_rows(manifest)
    # Keep one abnormal train image: heads cannot learn from it, and the cell says so.
    abnormal_train = [r["image_id"] for r in rows if r["split"] == "train" and r["label"] == "1"]
    keep = [r for r in rows if not (r["image_id"] in abnormal_train[1:])]
    manifest, store = rewrite(tmp_path / "short", keep)
    summary = run_sweep(load_config(config_file(tmp_path, manifest, store, heads='["logreg"]', budgets="[1.0]", seeds="[0]")))
    [row] = read_results(summary.results_csv)
    assert "only 1 abnormal" in row["note"] and np.isnan(row["study_auroc"])
    assert "not run: the budgeted train rows hold only 1 abnormal" in summary.results_md.read_text()


def test_a_store_from_another_manifest_or_unfinished_is_refused(tmp_path, study):
    manifest, store = study
    rows = read_manifest_rows(manifest)
    for row in rows[:4]:
        row["split"] = "test" if row["split"] != "test" else "train"
    other, _ = rewrite(tmp_path / "other", rows)
    with pytest.raises(MedembedError, match="disagree with .* on split or label"):
        run_sweep(load_config(config_file(tmp_path, other, store)))

    extra = [dict(rows[0], image_id="not_embedded", split="train")] + read_manifest_rows(manifest)
    larger, _ = rewrite(tmp_path / "larger", extra)
    with pytest.raises(MedembedError, match="1 of the manifest's images are neither embedded nor listed as failed"):
        run_sweep(load_config(config_file(tmp_path, larger, store)))


def test_two_sweeps_cannot_write_one_table(tmp_path):
    from medembed.sweep.results import ResultsLog

    with ResultsLog(tmp_path / "out", {"threshold": "f1"}):
        with pytest.raises(MedembedError, match="another sweep is writing"):
            ResultsLog(tmp_path / "out", {"threshold": "f1"})


def read_manifest_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def rewrite(directory: Path, rows: list[dict]) -> tuple[Path, Path]:
    """A manifest of `rows` and a store holding exactly them."""
    return write_study(directory, {column: [row[column] for row in rows] for column in rows[0]})
