"""Which encoder a command builds, and with what: the options `extract`, `encoders check` and the sweep share.
Standard library only (the registry names encoders without importing them), so --help stays fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medembed.encoders.registry import _REGISTRY, EncoderError, available_encoders
from medembed.options import option


@dataclass
class EncoderChoice:
    """Which encoder a command builds, and with what: the options `extract`, `encoders check` and the sweep share."""

    encoder: str = option("medsiglip", "Encoder name (medembed encoders list).", flag="-e")
    model: str | None = option(None, "Hub id or local directory of the checkpoint (HF encoders).")
    revision: str | None = option(None, "Model revision (branch, tag or commit) on the hub.")
    options: dict[str, Any] = option(help="Encoder option key=value, e.g. --option pooling=mean_patch_tokens --option size=320.", flag="--option", factory=dict)
    levels: str | None = option(None, "Intermediate levels to store as tokens, e.g. block14,block10@7x7 or layer:-4@4x4 (medembed encoders list shows each encoder's).")
    tokens: str | None = option(None, "Regional tokens of the final feature map, e.g. 2x2,4x4 (= levels final@2x2,final@4x4).")
    views: str | None = option(None, "Test-time views embedded beside each image and averaged into its embedding: hflip, vflip, zoom:F.")
    view_reduce: str = option("mean", "With --views: mean (store the average) | all (also every view, as the token level 'views').")

    def __post_init__(self) -> None:
        if self.encoder not in _REGISTRY:
            raise EncoderError(f"unknown encoder {self.encoder!r}; available: {', '.join(available_encoders())}")
        if self.view_reduce not in ("mean", "all"):
            raise EncoderError(f"option view_reduce must be mean or all, got {self.view_reduce!r}")

    def encoder_options(self) -> dict[str, Any]:
        """The keyword arguments for `get_encoder` (what a store records as its encoder options)."""
        given = {"model_id": self.model, "revision": self.revision, "levels": self.levels, "tokens": self.tokens, "views": self.views}
        if self.views:
            given["view_reduce"] = self.view_reduce
        return dict(self.options) | {key: value for key, value in given.items() if value is not None}
