"""The data a baseline trains on: a checked manifest, and its images decoded once into an in-memory 8-bit cache.

Training for many epochs re-reads each image many times; decoding a 1024 px JPEG costs far more than a
forward pass of a small network, so images are decoded and preprocessed once, by DataLoader workers running
the same decoding dataset as `medembed extract`. Pixels are kept as uint8 (`spec` output x 255, rounded): a
4,000-image set at 160 px is 100 MB, a MURA-sized one 1 GB. The quantisation step (1/255) is below what the
source JPEGs/PNGs resolve.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from medembed.errors import MedembedError
from medembed.extract.runner import collate_images, init_decode_worker, ManifestImages
from medembed.data.images import PreprocessSpec
from medembed.data.manifest import Manifest, read_manifest, validate_manifest


def read_checked_manifest(path: Path, splits: tuple[str, ...]) -> Manifest:
    """Read and validate the manifest at `path` (ids, labels, leakage between splits); it must have rows in `splits`.

    Baselines use the manifest's own split (they carve none), so they are compared on exactly its rows.
    """
    manifest = read_manifest(Path(path))
    validate_manifest(manifest, root=None, check_files=False).raise_for_errors()
    missing = [name for name in splits if not (manifest.split == name).any()]
    if missing:
        raise MedembedError(
            f"{path}: no rows in split(s) {', '.join(missing)}; a baseline needs {', '.join(splits)} rows "
            "(the manifest builders write a split column; val is carved from train by patient)"
        )
    return manifest


@dataclass
class ImageCache:
    """Decoded images of a manifest: pixels of the ones that decoded, and why the others did not."""

    pixels: torch.Tensor  # [M, C, S, S] uint8: the spec's [0, 1] output x 255
    rows: np.ndarray  # [M] int64: the manifest row of each cached image
    failed: dict[str, str]  # image id -> reason, for rows that could not be decoded

    def __len__(self) -> int:
        return len(self.rows)


def grey_spec(base: PreprocessSpec) -> PreprocessSpec:
    """`base`'s geometry (padding, size, resampling) with one grey channel in [0, 1]: what the cache holds.

    Normalisation (mean/std, channel repeat) is left to the network, so the cache can be 8-bit.
    """
    return replace(base, mean=(0.0,), std=(1.0,), channels=1)


def cache_images(
    manifest: Manifest,
    root: Path,
    spec: PreprocessSpec,
    num_workers: int | None = None,
    batch_size: int = 32,
    on_progress: Callable[[int], None] | None = None,
) -> ImageCache:
    """Decode and preprocess every row of `manifest` (paths relative to `root`) once, in worker processes.

    `spec` must produce [0, 1] pixels (mean 0, std 1; see `grey_spec`). Rows that fail to decode are left out
    and named in `failed`; nothing is raised for them. `num_workers` defaults to one per CPU core (the main
    process only gathers results). `on_progress(n)` is called after each batch of n rows.
    """
    base = getattr(spec, "spec", spec)  # a CorruptedPreprocess wraps the spec it corrupts
    if any(m != 0.0 for m in base.mean) or any(s != 1.0 for s in base.std):
        raise ValueError(f"the image cache holds [0, 1] pixels; got a spec with mean {spec.mean} and std {spec.std}")
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    loader = DataLoader(
        ManifestImages(manifest.resolve(root), spec),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_images,
        worker_init_fn=init_decode_worker if workers else None,
    )
    pixels = torch.empty((len(manifest), base.channels, base.size, base.size), dtype=torch.uint8)
    decoded = np.zeros(len(manifest), dtype=bool)
    failed: dict[str, str] = {}
    for good, batch, bad, reasons in loader:
        if batch is not None:
            pixels[good] = batch.mul_(255).round_().to(torch.uint8)
            decoded[good] = True
        failed.update({str(manifest.image_id[i]): reason for i, reason in zip(bad, reasons)})
        if on_progress:
            on_progress(len(good) + len(bad))
    rows = np.flatnonzero(decoded)
    return ImageCache(pixels[torch.from_numpy(rows)] if len(rows) < len(manifest) else pixels, rows, failed)


def failed_note(failed: dict[str, str]) -> str:
    """One line naming every image left out because it could not be decoded, grouped by reason."""
    by_reason: dict[str, list[str]] = {}
    for image_id, reason in failed.items():
        by_reason.setdefault(reason, []).append(image_id)
    groups = "; ".join(f"{reason} ({len(ids)}): {', '.join(sorted(ids))}" for reason, ids in sorted(by_reason.items()))
    return f"{len(failed)} image{'s' if len(failed) != 1 else ''} could not be decoded and {'were' if len(failed) != 1 else 'was'} left out: {groups}"


def unit_pixels(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Cached uint8 pixels [B, C, S, S] -> float32 in [0, 1] on `device`."""
    return pixels.to(device, non_blocking=True).float().div_(255)
