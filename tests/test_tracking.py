"""MLflow tracking against a real local tracking store in tmp (read back with MLflow's own client), a failing store,
and MLflow absent (blocked in the subprocess): --track is then one line, MLFLOW_TRACKING_URI alone changes nothing."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medembed.options.tracking import TrackingOptions
from medembed.tracking import metric_values, track_run
from tests.conftest import REPO
from tests.sweep.conftest import sweep_toml, write_study
from tests.test_fit import write_store

NEEDS_MLFLOW = "MLflow is not installed: pip install 'medembed[tracking]' (the dev extra has it) to run the tracking tests"
BLOCK_MLFLOW = "import sys; sys.modules['mlflow'] = None; from cli.main import main; main(sys.argv[1:])"  # import mlflow -> ImportError


def medembed(*args, env=None, block_mlflow=False):
    """The CLI of this checkout in a subprocess, with `env` added to the environment (and mlflow unimportable)."""
    command = [sys.executable, "-c", BLOCK_MLFLOW] if block_mlflow else [sys.executable, "-m", "cli.main"]
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | (env or {})
    return subprocess.run([*command, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300, env=environment)


def client_for(uri):
    mlflow = pytest.importorskip("mlflow", reason=NEEDS_MLFLOW)
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return mlflow.MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A fit tracked through MLFLOW_TRACKING_URI, then an evaluate tracked through --track-uri, into one file store."""
    pytest.importorskip("mlflow", reason=NEEDS_MLFLOW)
    folder = tmp_path_factory.mktemp("tracking")
    store = write_store(folder / "s.h5")
    uri = (folder / "mlruns").as_uri()
    fit = medembed("fit", store, "--head", "logreg", "--bootstrap", "30", "--out", folder / "run", env={"MLFLOW_TRACKING_URI": uri})
    assert fit.returncode == 0, fit.stderr[-2000:]
    evaluate = medembed("evaluate", folder / "run", "--bootstrap", "20", "--track", "--track-uri", uri, "--track-experiment", "evals")
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    return folder, uri, fit, evaluate


def test_fit_logs_options_metrics_with_bounds_figures_and_the_run_directory(tracked):
    folder, uri, fit, _ = tracked
    client = client_for(uri)
    experiment = client.get_experiment_by_name("medembed")
    (run,) = client.search_runs([experiment.experiment_id])
    assert f"tracked in MLflow: run {run.info.run_id}" in fit.stdout and run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert params["options.head"] == "logreg" and params["options.n_resamples"] == "30" and params["kind"] == "head"
    assert params["versions.numpy"] and run.data.tags["medembed.command"].startswith("medembed fit ")
    written = json.loads((folder / "run" / "metrics.json").read_text())["study"]["overall"]["auroc"]
    assert metrics["study.auroc"] == pytest.approx(written["value"])
    assert (metrics["study.auroc.ci_low"], metrics["study.auroc.ci_high"]) == pytest.approx(tuple(written["ci"]))
    assert "image.by_body_part.wrist.auroc" in metrics
    figures = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "figures")}
    assert "roc_study.png" in figures
    files = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "run")}
    assert {"run.json", "metrics.json", "report.md", "predictions.csv"} <= files


def test_evaluate_logs_into_its_experiment_with_what_was_asked(tracked):
    _, uri, _, evaluate = tracked
    client = client_for(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("evals").experiment_id])
    assert f"tracked in MLflow: run {run.info.run_id}, experiment 'evals'" in evaluate.stdout
    assert run.data.tags["medembed.kind"] == "evaluate" and run.data.params["evaluate.bootstrap"] == "20"
    assert "image.auroc.ci_low" in run.data.metrics
    written = Path(run.data.params["evaluate.written"])  # the evaluation's own folder, beside the fit's results
    assert written.parent.name == "evaluations" and (written / "report.md").is_file()
    assert {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "figures")} == {p.name for p in (written / "figures").iterdir()}


