"""`medembed extract`: stage 1, a frozen encoder over a manifest into an HDF5 store."""

from __future__ import annotations

from pathlib import Path

import typer

from medembed.encoders.choice import EncoderChoice
from medembed.options.augment import AugmentOptions
from medembed.options.extract import ExtractOptions

from ._generate import command


def extract(
    manifest: Path = typer.Argument(..., metavar="MANIFEST", help="Manifest CSV (paths relative to --root)."),
    root: Path = typer.Option(..., "--root", help="Folder the manifest's paths are relative to."),
    out: Path = typer.Option(..., "--out", "-o", help="HDF5 store to write or resume."),
    choice: EncoderChoice = None,
    lenient: bool = typer.Option(False, "--lenient/--no-lenient", help="Decode truncated images (grey fill) instead of listing them as failed; recorded in the store's fingerprint."),
    options: ExtractOptions = None,
    augment: AugmentOptions = None,
) -> None:
    """Embed every image of a manifest into an HDF5 store; rerun the same command to resume.

    Examples:

      medembed extract data_manifests/fracatlas.csv --root ../shared/data/fracatlas --encoder efficientnet-lite0 --out fracatlas-effl0.h5

      medembed extract mura.csv --root /data --encoder medsiglip --model google/medsiglip-448 --batch-size 256 --out mura-medsiglip.h5

      torchrun --nproc-per-node 8 $(which medembed) extract mura.csv --root /data --out mura.h5

      medembed extract fracatlas.csv --root ../shared/data/fracatlas --levels block14 --augment 4 --out fa.h5  (+ fa.views.h5: 4 views per train image)
    """
    from tqdm import tqdm

    from medembed.data.manifest import read_manifest
    from medembed.encoders.runtime import build_encoder

    encoder_options = choice.encoder_options() | ({"lenient_decoding": True} if lenient else {})
    table = read_manifest(manifest)
    built = build_encoder(choice.encoder, encoder_options)
    # Imported after the encoder is built: a hub model that cannot be had fails before torch is imported.
    from medembed.extract.runner import check_bank_recipe, extract as run_extract, extract_bank

    if augment.augment:
        check_bank_recipe(out, augment)  # a bank of another recipe is refused before anything runs
    with tqdm(total=len(table), unit="img", desc=f"extract {choice.encoder}", dynamic_ncols=True) as bar:
        summary = run_extract(table, root, built, out, options, on_progress=bar.update, encoder_options=encoder_options)
    typer.echo(summary.format())
    if augment.augment:
        train = int((table.split == "train").sum())
        with tqdm(total=augment.augment * train, unit="view", desc=f"views x{augment.augment}", dynamic_ncols=True) as bar:
            bank = extract_bank(table, root, built, out, options, augment, on_progress=bar.update, encoder_options=encoder_options)
        typer.echo(bank.format())
    typer.echo(f"store: {out}  (medembed info {out})")


def register(app: typer.Typer) -> None:
    command(app)(extract)
