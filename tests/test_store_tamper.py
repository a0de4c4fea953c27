"""Tampered segmented stores, through the installed `medembed` entry point as a user runs it: an index's
`segments` attribute naming files outside `<store>.segments/` (or not JSON, or of the wrong types), virtual
datasets whose sources are not the listed segments, a segment copied over another (ids twice), a store path
that is a directory, and a failed first extraction. Each is one line, no traceback, never `unexpected`;
`info --verify` fails and `fit`, `evaluate --on` and `recalibrate` refuse rather than read foreign rows.

Stores are tiny (60 rows in 3 segments) and the commands of one test run two at a time (CI has 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from medembed.scorers.options import FitOptions
from medembed.fit import fit_run
from medembed.store import StoreError, StoreWriter, make_fingerprint, open_store

MEDEMBED = shutil.which("medembed", path=str(Path(sys.executable).parent)) or shutil.which("medembed")
FP = make_fingerprint(encoder="test", model_id="tiny", embedding_kind="pooler_output", preprocess_hash="abc", dtype="float32")
DIM = 8
SEGMENT_ROWS = 20
SEGMENTS = ("s.h5.segments/seg-000001.h5", "s.h5.segments/seg-000002.h5", "s.h5.segments/seg-000003.h5")


def medembed(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1"}
    env.pop("MEDEMBED_DEBUG", None)
    return subprocess.run([MEDEMBED, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def run_all(*commands: tuple) -> list[subprocess.CompletedProcess]:
    """The commands, two at a time, in order."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda command: medembed(*command), commands))


