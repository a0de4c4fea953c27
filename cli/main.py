"""`medembed` entry point: the command tree. Each command parses options and calls one library function."""

from __future__ import annotations

import sys

import typer

from cli import baseline_cmds, extract_cmds, fit_cmds, manifest_cmds, store_cmds, sweep_cmds, zeroshot_cmds
from medembed.errors import MedembedError

app = typer.Typer(
    help="Detect abnormalities in musculoskeletal radiographs with frozen foundation-model embeddings.\n\n"
    "Typical flow: manifest -> extract (GPU box) -> fit -> evaluate / predict (laptop).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(manifest_cmds.app, name="manifest")
app.command()(extract_cmds.extract)
fit_cmds.register(app)
app.command()(zeroshot_cmds.zeroshot)
app.add_typer(baseline_cmds.app, name="baseline")
app.command()(sweep_cmds.sweep)
store_cmds.register(app)


def main() -> None:
    """Run the CLI; library errors become one clear line and exit code 2, not a traceback."""
    try:
        app(standalone_mode=False)
    except MedembedError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as done:
        sys.exit(getattr(done, "exit_code", getattr(done, "code", 0)))
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except Exception as error:  # click usage errors arrive here with standalone_mode=False
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()
