"""The options of the transfer kit, shared by `evaluate` (own test or `--on`), `recalibrate` and `predict`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medembed.errors import MedembedError
from medembed.options import check_positive, option

REPORTED_ALPHAS = (0.1, 0.05)  # conformal coverage is reported at these and at --alpha
ALL_ROWS = "all"  # a target's rows: all of them, or one split's


def check_alpha(alpha: float) -> float:
    """alpha as a float in (0, 1), or MedembedError."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise MedembedError(f"conformal alpha must be in (0, 1); got {alpha!r}")
    return float(alpha)


def parse_columns(text: str | None) -> list[str]:
    """ "view,site" -> ["view", "site"]; None or "" -> []."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise MedembedError(f"--by names a column twice: {text!r}")
    return names


@dataclass
class TransferOptions:
    """Conformal sets, the OOD flag, the shift test and subgroups."""

    alpha: float = option(0.1, "Conformal prediction sets: miscoverage alpha (sets cover the true label with probability >= 1 - alpha).")
    class_conditional: bool = option(False, "Conformal quantiles per class (coverage holds within normal and within abnormal).")
    false_alarm: float = option(0.05, "OOD flag: the share of val-like images flagged (the threshold is calibrated on val).", flag="--ood-rate")
    by: str | None = option(None, "Subgroups: metrics per value of these manifest columns, e.g. --by site,sex or --by frontal,lateral,oblique.")
    columns_from: Path | None = option(None, "Manifest CSV whose columns --by may name, joined by image id (stores written before they kept every column).")
    permutations: int = option(500, "Permutations of the embedding shift test (its p-value's resolution is 1 / (1 + N)).")

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if isinstance(self.false_alarm, bool) or not isinstance(self.false_alarm, (int, float)) or not 0 < self.false_alarm < 1:
            raise MedembedError(f"option false_alarm (--ood-rate) must be in (0, 1); got {self.false_alarm!r}")
        check_positive("permutations", self.permutations)
        parse_columns(self.by)

    @property
    def columns(self) -> list[str]:
        return parse_columns(self.by)

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(dict.fromkeys((self.alpha, *REPORTED_ALPHAS)))


# TransferOptions fields `predict` has no use for (no labels, no target sample to test).
PREDICT_SKIPS = ("by", "columns_from", "permutations")
