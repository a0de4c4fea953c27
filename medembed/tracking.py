"""Experiment tracking with MLflow, optional: `pip install 'medembed[tracking]'`, then `--track` (or
MLFLOW_TRACKING_URI set) on `fit`, `evaluate` and `sweep`.

What one MLflow run holds, for a run directory (`track_run`):
    params     the run's options (options.*, head_params flattened), kind, scorer, encoder, stores, library versions
    tags       medembed.kind, medembed.directory, the command line, the git commit (from run.json's provenance)
    metrics    every {"value", "ci"} of the metrics as `<level>.<metric>` plus `<...>.ci_low` / `<...>.ci_high`
               (per body part and subgroup too), and a multi-seed run's `<...>.mean` / `<...>.sd`
    artifacts  figures/ (the run's figures, or the evaluation's) and run/ (the whole run directory)
A sweep (`track_sweep`) is one parent run (its config as params, results.csv/md and figures as artifacts) with one
nested run per results row (encoder, head, budget, seed; its metrics and interval bounds).

The run directory is written before anything is tracked, and a tracking failure (server unreachable, a store that
cannot be written) is one warning line: the run directory stays as written. Without MLflow installed nothing
changes, unless --track asked for it (`check_tracking`: one MedembedError before any work). MLflow is imported
only here, inside the functions, and only when tracking is on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medembed.errors import MedembedError
from medembed.options.tracking import TrackingOptions

INSTALL = "pip install 'medembed[tracking]'"
_KEY = re.compile(r"[^\w\-. /]")  # the characters MLflow accepts in param and metric names
_MAX_PARAM = 6000  # MLflow's longest param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
_MAX_BATCH = 100  # params per log_batch request (MAX_PARAMS_TAGS_PER_BATCH)
_MAX_METRICS = 1000  # metrics per log_batch request (MAX_METRICS_PER_BATCH)
HTTP_RETRIES = 3  # retries of a tracking server that does not answer (backoff 2, 4, 8 s), unless MLFLOW_HTTP_REQUEST_MAX_RETRIES is set


def check_tracking(options: TrackingOptions | None) -> None:
    """Before any work: --track (or --track-uri) without MLflow installed is one MedembedError saying how to get it."""
    if options is None or not options.asked:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise MedembedError(f"--track logs to MLflow, which is not installed: {INSTALL}") from None


def _client(options: TrackingOptions) -> tuple[Any, str]:
    """An MlflowClient on the options' tracking URI and the id of its experiment (created on first use)."""
    from mlflow import MlflowClient

    uri = options.uri
    if "://" not in uri and not uri.startswith("file:"):  # a plain path: MLflow's file store there
        uri = Path(uri).resolve().as_uri()
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store in maintenance mode and refuses it unless allowed; a local folder is what
        # a user without a server asked for (set MLFLOW_ALLOW_FILE_STORE=false to keep MLflow's refusal).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if uri.startswith(("http://", "https://")):
        # MLflow retries an unreachable server 7 times with exponential backoff (minutes) before it fails; a run is
        # already written when it is tracked, so fail sooner unless the user chose otherwise.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(HTTP_RETRIES))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(options.experiment)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(options.experiment)
    return client, experiment_id


def _key(name: str) -> str:
    return _KEY.sub("_", name)[:250]


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every leaf of nested dicts (lists and other leaves as they are)."""
    if isinstance(value, dict) and value:
        for name, item in value.items():
            yield from _flatten(f"{prefix}.{name}" if prefix else str(name), item)
    else:
        yield prefix, value


def param_values(params: dict[str, Any]) -> dict[str, str]:
    """MLflow params (text, at most 6000 characters) from nested option values."""
    flat = {}
    for name, value in _flatten("", params):
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[_key(name)] = text[:_MAX_PARAM]
    return flat


def metric_values(metrics: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics from medembed's metrics document: each {"value", "ci"} leaf as name, name.ci_low and
    name.ci_high; each over-seeds {"mean", "sd"} leaf as name.mean and name.sd (names drop the "overall" level:
    image.auroc). Non-finite values (a metric with no positives) are left out."""
    found: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[_key(name)] = float(value)

    def walk(prefix: str, node: Any) -> None:
        if not isinstance(node, dict):
            return
        if "value" in node and not isinstance(node["value"], dict):
            put(prefix, node["value"])
            ci = node.get("ci")
            if isinstance(ci, (list, tuple)) and len(ci) == 2:
                put(f"{prefix}.ci_low", ci[0])
                put(f"{prefix}.ci_high", ci[1])
            return
        if "mean" in node and "sd" in node:
            put(f"{prefix}.mean", node["mean"])
            put(f"{prefix}.sd", node["sd"])
            return
        for name, child in node.items():
            if name == "overall":
                walk(prefix, child)
            else:
                walk(f"{prefix}.{name}" if prefix else str(name), child)

    walk("", metrics)
    return found


