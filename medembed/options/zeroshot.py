"""Where the zero-shot scorer's text tower comes from and which prompts it uses (thresholds and calibration are the
protocol's options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medembed.options import option


@dataclass
class ZeroShotOptions:
    """Where the text tower comes from and which prompts to use (thresholds and calibration: FitOptions)."""

    prompts: Path | None = option(None, 'JSON {"normal": [...], "abnormal": [...]}; {body_part} is filled per image. Default: the built-in ensemble.')
    revision: str | None = option(None, "Model revision (branch, tag or commit) on the hub.")
    cache_dir: str | None = option(None, "Hugging Face cache folder.", cli=False)
    local_files_only: bool | None = option(None, "Never contact the hub.", cli=False)
    device: str = option("auto", "Where the text tower runs: auto | cpu | cuda.")
