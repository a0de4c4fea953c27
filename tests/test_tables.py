"""medembed.tables: CSV (injection-safe text, stdout) or typed Parquet by the suffix, one clear line without pyarrow."""

import csv
import sys

import pytest

from medembed._csv import read_text_cell
from medembed.errors import MedembedError
from medembed.tables import column_type, sibling, table_format, write_table

HEADER = ["image_id", "probability", "abnormal", "note"]
ROWS = [["=cmd|' /C calc'!A0.jpg", 0.25, 0, "-0.5"], ["b.png", None, None, ""], ["c.png", 0.875, 1, "x,y\nz"]]


def test_csv_writes_text_safely_and_reads_back_exactly(tmp_path):
    write_table(tmp_path / "t.csv", HEADER, ROWS)
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == HEADER
    assert rows[1] == ["'=cmd|' /C calc'!A0.jpg", "0.250000", "0", "-0.5"]  # a formula is quoted, a number is not
    assert rows[2] == ["b.png", "", "", ""] and rows[3][3] == "x,y\nz"
    assert read_text_cell(rows[1][0]) == ROWS[0][0]
    assert list(tmp_path.iterdir()) == [tmp_path / "t.csv"]  # no temporary file left beside it


def test_csv_to_standard_output_when_no_path(capsys):
    write_table(None, ["a", "b"], [[1, 0.5]], float_format=".2f")
    assert capsys.readouterr().out == "a,b\n1,0.50\n"


def test_parquet_has_typed_columns_and_the_text_as_given(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    write_table(tmp_path / "t.Parquet", HEADER, ROWS)
    table = pq.read_table(tmp_path / "t.Parquet")
    assert [str(t) for t in table.schema.types] == ["string", "double", "int64", "string"]
    columns = table.to_pydict()
    assert columns["image_id"][0] == ROWS[0][0]  # no CSV quote in Parquet: a value, not a formula
    assert columns["probability"] == [0.25, None, 0.875] and columns["abnormal"] == [0, None, 1]
    assert columns["note"] == ["-0.5", "", "x,y\nz"]


def test_an_empty_table_and_a_column_of_only_missing_values_are_strings(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    write_table(tmp_path / "e.parquet", ["a", "b"], [])
    assert pq.read_table(tmp_path / "e.parquet").num_rows == 0
    write_table(tmp_path / "n.parquet", ["a"], [[None], [None]])
    assert str(pq.read_table(tmp_path / "n.parquet").schema.types[0]) == "string"


def test_without_pyarrow_parquet_is_one_line_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    with pytest.raises(MedembedError, match=r"t\.parquet: writing Parquet needs pyarrow.*pip install 'medembed\[parquet\]'"):
        write_table(tmp_path / "t.parquet", HEADER, ROWS)
    assert list(tmp_path.iterdir()) == []
    assert table_format(tmp_path / "t.csv") == "csv" and table_format(None) == "csv"


def test_bad_tables_are_refused(tmp_path):
    with pytest.raises(MedembedError, match="two columns named a"):
        write_table(tmp_path / "t.csv", ["a", "b", "a"], [])
    with pytest.raises(MedembedError, match="row 2 has 1 cells for 2 columns"):
        write_table(tmp_path / "t.csv", ["a", "b"], [[1, 2], [1]])
    with pytest.raises(MedembedError, match="'a' mixes text and numbers"):
        column_type("a", ["x", 1.0])
    assert column_type("a", [1, 2.5, None]) == "float" and column_type("a", [None, 3]) == "int"
    assert not list(tmp_path.iterdir())


def test_sibling_keeps_the_format():
    assert sibling("out/preds.csv", "_studies").as_posix() == "out/preds_studies.csv"
    assert sibling("preds.txt", "_studies").as_posix() == "preds_studies.csv"


def test_sibling_of_parquet_is_parquet():
    pytest.importorskip("pyarrow")
    assert sibling("p.parquet", "_studies").as_posix() == "p_studies.parquet"


def test_table_frame_types_columns_as_parquet_does():
    pytest.importorskip("pandas")
    from medembed.tables import table_frame

    frame = table_frame(HEADER, ROWS)
    assert frame["image_id"].tolist()[0] == ROWS[0][0] and str(frame["probability"].dtype) == "float64"
    assert str(frame["abnormal"].dtype) == "Int64" and frame["abnormal"].isna().tolist() == [False, True, False]
    assert str(table_frame(["a"], [[1], [0]])["a"].dtype) == "int64" and len(table_frame(["a"], [])) == 0


def test_table_frame_without_pandas_says_how_to_install_it(monkeypatch):
    from medembed.tables import table_frame

    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MedembedError, match=r"notebook rows needs pandas.*pip install 'medembed\[api\]'"):
        table_frame(HEADER, ROWS, "notebook rows")
