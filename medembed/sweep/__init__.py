"""Benchmark sweeps: encoders x heads x label budgets x seeds (and CNN / autoencoder baselines) under one protocol.

    config = load_config(Path("data_manifests/fracatlas_sweep.toml"))
    summary = run_sweep(config, log=print)      # resumes: cells already in OUT/results.csv are skipped
    summary.results_md                          # heads x encoders and learning-curve tables

Modules: ``config`` (the TOML file, validated), ``budgets`` (nested grouped stratified label budgets),
``results`` (results.csv appended cell by cell, and what its rows were computed under), ``runner`` (the cells),
``report`` (results.md and figures).
"""

from medembed.sweep.budgets import budget_subset
from medembed.sweep.config import BaselineSpec, EncoderSpec, SweepConfig, SweepConfigError, load_config, parse_config
from medembed.sweep.results import CellKey, read_results
from medembed.sweep.runner import SweepSummary, run_sweep

__all__ = [
    "BaselineSpec",
    "CellKey",
    "EncoderSpec",
    "SweepConfig",
    "SweepConfigError",
    "SweepSummary",
    "budget_subset",
    "load_config",
    "parse_config",
    "read_results",
    "run_sweep",
]
