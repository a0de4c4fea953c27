"""What `manifest split`, `manifest sample` and the `--ratios` of `manifest folders` / `manifest csv` can be told.
Standard library only, so every command's --help starts fast."""

from __future__ import annotations

import math
from dataclasses import dataclass

from medembed.errors import MedembedError
from medembed.options import check_positive, option

SPLIT_NAMES = ("train", "val", "test")  # the order --ratios gives its shares in
DEFAULT_RATIOS = "70/10/20"
_RATIOS_HELP = "three shares train/val/test, as percentages summing to 100 (70/10/20) or fractions summing to 1 (0.7,0.1,0.2)"


def parse_ratios(text: str) -> dict[str, float]:
    """``"70/10/20"`` or ``"0.7,0.1,0.2"`` -> ``{"train": 0.7, "val": 0.1, "test": 0.2}``.

    Shares are non-negative and sum to 100 or to 1; a zero share is allowed (80/0/20: fit carves val from train).
    Anything else is a MedembedError quoting the text."""
    parts = str(text).replace(",", "/").split("/")
    if len(parts) != len(SPLIT_NAMES):
        raise MedembedError(f"ratios {text!r}: expected {_RATIOS_HELP}")
    try:
        shares = [float(part) for part in parts]
    except ValueError:
        raise MedembedError(f"ratios {text!r}: not numbers; expected {_RATIOS_HELP}") from None
    if any(not math.isfinite(share) or share < 0 for share in shares):
        raise MedembedError(f"ratios {text!r}: shares must be finite and non-negative")
    total = sum(shares)
    scale = next((whole for whole in (100.0, 1.0) if math.isclose(total, whole, rel_tol=1e-6, abs_tol=1e-9)), None)
    if scale is None:
        raise MedembedError(f"ratios {text!r} sum to {total:g}; they must sum to 100 (percentages) or 1 (fractions)")
    return {name: share / scale for name, share in zip(SPLIT_NAMES, shares)}


def parse_columns(text: str | None, what: str) -> tuple[str, ...] | None:
    """``"label,body_part"`` -> ``("label", "body_part")``; None stays None (the command's default columns)."""
    if text is None:
        return None
    columns = tuple(name.strip() for name in str(text).split(","))
    if not all(columns):
        raise MedembedError(f"{what} {text!r}: expected column names separated by commas, e.g. label,body_part")
    return columns


@dataclass
class SplitOptions:
    """How rows without a split get one: shares, seed, the grouping that no split may cut, the strata to balance."""

    ratios: str | None = option(DEFAULT_RATIOS, f"Split shares: {_RATIOS_HELP}.")
    seed: int = option(0, "Seed of the assignment: the same manifest and seed give the same splits, whatever the row order.")
    group_by: str | None = option(None, "Column whose rows stay together in one split (default: patient_id where it has values, else the study, else the image; rows of one study always stay together).")
    stratify: str | None = option(None, "Columns to balance across splits, e.g. label,body_part (default: label and body_part, those the manifest has).")
    overwrite: bool = option(False, "Reassign every row; by default rows that already have a split keep it and only the others are split, towards the ratios overall.")

    def __post_init__(self) -> None:
        if self.ratios is not None:
            parse_ratios(self.ratios)
        check_positive("seed", self.seed, minimum=0)
        parse_columns(self.stratify, "stratify")
        if self.group_by is not None and not str(self.group_by).strip():
            raise MedembedError("option group_by must name a column; got an empty name")

    @property
    def fractions(self) -> dict[str, float] | None:
        """Split name -> share of the rows, summing to 1; None where no ratios were given (no assignment)."""
        return None if self.ratios is None else parse_ratios(self.ratios)

    @property
    def stratify_columns(self) -> tuple[str, ...] | None:
        """The columns to stratify by, or None for the default (label and body_part where present)."""
        return parse_columns(self.stratify, "stratify")


@dataclass
class BuildSplitOptions(SplitOptions):
    """SplitOptions for the builders of a user's own data: splits are assigned only when --ratios is given."""

    ratios: str | None = option(None, f"Also assign train/val/test to the rows without a split: {_RATIOS_HELP}. Default: leave them unassigned.")


@dataclass
class SampleOptions:
    """A seeded, stratified sample of a manifest's rows."""

    n: int | None = option(None, "Rows to sample (required); at most the manifest's rows.", flag="--n -n")
    stratify: str | None = option(None, "Columns whose combinations are sampled in proportion, at least one row from each when --n allows (default: label and split, those the manifest has).")
    seed: int = option(0, "Seed: the same manifest and seed give the same sample, whatever the row order.")
    groups: bool = option(False, "Sample whole groups (patients; see --group-by), so a patient's images come together: about --n rows, within one group per stratum.")
    group_by: str | None = option(None, "With --groups: the column whose rows are taken together (default: patient_id where it has values, else the study, else the image).")

    def __post_init__(self) -> None:
        if self.n is None:
            raise MedembedError("option n is required: how many rows to sample (--n 300)")
        check_positive("n", self.n, minimum=1)
        check_positive("seed", self.seed, minimum=0)
        parse_columns(self.stratify, "stratify")

    @property
    def stratify_columns(self) -> tuple[str, ...] | None:
        """The columns to stratify by, or None for the default (label and split where present)."""
        return parse_columns(self.stratify, "stratify")
