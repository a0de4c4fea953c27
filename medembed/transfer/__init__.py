"""Taking a fitted run to another site: external validation, recalibration, drift, OOD, conformal sets, subgroups.

One concern per module: `conformal` (split-conformal prediction sets), `ood` (Mahalanobis out-of-distribution
score), `drift` (two-sample shift test, predicted-prevalence shift), `reference` (what a run keeps from its
source site: val scores, a seeded sample of train embeddings), `subgroups` (metrics per manifest column value),
`external` (`evaluate RUN --on`), `recalibrate` (calibration and thresholds refitted on a few labelled target
images), `sections` (report sections and figures). The rows of another site a run can score come from
`medembed.runs.inputs` (`run_inputs(run).target(...)`). Everything works through `Run.probabilities(rows)` and
the rows' `X`, never a particular scorer class.
"""
