"""Store identity, provenance and integrity: precision/config in the fingerprint, stores of the previous schema,
provenance warnings, ids HDF5 cannot hold, log resynchronisation, checksums, metadata updates, partial stores."""

import json
import os
import warnings

import h5py
import numpy as np
import pytest

from medembed.store import (
    FINGERPRINT_KEYS,
    ProvenanceWarning,
    StoreError,
    StoreWarning,
    StoreWriter,
    collect_provenance,
    fingerprint_mismatch,
    format_summary,
    make_fingerprint,
    merge_stores,
    open_store,
    read_stores,
)
from medembed.store.wal import _encode_record

from tests.test_store import DIM, abandon, rows

FP = make_fingerprint(
    encoder="test", model_id="tiny", embedding_kind="pooler_output", preprocess_hash="abc", dtype="float16",
    precision="bf16", config_sha256="c0ffee",
)
OLD_KEYS = ("encoder", "model_id", "revision", "weights_sha256", "embedding_kind", "preprocess_hash", "dtype")


def old_schema_store(path, n=4):
    """A store exactly as the previous medembed wrote it: 7-key fingerprint, no provenance, no checksums."""
    ids, emb, cols = rows(0, n)
    fingerprint = {k: FP[k] for k in OLD_KEYS}
    string = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.create_dataset("embeddings", data=emb, maxshape=(None, DIM), chunks=(1024, DIM))
        f.create_dataset("image_id", data=ids, dtype=string, maxshape=(None,), chunks=(4096,))
        f.create_dataset("label", data=np.asarray(cols["label"], np.int8), maxshape=(None,), chunks=(4096,))
        for name in ("study_id", "patient_id", "body_part", "split"):
            f.create_dataset(name, data=cols[name], dtype=string, maxshape=(None,), chunks=(4096,))
        for name in ("failed/image_id", "failed/reason"):
            f.create_dataset(name, (0,), dtype=string, maxshape=(None,), chunks=(4096,))
        f.attrs["schema_version"] = 1
        f.attrs["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
        for key, value in fingerprint.items():
            f.attrs[key] = value
        f.attrs["dim"] = DIM
        f.attrs["medembed_version"] = "0.1.0"
        f.attrs["created"] = "2025-01-01T00:00:00+00:00"


# ------------------------------------------------------------------------------------------ fingerprint


def test_fingerprint_has_precision_and_config_hash_and_old_call_sites_still_work():
    assert FINGERPRINT_KEYS[-3:] == ("precision", "config_sha256", "levels")
    old_style = make_fingerprint(encoder="x", dtype="float32")  # a call site that knows nothing of the new keys
    assert old_style["precision"] == "" and old_style["config_sha256"] == "" and old_style["levels"] == ""


def test_a_store_begun_in_bf16_is_refused_in_fp32_with_one_line(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP) as w:
        w.append(*rows(0, 4))
    with pytest.raises(StoreError, match="precision: 'bf16' vs 'fp32'") as error:
        StoreWriter(path, dim=DIM, fingerprint=dict(FP, precision="fp32"))
    assert "\n" not in str(error.value) and "--precision bf16" in str(error.value)
    with pytest.raises(StoreError, match="config_sha256"):
        StoreWriter(path, dim=DIM, fingerprint=dict(FP, config_sha256="other"))
    assert open_store(path).fingerprint["precision"] == "bf16" and open_store(path).attrs["precision"] == "bf16"


def test_a_store_of_the_previous_schema_opens_reads_and_resumes_with_a_warning(tmp_path):
    path = tmp_path / "old.h5"
    old_schema_store(path)
    store = open_store(path)
    assert len(store.read()) == 4 and store.provenance == {} and not store.checksummed
    summary = store.summary()
    assert summary["checksum"] == "none" and summary["provenance"] == {}
    assert any("not recorded" in line for line in format_summary(summary))
    assert store.verify() == []
    # A key the old store does not record is not compared; everything it does record still is.
    assert fingerprint_mismatch(store.fingerprint, FP) == []
    assert fingerprint_mismatch(store.fingerprint, dict(FP, encoder="other")) == ["encoder: 'test' vs 'other'"]
    with pytest.warns(StoreWarning, match="predates recording precision, config_sha256"):
        with StoreWriter(path, dim=DIM, fingerprint=FP) as w:
            w.append(*rows(4, 6))
    assert len(open_store(path)) == 6
    assert "precision" not in open_store(path).fingerprint  # what the old rows were made with stays unknown
    new = tmp_path / "new.h5"
    with StoreWriter(new, dim=DIM, fingerprint=FP) as w:
        w.append(*rows(10, 12))
    table, _ = read_stores([path, new])
    assert len(table) == 8


def test_an_empty_key_on_both_sides_matches_and_a_recorded_empty_key_differs_from_a_value():
    base = make_fingerprint(encoder="cnn", dtype="float32")
    assert fingerprint_mismatch(base, dict(base)) == []
    assert fingerprint_mismatch(base, dict(base, precision="fp32")) == ["precision: '' vs 'fp32'"]


# ------------------------------------------------------------------------------------------- provenance


def test_provenance_is_recorded_and_a_resume_elsewhere_warns_naming_the_packages(tmp_path):
    path = tmp_path / "s.h5"
    here = collect_provenance(gpu="NVIDIA H100")
    with StoreWriter(path, dim=DIM, fingerprint=FP, provenance=here) as w:
        w.append(*rows(0, 2))
    store = open_store(path)
    assert store.provenance == here and set(here) >= {"python", "torch", "transformers", "medembed", "gpu"}
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["provenance"])["gpu"] == "NVIDIA H100"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same environment: no warning
        StoreWriter(path, dim=DIM, fingerprint=FP, provenance=here).close()
    elsewhere = dict(here, torch="9.9.9", gpu="cpu")
    with pytest.warns(ProvenanceWarning, match=r"torch .* -> 9\.9\.9; gpu NVIDIA H100 -> cpu"):
        with StoreWriter(path, dim=DIM, fingerprint=FP, provenance=elsewhere) as w:
            w.append(*rows(2, 4))  # never an error
    assert len(open_store(path)) == 4 and open_store(path).provenance == here


