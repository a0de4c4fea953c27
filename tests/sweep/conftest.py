"""A small synthetic study: a manifest and a matching embedding store, and a sweep config over them."""

from pathlib import Path

import numpy as np
import pytest

from medembed.data.manifest import Manifest, write_manifest
from medembed.store import StoreWriter, make_fingerprint

FINGERPRINT = make_fingerprint(encoder="efficientnet-lite0", model_id="synthetic", embedding_kind="pooled", preprocess_hash="p", dtype="float32")


def synthetic_rows(n_patients: int = 90, images_per_patient: int = 2) -> dict[str, list]:
    """Manifest columns of patients with one study each; a third abnormal; splits 60/20/20 by patient."""
    columns: dict[str, list] = {k: [] for k in ("image_id", "path", "label", "study_id", "patient_id", "body_part", "split")}
    for p in range(n_patients):
        for k in range(images_per_patient):
            columns["image_id"].append(f"p{p}_img{k}")
            columns["path"].append(f"p{p}/img{k}.png")
            columns["label"].append(str(int(p % 3 == 0)))
            columns["study_id"].append(f"p{p}_s1")
            columns["patient_id"].append(f"p{p}")
            columns["body_part"].append(("wrist", "elbow")[p % 2])
            columns["split"].append(("train", "train", "train", "val", "test")[p % 5])
    return columns


def write_study(directory: Path, columns: dict[str, list] | None = None, dim: int = 16) -> tuple[Path, Path]:
    """manifest.csv and store.h5 in `directory` with the same rows (default: synthetic_rows()); abnormal
    embeddings are shifted along one direction."""
    columns = columns or synthetic_rows()
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / "manifest.csv"
    write_manifest(Manifest({k: np.asarray(v, dtype=object) for k, v in columns.items()}), manifest)
    rng = np.random.default_rng(0)
    labels = np.asarray(columns["label"], dtype=int)
    embeddings = rng.standard_normal((len(labels), dim)) + 1.2 * labels[:, None] * rng.standard_normal(dim)
    store = directory / "store.h5"
    with StoreWriter(store, dim=dim, fingerprint=FINGERPRINT) as writer:
        writer.append(columns["image_id"], embeddings, {k: columns[k] for k in ("label", "study_id", "patient_id", "body_part", "split")})
    return manifest, store


def sweep_toml(manifest: Path, store: Path, out: Path, **overrides: str) -> str:
    """A 2 heads x 2 budgets x 2 seeds sweep on the given store."""
    settings = {
        "budgets": "[0.3, 1.0]", "seeds": "[0, 1]", "heads": '["logreg", "xgboost"]', "threshold": '"f1"', "bootstrap": "20",
    } | overrides
    lines = ['name = "tiny"', f'manifest = "{manifest}"', f'out = "{out}"'] + [f"{k} = {v}" for k, v in settings.items()]
    if "xgboost" in settings["heads"]:
        lines += ["[head_params.xgboost]", "n_estimators = 15"]
    lines += ["[[encoders]]", 'name = "efficientnet-lite0"', 'label = "synthetic"', f'store = "{store}"']
    return "\n".join(lines) + "\n"


@pytest.fixture
def study(tmp_path: Path) -> tuple[Path, Path]:
    return write_study(tmp_path)
