"""`medembed` entry point: runs the command tree of `.app` and turns every failure into an exit code and one line.

Usage errors print click's usage message and exit 2; library errors (MedembedError) print one line and exit 2;
Ctrl-C exits 130, from the first instruction on (the handler is in place before typer or any command module is
imported); no traceback reaches a user unless MEDEMBED_DEBUG=1. This module imports only the standard library.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

INTERRUPTED = "interrupted: work already written is kept; rerun the same command to resume"


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"\033[31m{message}\033[0m\n" if sys.stderr.isatty() else f"{message}\n")
    sys.exit(code)


def _warning_line(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    return f"warning: {message}\n"  # one line, without Python's source-line echo


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and turn every failure into an exit code and one line (see the module docstring)."""
    debug = os.environ.get("MEDEMBED_DEBUG") == "1"
    if not debug:
        warnings.formatwarning = _warning_line
    try:
        code = _run(argv, debug)
    except KeyboardInterrupt:
        _fail(INTERRUPTED, 130)
    if code == 130:  # typer turns Ctrl-C inside a command into Exit(130), which comes back as the code
        _fail(INTERRUPTED, 130)
    sys.exit(code if isinstance(code, int) else 0)


def _run(argv: list[str] | None, debug: bool) -> Any:
    import typer

    from medembed.errors import MedembedError
    from medembed.runs.provenance import set_command_line

    from .app import app

    set_command_line(["medembed", *(sys.argv[1:] if argv is None else argv)])  # what run.json's provenance records
    try:
        return app(args=argv, prog_name="medembed", standalone_mode=False)
    except MedembedError as error:
        if debug:
            raise
        _fail(f"error: {error}", 2)
    except typer.Abort:
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


def __getattr__(name: str) -> Any:
    """`main.app` (`medembed.cli.main.app`, or `cli.main.app` from a checkout), the command tree, built on first use
    (tests and in-process runners take it from here)."""
    if name == "app":
        from .app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
