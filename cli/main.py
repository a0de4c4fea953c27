"""`medembed` entry point: the command tree. Each command parses options and calls one library function.

Usage errors print click's usage message and exit 2; library errors (MedembedError) print one line and exit 2;
Ctrl-C exits 130; no traceback reaches a user unless MEDEMBED_DEBUG=1.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer

from cli import baseline_cmds, encoders_cmds, extract_cmds, fit_cmds, manifest_cmds, store_cmds, sweep_cmds, transfer_cmds, zeroshot_cmds
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
for module in (extract_cmds, fit_cmds, zeroshot_cmds, baseline_cmds, sweep_cmds, store_cmds, encoders_cmds, transfer_cmds):
    module.register(app)


def _fail(message: str, code: int) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    sys.exit(code)


INTERRUPTED = "interrupted: work already written is kept; rerun the same command to resume"


def _warning_line(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    return f"warning: {message}\n"  # one line, without Python's source-line echo


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and turn every failure into an exit code and one line (see the module docstring)."""
    debug = os.environ.get("MEDEMBED_DEBUG") == "1"
    if not debug:
        warnings.formatwarning = _warning_line
    try:
        code = app(args=argv, prog_name="medembed", standalone_mode=False)
    except MedembedError as error:
        if debug:
            raise
        _fail(f"error: {error}", 2)
    except (KeyboardInterrupt, typer.Abort):
        _fail(INTERRUPTED, 130)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except Exception as error:
        if hasattr(error, "show") and hasattr(error, "exit_code"):  # click's usage errors (typer vendors click)
            error.show()
            sys.exit(error.exit_code)
        if debug:
            raise
        _fail(f"error: unexpected {type(error).__name__}: {error} (rerun with MEDEMBED_DEBUG=1 for the traceback)", 1)
    if code == 130:  # typer turns Ctrl-C inside a command into Exit(130), which comes back as the code
        _fail(INTERRUPTED, 130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
