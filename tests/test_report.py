"""Reports: JSON with nulls, Markdown tables holding the numbers, real PNG figures."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from medembed.errors import MedembedError
from medembed.protocol.metrics import evaluate_predictions, summarize_seeds
from medembed.protocol.figures import plot_figures
from medembed.protocol.report import markdown_report, write_metrics_json


def _leaf(value: float, low: float | None = None, high: float | None = None) -> dict:
    return {"value": value, "ci": None if low is None else [low, high]}


def _result(auroc: float = 0.871) -> dict:
    bootstrap = {"n_resamples": 1000, "seed": 0, "alpha": 0.05}
    return {
        "image": {
            "overall": {"auroc": _leaf(auroc, 0.842, 0.897), "kappa": _leaf(0.61, 0.58, 0.64), "n": _leaf(3000)},
            "by_body_part": {
                "XR_HAND": {
                    "n": _leaf(1200),
                    "n_pos": _leaf(500),
                    "auroc": _leaf(0.9, 0.85, 0.95),
                    "kappa": _leaf(math.nan),
                }
            },
            "bootstrap": {**bootstrap, "unit": "patient"},
        },
        "study": {
            "overall": {"auroc": _leaf(0.912, 0.880, 0.940), "kappa": _leaf(0.7, 0.65, 0.75), "n": _leaf(1000)},
            "by_body_part": {},
            "bootstrap": {**bootstrap, "unit": "patient"},
            "aggregation": "mean",
        },
    }


def test_metrics_json_writes_null_for_nan_with_sorted_keys(tmp_path):
    path = tmp_path / "run" / "metrics.json"
    write_metrics_json({"b": {"value": np.float64("nan"), "ci": (np.float32(0.5), math.inf)}, "a": np.int64(3)}, path)
    text = path.read_text()
    assert json.loads(text) == {"a": 3, "b": {"ci": [0.5, None], "value": None}}
    assert text.index('"a"') < text.index('"b"') and "NaN" not in text
    assert [entry.name for entry in path.parent.iterdir()] == ["metrics.json"]  # no temporary file left behind


def test_markdown_report_tabulates_levels_body_parts_and_context():
    text = markdown_report(
        _result(),
        title="MURA, logreg",
        context={
            "store fingerprint": "3f2a9c",
            "threshold rule": "kappa",
            "threshold": 0.43217,
            "split sizes": {"train": 30000, "val": 6000},
        },
    )
    assert text.startswith("# MURA, logreg\n")
    assert "| Metric | Image level | Study level |" in text
    assert "| AUROC | 0.871 [0.842, 0.897] | 0.912 [0.880, 0.940] |" in text
    assert "| Cohen's kappa | 0.610 [0.580, 0.640] | 0.700 [0.650, 0.750] |" in text
    assert "| n | 3000 | 1000 |" in text
    assert "resamples of patients at image level and patients at study level]." in text
    assert "Study probability: the mean of its images' probabilities." in text
    assert "## Per body part, image level" in text and "Per body part, study level" not in text
    assert "| XR_HAND | 1200 | 500 | 0.900 [0.850, 0.950] |  | n/a |" in text
    assert "- **store fingerprint**: 3f2a9c" in text and "- **threshold**: 0.4322" in text
    assert "- **split sizes**: train 30000, val 6000" in text


def test_markdown_report_of_seeds_shows_mean_and_sd():
    text = markdown_report(summarize_seeds([_result(0.8), _result(0.9)]), title="seeds", context={})
    assert "| AUROC | 0.850 ± 0.071 | 0.912 ± 0.000 |" in text
    assert "| n | 3000 | 1000 |" in text
    assert "mean ± sd over 2 seeds" in text


def test_a_run_of_several_seeds_heads_its_report_with_the_mean_and_sd_and_the_first_seeds_interval():
    run = {**_result(0.8), "over_seeds": {**summarize_seeds([_result(0.8), _result(0.9)]), "seeds": [3, 4]}}
    text = markdown_report(run, title="seeds", context={})
    assert "| AUROC | 0.850 ± 0.071 (seed 3: 0.800 [0.842, 0.897]) | 0.912 ± 0.000 (seed 3: 0.912 [0.880, 0.940]) |" in text
    assert "| n | 3000 | 1000 |" in text  # counts do not vary over seeds
    assert "mean ± sd over 2 seeds (3, 4); in parentheses seed 3's point estimate [95% percentile" in text
    assert "## Every seed" in text and "| 3 | 0.800 | 0.610 | 0.912 | 0.700 |" in text and "| 4 | 0.900 |" in text
    assert "## Per body part, image level (seed 3)" in text
    # metrics.json of runs written before the seeds were recorded: the first seed is named as such
    older = {**_result(0.8), "over_seeds": summarize_seeds([_result(0.8), _result(0.9)])}
    assert "| AUROC | 0.850 ± 0.071 (first seed: 0.800 [0.842, 0.897]) |" in markdown_report(older, title="old", context={})


def test_cells_print_intervals_in_brackets_with_a_real_minus_sign():
    from medembed.protocol.report import format_cell

    assert format_cell(_leaf(0.159, -0.132, 0.445), "kappa") == "0.159 [\u2212" "0.132, 0.445]"
    assert format_cell(_leaf(-0.0004, -0.2, 0.1), "kappa") == "0.000 [\u22120.200, 0.100]"  # no sign on a rounded zero
    assert format_cell(_leaf(0.5, None, None), "auroc") == "0.500" and format_cell(_leaf(None), "auroc") == "n/a"
    assert format_cell({"value": 0.7, "ci": [None, None]}, "auroc") == "0.700"


def test_markdown_report_needs_a_level():
    with pytest.raises(MedembedError, match="no image or study level"):
        markdown_report({"bootstrap": {}}, title="x", context={})


def _scores(n: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    p = np.clip(0.4 * y + 0.6 * rng.random(n), 0, 1)
    parts = np.array(["XR_HAND", "XR_WRIST", "XR_SHOULDER"])[np.arange(n) % 3]
    return y, p, parts


def test_plot_figures_writes_real_pngs(tmp_path):
    y, p, parts = _scores()
    result = evaluate_predictions(y, p, 0.5, body_parts=parts, n_resamples=50)
    paths = plot_figures(y, p, 0.5, tmp_path, level="image", body_parts=parts, result=result)
    assert sorted(path.name for path in paths) == [
        "body_parts_image.png",
        "pr_image.png",
        "reliability_image.png",
        "roc_image.png",
        "thresholds_image.png",
    ]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width == 1050 and round(image.info["dpi"][0]) == 300  # 3.5 in at 300 dpi
            assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn
        assert path.with_suffix(".pdf").read_bytes().startswith(b"%PDF-")  # and the vector copy beside it


def test_plot_figures_without_body_parts_skips_the_bar_chart(tmp_path):
    y, p, _ = _scores()
    names = [path.name for path in plot_figures(y, p, 0.4, tmp_path, level="study")]
    assert names == ["roc_study.png", "pr_study.png", "reliability_study.png", "thresholds_study.png"]


def test_plot_figures_refuses_one_class_and_unknown_levels(tmp_path):
    with pytest.raises(MedembedError, match="only one class"):
        plot_figures(np.zeros(5, int), np.linspace(0, 1, 5), 0.5, tmp_path, level="image")
    with pytest.raises(MedembedError, match="unknown level"):
        plot_figures(np.array([0, 1]), np.array([0.2, 0.7]), 0.5, tmp_path, level="patient")


def test_reports_accept_a_result_reloaded_from_metrics_json(tmp_path):
    y, p, parts = _scores(90)
    y[parts == "XR_SHOULDER"] = 1  # one class in a body part: its AUROC and interval are NaN, stored as null
    result = evaluate_predictions(y, p, 0.5, body_parts=parts, n_resamples=20)
    write_metrics_json(result, tmp_path / "metrics.json")
    reloaded = json.loads((tmp_path / "metrics.json").read_text())
    assert reloaded["image"]["by_body_part"]["XR_SHOULDER"]["auroc"] == {"value": None, "ci": [None, None]}
    assert "| XR_SHOULDER | 30 | 30 | n/a |" in markdown_report(reloaded, title="reloaded", context={})
    for result_or_level in (reloaded, reloaded["image"]):  # a whole result or just the level's entry
        paths = plot_figures(y, p, 0.5, tmp_path / "figures", level="image", result=result_or_level)
        assert (tmp_path / "figures" / "body_parts_image.png") in paths


def test_body_part_figure_draws_an_interval_that_excludes_its_point_estimate(tmp_path):
    # A percentile bootstrap interval can lie wholly above (or below) its point estimate: few resamples of a
    # skewed metric. Drawn as distances from the bar's top these were negative and matplotlib refused them.
    from medembed.protocol.figures import _body_part_figure

    result = _result()
    parts = result["image"]["by_body_part"]
    parts["XR_HAND"]["auroc"] = _leaf(0.62, 0.70, 0.85)  # interval above the point
    parts["XR_WRIST"] = {**parts["XR_HAND"], "auroc": _leaf(0.80, 0.55, 0.71)}  # interval below the point
    parts["XR_ELBOW"] = {**parts["XR_HAND"], "auroc": _leaf(None, None, None)}  # undefined: a bar of 0, no interval
    y, p, _ = _scores()
    paths = plot_figures(y, p, 0.5, tmp_path, level="image", result=result)
    assert tmp_path / "body_parts_image.png" in paths
    figure = _body_part_figure({"XR_HAND": (0.62, 0.70, 0.85), "XR_WRIST": (0.80, 0.55, 0.71)}, "image")
    (bars,) = figure.axes[0].containers[1:]  # the bars, then the interval lines
    segments = bars.lines[2][0].get_segments()
    assert np.allclose([seg[:, 1] for seg in segments], [[0.70, 0.85], [0.55, 0.71]])


def test_a_figure_that_cannot_be_written_is_a_warning_and_the_others_are_written(tmp_path):
    from medembed.protocol.figures import FigureWarning

    y, p, parts = _scores()
    (tmp_path / "roc_image.png").mkdir()  # savefig cannot write over a folder
    with pytest.warns(FigureWarning, match="roc_image.png: figure not drawn"):
        paths = plot_figures(y, p, 0.5, tmp_path, level="image", body_parts=parts)
    assert [path.name for path in paths] == ["pr_image.png", "reliability_image.png", "thresholds_image.png", "body_parts_image.png"]


def test_fit_with_intervals_that_exclude_their_point_writes_every_figure(tmp_path):
    # Issue 18: `fit --head sklearn:sklearn.svm.SVC --bootstrap 10` failed in the body-part figure. This store's
    # wrist AUROC (0.94) lies below its 10-resample interval; the premise is checked below.
    import subprocess

    from tests.cli.test_entry_point import run_cli
    from tests.test_fit import write_store

    def weak_signal(ids, emb, cols):
        emb[:] = np.random.default_rng(39).standard_normal(emb.shape) + 0.5 * np.asarray(cols["label"])[:, None]

    store = write_store(tmp_path / "s.h5", corrupt=weak_signal)
    done: subprocess.CompletedProcess = run_cli("fit", store, "--head", "sklearn:sklearn.svm.SVC", "--bootstrap", "10", "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    assert "figure not drawn" not in done.stderr and "Traceback" not in done.stderr  # (the small-val warning may be there)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    leaves = [table["auroc"] for level in ("image", "study") for table in metrics[level]["by_body_part"].values()]
    assert any(not leaf["ci"][0] <= leaf["value"] <= leaf["ci"][1] for leaf in leaves), "premise: an interval excludes its point"
    assert {path.name for path in (tmp_path / "run" / "figures").glob("body_parts_*.png")} == {"body_parts_image.png", "body_parts_study.png"}


@pytest.mark.parametrize("over_seeds, message", [
    ("x", "over_seeds must be an object"),
    ({"image": {"overall": {"auroc": {"mean": "high", "sd": 0.1, "n_seeds": 2}}}}, "over_seeds.image.overall.auroc: a seed summary"),
    ({"image": {"overall": {"auroc": {"mean": 0.8, "sd": 0.1, "n_seeds": 2, "values": ["a"]}}}}, "values must be a list of numbers"),
    ({"image": {"overall": {"auroc": {"mean": 0.8, "sd": 0.1, "n_seeds": 2}}}, "seeds": [0, "1"]}, "seeds must be a non-empty list of integers"),
])
def test_a_tampered_seed_summary_is_refused_in_one_line(tmp_path, over_seeds, message):
    from medembed.protocol.report import read_metrics_json

    write_metrics_json({**_result(), "over_seeds": over_seeds}, tmp_path / "metrics.json")
    with pytest.raises(MedembedError, match=message):
        read_metrics_json(tmp_path / "metrics.json")
