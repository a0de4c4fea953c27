"""The manifest: one CSV row per image that every later stage reads.

Required columns ``image_id`` (unique) and ``path`` (relative to a root given at run time); optional
``label`` (0 normal, 1 abnormal, empty unknown), ``study_id``, ``patient_id``, ``body_part``, ``split``
(train/val/test); further columns are carried along. Modules: ``table`` (schema, read/write),
``split`` (grouped stratified splits of any manifest: ``assign_splits``), ``sample`` (stratified samples),
``validate``, and the builders ``mura``, ``fracatlas``, ``generic`` (folder-per-class trees and a user's CSV).
"""

from medembed.data.manifest.fracatlas import FRACATLAS_SPLIT_FRACTIONS, build_fracatlas
from medembed.data.manifest.generic import DEFAULT_CLASS_LABELS, IMAGE_SUFFIXES, build_from_csv, build_from_folders
from medembed.data.manifest.mura import build_mura
from medembed.data.manifest.sample import sample_manifest
from medembed.data.manifest.split import assign_grouped_split, assign_splits
from medembed.data.manifest.table import (
    MANIFEST_COLUMNS,
    REQUIRED_COLUMNS,
    SPLITS,
    Manifest,
    ManifestError,
    read_manifest,
    write_manifest,
)
from medembed.data.manifest.validate import Problem, ValidationReport, validate_manifest

__all__ = [
    "DEFAULT_CLASS_LABELS",
    "FRACATLAS_SPLIT_FRACTIONS",
    "IMAGE_SUFFIXES",
    "MANIFEST_COLUMNS",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "Manifest",
    "ManifestError",
    "Problem",
    "ValidationReport",
    "assign_grouped_split",
    "assign_splits",
    "build_from_csv",
    "build_from_folders",
    "build_fracatlas",
    "build_mura",
    "read_manifest",
    "sample_manifest",
    "validate_manifest",
    "write_manifest",
]
