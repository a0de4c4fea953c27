"""The batch runner on real FracAtlas images with the real EfficientNet-Lite0 weights (small input size for speed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.options.extract import ExtractOptions
from medembed.encoders.runtime import build_encoder
from medembed.extract.runner import extract
from medembed.data.manifest import read_manifest
from medembed.store import open_store

from tests.conftest import REPO, TRUNCATED, kill_after_batches

ENCODER = {"size": 64}
OPTIONS = ExtractOptions(batch_size=8, num_workers=0)


def assert_same_embeddings(a, b) -> None:
    """Same ids, and the same vectors up to float16 rounding of slightly different batch arithmetic."""
    a, b = (t.subset(np.argsort(t.image_id.astype(str))) for t in (a, b))
    assert a.image_id.tolist() == b.image_id.tolist()
    np.testing.assert_allclose(a.embeddings.astype(np.float32), b.embeddings.astype(np.float32), rtol=2e-3, atol=2e-3)


def run_extract(manifest_path, root, out, options=OPTIONS, **encoder_options):
    encoder = build_encoder("efficientnet-lite0", {**ENCODER, **encoder_options})
    return extract(read_manifest(manifest_path), root, encoder, out, options, encoder_options={**ENCODER, **encoder_options})


def test_extract_embeds_and_lists_truncated_files_as_failed(tmp_path, small_manifest, fracatlas_root):
    summary = run_extract(small_manifest, fracatlas_root, tmp_path / "s.h5")
    assert (summary.done, summary.failed, summary.skipped) == (24, 2, 0)
    store = open_store(tmp_path / "s.h5")
    table = store.read()
    assert table.embeddings.shape == (24, 1280) and np.isfinite(table.embeddings.astype(np.float32)).all()
    assert set(store.failed()) == set(TRUNCATED)
    assert all("truncated" in reason for reason in store.failed().values())
    manifest = read_manifest(small_manifest)
    by_id = dict(zip(manifest.image_id, manifest.split))
    assert [by_id[i] for i in table.image_id] == table.columns["split"].tolist()
    assert store.fingerprint["encoder"] == "efficientnet-lite0" and store.attrs["encoder_options"] == '{"size": 64}'
    # rerunning the same command finds nothing to do
    again = run_extract(small_manifest, fracatlas_root, tmp_path / "s.h5")
    assert (again.done, again.skipped, again.failed) == (0, 26, 0)


def test_batching_and_workers_do_not_change_embeddings(tmp_path, small_manifest, fracatlas_root):
    run_extract(small_manifest, fracatlas_root, tmp_path / "a.h5")
    run_extract(small_manifest, fracatlas_root, tmp_path / "b.h5", ExtractOptions(batch_size=5, num_workers=2))
    assert_same_embeddings(open_store(tmp_path / "a.h5").read(), open_store(tmp_path / "b.h5").read())


def test_lenient_decoding_embeds_truncated_files_under_another_fingerprint(tmp_path, small_manifest, fracatlas_root):
    run_extract(small_manifest, fracatlas_root, tmp_path / "strict.h5")
    with pytest.raises(MedembedError, match="preprocess_hash"):
        run_extract(small_manifest, fracatlas_root, tmp_path / "strict.h5", lenient_decoding=True)
    summary = run_extract(small_manifest, fracatlas_root, tmp_path / "lenient.h5", lenient_decoding=True)
    assert (summary.done, summary.failed) == (26, 0)
    assert '"lenient_decoding":true' in open_store(tmp_path / "lenient.h5").attrs["preprocess"]


def test_retry_failed_and_limit(tmp_path, small_manifest, fracatlas_root):
    first = run_extract(small_manifest, fracatlas_root, tmp_path / "s.h5", ExtractOptions(batch_size=4, num_workers=0, limit=10))
    assert first.done + first.failed == 10
    rest = run_extract(small_manifest, fracatlas_root, tmp_path / "s.h5", ExtractOptions(batch_size=4, num_workers=0, retry_failed=True))
    assert rest.done + first.done == 24 and len(open_store(tmp_path / "s.h5").failed()) == 2


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def test_cli_resumes_after_sigkill(tmp_path, small_manifest, fracatlas_root):
    out = tmp_path / "killed.h5"
    args = cli("extract", str(small_manifest), "--root", str(fracatlas_root), "--encoder", "efficientnet-lite0",
               "--option", "size=64", "--out", str(out), "--batch-size", "2", "--workers", "0")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after_batches(proc, out)
    partial = len(open_store(out))
    assert 0 < partial < 24, "the kill did not land mid-run"
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stdout
    resumed = open_store(out).read()
    assert len(resumed) == 24 and len(set(resumed.image_id)) == 24
    reference = tmp_path / "reference.h5"
    run_extract(small_manifest, fracatlas_root, reference)
    assert_same_embeddings(resumed, open_store(reference).read())


def test_bad_manifest_path_gives_clear_cli_error(tmp_path, fracatlas_root):
    done = subprocess.run(cli("extract", str(tmp_path / "missing.csv"), "--root", str(fracatlas_root), "--encoder",
                              "efficientnet-lite0", "--out", str(tmp_path / "x.h5")),
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "missing.csv" in done.stderr and "Traceback" not in done.stderr


def torchrun_extract(out, manifest_path, root, *options: str, port: int) -> subprocess.CompletedProcess:
    """`medembed extract` (EfficientNet-Lite0 at 64 px) under torchrun with two processes."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         "-m", "cli.main", "extract", str(manifest_path), "--root", str(root), "--encoder",
         "efficientnet-lite0", "--option", "size=64", "--out", str(out), *options],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


