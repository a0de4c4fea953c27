"""Figures a paper can take: both formats at 300 dpi, titles naming the run and n, n per bar, "n/a" drawn as
such, reliability bins that follow the sample size, learning-curve axes at the real budgets, bands in legends."""

import math

import numpy as np
import pytest
from PIL import Image

from medembed.protocol.calibrate import sweep_thresholds
from medembed.protocol.figures import (
    FigureContext,
    PartBar,
    _body_part_figure,
    _reliability_figure,
    _roc_figure,
    plot_figures,
    quantile_bins,
    reliability_bin_count,
    wilson_interval,
)
from medembed.protocol.metrics import binary_metrics, evaluate_predictions


def _scores(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(0.4 * y + 0.6 * rng.random(n), 0, 1)


def test_every_figure_is_a_300_dpi_png_and_a_pdf_with_no_creation_date(tmp_path):
    y, p = _scores()
    parts = np.array(["hand", "hip"])[np.arange(len(y)) % 2]
    paths = plot_figures(y, p, 0.5, tmp_path, level="study", body_parts=parts, context=FigureContext("r", "logreg", "enc"))
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([x.name for x in paths] + [x.with_suffix(".pdf").name for x in paths])
    for path in paths:
        with Image.open(path) as image:
            assert round(image.info["dpi"][0]) == 300 and image.width == 1050
        pdf = path.with_suffix(".pdf").read_bytes()
        assert pdf.startswith(b"%PDF-") and b"CreationDate" not in pdf


def test_titles_name_the_run_scorer_encoder_and_n():
    y, p = _scores(120)
    assert FigureContext("frac-mlp", "mlp", "efficientnet-lite0").heading() == "run frac-mlp · mlp on efficientnet-lite0"
    assert FigureContext().heading() == "" and FigureContext(scorer="logreg").heading() == "logreg"
    from medembed.protocol.figures import _count_phrase, _with_heading

    title = f"ROC, study level\n{_count_phrase(120, int(y.sum()), 'study')}"
    figure = _with_heading(lambda: _roc_figure(sweep_thresholds(y, p), binary_metrics(y, p, 0.5), title), "run frac-mlp · mlp")()
    assert figure.get_suptitle() == "run frac-mlp · mlp"
    assert figure.axes[0].get_title() == f"ROC, study level\nn = 120 studies ({int(y.sum())} abnormal)"


def test_body_part_bars_write_n_under_each_and_n_a_where_auroc_is_undefined():
    bars = {
        "hand": PartBar(0.9, 0.85, 0.95, 40, 12),
        "hip": PartBar(math.nan, math.nan, math.nan, 30, 0),  # no abnormal: AUROC undefined
        "leg": PartBar(math.nan, math.nan, math.nan, 20, 20),  # no normal
        "knee": PartBar(0.0, 0.0, 0.1, 25, 5),  # a real 0.000: a bar of height 0, not "n/a"
    }
    axes = _body_part_figure(bars, "image", "95% bootstrap interval", "t").axes[0]
    labels = [tick.get_text() for tick in axes.get_xticklabels()]
    assert labels == ["hand\nn=40\n12 abn.", "hip\nn=30\n0 abn.", "leg\nn=20\n20 abn.", "knee\nn=25\n5 abn."]
    texts = [text.get_text() for text in axes.texts]
    assert texts == ["n/a: no abnormal", "n/a: no normal"]
    filled = [patch for patch in axes.patches if patch.get_facecolor()[3] > 0]  # the blue value bars
    assert [round(patch.get_height(), 3) for patch in filled] == [0.9, 0.0]
    assert [round(patch.get_x() + patch.get_width() / 2) for patch in filled] == [0, 3]  # hand and knee
    assert "95% bootstrap interval" in [text.get_text() for text in axes.get_legend().get_texts()]


def test_body_part_bars_from_a_result_carry_its_counts_and_interval_kind(tmp_path):
    y, p = _scores(200)
    parts = np.array(["hand", "hip"])[np.arange(200) % 2]
    y[parts == "hip"] = 0
    result = evaluate_predictions(y, p, 0.5, body_parts=parts, n_resamples=20)
    from medembed.protocol.figures import _body_part_auroc

    bars, band = _body_part_auroc(y, p, 0.5, None, result, "image")
    assert bars["hip"].n == 100 and bars["hip"].n_pos == 0 and math.isnan(bars["hip"].value)
    assert bars["hand"].n == 100 and bars["hand"].n_pos == int(y[parts == "hand"].sum())
    assert band == "95% bootstrap interval\n(20 resamples of images)"


@pytest.mark.parametrize("n, bins", [(40, 3), (300, 6), (520, 10), (5000, 15)])
def test_reliability_bins_follow_the_sample_size(n, bins):
    assert reliability_bin_count(n) == bins
    y, p = _scores(n, seed=n)
    table = quantile_bins(y, p, bins)
    assert len(table["count"]) == bins and table["count"].sum() == n
    assert table["count"].max() - table["count"].min() <= 2  # equal-count (up to ties and rounding)
    assert np.all(table["low"] <= table["frac_pos"] + 1e-12) and np.all(table["frac_pos"] <= table["high"] + 1e-12)


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson_interval(np.array([0.5, 0.0]), np.array([20.0, 10.0]))
    assert low[0] == pytest.approx(0.2993, abs=1e-4) and high[0] == pytest.approx(0.7007, abs=1e-4)
    assert low[1] == 0 and high[1] == pytest.approx(0.2775, abs=1e-4)


def test_reliability_legend_says_which_bins_and_intervals():
    y, p = _scores(300)
    figure = _reliability_figure(y, p, binary_metrics(y, p, 0.5), "t", "image")
    legend = " ".join(text.get_text() for text in figure.axes[0].get_legend().get_texts())
    assert "6 equal-count bins (~50 images each)" in legend and "95% Wilson interval per bin" in legend
    assert "15 equal-width bins" in legend  # the ECE's own bins, said apart


def test_learning_curve_is_ticked_at_the_real_budgets_and_its_band_explained():
    from medembed.sweep.report import heads_encoders_figure, learning_curve_figure, summarize_cells
    from tests.sweep.test_report import ROWS

    summary = summarize_cells(ROWS)
    figure = learning_curve_figure(summary)
    axes = figure.axes[0]
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["11\n(10%)", "100\n(100%)"]
    assert list(axes.get_xticks()) == [11, 100]
    assert "band: ± 1 sd over 2 seeds" in [text.get_text() for text in figure.legends[0].get_texts()]
    bars = heads_encoders_figure(summary)
    assert "n/a" in [text.get_text() for text in bars.axes[0].texts]  # cnn has no logreg cell: said, not a 0 bar
    assert "error bar: ± 1 sd over seeds" in [text.get_text() for text in bars.legends[0].get_texts()]
