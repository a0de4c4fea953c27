"""The scoring contract: anything that turns embeddings or images into abnormality probabilities.

A scorer follows scikit-learn's estimator contract where it applies (keyword hyperparameters stored unmodified,
`get_params(deep)` / `set_params`, `sklearn.base.clone` works) and adds what medembed's protocol needs:

    kind          the run kind it is saved as: "head" | "cnn" | "zeroshot" | "ensemble"
    consumes      "embeddings" (rows of a store with the run's fingerprint) or "images" (pixels decoded with
                  the scorer's own `preprocess` spec)
    columns_used  manifest columns `predict_proba` also takes, by keyword (the zero-shot prompts use body_part, study
                  pooling study_id)
    fit(X, y, *, eval_set=[(X_val, y_val)])     train; val only for early stopping / model selection
    predict_proba(X, **columns) -> [N, 2]       column 1 is P(abnormal), uncalibrated
    save(directory) / load(directory)           no pickle; a tampered file fails to load and runs no code

The protocol (`medembed.protocol.steps`) then calibrates and chooses thresholds on val and evaluates on test, and the
run directory (`medembed.runs.record`) records which kind to load back.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from medembed.errors import MedembedError

CONSUMES = ("embeddings", "images")


@runtime_checkable
class Scorer(Protocol):
    """What every scorer implements (see the module docstring)."""

    kind: ClassVar[str]
    consumes: ClassVar[str]
    columns_used: ClassVar[tuple[str, ...]]

    def fit(self, X: Any, y: np.ndarray, *, eval_set: Any = None) -> Scorer: ...

    def predict_proba(self, X: Any, **columns: np.ndarray) -> np.ndarray: ...

    def save(self, directory: Path) -> None: ...

    def get_params(self, deep: bool = True) -> dict[str, Any]: ...

    def set_params(self, **params: Any) -> Scorer: ...


def positive_scores(scorer: Scorer, X: Any, columns: dict[str, np.ndarray]) -> np.ndarray:
    """Uncalibrated P(abnormal) `[N]` float64, passing the manifest columns the scorer uses."""
    missing = [name for name in scorer.columns_used if name not in columns]
    if missing:
        raise MedembedError(f"this {scorer.kind} scorer needs the column(s) {', '.join(missing)} of the rows it scores")
    wanted = {name: columns[name] for name in scorer.columns_used}
    return np.asarray(scorer.predict_proba(X, **wanted))[:, 1].astype(np.float64)


# kind -> (module, a function or a class's `load` classmethod that reads a saved scorer from a directory). Imported by name on first use, like the encoder
# registry: loading a head run must not import torch-heavy baselines or transformers, and the scorers (which
# write runs) are not imported by the contract they implement.
_KINDS: dict[str, tuple[str, str]] = {
    "head": ("medembed.scorers.heads", "load_head"),
    "cnn": ("medembed.scorers.baselines.cnn", "CNNScorer"),
    "zeroshot": ("medembed.scorers.zeroshot", "ZeroShotScorer"),
    "ensemble": ("medembed.scorers.ensemble", "EnsembleScorer"),
    "study-pooling": ("medembed.scorers.study_pooling", "AttentionStudyPooling"),
}
KINDS: tuple[str, ...] = tuple(_KINDS)


def load_scorer(kind: str, directory: Path) -> Scorer:
    """The scorer of `kind` saved in `directory`."""
    if kind not in _KINDS:
        raise MedembedError(f"{directory}: unknown run kind {kind!r}; medembed knows {', '.join(KINDS)}")
    module, name = _KINDS[kind]
    loader = getattr(importlib.import_module(module), name)
    return (loader.load if isinstance(loader, type) else loader)(Path(directory))
