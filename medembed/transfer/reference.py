"""What a run keeps from its source site, in RUN/reference/, so transfer checks need neither its store nor its images.

    reference.npz   val_p [n] float64 calibrated P(abnormal) of val and val_y [n] int8 (conformal quantiles, the
                    source's predicted prevalence); for embedding runs also train_sample [m, D] float32, a seeded
                    sample of at most SAMPLE_SIZE train embeddings (the drift reference and the OOD model), and
                    val_ood [k] float64, the source val's OOD scores under that model (the flag threshold at any
                    rate; a recalibrated run keeps the source's while its val_p come from the target sample)
    reference.json  sizes, seed and what is unavailable for this run kind

Read without pickle. A run written before this module existed has no reference: `run_reference` builds one from
the run's own inputs (its store or manifest) and saves it beside the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medembed._files import atomic_write_json, read_json
from medembed.errors import MedembedError
from medembed.protocol.splits import Split
from medembed.runs.inputs import run_inputs
from medembed.transfer.ood import MahalanobisOOD, embedding_matrix

REFERENCE_DIR = "reference"
SAMPLE_SIZE = 1024
NO_EMBEDDINGS = "this run's scorer reads images, so it has no embedding space: the OOD score and the embedding shift test are unavailable"


@dataclass
class SiteReference:
    """The source site's val scores and (embedding runs) train-embedding sample with val's OOD scores."""

    val_p: np.ndarray
    val_y: np.ndarray
    train_sample: np.ndarray | None = None
    val_ood: np.ndarray | None = None
    n_train: int = 0
    seed: int = 0

    @property
    def has_embeddings(self) -> bool:
        return self.train_sample is not None

    def ood_model(self) -> MahalanobisOOD:
        """The Mahalanobis model of the train sample (refitted on load: deterministic, about a second)."""
        if self.train_sample is None:
            raise MedembedError(NO_EMBEDDINGS)
        if not hasattr(self, "_ood"):
            self._ood = MahalanobisOOD().fit(self.train_sample)
        return self._ood

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {"val_p": self.val_p, "val_y": self.val_y}
        if self.train_sample is not None:
            arrays |= {"train_sample": self.train_sample, "val_ood": self.val_ood}
        temporary = directory / "reference.tmp.npz"
        np.savez_compressed(temporary, **arrays)
        temporary.replace(directory / "reference.npz")
        atomic_write_json(directory / "reference.json", {
            "format_version": 1, "val_images": int(len(self.val_y)), "train_images": int(self.n_train),
            "train_sample": 0 if self.train_sample is None else int(len(self.train_sample)), "seed": int(self.seed),
            "unavailable": [] if self.has_embeddings else [NO_EMBEDDINGS],
        })

    @classmethod
    def load(cls, directory: Path) -> SiteReference:
        directory = Path(directory)
        meta = read_json(directory / "reference.json", "reference.json")
        try:
            with np.load(directory / "reference.npz", allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError) as error:
            raise MedembedError(f"{directory / 'reference.npz'}: cannot be read ({error}); rerun medembed evaluate on the run to rebuild it") from None
        val_p, val_y = arrays.get("val_p"), arrays.get("val_y")
        if val_p is None or val_y is None or val_p.ndim != 1 or val_p.shape != val_y.shape:
            raise MedembedError(f"{directory / 'reference.npz'}: val_p and val_y must be aligned [n] arrays")
        sample, val_ood = arrays.get("train_sample"), arrays.get("val_ood")
        if sample is not None and (sample.ndim != 2 or val_ood is None or val_ood.ndim != 1 or not len(val_ood)):
            raise MedembedError(f"{directory / 'reference.npz'}: train_sample must be [m, D] with val_ood, val's OOD scores, beside it")
        return cls(val_p.astype(np.float64), val_y.astype(np.int8), sample, val_ood, int(meta.get("train_images", 0)), int(meta.get("seed", 0)))


def build_reference(p_val: np.ndarray, val: Split, train: Split | None, seed: int = 0) -> SiteReference:
    """A reference from val's calibrated probabilities [n] and rows, and train's rows (None or non-numeric X:
    no embedding part)."""
    reference = SiteReference(np.asarray(p_val, dtype=np.float64), np.asarray(val.y, dtype=np.int8), seed=seed)
    train_X = embedding_matrix(train.X) if train is not None and train.X is not None else None
    val_X = embedding_matrix(val.X) if val.X is not None else None
    if train_X is None or val_X is None or len(train_X) < 2:
        return reference
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(train_X), SAMPLE_SIZE, replace=False)) if len(train_X) > SAMPLE_SIZE else np.arange(len(train_X))
    reference.train_sample = train_X[rows].astype(np.float32)
    reference.n_train = len(train_X)
    reference.val_ood = reference.ood_model().score(val_X)
    return reference


def reference_dir(run_dir: Path) -> Path:
    return Path(run_dir) / REFERENCE_DIR


def run_reference(run: Any) -> SiteReference:
    """The run's saved reference, or one built now from its own val (and train) rows and saved beside it."""
    directory = reference_dir(run.directory)
    if (directory / "reference.json").is_file():
        return SiteReference.load(directory)
    inputs = run_inputs(run)
    try:
        val = inputs.rows("val")
        train = inputs.rows("train") if inputs.reads_embeddings else None
    except MedembedError as error:
        raise MedembedError(
            f"{run.directory}: the run has no {REFERENCE_DIR}/ (it predates them) and its own inputs cannot be read to build one: {error}"
        ) from None
    reference = build_reference(run.probabilities(val), val, train, seed=run.record.protocol.seed)
    reference.save(directory)
    return reference
