"""CSV injection (issue 18): user text that a spreadsheet would run as a formula is written with a leading quote in
every CSV medembed writes, numbers stay numbers, and medembed's own readers give the original text back."""

import csv
import shutil

import pytest

from medembed._csv import read_text_cell, text_cell
from medembed.data.manifest import Manifest, read_manifest, write_manifest
from medembed.sweep.results import COLUMNS, CellKey, ResultsLog, cell_row, read_results
from tests.cli.test_entry_point import run_cli
from tests.test_fit import write_store
from tests.test_predict import run_dir  # noqa: F401 - the module-scoped fitted run with its real encoder

EVIL = "=cmd|' /C calc'!A0.jpg"
TEXT = [EVIL, "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\tx", "\rx", "-scan.png", "-", "'=x", "''-y", "'plain", "'-5",
        "plain.png", "", "'", "a=b"]
NUMBERS = ["-0.5", "+3", "-1e-3", "-.5", "-5.", "12", "1e5"]


def rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


@pytest.mark.parametrize("value", TEXT + NUMBERS)
def test_a_cell_reads_back_as_written(value):
    assert read_text_cell(text_cell(value)) == value


def test_formula_starts_get_one_quote_and_numbers_none():
    for value in (EVIL, "+1+x", "-2+3", "@SUM(A1)", "\tx", "\rx", "-scan.png", "'=x"):
        assert text_cell(value) == "'" + value
    for value in NUMBERS + ["plain.png", "'plain", "", "a=b"]:
        assert text_cell(value) == value


def test_a_manifest_with_formula_ids_and_paths_round_trips_through_the_entry_point(tmp_path, fracatlas_root):
    # A user's CSV naming real images, two of them under names a spreadsheet would run or read as a formula.
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted((fracatlas_root / "images").rglob("*.jpg"))[:3]
    names = [EVIL, "-scan.jpg", "plain.jpg"]
    for source, name in zip(sources, names):
        (images / name).parent.mkdir(exist_ok=True)  # EVIL holds a "/": a file in the folder "=cmd|' "
        shutil.copy(source, images / name)
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "file", "finding", "age_delta"])
        writer.writerows([["@id1", EVIL, "1", "-0.5"], ["-id2", "-scan.jpg", "0", "-3"], ["id3", "plain.jpg", "0", "+2"]])
    done = run_cli("manifest", "csv", tmp_path / "labels.csv", "--column", "image_id=ID", "--column", "path=file",
                   "--column", "label=finding", "--out", tmp_path / "mine.csv")
    assert done.returncode == 0, done.stderr
    written = rows(tmp_path / "mine.csv")
    header = written[0]
    cells = {name: [row[header.index(name)] for row in written[1:]] for name in header}
    assert cells["image_id"] == ["'@id1", "'-id2", "id3"]
    assert cells["path"] == ["'" + EVIL, "'-scan.jpg", "plain.jpg"]
    assert cells["age_delta"] == ["-0.5", "-3", "+2"]  # numbers stay numbers
    manifest = read_manifest(tmp_path / "mine.csv")
    assert manifest.image_id.tolist() == ["@id1", "-id2", "id3"] and manifest.path.tolist() == names
    assert manifest.columns["age_delta"].tolist() == ["-0.5", "-3", "+2"]
    # the paths read back are the real files: check finds and decodes all three
    done = run_cli("manifest", "check", tmp_path / "mine.csv", "--root", images, "--decode")
    assert done.returncode == 0, done.stdout + done.stderr


def test_write_manifest_round_trips_every_kind_of_cell(tmp_path):
    values = TEXT + NUMBERS
    manifest = Manifest({"image_id": [f"{v}#{k}" if k else v for k, v in enumerate(values)], "path": values,
                         "=extra": values})
    write_manifest(manifest, tmp_path / "m.csv")
    assert rows(tmp_path / "m.csv")[0] == ["image_id", "path", "'=extra"]
    again = read_manifest(tmp_path / "m.csv")
    assert list(again.columns) == list(manifest.columns)
    for name in manifest.columns:
        assert again.columns[name].tolist() == manifest.columns[name].tolist(), name


