"""How `medembed encoders check` runs the encoder (which encoder it builds is `medembed.encoders.choice`)."""

from __future__ import annotations

from dataclasses import dataclass

from medembed.options import check_choice, option

# Precisions `encoders check` compares golden embeddings in (medembed.encoder_check.GOLDEN_TOLERANCE has one
# tolerance per precision).
CHECK_PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class CheckOptions:
    """How `medembed encoders check` runs the encoder."""

    device: str = option("cpu", "Device to run on (cpu, cuda, cuda:1).")
    precision: str = option("fp32", "Autocast precision: fp32, bf16 or fp16 (golden tolerances differ per precision).")

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, CHECK_PRECISIONS)