def test_merging_stores_from_different_environments_warns(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    with StoreWriter(a, dim=DIM, fingerprint=FP, provenance=collect_provenance(gpu="A100")) as w:
        w.append(*rows(0, 3))
    with StoreWriter(b, dim=DIM, fingerprint=FP, provenance=collect_provenance(gpu="H100")) as w:
        w.append(*rows(3, 6))
    with pytest.warns(ProvenanceWarning, match="gpu A100 -> H100"):
        merge_stores([a, b], tmp_path / "m.h5")
    assert open_store(tmp_path / "m.h5").provenance["gpu"] == "A100"


def test_format_summary_prints_what_info_prints_plus_provenance(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP, provenance=collect_provenance(gpu="cpu")) as w:
        w.append(*rows(0, 6))
        w.add_failed(["bad"], ["empty file (0 bytes)"])
    summary = open_store(path).summary()
    lines = format_summary(summary)
    assert lines[0] == f"store        {path}"
    assert lines[1] == "rows         6" and lines[2] == f"dim, dtype   {DIM}, float16" and lines[3] == "failed       1"
    start = next(k for k, line in enumerate(lines) if line.startswith("fingerprint  "))
    fingerprint = lines[start:start + len(FP)]
    assert sorted(line[13:].split()[0] for line in fingerprint) == sorted(FP)  # every key, in one column after `fingerprint`
    assert len({line.rindex("  ") for line in fingerprint}) == 1  # values in one column, after long keys too
    assert fingerprint[0].split() == ["fingerprint", "config_sha256", "c0ffee"] and ["precision", "bf16"] in [line.split() for line in fingerprint]
    assert "checksum     fletcher32" in lines
    provenance = next(line for line in lines if line.startswith("provenance"))
    assert "torch " in provenance and "gpu cpu" in provenance
    assert lines[-4].split() == ["split", "rows", "normal", "abnormal", "unknown"]
    assert [line.split()[0] for line in lines[-3:]] == ["train", "val", "test"]  # the protocol's order
    assert lines[-2].split() == ["val", "2", "1", "1", "0"]
    json.dumps(summary)  # `medembed info --json` prints it


# ------------------------------------------------------------------------- ids HDF5 cannot hold, poisoned logs


@pytest.mark.parametrize("bad_id", ["img\x00nul", "img\udcff"])
def test_an_id_hdf5_cannot_store_is_refused_before_it_reaches_the_log(tmp_path, bad_id):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP) as w:
        w.append(*rows(0, 2))
        size = (tmp_path / "s.h5.wal").stat().st_size
        ids, emb, cols = rows(2, 4)
        with pytest.raises(StoreError, match="cannot be stored in HDF5") as error:
            w.append([ids[0], bad_id], emb, cols)
        assert repr(bad_id) in str(error.value) and "\n" not in str(error.value)
        with pytest.raises(StoreError, match="cannot be stored"):
            w.add_failed([bad_id], ["unreadable"])
        with pytest.raises(StoreError, match="column 'split'"):
            w.append(ids, emb, dict(cols, split=["train", "va\x00l"]))
        assert (tmp_path / "s.h5.wal").stat().st_size == size  # nothing of the refused batches was logged
        w.append(ids, emb, cols, failed={"x": "reason with a NUL \x00 byte"})
    assert len(open_store(path)) == 4 and open_store(path).failed() == {"x": "reason with a NUL \\0 byte"}


