"""Extraction throughput: `medembed extract` end to end against the naive loops users write today.

Two parts (run: make bench-extract):
  cpu  EfficientNet-Lite0 (real ImageNet weights) over all of FracAtlas through `medembed.extract`, and a plain
       single-process PIL + torch loop over the same images. Target on a 2-core CPU: <= 100 s.
  gpu  (CUDA only) the MedSigLIP-448 architecture with RANDOM weights (speed does not depend on the values): images/s
       from real image files through the full loader at several batch sizes, the model alone, the compute limit
       (forward FLOPs per image from the config / the GPU's peak bf16 FLOP/s) and the achieved fraction, and the
       naive notebook loop (HF image processor per batch + fp32 model, batch 128) in the same run.
       Target on one H100: >= 560 images/s end to end and >= 3x the naive loop.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medembed.encoders import get_encoder
from medembed.extract import ExtractOptions, extract
from medembed.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]
# google/medsiglip-448 vision tower (SigLIP so400m, patch 14, 448 px).
MEDSIGLIP_448 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14, image_size=448)
# Dense bf16 peak FLOP/s by device name (NVIDIA datasheets, without sparsity).
PEAK_BF16 = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def naive_cpu_loop(paths: list[Path], size: int) -> tuple[int, float]:
    """What a notebook does: open each image with PIL, resize, normalise, forward one at a time in one process."""
    from PIL import Image

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
    with tempfile.TemporaryDirectory() as tmp:
        options = ExtractOptions(batch_size=args.batch_size, num_workers=args.workers)
        summary = extract(manifest, args.fracatlas, encoder, Path(tmp) / "bench.h5", options)
    print(f"  medembed extract: {summary.seconds:6.1f} s  {summary.images_per_second:6.1f} img/s  ({summary.done} embedded, {summary.failed} failed)  target <= 100 s [{'ok' if summary.seconds <= 100 else 'MISSED'}]")
    if not args.skip_naive:
        done, seconds = naive_cpu_loop(manifest.resolve(args.fracatlas), args.size)
        print(f"  naive PIL + torch loop: {seconds:6.1f} s  {done / seconds:6.1f} img/s  ({done} images)")
        print(f"  speed-up: {seconds / summary.seconds:.2f}x")


def _tiny_random_medsiglip(directory: Path) -> Path:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model = SiglipVisionModel(SiglipVisionConfig(**MEDSIGLIP_448))
    model.save_pretrained(directory)
    return directory


def bench_gpu(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("gpu: CUDA not available on this machine; GPU figures not measured")
        return
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    manifest = read_manifest(REPO / "data_manifests" / "fracatlas.csv")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _tiny_random_medsiglip(Path(tmp) / "medsiglip-448-random")
        encoder = get_encoder("medsiglip", model_id=str(model_dir), local_files_only=True)
        flops = encoder.flops_per_image()
        limit = peak / flops if peak and flops else None
        print(f"gpu: {name}; MedSigLIP-448 architecture, RANDOM weights; {flops / 1e9:.1f} GFLOPs/image")
        if limit:
            print(f"  compute limit: {peak / 1e12:.0f} TFLOP/s bf16 / {flops / 1e9:.1f} GFLOP = {limit:.0f} images/s")
        encoder.load(torch.device("cuda"))
        for batch in args.gpu_batches:  # the model alone, on device-resident input
            x = torch.randn(batch, 3, 448, 448, device="cuda")
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                for _ in range(3):
                    encoder.embed(x)
                torch.cuda.synchronize()
                start = time.perf_counter()
                steps = max(3, 2048 // batch)
                for _ in range(steps):
                    encoder.embed(x)
                torch.cuda.synchronize()
            rate = steps * batch / (time.perf_counter() - start)
            print(f"  model alone, batch {batch:4d}: {rate:7.0f} images/s" + (f"  ({rate / limit:.0%} of limit)" if limit else ""))
        n = min(len(manifest), args.gpu_images)
        subset = manifest.subset(np.arange(n))
        best = 0.0
        for batch in args.gpu_batches:
            options = ExtractOptions(batch_size=batch, num_workers=args.gpu_workers)
            summary = extract(subset, args.fracatlas, encoder, Path(tmp) / f"e{batch}.h5", options)
            best = max(best, summary.images_per_second)
            print(f"  medembed extract, batch {batch:4d}: {summary.images_per_second:7.0f} images/s end to end ({summary.done} images)" + (f"  ({summary.images_per_second / limit:.0%} of limit)" if limit else ""))
        naive = naive_gpu_loop(model_dir, subset.resolve(args.fracatlas))
        print(f"  naive notebook loop (HF processor per batch + fp32, batch 128): {naive:7.0f} images/s")
        print(f"  best end to end {best:.0f} images/s: {best / naive:.2f}x the naive loop; target >= 560 images/s [{'ok' if best >= 560 else 'MISSED'}] and >= 3x [{'ok' if best >= 3 * naive else 'MISSED'}]")


def naive_gpu_loop(model_dir: Path, paths: list[Path]) -> float:
    """The official notebooks' recipe: PIL images -> SiglipImageProcessor per batch -> fp32 model, batch 128."""
    from PIL import Image
    from transformers import SiglipImageProcessor, SiglipVisionModel

    processor = SiglipImageProcessor(size={"height": 448, "width": 448})
    model = SiglipVisionModel.from_pretrained(model_dir).cuda().eval()
    done = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), 128):
            images = []
            for path in paths[i : i + 128]:
                try:
                    images.append(Image.open(path).convert("RGB"))
                except OSError:
                    continue
            inputs = processor(images=images, return_tensors="pt").to("cuda")
            model(**inputs).pooler_output.cpu()
            done += len(images)
    torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["cpu", "gpu", "all"], default="all")
    parser.add_argument("--fracatlas", type=Path, default=REPO.parent / "shared" / "data" / "fracatlas")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the extractor's (4 on CPU)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="only the first N manifest rows (cpu part)")
    parser.add_argument("--skip-naive", action="store_true", help="skip the naive CPU loop (it takes minutes)")
    parser.add_argument("--gpu-batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--gpu-images", type=int, default=4083)
    parser.add_argument("--gpu-workers", type=int, default=None)
    args = parser.parse_args()
    if args.part in ("cpu", "all"):
        bench_cpu(args)
    if args.part in ("gpu", "all"):
        bench_gpu(args)


if __name__ == "__main__":
    main()