def _log(client: Any, run_id: str, params: dict[str, str], metrics: dict[str, float], tags: dict[str, str]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    stamp = int(time.time() * 1000)
    params_list = [Param(k, v) for k, v in params.items()]
    tags_list = [RunTag(_key(k), str(v)[:_MAX_PARAM]) for k, v in tags.items()]
    for start in range(0, len(params_list), _MAX_BATCH):
        client.log_batch(run_id, params=params_list[start:start + _MAX_BATCH])
    for start in range(0, len(tags_list), _MAX_BATCH):
        client.log_batch(run_id, tags=tags_list[start:start + _MAX_BATCH])
    metric_list = [Metric(k, v, stamp, 0) for k, v in metrics.items()]
    for start in range(0, len(metric_list), _MAX_METRICS):
        client.log_batch(run_id, metrics=metric_list[start:start + _MAX_METRICS])


def _warn_failed(options: TrackingOptions, error: BaseException, directory: Path) -> None:
    reason = " ".join(str(error).split())[:300] or type(error).__name__
    warnings.warn(f"MLflow tracking to {options.uri} failed ({type(error).__name__}: {reason}); "
                  f"{directory} is written and unaffected", stacklevel=3)


def track_run(options: TrackingOptions | None, directory: Path, metrics: dict[str, Any], kind: str,
              params: dict[str, Any] | None = None, figures: Path | None = None) -> str | None:
    """Log the written run directory `directory` (its run.json's options and provenance), `metrics` (a metrics
    document), `params` (what this command was asked on top of the run's options) and the figures of `figures`
    (default: the run's figures/; an evaluation's own folder for `evaluate`) as one MLflow run named after the
    directory. Returns the MLflow run id; None when tracking is off, MLflow is not installed, or it failed
    (then one warning line)."""
    if options is None or not options.enabled:
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return None  # MLFLOW_TRACKING_URI set, MLflow absent: nothing changes
    directory = Path(directory)
    run_id, client = None, None
    try:
        from medembed.runs.record import read_record

        record = read_record(directory)
        provenance = record.provenance
        logged = {
            "kind": record.kind, "scorer": record.scorer, "encoder": record.fingerprint.get("encoder", ""),
            "model_id": record.fingerprint.get("model_id", ""), "inputs": record.inputs,
            "options": dataclasses.asdict(record.options), "versions": provenance.get("versions", {}), **(params or {}),
        }
        tags = {"medembed.kind": kind, "medembed.directory": str(directory.resolve())}
        invocation = provenance.get("invocation", {})
        if "argv" in invocation:
            tags["medembed.command"] = " ".join(invocation["argv"])
        if "git" in provenance:
            tags["medembed.git_commit"] = provenance["git"].get("commit", "") + (" (dirty)" if provenance["git"].get("dirty") else "")
        client, experiment_id = _client(options)
        run_id = client.create_run(experiment_id, run_name=f"{directory.name} ({kind})", tags={"mlflow.source.name": "medembed"}).info.run_id
        _log(client, run_id, param_values(logged), metric_values(metrics), tags)
        figures = Path(figures) if figures is not None else directory / "figures"
        if figures.is_dir():
            client.log_artifacts(run_id, str(figures), "figures")
        client.log_artifacts(run_id, str(directory), "run")
        client.set_terminated(run_id)
        return run_id
    except Exception as error:  # tracking is an extra: never lose or fail the written run over it
        _end_failed(client, run_id)
        _warn_failed(options, error, directory)
        return None


def track_sweep(options: TrackingOptions | None, config: Any, summary: Any) -> str | None:
    """Log a finished sweep: one parent MLflow run (the config as params; results.csv, results.md and the figures
    as artifacts) and one nested run per row of its results table (key columns as params, metrics with their
    interval bounds). Returns the parent run id, or None as `track_run` does."""
    if options is None or not options.enabled:
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return None
    run_id, client = None, None
    out = Path(config.out)
    try:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        from medembed.sweep.results import KEY_COLUMNS, read_results

        rows = read_results(summary.results_csv)
        client, experiment_id = _client(options)
        run_id = client.create_run(experiment_id, run_name=f"sweep {out.name}", tags={"mlflow.source.name": "medembed"}).info.run_id
        described = {"manifest": str(config.manifest), "encoders": [spec.label for spec in config.encoders], "heads": list(config.heads),
                     "budgets": list(config.budgets), "seeds": list(config.seeds), "protocol": dataclasses.asdict(config.protocol)}
        _log(client, run_id, param_values(described), {"cells": float(len(rows))}, {"medembed.kind": "sweep", "medembed.directory": str(out.resolve())})
        for path in (summary.results_csv, summary.results_md, *summary.figures):
            client.log_artifact(run_id, str(path), "sweep")
        for row in rows:
            name = "/".join(f"{row[k]:g}" if isinstance(row[k], float) else str(row[k]) for k in KEY_COLUMNS)
            child = client.create_run(experiment_id, run_name=name, tags={MLFLOW_PARENT_RUN_ID: run_id}).info.run_id
            numbers = {k: v for k, v in row.items() if k not in KEY_COLUMNS and k != "note"}
            _log(client, child, param_values({k: row[k] for k in KEY_COLUMNS} | ({"note": row["note"]} if row["note"] else {})),
                 {_key(k): v for k, v in numbers.items() if isinstance(v, float) and math.isfinite(v)}, {"medembed.kind": "sweep-cell"})
            client.set_terminated(child)
        client.set_terminated(run_id)
        return run_id
    except Exception as error:
        _end_failed(client, run_id)
        _warn_failed(options, error, out)
        return None


def _end_failed(client: Any, run_id: str | None) -> None:
    if client is None or run_id is None:
        return
    try:
        client.set_terminated(run_id, "FAILED")
    except Exception:  # the store that failed may fail again; the warning says what happened first
        pass
