"""The sweep report: seed summaries per cell, Markdown tables, figures that open."""

import math

import pytest
from PIL import Image

from medembed.sweep.report import heads_encoders_figure, learning_curve_figure, percent, summarize_cells


def row(encoder, head, budget, seed, auroc, kappa, images, note=""):
    return {"encoder": encoder, "head": head, "budget": budget, "seed": seed, "study_auroc": auroc, "study_kappa": kappa, "train_images": images, "note": note}


ROWS = [
    row("enc", "logreg", 1.0, 0, 0.80, 0.40, 100),
    row("enc", "logreg", 1.0, 1, 0.90, 0.50, 100),
    row("enc", "logreg", 0.1, 0, 0.60, 0.20, 10),
    row("enc", "logreg", 0.1, 1, 0.70, 0.30, 12),
    row("enc", "mlp", 0.1, 0, math.nan, math.nan, 11, note="only 1 abnormal"),
    row("cnn", "finetune", 1.0, 0, 0.85, 0.45, 100),
]


def test_cells_are_summarised_over_seeds_leaving_out_cells_that_did_not_run():
    summary = summarize_cells(ROWS)
    assert set(summary) == {("enc", "logreg", 1.0), ("enc", "logreg", 0.1), ("cnn", "finetune", 1.0)}
    full = summary[("enc", "logreg", 1.0)]
    assert full["auroc"]["mean"] == pytest.approx(0.85) and full["auroc"]["sd"] == pytest.approx(0.0707107, rel=1e-5)
    assert full["auroc"]["n_seeds"] == 2 and full["kappa"]["values"] == [0.4, 0.5]
    assert summary[("enc", "logreg", 0.1)]["train_images"]["mean"] == 11
    assert summary[("cnn", "finetune", 1.0)]["auroc"]["n_seeds"] == 1


def test_figures_draw_every_series(tmp_path):
    summary = summarize_cells(ROWS)
    for name, figure in (("curve.png", learning_curve_figure(summary)), ("bars.png", heads_encoders_figure(summary))):
        figure.savefig(tmp_path / name)
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 500
    curve_axes = learning_curve_figure(summary).axes[0]
    assert sorted(line.get_label() for line in curve_axes.get_lines()) == ["cnn · finetune", "enc · logreg"]


def test_budgets_read_as_percentages():
    assert [percent(b) for b in (0.01, 0.125, 1.0)] == ["1%", "12.5%", "100%"]


def test_sweep_cells_read_as_a_multi_seed_runs_headline():
    """mean ± sd with the first seed's interval beside it, as fit, report.md and compare show a run of several seeds."""
    from medembed.sweep.report import _cell_text

    rows = [dict(r, study_auroc_low=r["study_auroc"] - 0.1, study_auroc_high=r["study_auroc"] + 0.05) for r in ROWS]
    summary = summarize_cells(rows)
    assert _cell_text(summary[("enc", "logreg", 1.0)]["auroc"], "auroc") == "0.850 ± 0.071 (seed 0: 0.800 [0.700, 0.850])"
    assert _cell_text(summary[("cnn", "finetune", 1.0)]["auroc"], "auroc") == "0.850 [0.750, 0.900]"  # one seed: no sd
    assert _cell_text(summary[("enc", "logreg", 1.0)]["kappa"], "kappa") == "0.450 ± 0.071 (seed 0: 0.400)"  # no interval in the rows
    assert _cell_text(None, "auroc") == "—"
