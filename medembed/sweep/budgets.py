"""Label budgets: nested, grouped, stratified fractions of the training split.

Every group (patient, else study) gets a pseudo-random priority from a hash of the seed and its own id.
Within each stratum (groups with an abnormal image, groups without), groups are taken in priority order
until the budget's share of the stratum's images is reached, so:

- a group is wholly in or out of a subset (images of one patient are correlated);
- both classes keep their share of the budget, and at least `min_per_class` images of each;
- budgets are nested: the same order is cut at a larger count, so the 5% subset holds the 1% subset;
- a group's priority depends only on the seed and its own id, not on the other rows or their order:
  reordering a manifest changes nothing, and adding patients to it leaves the others' order as it was.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from medembed.errors import MedembedError

MIN_PER_CLASS = 2  # fewer abnormal (or normal) training images than this leave a head nothing to learn from


def check_fraction(fraction: float, what: str = "budget") -> float:
    """`fraction` as a float in (0, 1]; MedembedError naming `what` otherwise."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise MedembedError(f"{what} {fraction!r} must be a fraction of the training labels in (0, 1]")
    return float(fraction)


def budget_subset(
    groups: Sequence[str] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    fractions: Sequence[float],
    seed: int,
    min_per_class: int = MIN_PER_CLASS,
) -> dict[float, np.ndarray]:
    """The training rows each label budget keeps: {fraction: [N] bool mask}.

    groups [N] str: the grouping unit of each row (patient, else study). labels [N] {0, 1}. fractions: budgets
    in (0, 1], as fractions of each stratum's images (rounded up to whole groups). A group with any abnormal
    image counts in the abnormal stratum. Masks are nested (a smaller fraction's rows are a subset of a
    larger's), whole groups, and seeded by `seed`; 1.0 keeps every row. Each mask holds at least
    `min_per_class` images of each class where the data has that many.
    """
    groups = np.asarray(groups).astype(str)
    labels = np.asarray(labels)
    if groups.ndim != 1 or labels.shape != groups.shape:
        raise MedembedError(f"groups and labels must be aligned 1-D arrays; got shapes {groups.shape} and {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise MedembedError(f"budget labels must be 0 or 1; got {sorted(set(np.unique(labels).tolist()) - {0, 1})[:5]}")
    fractions = [check_fraction(f) for f in fractions]
    keys, row_group = np.unique(groups, return_inverse=True)
    group_abnormal = np.zeros(len(keys), dtype=np.int64)
    np.maximum.at(group_abnormal, row_group, labels.astype(np.int64))
    group_images = np.bincount(row_group, minlength=len(keys))
    priority = np.array([_priority(seed, key) for key in keys], dtype=np.uint64)

    taken = {fraction: np.zeros(len(keys), dtype=bool) for fraction in fractions}
    for stratum in (0, 1):
        members = np.flatnonzero(group_abnormal == stratum)
        if members.size == 0:
            continue
        members = members[np.argsort(priority[members], kind="stable")]
        images = np.cumsum(group_images[members])
        # Images of the stratum's own class: a group in the abnormal stratum may also hold normal images.
        of_class = np.cumsum(np.bincount(row_group, weights=labels == stratum, minlength=len(keys))[members])
        needed_for_class = np.searchsorted(of_class, min(min_per_class, of_class[-1])) + 1
        for fraction in fractions:
            # Rounded first so that e.g. 0.1 * 2800 = 280.00000000000006 does not become 281.
            target = math.ceil(round(fraction * images[-1], 9))
            count = max(int(np.searchsorted(images, target)) + 1, int(needed_for_class))
            taken[fraction][members[:count]] = True
    return {fraction: taken[fraction][row_group] for fraction in fractions}


def _priority(seed: int, group: str) -> int:
    """A 64-bit pseudo-random rank of `group` under `seed`, the same in every process (unlike hash())."""
    digest = hashlib.blake2b(f"{seed}\x00{group}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
