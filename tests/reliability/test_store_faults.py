"""The store's answers to a full disk and to damaged labels, in-process and in a second (no tmpfs needed, so
they run everywhere; `test_faults.py` does the same through the CLI on a real full tmpfs):

- a log append that fails (ENOSPC) is a one-line StoreError, the log is cut back to the last whole record,
  close() does not fold, and the next writer recovers every acknowledged row;
- no room for the end-of-run consolidation: the run's rows go to a segment instead, with a warning;
- a fold that cannot reserve its space is a one-line StoreError with the .h5 and the log untouched (HDF5
  writing into a full disk crashed the process before);
- `summary()` (what `medembed info` prints) of a store with a damaged label chunk says so instead of
  raising, so `info --verify` reaches verify().
"""

import errno
import os

import h5py
import numpy as np
import pytest

from medembed.store import writer as store_module
from medembed.store import StoreError, StoreWriter, format_summary, make_fingerprint, open_store

DIM = 8
FP = make_fingerprint(encoder="test", model_id="tiny", preprocess_hash="abc", dtype="float16", precision="fp32")


def batch(start: int, stop: int):
    idx = np.arange(start, stop)
    embeddings = np.sin(idx[:, None] * 0.37 + np.arange(DIM)[None, :]).astype(np.float16)
    return [f"img{i:05d}" for i in idx], embeddings, {"label": (idx % 2).tolist(), "split": ["train"] * len(idx)}


class FullDisk:
    """A raw log file that accepts `room` more bytes, writes part of the record that does not fit, then ENOSPC."""

    def __init__(self, log, room: int) -> None:
        self.log, self.room = log, room

    def write(self, data) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        part = bytes(data[: self.room])
        self.room -= len(part)
        return self.log.write(part)

    def __getattr__(self, name):
        return getattr(self.log, name)


def test_a_log_append_on_a_full_disk_is_one_line_and_loses_nothing_acknowledged(tmp_path):
    path = tmp_path / "s.h5"
    writer = StoreWriter(path, dim=DIM, fingerprint=FP)
    writer.append(*batch(0, 4))
    size = writer._log.tell()
    writer._log = FullDisk(writer._log, room=100)  # the next record gets 100 bytes in, then the disk is full
    with pytest.raises(StoreError) as raised:
        writer.append(*batch(4, 8))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{path}.wal: cannot append to the write-ahead log (No space left on device)")
    assert os.path.getsize(f"{path}.wal") == size  # the torn record was cut off again
    writer.close()  # no fold after a failed append: the log stays for the next run
    assert open_store(path).committed_rows == 0 and open_store(path).pending_rows == 4
    with StoreWriter(path, dim=DIM, fingerprint=FP) as again:
        assert again.done_ids() == set(batch(0, 4)[0])
        again.append(*batch(4, 8))
    store = open_store(path)
    assert store.verify() == [] and len(store) == 8 and not os.path.exists(f"{path}.wal")
    np.testing.assert_array_equal(store.read().embeddings, np.concatenate([batch(0, 4)[1], batch(4, 8)[1]]))


def test_a_fold_without_room_is_one_line_and_touches_nothing(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    writer = StoreWriter(path, dim=DIM, fingerprint=FP)
    writer.append(*batch(0, 6))
    before, log = path.read_bytes(), open(f"{path}.wal", "rb").read()

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(StoreError) as raised:
        writer.close()
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{path}: cannot fold the write-ahead log into the store (No space left on device")
    assert path.read_bytes() == before and open(f"{path}.wal", "rb").read() == log
    assert not os.path.exists(f"{path}.tmp")
    monkeypatch.undo()
    with StoreWriter(path, dim=DIM, fingerprint=FP):
        pass
    store = open_store(path)
    assert store.verify() == [] and store.committed_rows == 6 and store.pending_rows == 0


def test_the_fold_reservation_is_given_back(tmp_path, monkeypatch):
    """HDF5 trims the file to what it uses on close, so the reserved space does not stay in the store."""
    sizes = []
    for name in ("reserved.h5", "unreserved.h5"):
        with StoreWriter(tmp_path / name, dim=DIM, fingerprint=FP) as writer:
            writer.append(*batch(0, 6))
        sizes.append((tmp_path / name).stat().st_size)
        monkeypatch.setattr(store_module, "_reserve", lambda path, extra: None)
    assert sizes[0] == sizes[1]


def test_info_of_a_store_with_a_damaged_label_chunk_says_so_and_verify_lists_it(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP) as writer:
        writer.append(*batch(0, 6))
    with h5py.File(path, "r") as f:
        offset = f["label"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset + 2)
        byte = f.read(1)[0]
        f.seek(offset + 2)
        f.write(bytes([byte ^ 0x10]))
    store = open_store(path)
    summary = store.summary()
    assert "cannot read 'label', the file is damaged" in summary["damaged"] and summary["rows"] == 6
    assert any(line.startswith("damaged      ") for line in format_summary(summary))
    (problem,) = store.verify()
    assert problem.startswith("'label' rows 0-") and "damaged" in problem
    with pytest.raises(StoreError, match="cannot read 'label', the file is damaged"):
        store.read()


def test_creating_a_store_on_a_full_disk_is_one_line(tmp_path):
    from .test_faults import Mount

    mount = Mount(tmp_path / "tmpfs", "4k")
    if mount.skip:
        pytest.skip(mount.skip)
    try:
        path = mount.path / "s.h5"
        with pytest.raises(StoreError) as raised:
            StoreWriter(path, dim=DIM, fingerprint=FP)
        assert str(raised.value) == f"{path}: cannot create the store (No space left on device under {mount.path})"
        assert not path.exists() and not path.with_name("s.h5.tmp").exists()
        mount.resize("8m")  # the fold reserves an upper bound of what it can need (2 chunks of 1 MiB here)
        with StoreWriter(path, dim=DIM, fingerprint=FP) as writer:  # with room, the same call works
            writer.append(*batch(0, 2))
        assert open_store(path).verify() == [] and len(open_store(path)) == 2
    finally:
        mount.close()


def test_no_room_to_consolidate_at_the_end_leaves_the_store_segmented_with_every_row(tmp_path, monkeypatch):
    """The end-of-run consolidation copies the store: without room for the copy, the rows go to a segment."""
    path, dim = tmp_path / "s.h5", 256
    fingerprint = dict(FP, dtype="float32")
    data = np.random.default_rng(0).standard_normal((3100, dim)).astype(np.float32)
    ids = [f"img{i:05d}" for i in range(3100)]
    with StoreWriter(path, dim=dim, fingerprint=fingerprint, fold_every_rows=1000, consolidate=False) as writer:
        writer.append(ids[:3000], data[:3000])
    allocate = os.posix_fallocate

    def room_for_a_segment_only(fd, offset, length):  # about 4 MB free: a segment fits, a copy of the store does not
        if length > 4 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        allocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", room_for_a_segment_only)
    writer = StoreWriter(path, dim=dim, fingerprint=fingerprint)
    writer.append(ids[3000:], data[3000:])  # a small store: close() chooses to consolidate
    with pytest.warns(store_module.StoreWarning, match="left segmented, not consolidated into one file"):
        writer.close()
    monkeypatch.undo()
    store = open_store(path)
    assert store.segmented and store.verify() == [] and store.pending_rows == 0 and not os.path.exists(f"{path}.tmp")
    np.testing.assert_array_equal(store.read().embeddings, data)
