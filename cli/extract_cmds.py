"""`medembed extract`: stage 1, a frozen encoder over a manifest into an HDF5 store."""

from __future__ import annotations

from pathlib import Path

import typer

from medembed.encoders import available_encoders
from medembed.extract import ExtractOptions, build_encoder, extract as run_extract
from medembed.manifest import read_manifest


def extract(
    manifest: Path = typer.Argument(..., help="Manifest CSV (paths relative to --root)."),
    root: Path = typer.Option(..., "--root", help="Folder the manifest's paths are relative to."),
    out: Path = typer.Option(..., "--out", "-o", help="HDF5 store to write or resume."),
    encoder: str = typer.Option("medsiglip", "--encoder", "-e", help=f"One of: {', '.join(available_encoders())}."),
    model: str = typer.Option(None, "--model", help="Hub id or local directory of the checkpoint (HF encoders)."),
    revision: str = typer.Option(None, "--revision", help="Model revision (branch, tag or commit) on the hub."),
    option: list[str] = typer.Option(None, "--option", help="Encoder option key=value, e.g. --option pooling=mean_patch_tokens --option size=320."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Images per forward pass (default: 128 on CUDA, 8 on CPU)."),
    workers: int = typer.Option(None, "--workers", "-j", help="Decoding worker processes (default: CPU cores - 1)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32."),
    dtype: str = typer.Option("float16", help="Store dtype: float16 | float32."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the encoder (GPU, long runs)."),
    lenient: bool = typer.Option(False, "--lenient", help="Decode truncated images (grey fill) instead of listing them as failed; recorded in the store's fingerprint."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Try again the images an earlier run listed as failed."),
    limit: int = typer.Option(None, help="Embed at most this many new images."),
) -> None:
    """Embed every image of a manifest into an HDF5 store; rerun the same command to resume.

    Examples:

      medembed extract data_manifests/fracatlas.csv --root ../shared/data/fracatlas --encoder efficientnet-lite0 --out fracatlas-effl0.h5

      medembed extract mura.csv --root /data --encoder medsiglip --model google/medsiglip-448 --batch-size 256 --out mura-medsiglip.h5

      torchrun --nproc-per-node 8 $(which medembed) extract mura.csv --root /data --out mura.h5
    """
    from tqdm import tqdm

    encoder_options = _options(option or [])
    if model:
        encoder_options["model_id"] = model
    if revision:
        encoder_options["revision"] = revision
    if lenient:
        encoder_options["lenient_decoding"] = True
    table = read_manifest(manifest)
    built = build_encoder(encoder, encoder_options)
    options = ExtractOptions(
        batch_size=batch_size, num_workers=workers, device=device, precision=precision, store_dtype=dtype,
        compile=compile_model, retry_failed=retry_failed, limit=limit,
    )
    with tqdm(total=len(table), unit="img", desc=f"extract {encoder}", dynamic_ncols=True) as bar:
        summary = run_extract(table, root, built, out, options, on_progress=bar.update, encoder_options=encoder_options)
    typer.echo(summary.format())
    typer.echo(f"store: {out}  (medembed info {out})")


def _options(items: list[str]) -> dict:
    """key=value pairs; values parsed as int, float, true/false where they look like one."""
    parsed: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected key=value, got {item!r}")
        for cast in (int, float):
            try:
                parsed[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            parsed[key] = {"true": True, "false": False}.get(value.lower(), value)
    return parsed
