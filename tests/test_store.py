"""The HDF5 embedding store: round trip, resume, refusals, merge, and crash safety under SIGKILL."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from medembed.store import (
    EmbeddingStore,
    StoreError,
    StoreWriter,
    make_fingerprint,
    merge_stores,
    open_store,
    read_stores,
)

REPO = Path(__file__).resolve().parent.parent
FP = make_fingerprint(encoder="test", model_id="tiny", embedding_kind="pooler_output", preprocess_hash="abc", dtype="float16")
DIM = 8


def rows(start: int, stop: int) -> tuple[list[str], np.ndarray, dict]:
    """Deterministic rows: ids img00012, embeddings from the index, alternating labels and splits."""
    idx = np.arange(start, stop)
    emb = (np.sin(idx[:, None] * 0.37 + np.arange(DIM)[None, :])).astype(np.float16)
    cols = {
        "label": (idx % 2).tolist(),
        "split": [("train", "val", "test")[i % 3] for i in idx],
        "study_id": [f"s{i // 2}" for i in idx],
        "patient_id": [f"p{i // 4}" for i in idx],
        "body_part": ["wrist"] * len(idx),
    }
    return [f"img{i:05d}" for i in idx], emb, cols


def test_round_trip_is_readable_with_plain_h5py(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP, metadata={"manifest": "m.csv"}) as w:
        w.append(*rows(0, 10))
        w.add_failed(["bad1"], ["truncated JPEG"])
    with h5py.File(path, "r") as f:  # the documented format, no medembed needed
        assert f["embeddings"].shape == (10, DIM) and f["embeddings"].dtype == np.float16
        assert f["image_id"].asstr()[3] == "img00003"
        assert f["label"][:].tolist() == [0, 1] * 5
        assert f["failed/reason"].asstr()[0] == "truncated JPEG"
        assert f.attrs["encoder"] == "test" and f.attrs["manifest"] == "m.csv" and f.attrs["schema_version"] == 1
    table = open_store(path).read()
    ids, emb, cols = rows(0, 10)
    assert table.image_id.tolist() == ids
    np.testing.assert_array_equal(table.embeddings, emb)
    assert table.columns["split"].tolist() == cols["split"]
    assert open_store(path).read("val").image_id.tolist() == [i for i, s in zip(ids, cols["split"]) if s == "val"]
    assert open_store(path).failed() == {"bad1": "truncated JPEG"}
    summary = open_store(path).summary()
    assert summary["rows"] == 10 and summary["failed"] == 1 and summary["splits"]["train"]["abnormal"] == 2


def test_resume_skips_done_ids_and_refuses_duplicates(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP) as w:
        w.append(*rows(0, 5))
        w.add_failed(["bad"], ["empty file"])
    with StoreWriter(path, dim=DIM, fingerprint=FP) as w:
        assert w.done_ids() == {f"img{i:05d}" for i in range(5)} | {"bad"}
        assert "bad" not in w.done_ids(include_failed=False)
        with pytest.raises(StoreError, match="already in the store"):
            w.append(*rows(4, 6))
        w.append(*rows(5, 8))
        # a retried image that now succeeds leaves the failed table
        ids, emb, cols = rows(100, 101)
        w.append(["bad"], emb, {k: v for k, v in cols.items()})
    store = open_store(path)
    assert len(store) == 9 and store.failed() == {}


def test_fold_happens_during_a_long_run(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP, fold_every_rows=20) as w:
        for start in range(0, 60, 10):
            w.append(*rows(start, start + 10))
        with h5py.File(path, "r") as f:  # plain h5py already sees folded rows mid-run
            assert f["embeddings"].shape[0] >= 40
        assert len(open_store(path)) == 60  # h5 rows + rows still in the log
    assert not (tmp_path / "s.h5.wal").exists() and not (tmp_path / "s.h5.lock").exists()


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP):
        with pytest.raises(StoreError, match="another process"):
            StoreWriter(path, dim=DIM, fingerprint=FP)
        open_store(path).read()  # readers are fine
    StoreWriter(path, dim=DIM, fingerprint=FP).close()  # and the lock is released after


def test_fingerprint_and_dim_mismatch_are_refused(tmp_path):
    path = tmp_path / "s.h5"
    StoreWriter(path, dim=DIM, fingerprint=FP).close()
    other = dict(FP, preprocess_hash="zzz")
    with pytest.raises(StoreError, match="preprocess_hash"):
        StoreWriter(path, dim=DIM, fingerprint=other)
    with pytest.raises(StoreError, match="dim"):
        StoreWriter(path, dim=DIM + 1, fingerprint=FP)
    with pytest.raises(StoreError, match="dtype"):
        StoreWriter(tmp_path / "t.h5", dim=DIM, fingerprint=dict(FP, dtype="int8"))


def test_foreign_files_give_clear_errors(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        open_store(text)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = [1, 2]
    with pytest.raises(StoreError, match="not a medembed embedding store"):
        open_store(plain)
    newer = tmp_path / "newer.h5"
    StoreWriter(newer, dim=DIM, fingerprint=FP).close()
    with h5py.File(newer, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="newer than this medembed"):
        open_store(newer)
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "missing.h5")


def test_merge_shards(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    with StoreWriter(a, dim=DIM, fingerprint=FP) as w:
        w.append(*rows(0, 6))
        w.add_failed(["x"], ["unreadable"])
    with StoreWriter(b, dim=DIM, fingerprint=FP) as w:
        w.append(*rows(6, 10))
    merged = open_store(merge_stores([a, b], tmp_path / "m.h5")).read()
    ids, emb, _ = rows(0, 10)
    assert merged.image_id.tolist() == ids
    np.testing.assert_array_equal(merged.embeddings, emb)
    assert open_store(tmp_path / "m.h5").failed() == {"x": "unreadable"}
    with pytest.raises(StoreError, match="overlap"):
        merge_stores([a, a], tmp_path / "m2.h5")
    # merging into an existing store (a resumed distributed run) skips what it already holds
    merge_stores([a, b], tmp_path / "m.h5")
    assert len(open_store(tmp_path / "m.h5")) == 10
    c = tmp_path / "c.h5"
    StoreWriter(c, dim=DIM, fingerprint=dict(FP, encoder="other")).close()
    with pytest.raises(StoreError, match="fingerprints differ"):
        read_stores([a, c])


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys
    from tests.test_store import rows, FP, DIM
    from medembed.store import StoreWriter
    path, total, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with StoreWriter(path, dim=DIM, fingerprint=FP, fold_every_rows=4 * batch) as w:
        done = w.done_ids()
        for start in range(0, total, batch):
            ids, emb, cols = rows(start, start + batch)
            if ids[0] in done:
                continue
            failed = {f"bad{start}": "truncated"} if start % (3 * batch) == 0 else {}
            w.append(ids, emb, cols, failed=failed)
            print(start + batch, flush=True)  # acknowledged: this batch must survive any kill from here on
    """
)


