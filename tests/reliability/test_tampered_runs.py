"""Fuzzing saved runs: every field of run.json, the scorer's JSON and metrics.json mutated (wrong types, huge or
negative numbers, empty, huge lists and strings, deep nesting, missing keys, names of modules) and loaded through
the library's load path, plus a sample through the entry point. A mutated run either loads and scores finite
probabilities or is refused with one MedembedError; never another exception, never code run."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.scorers.options import FitOptions
from medembed.fit import fit_run
from medembed.runs.inputs import run_inputs
from medembed.protocol.report import compare_table, read_metrics_json
from medembed.runs.record import load_run
from medembed.runs.writer import report_context
from tests.cli.test_entry_point import run_cli
from tests.test_fit import write_store

SENTINEL = "medembed_fuzz_sentinel"
FAST = {"n_resamples": 0}
# kind -> (fit options, the scorer JSON files to mutate, relative to the run directory)
KINDS = {
    "logreg": ({"head": "logreg"}, ["scorer/head.json"]),
    "mlp": ({"head": "mlp", "head_params": {"max_epochs": 3, "hidden": [8]}}, ["scorer/head.json"]),
    "xgboost": ({"head": "xgboost", "head_params": {"n_estimators": 5}}, ["scorer/head.json"]),
    "sklearn": ({"head": "sklearn:sklearn.linear_model.LogisticRegression"}, ["scorer/head.json"]),
    "ensemble": ({"head": "logreg,sklearn:sklearn.linear_model.LogisticRegression", "ensemble": "mean"},
                 ["scorer/ensemble.json", "scorer/member-1/head.json"]),
    "study-pooling": ({"study_pooling": "attention", "head_params": {"max_epochs": 2, "hidden": 8, "attention": 4}},
                      ["scorer/study_pooling.json"]),
}


def _values() -> list[object]:
    """Replacement values for one field: other JSON types, extremes, empties, huge, nested, names of modules."""
    deep: object = 0
    for _ in range(60):
        deep = [deep]
    return [None, True, -1, 10**30, 1e308, "", "x" * 10_000, [], {}, [0.5] * 5_000, deep, f"{SENTINEL}.X",
            f"sklearn.{SENTINEL}.X"]


SKIPPED = {"by_body_part", "reliability", "selection", "seeds"}  # big record-only subtrees no loader reads: their first fields only


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    """Every field path of a JSON document (lists: their first element and the list itself)."""
    paths = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            if prefix and prefix[-1] in SKIPPED and key != next(iter(node)):
                continue
            paths += _paths(value, prefix + (key,))
    elif isinstance(node, list) and node:
        paths += _paths(node[0], prefix + (0,))
    return paths


def _mutations(document: object) -> list[tuple[str, str]]:
    """(description, file text) of every mutation of `document`: each field replaced by each value, or removed;
    plus whole-file ones (not JSON, nested 100,000 deep, empty)."""
    out = [("not JSON", "{"), ("nested 100000 deep", "[" * 100_000 + "]" * 100_000), ("empty file", ""), ("a list", "[]")]
    for path in _paths(document):
        for value in _values() + ["<missing>"]:
            changed = copy.deepcopy(document)
            parent = changed
            for key in path[:-1]:
                parent = parent[key]
            if value == "<missing>":
                if isinstance(parent, list):
                    parent.pop(path[-1])
                else:
                    del parent[path[-1]]
            else:
                parent[path[-1]] = value
            out.append((f"{'.'.join(map(str, path))} = {str(value)[:30]!r}", json.dumps(changed)))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny store, one run of each kind on it, and the sentinel module a mutation must never import."""
    base = tmp_path_factory.mktemp("tampered")
    store = write_store(base / "s.h5", n_patients=24, dim=6)
    runs = {}
    for kind, (options, _) in KINDS.items():
        fit_run([store], base / kind, FitOptions(**options, **FAST))
        runs[kind] = base / kind
    (base / "sentinel").mkdir()
    (base / "sentinel" / f"{SENTINEL}.py").write_text(f"open({str(base / 'sentinel' / 'ran')!r}, 'w').close()\n")
    sys.path.insert(0, str(base / "sentinel"))
    yield base, runs
    sys.path.remove(str(base / "sentinel"))


