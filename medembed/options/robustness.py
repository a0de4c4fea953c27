"""How `evaluate --corrupt` re-reads the test images (the extraction options) and bootstraps each condition."""

from __future__ import annotations

from dataclasses import dataclass, field

from medembed.options.extract import ExtractOptions


@dataclass
class RobustnessOptions:
    """How to extract (the run's store dtype is always used) and how many bootstrap resamples per condition."""

    extract: ExtractOptions = field(default_factory=ExtractOptions)
    n_resamples: int = 1000
