"""`medembed manifest …`: build manifests from public data sets or a user's folders/CSV, split, sample and check them.

The manifest package is imported inside each command, so `--help` stays fast."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import typer

from medembed.options import parse_key_values
from medembed.options.manifest import BuildSplitOptions, SampleOptions, SplitOptions

from ._generate import command

app = typer.Typer(help="Build and check manifests (one row per image: image_id, path, label, study, patient, body part, split).", no_args_is_help=True)

OUT = typer.Option(..., "--out", "-o", help="Manifest CSV to write.")


def _written(manifest, out: Path, notes: list[str] = ()) -> None:
    from medembed.data import manifest as m

    m.write_manifest(manifest, out)
    for note in notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"wrote {out} ({len(manifest)} rows)")
    typer.echo(m.validate_manifest(manifest, root=None, check_files=False).format())


@contextmanager
def _naming(source: Path):
    """Manifest errors from splitting or sampling (which know no file) say which file or folder was read."""
    from medembed.data import manifest as m

    try:
        yield
    except m.ManifestError as error:
        raise m.ManifestError(f"{source}: {error}") from None


def _split(manifest, options: SplitOptions, source: Path):
    """``manifest`` with splits assigned as ``options`` say (unchanged where they give no ratios)."""
    from medembed.data import manifest as m

    with _naming(source):
        return m.assign_splits(manifest, options)


@app.command()
def fracatlas(
    root: Path = typer.Argument(..., metavar="ROOT", help="The FracAtlas folder (with dataset.csv and images/)."),
    out: Path = OUT,
    seed: int = typer.Option(0, help="Seed of the train/val/test split (the committed canonical manifest uses 0)."),
) -> None:
    """FracAtlas: label = fractured OR hardware, each image its own study, seeded 70/10/20 split.

    Example: medembed manifest fracatlas ../shared/data/fracatlas --out fracatlas.csv
    """
    from medembed.data import manifest as m

    manifest, notes = m.build_fracatlas(root, seed=seed)
    _written(manifest, out, notes)


@app.command()
def mura(
    root: Path = typer.Argument(..., metavar="ROOT", help="The folder holding MURA-v1.1/ (or MURA-v1.1 itself)."),
    out: Path = OUT,
    seed: int = typer.Option(0, help="Seed of the val split carved from train."),
    val_fraction: float = typer.Option(0.1, help="Fraction of train images moved to val, taken as whole patients."),
) -> None:
    """MURA v1.1: study = (body part, patient, study); `valid` becomes test; val carved from train by patient.

    Example: medembed manifest mura /data --out mura.csv
    """
    from medembed.data import manifest as m

    _written(m.build_mura(root, seed=seed, val_fraction=val_fraction), out)


@command(app)
def folders(
    root: Path = typer.Argument(..., metavar="ROOT", help="root/<class>/... or root/<split>/<class>/..."),
    out: Path = OUT,
    label: list[str] = typer.Option(None, "--label", help="Folder-to-label mapping, e.g. --label normal=0 --label fracture=1."),
    splits: BuildSplitOptions = None,
) -> None:
    """One folder per class (optionally under train/val/test folders); --ratios also assigns the splits.

    Example: medembed manifest folders my_xrays/ --label normal=0 --label abnormal=1 --ratios 70/10/20 --out mine.csv
    """
    from medembed.data import manifest as m

    mapping = _labels(label, "--label") if label else None
    _written(_split(m.build_from_folders(root, class_to_label=mapping), splits, root), out)


@command(app, name="csv")
def from_csv(
    csv_path: Path = typer.Argument(..., metavar="CSV", help="Your CSV, one row per image."),
    out: Path = OUT,
    column: list[str] = typer.Option(None, "--column", help="manifest_column=your_column, e.g. --column image_id=ID --column path=file."),
    label_value: list[str] = typer.Option(None, "--label-value", help="your_value=0|1, e.g. --label-value abnormal=1."),
    splits: BuildSplitOptions = None,
) -> None:
    """A CSV with your own column names, mapped onto the manifest schema; --ratios also assigns the splits.

    Example: medembed manifest csv labels.csv --column image_id=ID --column path=file --column label=finding --label-value abnormal=1 --label-value normal=0 --column patient_id=PatientID --ratios 70/10/20 --out mine.csv
    """
    from medembed.data import manifest as m

    label_map = _labels(label_value, "--label-value") if label_value else None
    manifest = m.build_from_csv(csv_path, parse_key_values(column or [], "--column", typed=False), label_map=label_map)
    _written(_split(manifest, splits, csv_path), out)


@command(app)
def split(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST", help="Manifest CSV."),
    out: Path = OUT,
    options: SplitOptions = None,
) -> None:
    """Assign train/val/test to a manifest's rows: seeded, grouped (no patient or study in two splits), stratified.

    Rows that already have a split keep it (with their patient) unless --overwrite; the leakage check runs after.

    Examples:

      medembed manifest split mine.csv --ratios 70/10/20 --seed 0 --out mine-split.csv

      medembed manifest split mine.csv --ratios 0.8,0,0.2 --group-by patient_id --stratify label,body_part --out mine-split.csv
    """
    from medembed.data import manifest as m

    _written(_split(m.read_manifest(manifest_path), options, manifest_path), out)


@command(app)
def sample(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST", help="Manifest CSV."),
    out: Path = OUT,
    options: SampleOptions = None,
) -> None:
    """A seeded, stratified sample of a manifest (every column kept): a small balanced manifest to try things on.

    Example: medembed manifest sample data_manifests/fracatlas.csv --n 300 --stratify label,split --seed 0 --out small.csv
    """
    from medembed.data import manifest as m

    manifest = m.read_manifest(manifest_path)
    with _naming(manifest_path):
        sampled = m.sample_manifest(manifest, options)
    _written(sampled, out)


@app.command()
def check(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST", help="Manifest CSV."),
    root: Path = typer.Option(None, "--root", help="Image root the paths are relative to (checks the files exist)."),
    decode: bool = typer.Option(False, help="Also decode every file in full, as extract does: unreadable, truncated or corrupt images and sizes extract refuses are errors (reads every pixel: slower)."),
) -> None:
    """Validate a manifest and print a summary; exits non-zero on errors (warnings do not).

    Example: medembed manifest check data_manifests/fracatlas.csv --root ../shared/data/fracatlas
    """
    from medembed.data import manifest as m

    report = m.validate_manifest(m.read_manifest(manifest_path), root=root, check_files=root is not None, check_decodable=decode)
    typer.echo(report.format())
    if report.errors:
        raise typer.Exit(1)


def _labels(items: list[str], what: str) -> dict[str, int]:
    """`name=0|1` pairs: which folder or value means which label."""
    pairs = parse_key_values(items, what)
    wrong = {key: value for key, value in pairs.items() if value not in (0, 1) or isinstance(value, bool)}
    if wrong:
        raise typer.BadParameter(f"labels must be 0 or 1, got {wrong}", param_hint=what)
    return pairs
