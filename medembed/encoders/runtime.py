"""The encoder runtime: an encoder built from a store's or run's recorded options, the device and autocast
precision it runs in, and the store fingerprint of what it makes (extract, predict, the baselines and the
encoder check share these). torch is imported where it is used, so that building a hub encoder whose checkpoint
cannot be had fails before torch is imported (see `get_encoder`)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from medembed.encoders import get_encoder
from medembed.errors import MedembedError
from medembed.options.extract import PRECISIONS
from medembed.store import FINGERPRINT_KEYS, collect_provenance, make_fingerprint

if TYPE_CHECKING:
    import torch

    from medembed.encoders.base import Encoder


def build_encoder(name: str, options: dict[str, Any] | None = None) -> Encoder:
    """`get_encoder(name, **options)`, plus the run-level option `lenient_decoding` applied to its preprocessing.

    Lenient decoding lives in the PreprocessSpec, so it changes the preprocess hash and thus the store fingerprint.
    """
    options = dict(options or {})
    lenient = bool(options.pop("lenient_decoding", False))
    encoder = get_encoder(name, **options)
    if lenient:
        encoder.preprocess = replace(encoder.preprocess, lenient_decoding=True)
    return encoder


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available (this rank's GPU under torchrun), else CPU."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            # Ranks beyond the GPU count share them (e.g. two processes on one GPU).
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MedembedError(f"device {device!r} requested but CUDA is not available on this machine")
    return resolved


def default_workers(device: torch.device) -> int:
    """Decoding worker processes: every core but one on a GPU box (the GPU does the model); on a CPU the
    model needs the cores, so a quarter of them decode (none on a 2-core laptop, where decoding in-process
    between batches is fastest: measured in tests/benchmarks/bench_extract.py)."""
    cores = os.cpu_count() or 1
    return max(0, cores - 1) if device.type == "cuda" else cores // 4


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast precision a run uses: "bf16", "fp16" or "fp32" ("auto": bf16 on CUDA, fp32 on CPU)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise MedembedError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The torch autocast dtype of a precision name (None: no autocast, float32)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[resolve_precision(precision, device)]


def store_fingerprint(encoder: Encoder, store_dtype: str, precision: str = "fp32") -> dict[str, str]:
    """The store fingerprint of embeddings made by `encoder` in autocast `precision` (a resolved name:
    bf16, fp16 or fp32; see `resolve_precision`) and kept as `store_dtype`."""
    if precision not in PRECISIONS:
        raise MedembedError(f"store_fingerprint needs a resolved precision ({', '.join(PRECISIONS)}), got {precision!r}")
    described = encoder.fingerprint()
    fields = {k: described[k] for k in FINGERPRINT_KEYS if k in described}
    return make_fingerprint(**(fields | {"dtype": store_dtype, "precision": precision}))


def run_provenance(device: torch.device) -> dict[str, str]:
    """What a store records about the environment computing it (not identity): package versions and the GPU."""
    import torch

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return collect_provenance(gpu=gpu)