def test_sweep_results_quote_names_and_notes_and_read_them_back(tmp_path):
    key = CellKey("=enc", "-head", 0.5, 1)
    with ResultsLog(tmp_path, {"protocol": 1}) as log:
        log.append(cell_row(key, None, note="@note: cell failed"))
    (line,) = rows(tmp_path / "results.csv")[1:]
    assert line[COLUMNS.index("encoder")] == "'=enc" and line[COLUMNS.index("head")] == "'-head"
    assert line[COLUMNS.index("note")] == "'@note: cell failed" and line[COLUMNS.index("budget")] == "0.5"
    (row,) = read_results(tmp_path / "results.csv")
    assert (row["encoder"], row["head"], row["note"]) == ("=enc", "-head", "@note: cell failed")
    with ResultsLog(tmp_path, {"protocol": 1}) as log:  # a rerun finds the cell done under its real name
        assert log.has(key)


def _formula_ids(ids, emb, cols):
    ids[:] = [f"=HYPERLINK(\"x\",\"{i}\")" if k % 2 else f"-{i}" for k, i in enumerate(ids)]
    cols["study_id"][:] = [f"@{s}" for s in cols["study_id"]]


def test_fit_and_external_predictions_quote_ids_and_keep_numbers(tmp_path):
    store = write_store(tmp_path / "s.h5", corrupt=_formula_ids)
    done = run_cli("fit", store, "--bootstrap", "0", "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    target = write_store(tmp_path / "t.h5", seed=1, corrupt=_formula_ids)
    done = run_cli("evaluate", tmp_path / "run", "--on", target, "--bootstrap", "0")
    assert done.returncode == 0, done.stderr
    (external,) = (tmp_path / "run" / "external").glob("*/predictions.csv")
    for path in (tmp_path / "run" / "predictions.csv", external):
        header, *body = rows(path)
        assert body and all(row[0][:2] in ("'=", "'-") and row[1].startswith("'@") for row in body), path
        assert all(0 <= float(row[header.index("probability")]) <= 1 for row in body)
        assert {read_text_cell(row[0]) for row in body} <= _ids(tmp_path / "s.h5") | _ids(target)


def _ids(store):
    from medembed.store import open_store

    return open_store(store).image_ids()


def test_predict_quotes_formula_file_names_and_study_ids(tmp_path, run_dir, small_manifest, fracatlas_root):  # noqa: F811
    manifest = read_manifest(small_manifest)
    test = manifest.subset(manifest.split == "test")
    images = tmp_path / "new"
    images.mkdir()
    names = [EVIL, "-scan.jpg"]
    for name, source in zip(names, test.resolve(fracatlas_root)[:2]):
        (images / name).parent.mkdir(exist_ok=True)  # EVIL holds a "/": a file in the folder "=cmd|' "
        shutil.copy(source, images / name)
    done = run_cli("predict", run_dir, images, "--out", tmp_path / "folder.csv")
    assert done.returncode == 0, done.stderr
    header, *body = rows(tmp_path / "folder.csv")
    assert sorted(row[0] for row in body) == sorted("'" + name for name in names)
    assert all(0 <= float(row[header.index("probability")]) <= 1 for row in body)
    # a manifest with formula ids and study ids: its own quotes are read away, the output's written
    write_manifest(Manifest({"image_id": ["=a", "-b"], "path": names, "study_id": ["@s", "@s"]}), images / "m.csv")
    done = run_cli("predict", run_dir, images / "m.csv", "--out", tmp_path / "m_out.csv")
    assert done.returncode == 0, done.stderr
    header, *body = rows(tmp_path / "m_out.csv")
    assert [row[0] for row in body] == ["'=a", "'-b"] and [row[2] for row in body] == ["'@s", "'@s"]
    assert all(row[header.index("probability")] and not row[header.index("error")] for row in body)
    assert [row[0] for row in rows(tmp_path / "m_out_studies.csv")[1:]] == ["'@s"]
