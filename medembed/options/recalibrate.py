"""Which target images `recalibrate` takes as labelled, and what it refits on them."""

from __future__ import annotations

from dataclasses import dataclass

from medembed.errors import MedembedError
from medembed.options import check_choice, check_positive, option
from medembed.options.protocol import CALIBRATIONS, parse_threshold_rule
from medembed.options.transfer import ALL_ROWS


@dataclass
class RecalibrateOptions:
    """Which target images are labelled, and what is refitted on them."""

    labelled: int = option(50, "Labelled target images to refit on (a grouped, label-stratified seeded sample).")
    labelled_column: str | None = option(None, "Instead of a sample: the rows whose value in this column is 1/true/yes are the labelled ones.")
    calibration: str = option("platt", "Probability calibration refitted on them: none | platt | isotonic.")
    threshold: str | None = option(None, "Threshold rule refitted on them (default: the run's own rule).")
    split: str = option(ALL_ROWS, "Target rows: all, or one split of the target (train | val | test).", flag="--target-split")
    seed: int = option(0, "Seed of the labelled sample and the bootstrap.")
    n_resamples: int = option(1000, "Bootstrap resamples for the evaluation's intervals (0: none).", flag="--bootstrap")
    curve: str | None = option(None, "Also a learning curve: labelled sizes, e.g. 10,25,50,100,200 (written to RUN2/curve.*).")
    curve_seeds: int = option(5, "Seeds per size of the learning curve.")

    def __post_init__(self) -> None:
        check_positive("labelled", self.labelled, minimum=2)
        check_choice("calibration", self.calibration, CALIBRATIONS)
        if self.threshold is not None:
            parse_threshold_rule(self.threshold)
        check_positive("seed", self.seed, minimum=0)
        check_positive("n_resamples", self.n_resamples, minimum=0)
        check_positive("curve_seeds", self.curve_seeds)
        parse_sizes(self.curve)

    @property
    def sizes(self) -> list[int]:
        return parse_sizes(self.curve)


def parse_sizes(text: str | None) -> list[int]:
    """"10,25,50" -> [10, 25, 50]; None -> []."""
    if not text:
        return []
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MedembedError(f"--curve {text!r}: expected labelled sizes such as 10,25,50,100,200") from None
    if not sizes or min(sizes) < 2:
        raise MedembedError(f"--curve {text!r}: sizes must be integers >= 2")
    return sorted(set(sizes))
