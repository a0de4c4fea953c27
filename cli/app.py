"""The `medembed` command tree. Each command parses options and calls one library function; `main` runs it.

Installed as `medembed.cli`; a checkout imports the same folder as `cli`: the modules import each other
relatively, so either name works."""

from __future__ import annotations

import typer

from . import (
    baseline_cmds,
    compare_cmds,
    encoders_cmds,
    extract_cmds,
    fit_cmds,
    heads_cmds,
    manifest_cmds,
    predict_cmds,
    store_cmds,
    sweep_cmds,
    transfer_cmds,
    zeroshot_cmds,
)

app = typer.Typer(
    help="Detect abnormalities in musculoskeletal radiographs with frozen foundation-model embeddings.\n\n"
    "Typical flow: manifest -> extract (GPU box) -> fit -> evaluate / predict (laptop).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(manifest_cmds.app, name="manifest")
for module in (extract_cmds, fit_cmds, predict_cmds, compare_cmds, heads_cmds, zeroshot_cmds, baseline_cmds, sweep_cmds, store_cmds, encoders_cmds, transfer_cmds):
    module.register(app)
