"""`medembed info` and `medembed merge`: inspect and combine embedding stores."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from medembed.store import merge_stores, open_store


def info(
    store: Path = typer.Argument(..., help="An HDF5 embedding store."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Print rows, dim, dtype, fingerprint, failed count and label counts per split of a store.

    Example: medembed info fracatlas-effl0.h5
    """
    summary = open_store(store).summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"store        {summary['path']}")
    typer.echo(f"rows         {summary['rows']}" + (f"  ({summary['pending_rows']} not yet folded: an extraction is running or was killed; rerun it to finish)" if summary["pending_rows"] else ""))
    typer.echo(f"dim, dtype   {summary['dim']}, {summary['dtype']}")
    typer.echo(f"failed       {summary['failed']}")
    for key, value in summary["fingerprint"].items():
        typer.echo(f"{key:<12} {value}")
    for key in ("preprocess", "medembed_version", "created"):
        if key in summary["attrs"]:
            typer.echo(f"{key:<12} {summary['attrs'][key]}")
    typer.echo(f"{'split':<8}{'rows':>8}{'normal':>8}{'abnormal':>10}{'unknown':>9}")
    for split, counts in summary["splits"].items():
        typer.echo(f"{split:<8}{counts['rows']:>8}{counts['normal']:>8}{counts['abnormal']:>10}{counts['unknown']:>9}")


def merge(
    shards: list[Path] = typer.Argument(..., help="Shard stores with one fingerprint and disjoint ids."),
    out: Path = typer.Option(..., "--out", "-o", help="The merged store to write (must not exist)."),
) -> None:
    """Merge shard stores (e.g. one per torchrun rank) into one store.

    Example: medembed merge run.rank0.h5 run.rank1.h5 --out run.h5
    """
    merged = merge_stores(shards, out)
    typer.echo(f"merged {len(shards)} stores into {merged} ({len(open_store(merged))} rows)")


def register(app: typer.Typer) -> None:
    """Add the store commands to the top-level app."""
    app.command()(info)
    app.command()(merge)
