"""Extraction throughput: the data path's feed rate, `medembed extract` end to end, and the naive loops users write.

Three parts (run: make bench-extract):
  feed  The data path alone, on one core (torch limited to 1 thread): images/s a decoding worker feeds for
        FracAtlas JPEGs (real files) and MURA-like 512 px greyscale PNGs (generated) at 448 px (MedSigLIP's
        spec) and 896 px (MedGemma's), the old CPU path (decode + pad/resize/normalise to float32 [3, S, S],
        then the stacking collate) against the new one (decode to compact integer pixels, then the packing
        collate; the preprocessing runs on the GPU). Median of --repeats passes over the files. Target >= 3x.
        Also the cost of the device preprocessing when that device is this CPU.
  cpu   EfficientNet-Lite0 (real ImageNet weights) over FracAtlas through `medembed.extract.runner`, preprocessing in
        the workers and on the device (this CPU), and a plain single-process PIL + torch loop.
  gpu   (CUDA only) the MedSigLIP-448 architecture and the MedGemma-4B vision tower at 896 px, built from
        configs with the real shapes and RANDOM weights (speed does not depend on the values): the model alone
        and `medembed extract` end to end from real files at batch sizes 32-512 with its per-stage timings, the
        compute limit (forward FLOPs per image from the config / the GPU's peak bf16 FLOP/s) and the fraction
        reached, and the official notebooks' loop (HF image processor per batch + fp32, batch 128) in the same
        run. Targets: >= 70% of the limit end to end and >= 3x the notebook loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medembed.extract.device_preprocess import pack, preprocess_packed
from medembed.encoders import get_encoder
from medembed.encoders.medgemma import gemma3_spec
from medembed.options.extract import ExtractOptions
from medembed.extract.runner import collate_images, extract
from medembed.data.images import ImageDecodeError, medsiglip_spec
from medembed.data.manifest import Manifest, read_manifest

REPO = Path(__file__).resolve().parents[2]
# google/medsiglip-448 vision tower (SigLIP so400m, patch 14, 448 px).
MEDSIGLIP_448 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14, image_size=448)
# google/medgemma-4b-it vision tower: the same so400m tower at 896 px, without a pooling head.
MEDGEMMA_896 = dict(MEDSIGLIP_448, image_size=896, vision_use_head=False)
# Tiny shapes for --smoke (checks the gpu part's code on any device in seconds; its figures mean nothing).
SMOKE_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=14)
# Dense bf16 peak FLOP/s by device name (NVIDIA datasheets, without sparsity).
PEAK_BF16 = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
FEED_SPECS = {"448 px (MedSigLIP)": medsiglip_spec(448), "896 px (MedGemma)": gemma3_spec(896)}


# --- feed: the data path alone ---------------------------------------------------------------------------------


def fracatlas_files(root: Path, count: int) -> list[Path]:
    """The first `count` FracAtlas files that decode strictly (the truncated ones are failures, not feed)."""
    manifest = read_manifest(REPO / "data_manifests" / "fracatlas.csv")
    files = []
    for path in manifest.resolve(root):
        try:
            medsiglip_spec(448).decode_compact(path)
        except ImageDecodeError:
            continue
        files.append(path)
        if len(files) == count:
            return files
    return files


def mura_like_pngs(folder: Path, count: int) -> list[Path]:
    """8-bit greyscale PNGs 512 px on the long side, MURA's format (its radiographs are 512 px PNGs of varied
    aspect), with smooth radiograph-like content plus noise so they compress like real ones."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        short = int(rng.integers(300, 512))
        height, width = (512, short) if index % 3 else (short, 512)
        rows, cols = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
        values = 0.5 + 0.3 * np.sin(6 * rows + 3 * index) * np.cos(5 * cols) + 0.08 * rng.standard_normal((height, width))
        path = folder / f"mura_like_{index:03d}.png"
        Image.fromarray((np.clip(values, 0, 1) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _median_pass(work, files: list[Path], repeats: int, batch: int = 32) -> tuple[float, float]:
    """(images/s of the median pass, bytes per image sent) for `work(batch_of_paths) -> bytes sent`."""
    seconds, sent = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        sent = sum(work(files[i : i + batch]) for i in range(0, len(files), batch))
        seconds.append(time.perf_counter() - start)
    return len(files) / statistics.median(seconds), sent / len(files)


def old_worker(spec):
    """Yesterday's worker: decode + pad/resize/normalise to float32 [3, S, S], stacked by the collate."""
    return lambda paths: collate_images([(i, spec.load(p), "") for i, p in enumerate(paths)])[1].numel() * 4


def new_worker(spec):
    """Today's worker on the device path: decode to compact integer pixels, packed by the collate."""
    return lambda paths: pack([spec.decode_compact(p) for p in paths]).nbytes


def device_cost_on_cpu(spec, files: list[Path], repeats: int, batch: int = 32) -> float:
    """images/s of the device preprocessing itself when the device is this CPU (one thread)."""
    batches = [pack([spec.decode_compact(p) for p in files[i : i + batch]]) for i in range(0, len(files), batch)]
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for packed in batches:
            preprocess_packed(spec, packed)
        seconds.append(time.perf_counter() - start)
    return len(files) / statistics.median(seconds)


def bench_feed(args: argparse.Namespace) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one decoding worker = one core, as the extractor's workers run (init_decode_worker)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            datasets = {
                "FracAtlas JPEG": fracatlas_files(args.fracatlas, args.feed_images),
                "MURA-like 512 px PNG": mura_like_pngs(Path(tmp), args.feed_images),
            }
            print(f"feed: images/s one worker core feeds (torch 1 thread; median of {args.repeats} passes over "
                  f"{args.feed_images} files; MB/image sent to the model process)")
            print(f"  {'data':<22} {'input':<19} {'old CPU path':>14} {'new path':>14} {'ratio':>7}  {'device prep on this CPU':>24}")
            for name, files in datasets.items():
                for label, spec in FEED_SPECS.items():
                    old_rate, old_bytes = _median_pass(old_worker(spec), files, args.repeats)
                    new_rate, new_bytes = _median_pass(new_worker(spec), files, args.repeats)
                    prep = device_cost_on_cpu(spec, files, args.repeats)
                    ratio = new_rate / old_rate
                    print(f"  {name:<22} {label:<19} {old_rate:6.1f} ({old_bytes / 1e6:4.2f} MB) {new_rate:6.1f} ({new_bytes / 1e6:4.2f} MB) "
                          f"{ratio:6.2f}x  {prep:8.1f} img/s  target >= 3x [{'ok' if ratio >= 3 else 'MISSED'}]")
    finally:
        torch.set_num_threads(threads)


# --- cpu: end to end on this machine ---------------------------------------------------------------------------


def naive_cpu_loop(paths: list[Path], size: int) -> tuple[int, float]:
    """What a notebook does: open each image with PIL, resize, normalise, forward one at a time in one process."""
    encoder = get_encoder("efficientnet-lite0", size=size)
    encoder.load(torch.device("cpu"))
    mean, std = np.asarray(encoder.preprocess.mean, np.float32), np.asarray(encoder.preprocess.std, np.float32)
    done = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            try:
                image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
            except OSError:
                continue
            x = (np.asarray(image, np.float32) / 255 - mean) / std
            encoder.embed(torch.from_numpy(x.transpose(2, 0, 1)).unsqueeze(0))
            done += 1
    return done, time.perf_counter() - start


def bench_cpu(args: argparse.Namespace) -> None:
    manifest = read_manifest(REPO / "data_manifests" / "fracatlas.csv")
    if args.limit:
        manifest = manifest.subset(np.arange(args.limit))
    encoder = get_encoder("efficientnet-lite0", size=args.size)
    print(f"cpu: efficientnet-lite0 @ {args.size} px over {len(manifest)} FracAtlas images, {torch.get_num_threads()} torch threads")
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for place in ("workers", "device"):
            options = ExtractOptions(batch_size=args.batch_size, num_workers=args.workers, preprocess_on=place)
            summary = extract(manifest, args.fracatlas, encoder, Path(tmp) / f"bench-{place}.h5", options)
            seconds[place] = summary.seconds
            print(f"  medembed extract, preprocessing in the {place:<7}: {summary.seconds:6.1f} s  {summary.images_per_second:6.1f} img/s  "
                  f"({summary.done} embedded, {summary.failed} failed)")
            print(f"    {summary.stages.line()}")
    print(f"  device / workers time: {seconds['device'] / seconds['workers']:.2f} (below 1: the device path is faster on this CPU)")
    if not args.skip_naive:
        done, naive = naive_cpu_loop(manifest.resolve(args.fracatlas), args.size)
        print(f"  naive PIL + torch loop: {naive:6.1f} s  {done / naive:6.1f} img/s  ({done} images); "
              f"speed-up {naive / min(seconds.values()):.2f}x")


# --- gpu: the models at their real shapes ----------------------------------------------------------------------


def random_medsiglip(directory: Path, vision: dict) -> Path:
    """A SigLIP vision checkpoint with `vision`'s shapes and random weights (the `medsiglip` encoder loads it)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**vision)).save_pretrained(directory)
    return directory


def random_medgemma_vision(directory: Path, vision: dict) -> Path:
    """A Gemma 3 checkpoint holding only a vision tower of `vision`'s shapes, random weights, and a tiny text
    config (the `medgemma` encoder reads the vision tensors alone; the 4B language model is never built)."""
    from safetensors.torch import save_file
    from transformers import Gemma3Config, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(**vision))
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=256)
    directory.mkdir(parents=True, exist_ok=True)
    Gemma3Config(text_config=text, vision_config=vision).save_pretrained(directory)
    tensors = {f"vision_tower.{name}": tensor.contiguous() for name, tensor in tower.state_dict().items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def model_alone(encoder, size: int, batch: int, device: torch.device, images: int = 1024) -> float:
    """images/s of the forward pass alone on device-resident input (bf16 autocast, as extract runs it)."""
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        for _ in range(2):
            encoder.embed_with_tokens(x)
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        steps = max(2, images // batch)
        start = time.perf_counter()
        for _ in range(steps):
            encoder.embed_with_tokens(x)
        torch.cuda.synchronize(device) if device.type == "cuda" else None
    return steps * batch / (time.perf_counter() - start)


def naive_notebook_loop(model_dir: Path, paths: list[Path], size: int, device: torch.device) -> float:
    """The official notebooks' recipe: PIL images -> SiglipImageProcessor per batch -> fp32 model, batch 128."""
    from transformers import SiglipImageProcessor, SiglipVisionModel

    processor = SiglipImageProcessor(size={"height": size, "width": size})
    model = SiglipVisionModel.from_pretrained(model_dir).to(device).eval()
    done = 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), 128):
            images = []
            for path in paths[i : i + 128]:
                try:
                    images.append(Image.open(path).convert("RGB"))
                except OSError:
                    continue
            inputs = processor(images=images, return_tensors="pt").to(device)
            model(**inputs).pooler_output.cpu()
            done += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done / (time.perf_counter() - start)