def run_writer(path: Path, total: int, batch: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(path), str(total), str(batch)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_sigkill_at_random_points_then_resume_matches_uninterrupted_run(tmp_path):
    total, batch = 3000, 25
    reference = tmp_path / "reference.h5"
    assert run_writer(reference, total, batch).wait(timeout=120) == 0
    expected = open_store(reference).read()
    rng = random.Random(1234)
    kills = 0
    for trial in range(6):
        path = tmp_path / f"trial{trial}.h5"
        for _ in range(3):  # kill the same store several times, then let it finish
            proc = run_writer(path, total, batch)
            # Wait for a random number of acknowledged batches (so the kill lands mid-run however fast the
            # machine), then a random instant more: inside an append, a fold, or between them.
            acks = [proc.stdout.readline() for _ in range(rng.randint(1, 20))]
            time.sleep(rng.uniform(0, 0.05))
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=60)
            kills += proc.returncode == -signal.SIGKILL
            acknowledged = max(int(line) for line in acks + out.split() if str(line).strip())
            if path.exists():
                store = open_store(path)  # opens after a kill at any instant
                table = store.read()
                assert len(set(table.image_id)) == len(table.image_id), "duplicated rows after a kill"
                assert len(table) >= acknowledged, "an acknowledged batch was lost"
        proc = run_writer(path, total, batch)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        got = open_store(path).read()
        order = np.argsort(got.image_id.astype(str))
        assert got.image_id[order].tolist() == expected.image_id.tolist()
        np.testing.assert_array_equal(got.embeddings[order], expected.embeddings)
        assert got.columns["split"][order].tolist() == expected.columns["split"].tolist()
        assert open_store(path).failed() == open_store(reference).failed()
    assert kills == 18, "a writer finished before it could be killed; the test proves nothing"


def test_torn_log_tail_is_ignored_and_truncated(tmp_path):
    path = tmp_path / "s.h5"
    w = StoreWriter(path, dim=DIM, fingerprint=FP)
    w.append(*rows(0, 5))
    w.append(*rows(5, 10))
    w._log.close()  # simulate a kill: no fold, the lock file is released by the OS
    os.close(w._lock.fd)
    wal = tmp_path / "s.h5.wal"
    wal.write_bytes(wal.read_bytes()[:-7])  # a torn last record
    assert len(EmbeddingStore(path)) == 5
    with StoreWriter(path, dim=DIM, fingerprint=FP) as w2:
        assert len(w2.done_ids()) == 5
        w2.append(*rows(5, 10))
    assert len(open_store(path)) == 10