def test_torchrun_two_processes_match_a_single_process_run(tmp_path, small_manifest, fracatlas_root):
    out = tmp_path / "dist.h5"
    done = torchrun_extract(out, small_manifest, fracatlas_root, "--workers", "0", "--device", "cpu", port=29517)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.glob("dist.rank*")), "shard stores are merged and removed"
    merged = open_store(out)
    run_extract(small_manifest, fracatlas_root, tmp_path / "single.h5")
    single = open_store(tmp_path / "single.h5")
    assert set(merged.failed()) == set(single.failed())
    assert_same_embeddings(merged.read(), single.read())


def test_device_preprocessing_gives_the_workers_embeddings_and_profiles_each_stage(tmp_path, small_manifest, fracatlas_root):
    workers = run_extract(small_manifest, fracatlas_root, tmp_path / "w.h5", ExtractOptions(batch_size=8, num_workers=0, preprocess_on="workers"))
    device = run_extract(small_manifest, fracatlas_root, tmp_path / "d.h5",
                         ExtractOptions(batch_size=8, num_workers=1, preprocess_on="device", profile=True))
    assert (workers.preprocess_on, device.preprocess_on) == ("decoding workers", "cpu device")
    assert (device.done, device.failed) == (workers.done, workers.failed) == (24, 2)
    assert_same_embeddings(open_store(tmp_path / "w.h5").read(), open_store(tmp_path / "d.h5").read())
    assert device.stages.batches == 4 and device.stages.images == 24
    assert device.stages.seconds["model"] > 0 and device.stages.seconds["preprocess"] > 0 and device.stages.seconds["write"] > 0
    text = device.format()
    assert "batch 8, preprocessing on the cpu device; stages: decode wait" in text and "ms/image" in text
    profile = json.loads((tmp_path / "d.h5.profile.json").read_text())
    assert profile["images_embedded"] == 24 and profile["stages"]["bound_by"] in profile["stages"]["seconds"]


def test_token_grids_are_stored_beside_each_embedding(tmp_path, small_manifest, fracatlas_root):
    summary = run_extract(small_manifest, fracatlas_root, tmp_path / "t.h5", ExtractOptions(batch_size=8, num_workers=0, limit=10), tokens="2x2")
    store = open_store(tmp_path / "t.h5")
    grids = store.read_tokens("final@2x2")
    assert grids.shape == (summary.done, 5, 1280) and np.isfinite(grids.astype(np.float32)).all()
    # the pooled embedding is the mean over the final map, the first token of the 2x2 level
    np.testing.assert_allclose(grids[:, 0].astype(np.float32), store.read().embeddings.astype(np.float32), atol=2e-3)


def test_cli_batch_size_auto_and_profile_through_the_entry_point(tmp_path, small_manifest, fracatlas_root):
    # auto on a CPU is the CPU default batch (4); refused values are tested in tests/test_batch_size.py
    medembed = [str(Path(sys.executable).parent / "medembed"), "extract", str(small_manifest), "--root", str(fracatlas_root),
                "--encoder", "efficientnet-lite0", "--option", "size=64", "--out", str(tmp_path / "c.h5"), "--workers", "0"]
    done = subprocess.run([*medembed, "--batch-size", "auto", "--profile", "--limit", "6"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batch 4, preprocessing on the cpu device" in done.stdout and "bound by" in done.stdout and "ms/batch" in done.stdout
