"""`medembed encoders list` and `medembed encoders check`: what the encoders are, and whether they are fed and
embed as they should (the library's `medembed.encoder_check`; this module only prints)."""

from __future__ import annotations

import json

import typer

from medembed.encoders.choice import EncoderChoice
from medembed.encoders.registry import HUB, available_encoders, registered_encoder
from medembed.options.encoders import CheckOptions

from ._generate import command

app = typer.Typer(help="Inspect and check the frozen encoders.", no_args_is_help=True)


def list_encoders() -> None:
    """List the registered encoders: offline or from the hub, default model, input size, embedding dimension and
    the levels each can store as tokens (extract --levels).

    Example: medembed encoders list
    """
    header = ("name", "runs", "default model", "input px", "dim", "levels")
    rows = [header]
    for name in available_encoders():
        entry = registered_encoder(name)
        mark = "*" if entry.source == HUB else ""
        size, dim = (f"{value}{mark}" if value is not None else "model's" for value in (entry.input_size, entry.dim))
        rows.append((name, entry.source, entry.model_text, size, dim, entry.levels_summary))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    for row in rows:
        typer.echo("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[-1]]).rstrip())
    typer.echo(
        "\noffline: runs with no network (weights installed with medembed, or trained here by medembed baseline).\n"
        "hub: a Hugging Face checkpoint, downloaded into the Hugging Face cache on first use; with no network, pass\n"
        "  --model DIR (a downloaded copy: hf download ID --local-dir DIR) or use an offline encoder.\n"
        "*: the default checkpoint's (another --model's are read from its config.json); model's: the model given decides."
    )
    typer.echo("\nlevels (extract --levels):")
    for name in available_encoders():
        typer.echo(f"  {name}: {registered_encoder(name).levels}")


def check(
    choice: EncoderChoice = None,
    as_json: bool = typer.Option(False, "--json/--no-json", help="Print the result as JSON."),
    options: CheckOptions = None,
) -> None:
    """Check an encoder's preprocessing against its checkpoint's processor, or its embeddings against golden ones.

    Runs the bundled test images through medembed's preprocessing and, where the checkpoint ships one, its own
    Hugging Face image processor: per image the max pixel difference of the two inputs and the cosine of their
    embeddings. Offline encoders are compared with their golden embeddings (exit 1 if one moved).

    Examples:

      medembed encoders check --encoder efficientnet-lite0

      medembed encoders check --encoder medgemma --model /models/medgemma-4b-it

      medembed encoders check --encoder hf-vision --model microsoft/rad-dino --device cuda
    """
    from medembed.encoder_check import check_encoder
    encoder_options = choice.encoder_options()
    model = encoder_options.pop("model_id", None)
    result = check_encoder(choice.encoder, model_id=model, encoder_options=encoder_options, options=options)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        for line in result.lines():
            typer.echo(line)
    if not result.ok:
        raise typer.Exit(1)


def register(parent: typer.Typer) -> None:
    """Add the `encoders` group to the top-level app."""
    app.command("list")(list_encoders)
    command(app, "check")(check)
    parent.add_typer(app, name="encoders")
