"""The protocol's options: how scores become decisions (threshold rule, calibration, study aggregation), the
carved val split and the bootstrap. Standard library only, so every command's --help starts fast."""

from __future__ import annotations

from dataclasses import dataclass

from medembed.errors import MedembedError
from medembed.options import check_choice, check_positive, option

OPTIMISED_RULES = ("f1", "youden", "kappa")
TARGET_RULES = ("sensitivity", "specificity")
CALIBRATIONS = ("none", "platt", "isotonic")
AGGREGATIONS = ("mean", "max")
MAX_RESAMPLES = 100_000  # bootstrap resamples: 1,000 is the default; percentile intervals settle long before this


@dataclass(frozen=True)
class ThresholdRule:
    """A parsed threshold rule: kind in f1 | youden | kappa | sensitivity | specificity | fixed, and its number."""

    kind: str
    value: float | None = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


def parse_threshold_rule(rule: str) -> ThresholdRule:
    """Parse "f1", "youden", "kappa", "sensitivity:0.90", "specificity:0.90" or "fixed:0.5"."""
    expected = "expected f1, youden, kappa, sensitivity:<target>, specificity:<target> or fixed:<threshold>"
    kind, _, number = rule.strip().lower().partition(":")
    if kind in OPTIMISED_RULES and not number:
        return ThresholdRule(kind)
    if kind not in TARGET_RULES + ("fixed",) or not number:
        raise MedembedError(f"unknown threshold rule {rule!r}; {expected}")
    try:
        value = float(number)
    except ValueError:
        raise MedembedError(f"threshold rule {rule!r}: {number!r} is not a number; {expected}") from None
    if kind in TARGET_RULES and not 0 < value <= 1:
        raise MedembedError(f"threshold rule {rule!r}: the target {kind} must be in (0, 1]")
    if kind == "fixed" and not 0 <= value <= 1:
        raise MedembedError(f"threshold rule {rule!r}: a fixed threshold must be in [0, 1]")
    return ThresholdRule(kind, value)


@dataclass
class ProtocolOptions:
    """How a scorer's outputs become decisions and metrics: the rules chosen on val, the bootstrap on test."""

    threshold: str = option("f1", "Threshold rule chosen on val: f1 | youden | kappa | sensitivity:0.90 | specificity:0.90 | fixed:0.5.")
    calibration: str = option("none", "Probability calibration fitted on val: none | platt | isotonic.")
    aggregation: str = option("mean", "Study probability from its images': mean (MURA's rule) or max.")
    val_fraction: float = option(0.125, "Fraction of train carved into val (grouped by patient) when the data has no val split.")
    n_resamples: int = option(1000, "Bootstrap resamples for the 95% intervals (0: none).", flag="--bootstrap")
    seed: int = option(0, "Seed of the scorer's fit, the carved val split and the bootstrap.")

    @classmethod
    def of(cls, options: ProtocolOptions) -> ProtocolOptions:
        """The protocol's own fields of `options` (FitOptions and the other run options extend it), as a new object."""
        return cls(**{name: getattr(options, name) for name in cls.__dataclass_fields__})

    def __post_init__(self) -> None:
        parse_threshold_rule(self.threshold)
        check_choice("calibration", self.calibration, CALIBRATIONS)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) or not 0 < self.val_fraction < 1:
            raise MedembedError(f"option val_fraction must be in (0, 1); got {self.val_fraction!r}")
        check_positive("n_resamples", self.n_resamples, minimum=0)
        if self.n_resamples > MAX_RESAMPLES:  # a tampered run.json must not make `evaluate` bootstrap for days
            raise MedembedError(f"option n_resamples (--bootstrap) must be at most {MAX_RESAMPLES:,}; got {self.n_resamples!r}")
        check_positive("seed", self.seed, minimum=0)
