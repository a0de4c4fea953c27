"""The augmentation bank `extract --augment K` stores beside a store (see `medembed.data.augment`): how many views
per train image, their seed and the range of each random transform. Standard library only (fast --help)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from medembed.errors import MedembedError
from medembed.options import option

MAX_VIEWS = 64  # more views per image than this is a typo (the bank costs K x the train split)


def _check_range(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise MedembedError(f"option {name} must be a number in [{low:g}, {high:g}]; got {value!r}")


@dataclass
class AugmentOptions:
    """The recipe of an augmentation bank; `augment` 0 (the default) writes none and changes nothing."""

    augment: int = option(0, f"Augmented views per train image, stored in a bank beside the store (<out stem>.views.h5; 0: none, at most {MAX_VIEWS}). Extraction time and the bank's bytes grow by K x the train split; val and test get none.")
    augment_seed: int = option(0, "Seed of the views: view k of an image is the same in every run, resumed or not.")
    crop_scale: float = option(0.6, "Random resized crop: the smallest area kept, as a fraction of the image (1: no crop).", flag="--aug-crop-scale")
    crop_ratio: float = option(4 / 3, "Random resized crop: aspect ratios drawn log-uniformly in [1/r, r] (1: the image's own).", flag="--aug-crop-ratio")
    flip: float = option(0.5, "Probability of a left-right flip.", flag="--aug-flip")
    rotate: float = option(10.0, "Rotation drawn uniformly in [-d, d] degrees (0: none).", flag="--aug-rotate")
    brightness: float = option(0.1, "Brightness: an offset drawn in [-b, b] (pixels in [0, 1]).", flag="--aug-brightness")
    contrast: float = option(0.1, "Contrast: a factor about the image mean drawn in [1 - c, 1 + c].", flag="--aug-contrast")

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool) or not isinstance(self.augment, int) or not 0 <= self.augment <= MAX_VIEWS:
            raise MedembedError(f"option augment must be an integer in [0, {MAX_VIEWS}]; got {self.augment!r}")
        if isinstance(self.augment_seed, bool) or not isinstance(self.augment_seed, int) or not 0 <= self.augment_seed < 2**63:
            raise MedembedError(f"option augment_seed must be an integer in [0, 2**63); got {self.augment_seed!r}")
        _check_range("crop_scale", self.crop_scale, 0.05, 1.0)
        _check_range("crop_ratio", self.crop_ratio, 1.0, 4.0)
        _check_range("flip", self.flip, 0.0, 1.0)
        _check_range("rotate", self.rotate, 0.0, 45.0)
        _check_range("brightness", self.brightness, 0.0, 0.5)
        _check_range("contrast", self.contrast, 0.0, 0.9)
