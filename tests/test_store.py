"""The HDF5 embedding store: round trip, resume, refusals, merge, segments (folds that do not copy the store,
the index of virtual datasets, moving, consolidation), and crash safety under SIGKILL, in folds and consolidation."""

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from medembed.store import (
    EmbeddingStore,
    consolidate_store,
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


def abandon(writer: StoreWriter) -> None:
    """What a SIGKILL leaves: the log as written, no fold, the lock released by the kernel."""
    writer._log.close()
    os.close(writer._lock.fd)
    writer._lock.fd = -1


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


def write_batches(path: Path, total: int, batch: int, ack) -> None:
    """An extraction's writes: batches appended (a failure every third), a fold every four, resumed from what the
    store already holds; `ack(ids)` once a batch is acknowledged (durable from then on)."""
    with StoreWriter(path, dim=DIM, fingerprint=FP, fold_every_rows=4 * batch) as w:
        done = w.done_ids()
        for start in range(0, total, batch):
            ids, emb, cols = rows(start, start + batch)
            if ids[0] in done:
                continue
            failed = {f"bad{start}": "truncated"} if start % (3 * batch) == 0 else {}
            w.append(ids, emb, cols, failed=failed)
            ack(ids)


def test_sigkill_at_chosen_points_then_resume_matches_uninterrupted_run(tmp_path):
    """Kill points chosen deterministically over the whole run (killed_at counts calls: inside an append, a fold,
    or between them), the same store killed three times, then finished: it matches an uninterrupted run."""
    total, batch = 500, 25
    reference = tmp_path / "reference.h5"
    write_batches(reference, total, batch, lambda ids: None)
    expected = open_store(reference).read()
    _, marks, errors = killed_at(0, lambda ack, mark: (write_batches(tmp_path / "count.h5", total, batch, ack), mark("end")))
    assert not errors, errors
    kills = 0
    for trial, fraction in enumerate((0.07, 0.3, 0.55, 0.8)):
        path = tmp_path / f"trial{trial}.h5"
        acked: list[str] = []
        for attempt in range(3):  # kill the same store three times: each rerun resumes and gets a third further
            call = int(marks["end"] * fraction / 3) + attempt
            new, reached, errors = killed_at(call, lambda ack, mark: (write_batches(path, total, batch, ack), mark("end")))
            assert not errors, errors
            kills += "end" not in reached
            acked += new
            if path.exists():
                table = open_store(path).read()  # opens after a kill at any instant
                assert len(set(table.image_id)) == len(table.image_id), f"duplicated rows after a kill at call {call}"
                assert set(acked) <= set(table.image_id), f"an acknowledged batch was lost after a kill at call {call}"
        write_batches(path, total, batch, lambda ids: None)
        got = open_store(path).read()
        order = np.argsort(got.image_id.astype(str))
        assert got.image_id[order].tolist() == expected.image_id.tolist()
        np.testing.assert_array_equal(got.embeddings[order], expected.embeddings)
        assert got.columns["split"][order].tolist() == expected.columns["split"].tolist()
        assert open_store(path).failed() == open_store(reference).failed()
    assert kills == 12, f"only {kills} of 12 writers were killed before they finished; the test proves little"


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


# -------------------------------------------------------------------------------------------- segments


def file_state(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def test_folds_add_sealed_segments_and_never_rewrite_earlier_ones(tmp_path):
    path = tmp_path / "s.h5"
    seen: dict[Path, tuple] = {}
    with StoreWriter(path, dim=DIM, fingerprint=FP, fold_every_rows=10, consolidate=False) as w:
        for start in range(0, 50, 10):
            w.append(*rows(start, start + 10))  # each batch is a fold
            segments = sorted((tmp_path / "s.h5.segments").glob("seg-*.h5"))
            assert len(segments) == start // 10 + 1
            for segment, state in seen.items():  # a fold adds one file; what was sealed stays as it was
                assert file_state(segment) == state
            seen = {segment: file_state(segment) for segment in segments}
            assert path.stat().st_size < 64 * 1024  # the index holds no rows
    ids, emb, cols = rows(0, 50)
    with h5py.File(path, "r") as f:  # plain h5py sees every row through the virtual datasets
        assert f["embeddings"].is_virtual and f.attrs["layout"] == "segments"
        np.testing.assert_array_equal(f["embeddings"][:], emb)
        assert f["image_id"].asstr()[:].tolist() == ids and f["split"].asstr()[:].tolist() == cols["split"]
        assert f["label"][:].tolist() == cols["label"]
    store = open_store(path)
    assert store.segmented and store.verify() == [] and store.summary()["segments"] == 5
    moved = tmp_path / "elsewhere" / "data"
    move_store(path, moved)
    store = open_store(moved / "s.h5")  # relative paths: the folder moved whole still opens
    np.testing.assert_array_equal(store.read().embeddings, emb)
    assert consolidate_store(moved / "s.h5") == moved / "s.h5"
    store = open_store(moved / "s.h5")
    assert not store.segmented and not (moved / "s.h5.segments").exists() and store.verify() == []
    assert store.read().image_id.tolist() == ids
    with h5py.File(moved / "s.h5", "r") as f:
        assert not f["embeddings"].is_virtual and f.attrs["schema_version"] == 1


def move_store(path: Path, folder: Path) -> None:
    """Move a store with its segments, as a user moves a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in path.parent.glob(path.name + "*"):
        shutil.move(str(item), folder / item.name)


def test_a_missing_segment_is_one_line_and_verify_names_it(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP, fold_every_rows=5, consolidate=False) as w:
        for start in range(0, 15, 5):
            w.append(*rows(start, start + 5))
    (tmp_path / "s.h5.segments" / "seg-000002.h5").unlink()
    store = open_store(path)  # the index opens
    with pytest.raises(StoreError) as error:
        store.read()
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"{path}: its segment seg-000002.h5 is missing from {tmp_path / 's.h5.segments'}")
    assert any("seg-000002.h5 is missing" in problem for problem in store.verify())


def test_a_plain_store_resumed_becomes_segment_zero_without_a_copy(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP) as w:
        w.append(*rows(0, 30))
    inode = path.stat().st_ino
    with StoreWriter(path, dim=DIM, fingerprint=FP, consolidate=False) as w:
        w.append(*rows(30, 32))
    assert (tmp_path / "s.h5.segments" / "seg-000000.h5").stat().st_ino == inode  # a hard link, not a copy
    store = open_store(path)
    assert store.segmented and len(store) == 32 and store.verify() == []
    np.testing.assert_array_equal(store.read().embeddings, rows(0, 32)[1])


def test_column_updates_rewrite_only_the_segments_they_touch(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP, fold_every_rows=10, consolidate=False) as w:
        for start in range(0, 30, 10):
            w.append(*rows(start, start + 10))
    folder = tmp_path / "s.h5.segments"
    before = {p.name: file_state(p) for p in folder.glob("seg-*.h5")}
    with StoreWriter(path, dim=DIM, fingerprint=FP, consolidate=False) as w:
        assert w.update_columns(["img00012", "img00013"], {"split": ["test", "test"], "view": ["AP", "AP"]}) == 2
    after = {p.name: file_state(p) for p in folder.glob("seg-*.h5")}
    assert sorted(after) == ["seg-000001.h5", "seg-000003.h5", "seg-000004.h5"]  # seg 2 rewritten as seg 4
    assert after["seg-000001.h5"] == before["seg-000001.h5"] and after["seg-000003.h5"] == before["seg-000003.h5"]
    table = open_store(path).read()
    assert table.columns["split"][12:14].tolist() == ["test", "test"] and table.columns["view"][11:15].tolist() == ["", "AP", "AP", ""]
    assert open_store(path).verify() == []
    with h5py.File(path, "r") as f:
        assert f["extra/view"].asstr()[12] == "AP" and f["extra/view"].asstr()[0] == ""


# --------------------------------------------------- SIGKILL at every step of a fold and a consolidation


def killed_at(call: int, work) -> tuple[list[str], dict[str, int], str]:
    """Run `work(ack, mark)` in a forked child SIGKILLed at its `call`-th Python or C function call (0: never);
    returns the ids it acknowledged (durable), the call counts it marked, and any error it raised (or, when a
    kill was asked for and the child was not killed, that)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: count calls, die at the chosen one; never returns into pytest
        os.close(read)
        count = 0

        def profile(frame, event, arg):
            nonlocal count
            if event in ("call", "c_call"):
                count += 1
                if count == call:
                    os.kill(os.getpid(), signal.SIGKILL)

        try:
            sys.setprofile(profile)
            work(lambda ids: os.write(write, "".join(f"ack {i}\n" for i in ids).encode()),
                 lambda name: os.write(write, f"mark {name} {count}\n".encode()))
            sys.setprofile(None)
        except BaseException as error:  # noqa: BLE001 - reported to the parent, which fails the test
            sys.setprofile(None)
            os.write(write, f"error {type(error).__name__}: {error}\n".replace("\n", " ").encode() + b"\n")
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        lines = pipe.read().splitlines()
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    acked = [line.split(" ", 1)[1] for line in lines if line.startswith("ack ")]
    marks = {line.split()[1]: int(line.split()[2]) for line in lines if line.startswith("mark ")}
    errors = [line for line in lines if line.startswith("error ")]
    if call and not killed and call <= marks.get("end", 0) - 50:
        errors.append(f"not killed at call {call} of {marks['end']}")
    return acked, marks, " | ".join(errors)


def segmented_template(path: Path) -> None:
    """A store as a killed extraction leaves it: two segments, and a log with rows, a failure and an update."""
    with StoreWriter(path, dim=DIM, fingerprint=FP, fold_every_rows=10, consolidate=False) as w:
        w.append(*rows(0, 10))
        w.append(*rows(10, 20))
    w = StoreWriter(path, dim=DIM, fingerprint=FP, fold_every_rows=100)
    w.append(*rows(20, 25), failed={"bad1": "truncated"})
    w.update_columns(["img00003"], {"split": ["val2"], "view": ["AP"]})
    abandon(w)


def resume_and_finish(path: Path, ack, mark) -> None:
    """What the rerun does: fold what the log holds, append the rest (one batch makes a fold), consolidate."""
    w = StoreWriter(path, dim=DIM, fingerprint=FP, fold_every_rows=10)
    mark("opened")
    for start in (25, 30, 35):
        ids, emb, cols = rows(start, start + 5)
        if ids[0] not in w.done_ids():
            w.append(ids, emb, cols)
            ack(ids)
    mark("close")
    w.close()  # 40 rows of 8 float16 values: small, so consolidated into one plain file
    mark("end")


def test_sigkill_at_any_step_of_folds_and_consolidation_loses_nothing_and_duplicates_nothing(tmp_path):
    template = tmp_path / "template"
    template.mkdir()
    segmented_template(template / "s.h5")
    # once here first, so lazy imports and caches are warm and the forked children count the same calls
    resume_and_finish(_copy(template, tmp_path / "warm") / "s.h5", lambda ids: None, lambda name: None)
    _, marks, errors = killed_at(0, lambda ack, mark: resume_and_finish(_copy(template, tmp_path / "count") / "s.h5", ack, mark))
    assert not errors and marks["opened"] < marks["close"] < marks["end"]
    rng = random.Random(7)
    # kills spread over the whole rerun: opening (folding the log left), appends and a fold, and consolidation
    calls = sorted({rng.randint(1, marks["opened"]) for _ in range(4)} | {rng.randint(marks["opened"], marks["close"]) for _ in range(6)}
                   | {rng.randint(marks["close"], marks["end"] - 50) for _ in range(10)})
    expected_ids, expected_emb, _ = rows(0, 40)
    kills = 0
    for trial, call in enumerate(calls):
        folder = _copy(template, tmp_path / f"trial{trial}")
        path = folder / "s.h5"
        acked, reached, errors = killed_at(call, lambda ack, mark: resume_and_finish(path, ack, mark))
        assert not errors, errors
        kills += "end" not in reached
        store = open_store(path)  # opens after a kill at any instant
        table = store.read()
        assert len(set(table.image_id)) == len(table), f"duplicated rows after a kill at call {call}"
        assert set(rows(0, 25)[0]) | set(acked) <= set(table.image_id), f"rows lost after a kill at call {call}"
        assert store.failed() == {"bad1": "truncated"} and store.verify() == [], call
        by_id = dict(zip(table.image_id, table.columns["split"]))
        assert by_id["img00003"] == "val2"
        acked, _, errors = killed_at(0, lambda ack, mark: resume_and_finish(path, ack, mark))  # the rerun finishes
        assert not errors, errors
        store = open_store(path)
        table = store.read()
        assert table.image_id.tolist() == expected_ids, call
        np.testing.assert_array_equal(table.embeddings, expected_emb)
        assert table.columns["split"][3] == "val2" and table.columns["view"][3] == "AP" and table.columns["view"][4] == ""
        assert not store.segmented and store.failed() == {"bad1": "truncated"} and store.verify() == []
        assert sorted(p.name for p in folder.iterdir()) == ["s.h5"], call  # no log, temp file or segment left
        shutil.rmtree(folder)
    assert kills >= 15, f"only {kills} of {len(calls)} children were killed before they finished; the test proves little"


def _copy(template: Path, folder: Path) -> Path:
    shutil.copytree(template, folder)
    return folder


def test_info_shows_segments_tokens_and_extra_columns_and_merge_consolidates_through_the_entry_point(tmp_path):
    medembed = shutil.which("medembed", path=str(Path(sys.executable).parent)) or shutil.which("medembed")
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP, fold_every_rows=5, consolidate=False, tokens={"final@2x2": (5, DIM)}) as w:
        for start in range(0, 10, 5):
            ids, emb, cols = rows(start, start + 5)
            w.append(ids, emb, dict(cols, view=["AP"] * 5), tokens={"final@2x2": np.ones((5, 5, DIM))})
    assert open_store(path).verify() == []
    (tmp_path / "s.h5.segments" / "seg-000001.h5").unlink()
    info = subprocess.run([medembed, "info", str(path), "--verify"], capture_output=True, text=True, timeout=300)
    assert info.returncode == 1 and "Traceback" not in info.stderr, info.stderr
    assert f"layout       2 segment(s) in {path}.segments/" in info.stdout and "verify       1 problem(s)" in info.stdout
    assert "tokens       final@2x2 [5, 8] (80 bytes per image)" in info.stdout and "extra        view" in info.stdout
    assert info.stderr.count("problem: ") == 1 and "its segment seg-000001.h5 is missing" in info.stderr
    with StoreWriter(path.with_name("t.h5"), dim=DIM, fingerprint=FP, fold_every_rows=5, consolidate=False) as w:
        w.append(*rows(0, 5))
        w.append(*rows(5, 10))
    merged = subprocess.run([medembed, "merge", str(tmp_path / "t.h5"), "--out", str(tmp_path / "t.h5")], capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout.strip() == f"consolidated {tmp_path / 't.h5'} into one file (10 rows)"
    assert not open_store(tmp_path / "t.h5").segmented and not (tmp_path / "t.h5.segments").exists()


def test_a_reader_opened_before_a_consolidation_still_reads(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP, fold_every_rows=5, consolidate=False) as w:
        w.append(*rows(0, 5))
        w.append(*rows(5, 10))
    reader = open_store(path)
    assert reader.segmented
    consolidate_store(path)  # the segments this reader listed are gone now
    assert reader.read().image_id.tolist() == rows(0, 10)[0] and not reader.segmented
