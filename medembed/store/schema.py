"""What a store is: the schema of its files, the fingerprint that says which embeddings are comparable, the
provenance it records, the text HDF5 can hold, and the store's errors and warnings.

A finished store is one plain HDF5 file, readable with plain h5py:

    embeddings   [N, D] float16|float32, chunked by rows, fletcher32 checksum per chunk
    image_id     [N] UTF-8 strings, aligned with embeddings
    label        [N] int8 (0 normal, 1 abnormal, -1 unknown), fletcher32
    study_id, patient_id, body_part, split   [N] UTF-8 strings ("" where unknown)
    extra/<name> [N] UTF-8 strings: further manifest columns (view, site, ...), "" for rows written before
    tokens/<lv>  [N, T, C] token grids of each level (attrs token_levels: {level: [T, C]}), fletcher32
    failed/image_id, failed/reason           images that could not be embedded, and why
    attrs        schema_version, fingerprint (JSON) and its fields, provenance (JSON), dim, dtype,
                 medembed_version, created, ...

A store being written is segmented instead (see `medembed.store.segments`); plain h5py readers see the same
names either way.

Identity and provenance. The fingerprint (FINGERPRINT_KEYS) says which embeddings are comparable: two
stores, a store and a head, a store and a resumed run must agree on every key. `precision` is the
autocast precision the vectors were computed in (bf16, fp16, fp32), `config_sha256` the checksum of
the checkpoint's config.json and `levels` the encoder's canonical string of the token levels it keeps.
Fingerprints recorded before those keys existed lack them; a key a fingerprint does not record is not
compared (resuming such a store warns that it cannot be checked). `provenance` (torch, transformers,
medembed, python versions, GPU) is not identity: a resume or merge in another environment warns
(ProvenanceWarning) and goes on.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import unquote

import h5py
import numpy as np

from medembed._version import __version__, package_version
from medembed.errors import MedembedError

SCHEMA_VERSION = 2  # 2: the segmented layout (an index file); plain files are still written as 1
PLAIN_SCHEMA_VERSION = 1  # additive changes since (fingerprint keys, provenance, checksums, tokens, extra) stay readable
# The attributes that must match for two sets of embeddings to be comparable (mixing, merging, applying a head).
FINGERPRINT_KEYS = (
    "encoder", "model_id", "revision", "weights_sha256", "embedding_kind", "preprocess_hash", "dtype",
    "precision", "config_sha256", "levels",
)
# Keys added after stores were first written: a recorded fingerprint without them predates them.
LATER_FINGERPRINT_KEYS = ("precision", "config_sha256", "levels")
STRING_COLUMNS = ("study_id", "patient_id", "body_part", "split")
COLUMNS = ("label",) + STRING_COLUMNS
PROVENANCE_KEYS = ("python", "medembed", "torch", "transformers", "numpy", "h5py", "gpu")
_RESERVED_NAMES = ("image_id", "embeddings", "failed", "tokens", "extra")


class StoreError(MedembedError):
    """A store that cannot be opened, written or combined as asked."""


class StoreWarning(UserWarning):
    """Something the store recovered from: skipped damaged log records, rows HDF5 cannot hold, an unchecked key."""


class ProvenanceWarning(UserWarning):
    """A store is resumed or merged in another environment (package versions, GPU) than it was created in."""


def make_fingerprint(**fields: str) -> dict[str, str]:
    """A fingerprint dict with every key of FINGERPRINT_KEYS ('' where a field does not apply)."""
    unknown = set(fields) - set(FINGERPRINT_KEYS)
    if unknown:
        raise ValueError(f"unknown fingerprint fields: {sorted(unknown)}")
    return {key: str(fields.get(key, "")) for key in FINGERPRINT_KEYS}


def fingerprint_mismatch(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Human-readable differences between two fingerprints; empty when they match.

    A key of LATER_FINGERPRINT_KEYS that one side does not record at all (a store or run made before the
    key existed) is not compared; present on both sides, it must be equal ('' included). Other keys read
    as '' where absent.
    """
    return [
        f"{key}: {expected.get(key, '')!r} vs {actual.get(key, '')!r}"
        for key in FINGERPRINT_KEYS
        if not (key in LATER_FINGERPRINT_KEYS and (key not in expected or key not in actual))
        and str(expected.get(key, "")) != str(actual.get(key, ""))
    ]


def unrecorded_keys(recorded: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Keys `actual` sets (non-empty) that the older fingerprint `recorded` lacks, so could not be checked."""
    return [key for key in LATER_FINGERPRINT_KEYS if key not in recorded and str(actual.get(key, ""))]


def collect_provenance(gpu: str = "") -> dict[str, str]:
    """The environment that computes embeddings: python, medembed, torch, transformers, numpy, h5py versions
    ('' for a package not installed; read from package metadata, nothing is imported) and `gpu` (the
    device name, "cpu", or '' when unknown)."""
    return {
        "python": platform.python_version(),
        "medembed": __version__,
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "gpu": str(gpu),
    }


def provenance_differences(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """'torch 2.12.0 -> 2.13.0' for each key both record (non-empty) with different values."""
    return [
        f"{key} {old[key]} -> {new[key]}"
        for key in sorted(set(old) & set(new), key=lambda k: (PROVENANCE_KEYS + (k,)).index(k))
        if str(old[key]) and str(new[key]) and str(old[key]) != str(new[key])
    ]


def text_problem(value: str) -> str | None:
    """Why HDF5 cannot store `value` as a UTF-8 string (a NUL byte, a lone surrogate), or None."""
    if not isinstance(value, str):
        return f"not a string ({type(value).__name__})"
    if "\x00" in value:
        return "contains a NUL byte"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 (it holds a lone surrogate, e.g. from an undecodable file name)"
    return None


def _storable_text(value: str) -> str:
    """`value` with what HDF5 cannot store escaped (for free text such as failure reasons)."""
    return str(value).replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")


def _h5_name(name: str) -> str:
    """A level or column name as one HDF5 link name: '/' (a path separator there) and '%' are %-escaped,
    and so is a leading '.' ('.' alone names the group itself)."""
    encoded = name.replace("%", "%25").replace("/", "%2F")
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def _name_of(h5_name: str) -> str:
    """The name `_h5_name` encoded."""
    return unquote(h5_name)


def _tokens_dataset(level: str) -> str:
    return f"tokens/{_h5_name(level)}"


def _extra_dataset(column: str) -> str:
    return f"extra/{_h5_name(column)}"


def _check_name(path: Path, name: object, what: str) -> str:
    """`name` if it can name a token level or an extra column, else a one-line StoreError."""
    problem = "is empty" if name == "" else text_problem(name)
    if problem:
        raise StoreError(f"{path}: {what} name {name!r} cannot be stored: it {problem}")
    return str(name)


def normalise_token_shapes(path: Path, tokens: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, int]]:
    """{level: (T, C)} with positive ints, in sorted level order; a one-line StoreError on a bad entry."""
    shapes: dict[str, tuple[int, int]] = {}
    for level in sorted(tokens or {}, key=str):
        shape = tuple(tokens[level]) if isinstance(tokens[level], (tuple, list)) else ()
        if len(shape) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in shape):
            raise StoreError(f"{path}: token level {level!r} needs a shape (T, C) of two positive ints, got {tokens[level]!r}")
        shapes[_check_name(path, level, "token level")] = (int(shape[0]), int(shape[1]))
    return shapes


def _describe_levels(shapes: Mapping[str, tuple[int, int]]) -> str:
    return ", ".join(f"{level} {t}x{c}" for level, (t, c) in shapes.items()) or "none"
