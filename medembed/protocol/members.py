"""What each member of an ensemble brings: its own test AUROC beside the ensemble's.

A member's AUROC is computed from its own probabilities, before the ensemble averages or stacks them, at image
level and at study level (the run's aggregation of its images), for every seed the run fitted. Test is only
read here, never chosen on: nothing a member or the ensemble decides depends on it. run.json keeps the table
(`details.member_aurocs`), report.md shows it and `medembed fit` prints it, so a reader sees whether a member
(an encoder, a resolution, a head) adds to the ensemble or only costs its fit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medembed.protocol.metrics import aggregate_studies, binary_metrics
from medembed.protocol.report import format_cell, format_number, markdown_table


def member_aurocs(fitted: list[Any], test: Any, aggregation: str, reads: list[str]) -> dict[str, Any]:
    """{"members": names, "reads": what each reads, "seeds", "image" | "study": {"members": [[AUROC per member] per
    seed], "ensemble": [AUROC per seed]}} for the fitted ensembles (`medembed.protocol.steps.Fitted`, one per
    seed) on the test split; an AUROC undefined on test (one class) is NaN."""
    levels: dict[str, dict[str, list]] = {level: {"members": [], "ensemble": []} for level in ("image", "study")}
    for one in fitted:
        member_p = one.scorer.member_probabilities(test.X)
        per_level: dict[str, list[float]] = {"image": [], "study": []}
        for k in range(member_p.shape[1]):
            per_level["image"].append(_auroc(test.y, member_p[:, k]))
            studies = aggregate_studies(member_p[:, k], test.y, test.study_id, how=aggregation)
            per_level["study"].append(_auroc(studies.y, studies.p))
        for level, values in per_level.items():
            levels[level]["members"].append(values)
            levels[level]["ensemble"].append(float(one.metrics[level]["overall"]["auroc"]["value"]))
    return {"members": fitted[0].scorer.member_names(), "reads": reads, "seeds": [one.seed for one in fitted], **levels}


def members_section(table: dict[str, Any], combine: str) -> str:
    """report.md's "Members" section of a `member_aurocs` table (mean ± sd over seeds for several)."""
    seeds = table["seeds"]
    rows = []
    for k, name in enumerate(table["members"]):
        rows.append([name, table["reads"][k], *(_cell([values[k] for values in table[level]["members"]]) for level in ("image", "study"))])
    rows.append([f"**ensemble ({combine})**", "all members", *(_cell(table[level]["ensemble"]) for level in ("image", "study"))])
    over = f"mean ± sd over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    note = (f"Each member's test AUROC from its own probabilities, before the ensemble combines them ({over}). A member "
            "no better than the others may still add to the ensemble; one far below it mostly costs its fit.")
    return "\n".join(["## Members", "", note, "", *markdown_table(["Member", "Reads", "AUROC (image)", "AUROC (study)"], rows)])


def members_line(table: dict[str, Any]) -> str:
    """One console line: each member's study-level test AUROC (mean over seeds), then the ensemble's."""
    study = table["study"]
    means = [float(np.mean([values[k] for values in study["members"]])) for k in range(len(table["members"]))]
    cells = [f"{name} ({reads}) {value:.3f}" for name, reads, value in zip(table["members"], table["reads"], means)]
    return f"members' test AUROC (study level, before combining): {'; '.join(cells)}; ensemble {float(np.mean(study['ensemble'])):.3f}"


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    return binary_metrics(y, p, 0.5)["auroc"]


def _cell(values: list[float]) -> str:
    """One seed's AUROC, or mean ± sd over seeds (the sample sd, as `summarize_seeds`)."""
    if len(values) == 1:
        return format_number(values[0], "auroc")
    return format_cell({"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1))}, "auroc")
