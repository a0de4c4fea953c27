"""Metrics per subgroup of a manifest column, the largest gap, the figure, and the errors."""

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.protocol.splits import Split
from medembed.options.transfer import parse_columns
from medembed.transfer.subgroups import row_column, subgroup_figure, subgroup_metrics


def _rows(site):
    n = len(site)
    ids = np.array([f"i{k}" for k in range(n)])
    y = np.array([0, 1] * (n // 2), dtype=np.int8)
    return Split(None, y, ids, ids, ids, np.full(n, "hand"), False, {"site": np.asarray(site)})


def test_each_group_by_hand_and_the_largest_gap():
    site = ["a"] * 10 + ["b"] * 10 + [""] * 2
    rows = _rows(site)
    # site a: every call right; site b: every abnormal missed (p 0.2 < 0.5), normals right
    p = np.where(rows.y == 1, 0.9, 0.1)
    p[10:20][rows.y[10:20] == 1] = 0.2
    result = subgroup_metrics(p, rows, ["site"], threshold=0.5, n_resamples=50)
    groups = result["site"]["groups"]
    assert set(groups) == {"a", "b"}  # an empty value forms no group
    assert groups["a"]["sensitivity"]["value"] == 1.0 and groups["b"]["sensitivity"]["value"] == 0.0
    assert groups["a"]["n"]["value"] == 10 and groups["b"]["specificity"]["value"] == 1.0
    gap = result["site"]["largest_gap"]["sensitivity"]
    assert (gap["gap"], gap["high"], gap["low"]) == (1.0, "a", "b")
    assert "specificity" in result["site"]["largest_gap"] and result["site"]["largest_gap"]["specificity"]["gap"] == 0.0
    lo, hi = groups["a"]["auroc"]["ci"]
    assert lo <= groups["a"]["auroc"]["value"] <= hi
    assert subgroup_figure(result).axes  # one panel per metric


def test_groups_smaller_than_ten_take_no_part_in_the_gap():
    rows = _rows(["a"] * 10 + ["b"] * 4)
    result = subgroup_metrics(np.where(rows.y == 1, 0.9, 0.1), rows, ["site"], threshold=0.5, n_resamples=0)
    assert result["site"]["largest_gap"] == {} and groups_ci_is_none(result)


def groups_ci_is_none(result):
    return all(m["ci"] is None for g in result["site"]["groups"].values() for m in g.values())


def test_unknown_column_and_repeated_column_are_one_line_errors():
    with pytest.raises(MedembedError, match="--by view: no such column.*body_part, site"):
        row_column(_rows(["a", "b"]), "view")
    with pytest.raises(MedembedError, match="twice"):
        parse_columns("site,site")
    assert parse_columns(" site , sex ") == ["site", "sex"] and parse_columns(None) == []


def test_the_runs_own_evaluation_reports_subgroups(head_run):
    from medembed.evaluate import evaluate_run
    from medembed.options.transfer import TransferOptions

    evaluate_run(head_run, n_resamples=20, transfer=TransferOptions(by="site,body_part"))
    evaluation = head_run / "evaluations" / "test-bootstrap20-by-site-body_part"  # beside the fit's own report
    report = (evaluation / "report.md").read_text()
    assert "### By site" in report and "### By body_part" in report and "## Conformal prediction sets" in report
    assert (evaluation / "figures" / "subgroups.png").is_file()


def test_the_figure_writes_n_per_bar_and_n_a_for_a_group_without_abnormal_images(tmp_path):
    from medembed.transfer.sections import save_subgroup_figure

    site = ["a"] * 10 + ["b"] * 10 + ["c"] * 4
    rows = _rows(site)
    rows.y[20:] = 0  # site c: normal images only, so its AUROC and sensitivity are undefined
    result = subgroup_metrics(np.where(rows.y == 1, 0.9, 0.1), rows, ["site"], threshold=0.5, n_resamples=20)
    auroc_panel = subgroup_figure(result).axes[0]
    texts = [text.get_text() for text in auroc_panel.texts]
    assert texts == ["n/a: no abnormal"]  # drawn as undefined, not as a bar at 0
    assert [label.get_text() for label in auroc_panel.get_xticklabels()] == ["a\nn=10\n5 abn.", "b\nn=10\n5 abn.", "c\nn=4\n0 abn."]
    save_subgroup_figure(tmp_path, result)
    assert sorted(path.name for path in (tmp_path / "figures").iterdir()) == ["subgroups.pdf", "subgroups.png"]
