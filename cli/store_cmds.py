"""`medembed info` and `medembed merge`: inspect and combine embedding stores."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def info(
    store: Path = typer.Argument(..., metavar="STORE", help="An HDF5 embedding store."),
    as_json: bool = typer.Option(False, "--json/--no-json", help="Print the summary as JSON."),
    verify: bool = typer.Option(False, "--verify/--no-verify", help="Also read every chunk and check checksums, alignment and values (exit 1 on a problem)."),
) -> None:
    """Print rows, dim, dtype, fingerprint, provenance, failed count and label counts per split of a store, and its
    augmentation bank (extract --augment K) if it has one: views per split, recipe, bytes.

    Example: medembed info fracatlas-effl0.h5 --verify
    """
    from medembed.store.views import bank_path, bank_summary, format_bank
    from medembed.store import format_summary, open_store

    opened = open_store(store)
    summary = opened.summary()
    bank = bank_summary(store)
    if as_json:
        typer.echo(json.dumps(summary | ({"augmentation_bank": bank} if bank else {}), indent=2, default=str))
    else:
        for line in format_summary(summary):
            typer.echo(line)
        for line in format_bank(bank) if bank else ():
            typer.echo(line)
    if verify:
        problems = opened.verify()
        if bank:  # the bank is a store of its own: the same end-to-end checks, and its checks against this store
            found = (open_store(bank_path(store)).verify() if bank["readable"] else []) + bank["problems"]
            problems += [f"{bank_path(store).name}: {problem}" for problem in found]
        for problem in problems:
            typer.secho(f"problem: {problem}", fg=typer.colors.RED, err=True)
        typer.echo(f"verify       {'OK' if not problems else f'{len(problems)} problem(s)'}")
        if problems:
            raise typer.Exit(1)


def merge(
    shards: list[Path] = typer.Argument(..., metavar="SHARDS", help="Shard stores with one fingerprint and disjoint ids."),
    out: Path = typer.Option(..., "--out", "-o", help="The merged store to write (an existing one is resumed); the one input itself: consolidate it in place."),
) -> None:
    """Merge shard stores (e.g. one per torchrun rank) into one plain store, or consolidate a segmented store.

    Example: medembed merge run.rank0.h5 run.rank1.h5 --out run.h5; medembed merge run.h5 --out run.h5
    """
    from medembed.store import merge_stores, open_store

    merged = merge_stores(shards, out)
    if len(shards) == 1 and shards[0].resolve() == out.resolve():
        typer.echo(f"consolidated {merged} into one file ({len(open_store(merged))} rows)")
    else:
        typer.echo(f"merged {len(shards)} stores into {merged} ({len(open_store(merged))} rows)")


def register(app: typer.Typer) -> None:
    """Add the store commands to the top-level app."""
    app.command()(info)
    app.command()(merge)