def test_evaluate_on_another_store_logs_its_metrics_and_drift(tracked):
    folder, uri, _, _ = tracked
    target = write_store(folder / "other-site.h5")
    evaluate = medembed("evaluate", folder / "run", "--on", target, "--bootstrap", "20", "--track", "--track-uri", uri, "--track-experiment", "external")
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    client = client_for(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("external").experiment_id])
    assert f"tracked in MLflow: run {run.info.run_id}, experiment 'external'" in evaluate.stdout
    assert run.data.tags["medembed.kind"] == "evaluate-on" and run.data.params["evaluate.on"] == str(target)
    written = json.loads((Path(run.data.params["evaluate.written"]) / "external.json").read_text())
    assert run.data.metrics["study.auroc"] == pytest.approx(written["metrics"]["study"]["overall"]["auroc"]["value"])
    assert run.data.metrics["drift.target_called_abnormal"] == pytest.approx(written["drift"]["prevalence"]["target_called_abnormal"])


def test_sweep_logs_a_parent_run_and_one_nested_run_per_cell(tmp_path):
    pytest.importorskip("mlflow", reason=NEEDS_MLFLOW)
    manifest, store = write_study(tmp_path / "study")
    config = tmp_path / "sweep.toml"
    config.write_text(sweep_toml(manifest, store, tmp_path / "out", heads='["logreg"]', budgets="[1.0]", seeds="[0, 1]"))
    uri = (tmp_path / "mlruns").as_uri()
    done = medembed("sweep", config, "--track-uri", uri)
    assert done.returncode == 0, done.stderr[-2000:]
    client = client_for(uri)
    runs = client.search_runs([client.get_experiment_by_name("medembed").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("medembed.kind") == "sweep"]
    cells = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(cells) == 2 and {c.data.params["seed"] for c in cells} == {"0", "1"}
    assert all({"study_auroc", "study_auroc_low", "study_auroc_high"} <= set(c.data.metrics) for c in cells)
    assert {Path(f.path).name for f in client.list_artifacts(parent.info.run_id, "sweep")} >= {"results.csv", "results.md"}


def closed_port() -> int:
    with socket.socket() as s:  # bound then released: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("where", ["file-under-a-file", "unreachable-server"])
def test_a_tracking_failure_is_one_warning_and_the_run_directory_stays(tmp_path, monkeypatch, where):
    pytest.importorskip("mlflow", reason=NEEDS_MLFLOW)
    store = write_store(tmp_path / "s.h5")
    done = medembed("fit", store, "--head", "logreg", "--bootstrap", "0", "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-2000:]
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    (tmp_path / "a-file").write_text("not a folder")
    uri = (tmp_path / "a-file" / "mlruns").as_uri() if where == "file-under-a-file" else f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    with pytest.warns(UserWarning) as caught:
        assert track_run(TrackingOptions(tracking_uri=uri), tmp_path / "run", metrics, "fit") is None
    (warning,) = [str(w.message) for w in caught if "MLflow tracking" in str(w.message)]
    assert warning.startswith(f"MLflow tracking to {uri} failed (") and warning.endswith(f"{tmp_path / 'run'} is written and unaffected")
    assert "\n" not in warning
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_without_mlflow_track_is_one_line_and_the_environment_alone_changes_nothing(tmp_path):
    store = write_store(tmp_path / "s.h5")
    done = medembed("fit", store, "--head", "logreg", "--bootstrap", "0", "--track", "--out", tmp_path / "run", block_mlflow=True)
    assert done.returncode == 2 and not (tmp_path / "run").exists()
    assert done.stderr.strip().splitlines() == ["error: --track logs to MLflow, which is not installed: pip install 'medembed[tracking]'"]
    env = {"MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()}
    done = medembed("fit", store, "--head", "logreg", "--bootstrap", "0", "--out", tmp_path / "run", env=env, block_mlflow=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MLflow" not in done.stdout + done.stderr and not (tmp_path / "mlruns").exists()
    assert (tmp_path / "run" / "run.json").is_file()


def test_metric_names_carry_interval_bounds_and_seed_summaries():
    metrics = {
        "image": {"overall": {"auroc": {"value": 0.8, "ci": [0.7, 0.9]}, "ppv": {"value": float("nan"), "ci": None}}},
        "over_seeds": {"image": {"overall": {"auroc": {"mean": 0.75, "sd": 0.05, "n_seeds": 3, "values": [0.7, 0.8, 0.75]}}}},
    }
    assert metric_values(metrics) == {
        "image.auroc": 0.8, "image.auroc.ci_low": 0.7, "image.auroc.ci_high": 0.9,
        "over_seeds.image.auroc.mean": 0.75, "over_seeds.image.auroc.sd": 0.05,
    }