def test_a_poisoned_log_from_an_older_writer_cannot_wedge_later_runs(tmp_path):
    path = tmp_path / "s.h5"
    w = StoreWriter(path, dim=DIM, fingerprint=FP)
    w.append(*rows(0, 2))
    ids, emb, cols = rows(2, 5)
    poisoned = {"kind": "rows", "ids": [ids[0], "bad\x00id", ids[2]], "columns": cols, "failed": {"f\x00": "x", "ok": "y"}}
    w._log.write(_encode_record(poisoned, np.ascontiguousarray(emb).tobytes()))  # what an older medembed let through
    w._log.flush()
    ids2, emb2, cols2 = rows(5, 7)
    w.append(ids2, emb2, cols2)
    abandon(w)
    with pytest.warns(StoreWarning, match=r"dropped 2 logged entries .*'bad\\x00id'"):
        with StoreWriter(path, dim=DIM, fingerprint=FP) as w2:
            assert w2.recovered.dropped
    table = open_store(path).read()
    assert sorted(table.image_id) == sorted(rows(0, 2)[0] + [ids[0], ids[2]] + ids2)
    np.testing.assert_array_equal(table.embeddings[list(table.image_id).index(ids[2])], emb[2])
    assert open_store(path).failed() == {"ok": "y"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the log is gone: the next run starts clean
        StoreWriter(path, dim=DIM, fingerprint=FP).close()


# ------------------------------------------------------------------------------------ log resynchronisation


@pytest.mark.parametrize("damaged", [0, 1])
def test_a_damaged_log_record_is_skipped_and_later_records_survive(tmp_path, damaged):
    path = tmp_path / "s.h5"
    w = StoreWriter(path, dim=DIM, fingerprint=FP)
    offsets = []
    for start in range(0, 12, 3):
        offsets.append(w._log.tell())
        w.append(*rows(start, start + 3))
    abandon(w)
    wal = tmp_path / "s.h5.wal"
    data = bytearray(wal.read_bytes())
    data[offsets[damaged] + 40] ^= 0xFF  # a flipped bit inside the record's header
    wal.write_bytes(bytes(data))
    store = open_store(path)
    assert len(store) == 9  # the other three batches, not only those before the damage
    assert any("1 damaged record(s)" in problem for problem in store.verify())
    assert store.summary()["log_skipped_records"] == 1
    with pytest.warns(StoreWarning, match="skipped 1 damaged write-ahead-log record"):
        with StoreWriter(path, dim=DIM, fingerprint=FP) as w2:
            lost = rows(3 * damaged, 3 * damaged + 3)
            assert not set(lost[0]) & w2.done_ids()
            w2.append(*lost)  # a rerun embeds the lost batch again
    table = open_store(path).read()
    assert sorted(table.image_id) == rows(0, 12)[0]
    assert open_store(path).verify() == []


def test_records_appended_after_a_torn_tail_are_not_lost(tmp_path):
    path = tmp_path / "s.h5"
    w = StoreWriter(path, dim=DIM, fingerprint=FP)
    w.append(*rows(0, 3))
    ids, emb, cols = rows(3, 6)
    record = _encode_record({"kind": "rows", "ids": ids, "columns": cols, "failed": {}}, emb.tobytes())
    w._log.write(record[:-5])  # torn mid-write...
    w._log.flush()
    w.append(*rows(6, 9))  # ...and a later writer appended after it (a fold that had failed)
    abandon(w)
    assert sorted(open_store(path).read().image_id) == rows(0, 3)[0] + rows(6, 9)[0]


# --------------------------------------------------------------------------------------------- checksums


def test_embeddings_are_checksummed_and_a_damaged_chunk_is_reported(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP) as w:
        w.append(*rows(0, 10))
    with h5py.File(path, "r") as f:
        assert f["embeddings"].fletcher32 and f["label"].fletcher32
        chunk = f["embeddings"].id.get_chunk_info(0)
    assert open_store(path).verify() == []
    with open(path, "r+b") as handle:
        handle.seek(chunk.byte_offset + 3)
        byte = handle.read(1)
        handle.seek(chunk.byte_offset + 3)
        handle.write(bytes([byte[0] ^ 0xFF]))
    store = open_store(path)  # the metadata is intact: it opens
    with pytest.raises(StoreError, match="cannot read 'embeddings', the file is damaged") as error:
        store.read()
    assert "\n" not in str(error.value)
    problems = store.verify()
    assert len(problems) == 1 and "'embeddings' rows 0-" in problems[0]
    assert len(store.read_columns()) == 10  # ids and labels are still readable


# ------------------------------------------------------------------------------------- metadata updates


def test_metadata_updates_are_logged_seen_by_readers_and_applied_on_fold(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP) as w:
        w.append(*rows(0, 6))
    w = StoreWriter(path, dim=DIM, fingerprint=FP)
    ids = rows(0, 6)[0]
    changed = w.update_columns(
        [ids[0], ids[1], ids[2], "not-in-store"],
        {"label": [1, 1, 1, 1], "split": ["test", "val", "val", "train"]},  # ids[1] is already (1, val)
    )
    assert changed == 2
    assert w.update_columns([ids[0]], {"label": [1]}) == 0  # nothing left to change
    w.append(*rows(6, 8))
    abandon(w)  # killed before folding: readers apply the logged updates already
    table = open_store(path).read()
    by_id = {i: k for k, i in enumerate(table.image_id)}
    assert table.label[by_id[ids[0]]] == 1 and table.columns["split"][by_id[ids[0]]] == "test"
    assert table.columns["split"][by_id[ids[2]]] == "val" and table.columns["study_id"][by_id[ids[2]]] == "s1"
    assert len(table) == 8 and open_store(path).is_partial()
    StoreWriter(path, dim=DIM, fingerprint=FP).close()  # the next writer folds them in
    with h5py.File(path, "r") as f:  # plain h5py sees them
        split = dict(zip(f["image_id"].asstr()[:], f["split"].asstr()[:]))
        label = dict(zip(f["image_id"].asstr()[:], f["label"][:]))
    assert (label[ids[0]], split[ids[0]], label[ids[2]], split[ids[2]]) == (1, "test", 1, "val")
    assert split[ids[3]] == rows(3, 4)[2]["split"][0]
    assert not (tmp_path / "s.h5.wal").exists()
    with StoreWriter(path, dim=DIM, fingerprint=FP) as w:
        with pytest.raises(StoreError, match="'image_id' is given as the ids"):
            w.update_columns([ids[0]], {"image_id": ["x"]})


# --------------------------------------------------------------------------------------- partial stores


def test_a_store_being_written_or_left_unfolded_is_partial(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP) as w:
        w.append(*rows(0, 4))
        store = open_store(path)
        assert store.being_written() and store.is_partial()
        assert "still writing" in store.partial_reason() and str(os.getpid()) in store.partial_reason()
        assert store.summary()["being_written"]
        assert any("writing this store now" in line for line in format_summary(store.summary()))
    store = open_store(path)
    assert not store.being_written() and not store.is_partial() and store.partial_reason() is None
    w = StoreWriter(path, dim=DIM, fingerprint=FP)
    w.append(*rows(4, 6))
    abandon(w)  # a killed extraction: lock gone, rows still in the log
    store = open_store(path)
    assert not store.being_written() and store.is_partial()
    assert "2 rows are still in the write-ahead log" in store.partial_reason()
    # asking does not get in a writer's way
    with StoreWriter(path, dim=DIM, fingerprint=FP):
        for _ in range(20):
            assert open_store(path).being_written()
    assert not open_store(path).is_partial()


# ------------------------------------------------------------------------------------------ token grids

LEVELS = {"final": (4, 3), "block10@7x7": (2, 3), "layer:-4/x": (1, 2)}  # '/' cannot be in an HDF5 name


def grids(start: int, stop: int) -> dict[str, np.ndarray]:
    idx = np.arange(start, stop, dtype=np.float32)
    return {
        level: (idx[:, None, None] + np.arange(t * c, dtype=np.float32).reshape(1, t, c) / 16 + k).astype(np.float16)
        for k, (level, (t, c)) in enumerate(sorted(LEVELS.items()))
    }


def test_token_grids_round_trip_through_the_log_segments_and_the_plain_file(tmp_path):
    path = tmp_path / "s.h5"
    w = StoreWriter(path, dim=DIM, fingerprint=FP, tokens=LEVELS, fold_every_rows=8)
    for start in range(0, 20, 4):
        w.append(*rows(start, start + 4), tokens=grids(start, start + 4))
    store = open_store(path)
    assert store.segmented and store.pending_rows == 4 and store.token_shapes == LEVELS
    order = store.read().image_id
    for level in LEVELS:  # rows index read()'s row order, folded or still in the log
        np.testing.assert_array_equal(store.read_tokens(level), grids(0, 20)[level])
        np.testing.assert_array_equal(store.read_tokens(level, [19, 2, 17, 2]), grids(0, 20)[level][[19, 2, 17, 2]])
        mask = np.asarray([int(i[3:]) % 3 == 0 for i in order])
        np.testing.assert_array_equal(store.read_tokens(level, mask), grids(0, 20)[level][mask])
    w.close()
    with h5py.File(path, "r") as f:  # one plain file: tokens/<level> [N, T, C], '/' escaped in the name
        assert sorted(f["tokens"]) == ["block10@7x7", "final", "layer:-4%2Fx"]
        assert f["tokens/final"].shape == (20, 4, 3) and f["tokens/final"].dtype == np.float16
        assert json.loads(f.attrs["token_levels"]) == {k: list(v) for k, v in LEVELS.items()}
    store = open_store(path)
    assert not store.segmented and store.verify() == []
    np.testing.assert_array_equal(store.read_tokens("layer:-4/x", np.arange(5, 9)), grids(5, 9)["layer:-4/x"])
    lines = format_summary(store.summary())
    assert "tokens       block10@7x7 [2, 3] (12 bytes per image)" in lines
    assert "             final [4, 3] (24 bytes per image)" in lines


def test_token_levels_that_do_not_match_are_one_line_naming_the_level(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP, tokens=LEVELS) as w:
        batch = grids(0, 2)
        with pytest.raises(StoreError, match=r"missing level\(s\) 'final'"):
            w.append(*rows(0, 2), tokens={k: v for k, v in batch.items() if k != "final"})
        with pytest.raises(StoreError, match=r"unexpected level\(s\) 'block14'"):
            w.append(*rows(0, 2), tokens=dict(batch, block14=batch["final"]))
        with pytest.raises(StoreError, match=r"token level 'final' has shape \(2, 3, 4\), expected \(2, 4, 3\)"):
            w.append(*rows(0, 2), tokens=dict(batch, final=np.zeros((2, 3, 4))))
        with pytest.raises(StoreError, match="missing level"):
            w.append(*rows(0, 2))
        w.append(*rows(0, 2), tokens=batch)
    assert len(open_store(path)) == 2  # nothing of a refused batch was logged
    with pytest.raises(StoreError) as refused:
        StoreWriter(path, dim=DIM, fingerprint=FP, tokens={"final": (4, 3)})
    assert "\n" not in str(refused.value) and "holds token grids of levels block10@7x7 2x3, final 4x3, layer:-4/x 1x2 but this run writes final 4x3" in str(refused.value)
    with pytest.raises(StoreError, match="levels .* but this run writes none"):
        StoreWriter(path, dim=DIM, fingerprint=FP)
    with pytest.raises(StoreError, match="no token level 'block14'; the store has 'block10@7x7', 'final', 'layer:-4/x'"):
        open_store(path).read_tokens("block14")
    plain = tmp_path / "plain.h5"
    with StoreWriter(plain, dim=DIM, fingerprint=FP) as w:
        w.append(*rows(0, 2))
    assert open_store(plain).token_shapes == {}
    with pytest.raises(StoreError, match="no token grids"):
        open_store(plain).read_tokens("final")
    with pytest.raises(StoreError, match="needs a shape"):
        StoreWriter(tmp_path / "bad.h5", dim=DIM, fingerprint=FP, tokens={"final": (4,)})


def test_levels_is_a_fingerprint_key_that_older_fingerprints_do_not_record(tmp_path):
    with_levels = dict(FP, levels="final@4x3")
    assert fingerprint_mismatch(FP, with_levels) == ["levels: '' vs 'final@4x3'"]
    older = {k: v for k, v in FP.items() if k != "levels"}
    assert fingerprint_mismatch(older, with_levels) == []


def test_merge_keeps_token_grids_and_extra_columns(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for path, (start, stop) in ((a, (0, 5)), (b, (5, 9))):
        with StoreWriter(path, dim=DIM, fingerprint=FP, tokens=LEVELS) as w:
            ids, emb, cols = rows(start, stop)
            w.append(ids, emb, dict(cols, view=[f"v{i}" for i in range(start, stop)]), tokens=grids(start, stop))
    merged = open_store(merge_stores([a, b], tmp_path / "m.h5"))
    assert merged.token_shapes == LEVELS and merged.read().image_id.tolist() == rows(0, 9)[0]
    np.testing.assert_array_equal(merged.read_tokens("final"), grids(0, 9)["final"])
    assert merged.read().columns["view"].tolist() == [f"v{i}" for i in range(9)]
    other = tmp_path / "other.h5"
    with StoreWriter(other, dim=DIM, fingerprint=FP, tokens={"final": (4, 3)}) as w:
        w.append(*rows(20, 21), tokens={"final": grids(20, 21)["final"]})
    with pytest.raises(StoreError, match="token levels differ"):
        merge_stores([a, other], tmp_path / "m2.h5")


# ------------------------------------------------------------------------------------ extra manifest columns


def test_extra_manifest_columns_are_stored_read_updated_and_listed(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, dim=DIM, fingerprint=FP, fold_every_rows=4) as w:
        w.append(*rows(0, 4))  # before the manifest had a view column
        ids, emb, cols = rows(4, 8)
        w.append(ids, emb, dict(cols, view=["AP", "LAT", None, float("nan")], **{"site/ward": ["a"] * 4}))
        assert w.update_columns(rows(0, 2)[0], {"view": ["PA", "PA"]}) == 2
        ids, emb, cols = rows(8, 10)
        w.append(ids, emb, dict(cols, view=["AP", "AP"]))
        with pytest.raises(StoreError, match="column 'view' has 1 values for 2 ids"):
            w.append(*rows(10, 12)[:2], dict(rows(10, 12)[2], view=["AP"]))
        with pytest.raises(StoreError, match="column 'site' of image id 'img00010'.*NUL"):
            w.append(*rows(10, 12)[:2], dict(rows(10, 12)[2], site=["a\x00", "b"]))
        table = open_store(path).read()  # mid-run: segments plus the log
        assert table.columns["view"].tolist() == ["PA", "PA", "", "", "AP", "LAT", "", "", "AP", "AP"]
    table = open_store(path).read_columns()
    assert table.columns["view"].tolist() == ["PA", "PA", "", "", "AP", "LAT", "", "", "AP", "AP"]
    assert table.columns["site/ward"].tolist() == [""] * 4 + ["a"] * 4 + [""] * 2
    assert table.subset(table.columns["view"] == "AP").image_id.tolist() == ["img00004", "img00008", "img00009"]
    with h5py.File(path, "r") as f:
        assert sorted(f["extra"]) == ["site%2Fward", "view"] and f["extra/view"].asstr()[5] == "LAT"
    summary = open_store(path).summary()
    assert summary["extra_columns"] == ["site/ward", "view"]
    assert "extra        site/ward, view" in format_summary(summary)
    with StoreWriter(path, dim=DIM, fingerprint=FP) as w:  # a column first set by an update
        assert w.update_columns(rows(0, 1)[0], {"sex": ["F"]}) == 1
    assert open_store(path).read().columns["sex"].tolist() == ["F"] + [""] * 9
