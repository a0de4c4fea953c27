"""`--batch-size auto`: the largest batch that fits the card, found once per model, resolution and GPU.

On CUDA real forward passes (zeros of the encoder's input shape, the run's autocast, tokens included) are
tried at doubling batch sizes, then bisected between the last that fit and the first that did not; a batch
fits when it runs and its peak memory stays within MEMORY_MARGIN of the memory free before it. The answer is
cached in `batch_sizes.json` under the user cache directory ($XDG_CACHE_HOME/medembed, else ~/.cache/medembed),
keyed by GPU, model, resolution, precision and torch version. On a CPU "auto" is the CPU default batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from medembed._files import atomic_write_json, read_json
from medembed.errors import MedembedError

MEMORY_MARGIN = 0.85  # peak memory of a batch within 85% of the free memory: room for fragmentation and the loop's buffers
MAX_AUTO_BATCH = 4096


def largest_batch(fits: Callable[[int], bool], limit: int = MAX_AUTO_BATCH) -> int:
    """The largest batch in [1, limit] for which `fits` holds, assuming it holds for every smaller one:
    doubling from 1, then bisection. Raises MedembedError when not even a batch of 1 fits."""
    if not fits(1):
        raise MedembedError("--batch-size auto: not even a batch of 1 image fits in the device's memory")
    good = 1
    while good < limit:
        trial = min(2 * good, limit)
        if not fits(trial):
            bad = trial
            break
        good = trial
    else:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def rounded(batch: int) -> int:
    """Down to a multiple of 8 (tensor-core friendly shapes) when at least 8."""
    return batch - batch % 8 if batch >= 8 else batch


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medembed" / "batch_sizes.json"


def cached(key: str, search: Callable[[], int], path: Path | None = None) -> int:
    """The batch size cached under `key` in `path` (default `cache_file()`), else `search()`, then cached.

    An unreadable cache is searched again and rewritten, never an error."""
    path = path or cache_file()
    try:
        known = read_json(path, "batch-size cache") if path.is_file() else {}
    except MedembedError:
        known = {}
    if not isinstance(known, dict):
        known = {}
    value = known.get(key)
    if isinstance(value, int) and value >= 1:
        return value
    value = search()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**known, key: value})
    except OSError:
        pass  # a read-only home: the search is simply repeated next time
    return value


def cuda_fits(embed: Callable[[torch.Tensor], object], shape: tuple[int, int, int], device: torch.device, autocast: torch.dtype | None) -> Callable[[int], bool]:
    """`fits(batch)` for `largest_batch`: one real forward pass of `batch` zero images of `shape` on `device`."""

    def fits(batch: int) -> bool:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            pixels = torch.zeros((batch, *shape), device=device)
            with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                embed(pixels)
            torch.cuda.synchronize(device)
        except torch.OutOfMemoryError:
            return False
        finally:
            pixels = None
            torch.cuda.empty_cache()
        return torch.cuda.max_memory_allocated(device) - base <= MEMORY_MARGIN * free

    return fits