def _load_and_score(run_dir: Path, rows=None) -> None:
    """The library's load path: load_run, the rows the run scores (from its own inputs unless given), calibrated
    probabilities, the report's context."""
    run = load_run(run_dir)
    rows = rows if rows is not None else run_inputs(run).rows("test")
    p = run.probabilities(rows)
    assert p.shape == (len(rows),) and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all(), p
    report_context(run.record)


def _try(call, what: str, outcomes: dict[str, int], failures: list[str]) -> None:
    try:
        call()
        outcomes["loaded"] += 1
    except MedembedError as error:
        outcomes["refused"] += 1
        if "\n" in str(error) or "unexpected" in str(error)[:20]:
            failures.append(f"{what}: refusal is not one line: {str(error)[:200]!r}")
    except Exception as error:  # noqa: BLE001 - the point: nothing but MedembedError may escape
        failures.append(f"{what}: {type(error).__name__}: {str(error)[:200]}")


def test_every_mutated_field_of_every_run_kind_loads_or_is_refused_in_one_line(saved, tmp_path):
    base, runs = saved
    outcomes, failures = {"loaded": 0, "refused": 0}, []
    for kind, (_, scorer_files) in KINDS.items():
        work = tmp_path / kind
        shutil.copytree(runs[kind], work)
        rows = run_inputs(load_run(work)).rows("test")
        for relative in ["run.json", *scorer_files]:
            if relative == "run.json" and kind not in ("logreg", "ensemble"):
                continue  # one schema for every kind: fuzzed on a head run and an ensemble's (its member stores)
            given = None if relative == "run.json" else rows
            target = work / relative
            original = target.read_text()
            for description, text in _mutations(json.loads(original)):
                target.write_text(text)
                _try(lambda: _load_and_score(work, given), f"{kind} {relative} {description}", outcomes, failures)
                assert SENTINEL not in sys.modules and not (base / "sentinel" / "ran").exists(), f"{kind} {relative} {description} ran code"
            target.write_text(original)
    metrics = runs["logreg"] / "metrics.json"
    work = tmp_path / "compare" / "run"
    work.mkdir(parents=True)
    for description, text in _mutations(json.loads(metrics.read_text())):
        (work / "metrics.json").write_text(text)
        _try(lambda: compare_table({"run": read_metrics_json(work / "metrics.json")}), f"metrics.json {description}", outcomes, failures)
    total = outcomes["loaded"] + outcomes["refused"] + len(failures)
    print(f"\ntampered variants: {total}, loaded and scored: {outcomes['loaded']}, refused in one line: {outcomes['refused']}, "
          f"other exceptions: {len(failures)}, code executed: 0")
    assert not failures, f"{len(failures)} of {total} variants failed otherwise:\n" + "\n".join(failures[:30])
    assert total > 2000


@pytest.mark.parametrize("kind, relative, change", [
    ("sklearn", "scorer/head.json", lambda d: d["params"].update(estimator=f"{SENTINEL}.X")),
    ("logreg", "run.json", lambda d: d.update(fingerprint={"encoder": ["x"]})),
    ("ensemble", "scorer/ensemble.json", lambda d: d["params"].update(heads=[1, 2])),
])
def test_a_sample_of_mutations_through_the_entry_point_is_one_line_exit_2(saved, tmp_path, kind, relative, change):
    base, runs = saved
    work = tmp_path / "run"
    shutil.copytree(runs[kind], work)
    document = json.loads((work / relative).read_text())
    change(document)
    (work / relative).write_text(json.dumps(document))
    done = run_cli("evaluate", work, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert len(done.stderr.splitlines()) == 1 and "unexpected" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (base / "sentinel" / "ran").exists()