def cycled_fracatlas(root: Path, count: int) -> Manifest:
    """`count` manifest rows over the FracAtlas files present under `root` (all of them, or the subset
    gpu_check.sh carries to a GPU box), repeated under new ids where there are fewer: enough images for a
    throughput figure from a few hundred files."""
    manifest = read_manifest(REPO / "data_manifests" / "fracatlas.csv")
    present = np.flatnonzero([path.exists() for path in manifest.resolve(root)])
    rows = manifest.subset(np.resize(present, count))
    copies = np.arange(count) // len(present)
    ids = [f"{image_id}~{copy}" if copy else image_id for image_id, copy in zip(rows.image_id, copies)]
    return Manifest({**rows.columns, "image_id": np.asarray(ids, dtype=object)})


def bench_gpu(args: argparse.Namespace) -> None:
    smoke = args.smoke
    if not torch.cuda.is_available() and not smoke:
        print("gpu: CUDA not available on this machine; GPU figures not measured")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    subset = cycled_fracatlas(args.fracatlas, args.gpu_images)
    paths = subset.resolve(args.fracatlas)
    results = []
    models = {
        "MedSigLIP-448": ("medsiglip", random_medsiglip, dict(MEDSIGLIP_448, **(SMOKE_VISION if smoke else {}))),
        "MedGemma-4B vision @ 896": ("medgemma", random_medgemma_vision, dict(MEDGEMMA_896, **(SMOKE_VISION if smoke else {}))),
    }
    print(f"gpu: {name}{' (SMOKE: tiny shapes, figures meaningless)' if smoke else ''}; configs with the real shapes, RANDOM weights")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (kind, build, vision) in models.items():
            model_dir = build(Path(tmp) / kind, vision)
            encoder = get_encoder(kind, model_id=str(model_dir), local_files_only=True)
            size = encoder.preprocess.size
            flops = encoder.flops_per_image()
            limit = peak / flops if peak and flops else None
            encoder.load(device)
            attention = getattr(getattr(encoder, "_model", None) or getattr(encoder, "_vision", None), "config", None)
            attention = getattr(attention, "_attn_implementation", "?")
            print(f"  {label}: {flops / 1e9:.1f} GFLOP/image, attention {attention}"
                  + (f"; compute limit {peak / 1e12:.0f} TFLOP/s / {flops / 1e9:.1f} GFLOP = {limit:.0f} images/s" if limit else ""))
            for batch in args.gpu_batches:
                rate = model_alone(encoder, size, batch, device, images=8 if smoke else 1024)
                results.append({"model": label, "what": "model alone", "batch": batch, "images_per_second": rate})
                print(f"    model alone, batch {batch:4d}: {rate:7.0f} images/s" + (f"  ({rate / limit:.0%} of limit)" if limit else ""))
            best = 0.0
            for batch in args.gpu_batches:
                options = ExtractOptions(batch_size=batch, num_workers=args.gpu_workers, device=str(device))
                summary = extract(subset, args.fracatlas, encoder, Path(tmp) / f"{kind}-{batch}.h5", options)
                best = max(best, summary.images_per_second)
                results.append({"model": label, "what": "extract end to end", "batch": batch, "images_per_second": summary.images_per_second,
                                "stages": summary.stages.to_dict()})
                print(f"    medembed extract, batch {batch:4d}: {summary.images_per_second:7.0f} images/s end to end ({summary.done} images)"
                      + (f"  ({summary.images_per_second / limit:.0%} of limit)" if limit else ""))
                print(f"      {summary.stages.line()}")
            if kind == "medsiglip":
                naive = naive_notebook_loop(model_dir, paths, size, device)
                results.append({"model": label, "what": "notebook loop (HF processor, fp32, batch 128)", "batch": 128, "images_per_second": naive})
                print(f"    notebook loop (HF processor per batch + fp32, batch 128): {naive:7.0f} images/s; best end to end "
                      f"{best:.0f} images/s = {best / naive:.2f}x [target >= 3x: {'ok' if best >= 3 * naive else 'MISSED'}]")
            if limit:
                print(f"    best end to end {best / limit:.0%} of the compute limit [target >= 70%: {'ok' if best >= 0.7 * limit else 'MISSED'}]")
            del encoder  # frees the GPU copy before the next model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"device": name, "smoke": smoke, "results": results}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["feed", "cpu", "gpu", "all"], default="all")
    parser.add_argument("--fracatlas", type=Path, default=REPO.parent / "shared" / "data" / "fracatlas")
    parser.add_argument("--feed-images", type=int, default=64, help="files per data set in the feed part")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the files in the feed part (median)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the extractor's (4 on CPU)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="only the first N manifest rows (cpu part)")
    parser.add_argument("--skip-naive", action="store_true", help="skip the naive CPU loop (it takes minutes)")
    parser.add_argument("--gpu-batches", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--gpu-images", type=int, default=4083)
    parser.add_argument("--gpu-workers", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="gpu part with tiny shapes on whatever device is there (checks the code)")
    parser.add_argument("--json", type=Path, default=None, help="also write the gpu part's figures here")
    args = parser.parse_args()
    if args.part in ("feed", "all"):
        bench_feed(args)
    if args.part in ("cpu", "all"):
        bench_cpu(args)
    if args.part in ("gpu", "all"):
        bench_gpu(args)


if __name__ == "__main__":
    main()