def refused(done: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Assert a one-line refusal (exit `code`, no traceback, never `unexpected`) that holds `needles`; the line."""
    output = done.stdout + done.stderr
    assert done.returncode == code, output
    assert "Traceback" not in output and "unexpected" not in output, output
    errors = [line for line in done.stderr.splitlines() if line.startswith(("error:", "problem:"))]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def verify_fails(done: subprocess.CompletedProcess, *needles: str) -> list[str]:
    """Assert `info --verify` failed (exit 1, no traceback, never `unexpected`) with a problem line holding `needles`."""
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output and "unexpected" not in output, output
    problems = [line for line in done.stderr.splitlines() if line.startswith("problem: ")]
    assert problems and f"verify       {len(problems)} problem(s)" in done.stdout, output
    assert any(all(needle in line for needle in needles) for line in problems), problems
    return problems


def write_segmented(path: Path) -> Path:
    """30 patients with 2 images each (a third abnormal, splits by patient), in 3 segments of 20 rows."""
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(DIM)
    ids, emb, cols = [], [], {k: [] for k in ("label", "study_id", "patient_id", "body_part", "split")}
    for p in range(30):
        label = (p // 3) % 3 == 0
        for k in range(2):
            ids.append(f"p{p}_img{k}")
            emb.append(rng.standard_normal(DIM) + 2.0 * label * direction)
            cols["label"].append(int(label))
            cols["study_id"].append(f"p{p}_s1")
            cols["patient_id"].append(f"p{p}")
            cols["body_part"].append("wrist")
            cols["split"].append(("train", "val", "test")[p % 3])
    emb = np.asarray(emb, np.float32)
    with StoreWriter(path, dim=DIM, fingerprint=FP, fold_every_rows=SEGMENT_ROWS, consolidate=False) as writer:
        for start in range(0, len(ids), SEGMENT_ROWS):
            part = slice(start, start + SEGMENT_ROWS)
            writer.append(ids[part], emb[part], {k: v[part] for k, v in cols.items()}, tokens=None)
    return path


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A clean segmented store `s.h5` and a run `run` fitted on it."""
    base = tmp_path_factory.mktemp("tamper")
    store = write_segmented(base / "store" / "s.h5")
    assert open_store(store).segmented and open_store(store).verify() == []
    assert [s.file for s in open_store(store).segments] == list(SEGMENTS)
    fit_run([store], base / "run", FitOptions(n_resamples=0))
    return base


def copy_store(template: Path, folder: Path) -> Path:
    shutil.copytree(template / "store", folder)
    return folder / "s.h5"


def foreign_segment(store: Path, target: Path) -> Path:
    """A file like segment 2 (same ids) with random embeddings and flipped labels, written at `target`."""
    shutil.copyfile(store.parent / SEGMENTS[1], target)
    with h5py.File(target, "r+") as f:
        f["embeddings"][...] = np.random.default_rng(1).standard_normal(f["embeddings"].shape)
        f["label"][...] = 1 - f["label"][...]
    return target


def set_segments(store: Path, change) -> None:
    """Rewrite the index's `segments` attribute: `change(list) -> list | str`."""
    with h5py.File(store, "r+") as f:
        value = change(json.loads(f.attrs["segments"]))
        f.attrs["segments"] = value if isinstance(value, str) else json.dumps(value)


def redirect_sources(store: Path, name: str, change) -> None:
    """Rebuild the index's virtual dataset `name` from its sources (file, dataset, first row, rows), as
    `change(list) -> list` rewrites them."""
    with h5py.File(store, "r+") as f:
        dataset = f[name]
        shape, dtype = dataset.shape, dataset.dtype
        sources = [(s.file_name, s.dset_name, s.vspace.get_select_bounds()[0][0], SEGMENT_ROWS) for s in dataset.virtual_sources()]
        del f[name]
        layout = h5py.VirtualLayout(shape, dtype=dtype)
        for file, dset, first, rows in change(sources):
            layout[first : first + rows] = h5py.VirtualSource(file, dset, shape=(rows, *shape[1:]), dtype=dtype)
        f.create_virtual_dataset(name, layout)


# ------------------------------------------------------------------------- the segments attribute


def test_a_segments_entry_naming_another_h5_is_refused_by_info_verify_and_fit(template, tmp_path):
    """The other file holds the same ids with random embeddings and flipped labels: nothing may read it."""
    outside = copy_store(template, tmp_path / "outside")
    foreign = foreign_segment(outside, tmp_path / "other.h5")
    set_segments(outside, lambda entries: [dict(e, file=str(foreign)) if k == 1 else e for k, e in enumerate(entries)])
    # The same file copied into the folder under a segment's name: inside, but not what the index's virtual datasets read.
    inside = copy_store(template, tmp_path / "inside")
    foreign_segment(inside, inside.parent / "s.h5.segments/seg-000009.h5")
    set_segments(inside, lambda entries: [dict(e, file="s.h5.segments/seg-000009.h5") if k == 1 else e for k, e in enumerate(entries)])
    info_out, fit_out, info_in = run_all(
        ("info", outside, "--verify"), ("fit", outside, "--out", tmp_path / "run-out", "--bootstrap", "0"), ("info", inside, "--verify"),
    )
    for done in (info_out, fit_out):
        refused(done, str(outside), "entry 1", str(foreign), "refusing to read outside the store's folder")
    verify_fails(info_in, "index dataset 'embeddings'", "'s.h5.segments/seg-000002.h5'", "'s.h5.segments/seg-000009.h5'")
    with pytest.raises(StoreError, match="index dataset 'embeddings' reads rows 20-39 from 's.h5.segments/seg-000002.h5'"):
        open_store(inside).read()  # fit's refusal of an index its virtual datasets disagree with: the next test
    assert not (tmp_path / "run-out").exists()


@pytest.mark.parametrize("file", [
    "../other.h5",
    "s.h5.segments/../../other.h5",
    "s.h5.segments/../other.h5",
    "/etc/passwd",
    "t.h5.segments/seg-000002.h5",
    "s.h5.segments/seg-2.h5",
    "s.h5.segments/sub/seg-000002.h5",
    "s.h5.segments/seg-000001.h5",  # listed twice
])
def test_every_segments_entry_outside_the_folder_or_not_a_segment_name_is_one_line(template, tmp_path, file):
    store = copy_store(template, tmp_path / "s")
    set_segments(store, lambda entries: [dict(e, file=file) if k == 1 else e for k, e in enumerate(entries)])
    with pytest.raises(StoreError) as error:
        open_store(store)
    message = str(error.value)
    assert message.startswith(f"{store}: index attribute 'segments' entry 1") and "\n" not in message, message
    assert repr(file) in message


def test_a_segment_symlinked_outside_the_folder_is_refused(template, tmp_path):
    store = copy_store(template, tmp_path / "s")
    foreign = foreign_segment(store, tmp_path / "elsewhere.h5")
    segment = store.parent / SEGMENTS[1]
    segment.unlink()
    segment.symlink_to(foreign)
    with pytest.raises(StoreError, match="entry 1: file 's.h5.segments/seg-000002.h5' is not a segment inside s.h5.segments/"):
        open_store(store)
    segment.unlink()
    segment.symlink_to(store.parent / SEGMENTS[0])  # inside, but segment 1 again: its ids twice
    with pytest.raises(StoreError, match="entry 1: file 's.h5.segments/seg-000002.h5' is the file of entry 0 again"):
        open_store(store)


@pytest.mark.parametrize("value, says", [
    ("[{'file': 1", "is not JSON"),
    ('{"file": "s.h5.segments/seg-000001.h5"}', "is not a list of segments"),
    ('["s.h5.segments/seg-000001.h5"]', "entry 0 is not an object with file, rows and extra"),
    ('[{"rows": 20, "extra": []}]', "entry 0: 'file' must be a string"),
    ('[{"file": "s.h5.segments/seg-000001.h5", "rows": -1, "extra": []}]', "entry 0: 'rows' must be a non-negative integer"),
    ('[{"file": "s.h5.segments/seg-000001.h5", "rows": "20", "extra": []}]', "entry 0: 'rows' must be a non-negative integer"),
    ('[{"file": "s.h5.segments/seg-000001.h5", "rows": true, "extra": []}]', "entry 0: 'rows' must be a non-negative integer"),
    ('[{"file": "s.h5.segments/seg-000001.h5", "rows": 20, "extra": "view"}]', "entry 0: 'extra' must be a list of column names"),
    ('[{"file": "s.h5.segments/seg-000001.h5", "rows": 20, "extra": [1]}]', "entry 0: 'extra' must be a list of column names"),
    ("[" * 100_000 + "]" * 100_000, "is not JSON"),
])
def test_a_segments_attribute_of_the_wrong_shape_is_one_line(template, tmp_path, value, says):
    store = copy_store(template, tmp_path / "s")
    set_segments(store, lambda entries: value)
    with pytest.raises(StoreError) as error:
        open_store(store)
    assert str(error.value).startswith(f"{store}: index attribute 'segments'") and says in str(error.value)
    assert "\n" not in str(error.value)


def test_a_segments_attribute_that_is_not_json_is_one_line_through_info_and_fit(template, tmp_path):
    store = copy_store(template, tmp_path / "s")
    set_segments(store, lambda entries: "[{'file': 's.h5.segments/seg-000001.h5'")
    info, fit = run_all(("info", store, "--verify"), ("fit", store, "--out", tmp_path / "run", "--bootstrap", "0"))
    for done in (info, fit):
        refused(done, f"{store}: index attribute 'segments' is not JSON")


# ------------------------------------------------------------------------ the index's virtual datasets


def cross_segments(sources):
    """Segment 1's rows of image_id read from segment 2's: plain h5py sees segment 2's ids twice, segment 1's never."""
    return [(sources[1][0], d, first, rows) if k == 0 else (f, d, first, rows) for k, (f, d, first, rows) in enumerate(sources)]


def overlap_segments(sources):
    """Segment 2's ids mapped over rows 10-29, across segment 1's (plain h5py crashes reading it)."""
    return [(f, d, 10 if k == 1 else first, rows) for k, (f, d, first, rows) in enumerate(sources)]


VIRTUAL_TAMPERING = {
    "foreign": ("embeddings", lambda sources: [("other.h5", d, first, rows) if k == 1 else (f, d, first, rows) for k, (f, d, first, rows) in enumerate(sources)], "'other.h5'"),
    "escaped": ("label", lambda sources: [("../escaped.h5", d, first, rows) if k == 2 else (f, d, first, rows) for k, (f, d, first, rows) in enumerate(sources)], "'../escaped.h5'"),
    "passwd": ("embeddings", lambda sources: [("/etc/passwd", d, first, rows) if k == 0 else (f, d, first, rows) for k, (f, d, first, rows) in enumerate(sources)], "'/etc/passwd'"),
    "crossing": ("image_id", cross_segments, "reads rows 0-19 from 's.h5.segments/seg-000002.h5' dataset 'image_id'"),
}


def test_virtual_sources_that_are_not_the_listed_segments_fail_verify_and_readers_refuse(template, tmp_path):
    stores = {}
    for case, (name, change, _) in VIRTUAL_TAMPERING.items():
        store = copy_store(template, tmp_path / case)
        foreign_segment(store, store.parent / "other.h5")
        foreign_segment(store, tmp_path / "escaped.h5")
        redirect_sources(store, name, change)
        stores[case] = store
    with h5py.File(stores["foreign"], "r") as f:  # what a plain h5py reader would see: the foreign rows
        assert not np.array_equal(f["embeddings"][20:40], open_store(template / "store" / "s.h5").read().embeddings[20:40])
    with h5py.File(stores["crossing"], "r") as f:
        assert len(set(f["image_id"].asstr()[:])) == 40
    infos = run_all(*[("info", store, "--verify") for store in stores.values()], ("fit", stores["passwd"], "--out", tmp_path / "run", "--bootstrap", "0"))
    for (case, (name, _, says)), info in zip(VIRTUAL_TAMPERING.items(), infos):
        verify_fails(info, f"index dataset {name!r}", says)
    refused(infos[-1], str(stores["passwd"]), "index dataset 'embeddings'", "'/etc/passwd'", "refusing to read it")
    assert not (tmp_path / "run").exists()
    for case, store in stores.items():  # every reader of rows, in-process
        for read in (lambda s: s.read(), lambda s: s.read_columns(), lambda s: s.image_ids(), lambda s: len(s)):
            with pytest.raises(StoreError, match="index dataset") as error:
                read(open_store(store))
            assert "\n" not in str(error.value), case


def test_virtual_sources_overlapping_two_segments_fail_verify_and_readers_refuse(template, tmp_path):
    store = copy_store(template, tmp_path / "s")
    redirect_sources(store, "image_id", overlap_segments)
    problem = "index dataset 'image_id' reads rows 10-29 from 's.h5.segments/seg-000002.h5', but its segments attribute lists 's.h5.segments/seg-000002.h5' for rows 20-39"
    assert open_store(store).verify() == [problem]
    with pytest.raises(StoreError) as error:
        open_store(store).read_columns()
    assert str(error.value).startswith(f"{store}: {problem}; refusing to read it")


def test_a_virtual_dataset_that_is_no_row_dataset_or_not_virtual_fails_verify(template, tmp_path):
    store = copy_store(template, tmp_path / "s")
    with h5py.File(store, "r+") as f:
        layout = h5py.VirtualLayout((20,), dtype=f["label"].dtype)
        layout[0:20] = h5py.VirtualSource("/etc/passwd", "label", shape=(20,), dtype=f["label"].dtype)
        f.create_virtual_dataset("extra/site", layout)
    assert open_store(store).verify() == [
        "index dataset 'extra/site' is virtual but is no row dataset of the store (its segments attribute lists none)"
    ]
    plain = copy_store(template, tmp_path / "p")
    with h5py.File(plain, "r+") as f:
        del f["label"]
        f.create_dataset("label", data=np.ones(60, np.int8))  # flipped labels for plain h5py readers
    problems = open_store(plain).verify()
    assert problems == ["index dataset 'label' is not a virtual dataset over the segments its segments attribute lists"]
    with pytest.raises(StoreError, match="'label' is not a virtual dataset"):
        open_store(plain).read()


# ------------------------------------------------------------------------------ ids twice, row counts


def test_a_segment_copied_over_another_is_refused_by_fit_evaluate_and_recalibrate(template, tmp_path):
    store = copy_store(template, tmp_path / "s")
    shutil.copyfile(store.parent / SEGMENTS[0], store.parent / SEGMENTS[1])  # 20 ids twice, 20 missing
    run = template / "run"
    info, fit, evaluate, recalibrate = run_all(
        ("info", store, "--verify"),
        ("fit", store, "--out", tmp_path / "fit", "--bootstrap", "0"),
        ("evaluate", run, "--on", store, "--bootstrap", "0"),
        ("recalibrate", run, store, "--labelled", "10", "--out", tmp_path / "recal", "--bootstrap", "0"),
    )
    assert verify_fails(info, "image ids stored more than once", "(20 in all)") == [
        "problem: image ids stored more than once: ['p0_img0', 'p0_img1', 'p1_img0', 'p1_img1', 'p2_img0'] (20 in all)"
    ]
    for done in (fit, evaluate, recalibrate):
        refused(done, str(store), "image ids stored more than once", "refusing to read it")
    assert not (tmp_path / "fit").exists() and not (tmp_path / "recal").exists()


def test_a_segment_with_other_row_counts_is_refused_on_open_for_rows(template, tmp_path):
    store = copy_store(template, tmp_path / "s")
    shutil.copyfile(store.parent / SEGMENTS[0], store.parent / SEGMENTS[2])
    with h5py.File(store.parent / SEGMENTS[2], "r+") as f:
        f["embeddings"].resize((10, DIM))
    with pytest.raises(StoreError, match=r"segment seg-000003.h5 'embeddings' has 10 rows, the index lists 20"):
        open_store(store).read()
    assert any("has 10 rows, expected 20" in p for p in open_store(store).verify())


# ----------------------------------------------------------------------- a directory, a failed extract


def test_a_store_path_that_is_a_directory_is_one_line(tmp_path):
    folder = tmp_path / "d.h5"
    folder.mkdir()
    refused(medembed("info", folder), f"{folder}: is a directory, not a store")
    with pytest.raises(StoreError, match="is a directory, not a store"):
        StoreWriter(folder, dim=DIM, fingerprint=FP)  # extract --out a folder


def test_a_failed_first_extract_leaves_no_store_and_a_failed_resume_keeps_it(tmp_path, template):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,path,label,split\na,a.png,0,train\nb,b.png,1,test\n")
    out = tmp_path / "new.h5"
    done = medembed("extract", manifest, "--root", tmp_path / "nowhere", "--encoder", "efficientnet-lite0", "--option", "size=64",
                    "--workers", "0", "--out", out)
    refused(done, "wrong --root")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]
    # A store that existed, or a writer that wrote rows, is kept whatever goes wrong (in-process: the writer's rule).
    store = copy_store(template, tmp_path / "old")
    before = open_store(store).read().image_id.tolist()
    with pytest.raises(RuntimeError), StoreWriter(store, dim=DIM, fingerprint=FP, discard_if_empty=True):
        raise RuntimeError("refused")
    assert open_store(store).read().image_id.tolist() == before
    fresh = tmp_path / "fresh.h5"
    with pytest.raises(RuntimeError), StoreWriter(fresh, dim=DIM, fingerprint=FP, discard_if_empty=True) as writer:
        writer.append(["x"], np.zeros((1, DIM)), {"label": [0], "split": ["train"]})
        raise RuntimeError("after a row")
    assert open_store(fresh).read().image_id.tolist() == ["x"]
    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "gone.h5", dim=DIM, fingerprint=FP, discard_if_empty=True):
        raise RuntimeError("before any row")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gone.h5")]
