"""The CUDA paths of the extractor: device preprocessing on the GPU, the overlapped loop with streams and pinned
buffers, --batch-size auto's real search, --compile with CUDA graphs. Skipped without CUDA; run on a GPU box by
tests/benchmarks/gpu_check.sh."""

import numpy as np
import pytest
import torch

from medembed.extract.device_preprocess import pack, preprocess_packed
from medembed.options.extract import ExtractOptions
from medembed.encoders.runtime import build_encoder
from medembed.extract.runner import resolve_batch_size
from medembed.store import open_store

from tests.test_device_preprocess import SPECS, TOLERANCE, cpu_path, fracatlas_paths, generated  # noqa: F401 (fixtures)
from tests.test_extract import ENCODER, assert_same_embeddings, run_extract, torchrun_extract

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (tests/benchmarks/gpu_check.sh runs these)")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("name", SPECS)
def test_preprocessing_on_the_gpu_equals_the_cpu_path(name, fracatlas_paths, generated):
    spec = SPECS[name]
    paths = fracatlas_paths[0] + list(generated.values())
    packed = pack([spec.decode_compact(p) for p in paths]).pin_memory().to(CUDA, non_blocking=True)
    on_gpu = preprocess_packed(spec, packed).cpu().numpy()
    difference = np.abs(on_gpu - cpu_path(spec, paths)).max()
    assert difference <= TOLERANCE, f"max |gpu - cpu| = {difference:.2e}"


def test_the_overlapped_cuda_loop_gives_the_cpu_embeddings(tmp_path, small_manifest, fracatlas_root):
    cpu = run_extract(small_manifest, fracatlas_root, tmp_path / "cpu.h5", ExtractOptions(batch_size=8, num_workers=0, device="cpu"))
    gpu = run_extract(small_manifest, fracatlas_root, tmp_path / "gpu.h5", ExtractOptions(batch_size=8, num_workers=2, device="cuda", precision="fp32"))
    assert gpu.preprocess_on == "cuda:0 device" and (gpu.done, gpu.failed) == (cpu.done, cpu.failed) == (24, 2)
    assert_same_embeddings(open_store(tmp_path / "cpu.h5").read(), open_store(tmp_path / "gpu.h5").read())
    assert all(gpu.stages.seconds[stage] > 0 for stage in ("H2D", "preprocess", "model", "D2H", "write"))


def test_bf16_is_the_cuda_default_and_tokens_come_back_too(tmp_path, small_manifest, fracatlas_root):
    summary = run_extract(small_manifest, fracatlas_root, tmp_path / "t.h5", ExtractOptions(batch_size=8, num_workers=0), tokens="2x2")
    assert summary.precision == "bf16" and summary.done == 24
    store = open_store(tmp_path / "t.h5")
    assert store.read_tokens("final@2x2").shape == (24, 5, 1280) and store.fingerprint["precision"] == "bf16"


def test_compile_with_cuda_graphs_pads_the_last_batch_and_matches_eager(tmp_path, small_manifest, fracatlas_root):
    eager = run_extract(small_manifest, fracatlas_root, tmp_path / "eager.h5", ExtractOptions(batch_size=8, num_workers=0, precision="fp32"))
    compiled = run_extract(small_manifest, fracatlas_root, tmp_path / "graphs.h5", ExtractOptions(batch_size=8, num_workers=0, precision="fp32", compile=True))
    assert compiled.done == eager.done == 24  # 26 images in batches of 8: the last one padded to 8, its padding dropped
    assert_same_embeddings(open_store(tmp_path / "eager.h5").read(), open_store(tmp_path / "graphs.h5").read())


def test_auto_batch_size_searches_real_forward_passes_once_then_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    encoder = build_encoder("efficientnet-lite0", ENCODER)
    encoder.load(CUDA)
    first = resolve_batch_size("auto", encoder, encoder.preprocess, CUDA, torch.bfloat16)
    assert first >= 64 and first % 8 == 0
    assert (tmp_path / "medembed" / "batch_sizes.json").is_file()
    assert resolve_batch_size("auto", encoder, encoder.preprocess, CUDA, torch.bfloat16) == first


def test_torchrun_two_processes_on_one_gpu_match_a_single_process_run(tmp_path, small_manifest, fracatlas_root):
    out = tmp_path / "dist.h5"
    done = torchrun_extract(out, small_manifest, fracatlas_root, "--workers", "2", "--precision", "fp32", port=29519)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.glob("dist.rank*")), "shard stores are merged and removed"
    run_extract(small_manifest, fracatlas_root, tmp_path / "single.h5", ExtractOptions(batch_size=8, num_workers=0, precision="fp32"))
    merged, single = open_store(out), open_store(tmp_path / "single.h5")
    assert set(merged.failed()) == set(single.failed()) and merged.provenance.get("gpu", "").startswith("NVIDIA")
    assert_same_embeddings(merged.read(), single.read())
