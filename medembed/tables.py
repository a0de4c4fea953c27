"""The tables medembed writes for users (predictions, comparisons): CSV, or Parquet by the `.parquet` suffix.

A table is a header and rows of typed cells: `str` (user text: ids, paths, manifest columns), `int`, `float`, or
None (a missing value, e.g. the probability of an image that could not be read). Every row has one cell per
header name.

    CSV      the default, and standard output when the path is None. Text cells go through `text_cell`, so a
             spreadsheet shows `=cmd|...` as text rather than running it (CSV injection); floats are written
             with `float_format`; None is an empty cell.
    Parquet  `path.parquet`; needs pyarrow (`pip install 'medembed[parquet]'`). Columns are typed from their
             cells: int64, float64 or string, nulls where None (a column of only None is a string column).
             Text is stored exactly as given, without the CSV's quote: Parquet cells are values, never
             formulas, and a program reading them gets the user's text back unchanged.

Both are written atomically (a temporary file beside `path`, then a rename): a reader never sees half a table.
`table_frame` hands the same table to pandas, typed alike. pyarrow and pandas are imported only where used.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medembed._csv import csv_lines, text_cell
from medembed._files import atomic_write, atomic_write_text
from medembed.errors import MedembedError

PARQUET_SUFFIX = ".parquet"
PARQUET_INSTALL = "pip install 'medembed[parquet]'"
PANDAS_INSTALL = "pip install 'medembed[api]' (or pip install pandas)"


def table_format(path: Path | str | None) -> str:
    """"parquet" for a path ending in .parquet (any case), else "csv" (standard output included).

    Refuses a Parquet path when pyarrow is not installed, so that a command can check before doing any work."""
    if path is None or Path(path).suffix.lower() != PARQUET_SUFFIX:
        return "csv"
    try:
        import pyarrow  # noqa: F401  (only whether it can be imported)
    except ImportError:
        raise MedembedError(f"{path}: writing Parquet needs pyarrow, which is not installed: {PARQUET_INSTALL}") from None
    return "parquet"


def sibling(path: Path | str, suffix: str) -> Path:
    """`path` with `suffix` added to its stem, in the same format: preds.csv -> preds_studies.csv,
    preds.parquet -> preds_studies.parquet (any other suffix becomes .csv, the format it is written in)."""
    path = Path(path)
    extension = PARQUET_SUFFIX if table_format(path) == "parquet" else ".csv"
    return path.with_name(f"{path.stem}{suffix}{extension}")


def write_table(path: Path | str | None, header: Sequence[str], rows: Sequence[Sequence[Any]], float_format: str = ".6f") -> None:
    """Write `rows` under `header` to `path`: Parquet for a `.parquet` path, else CSV (standard output when None)."""
    header = [str(name) for name in header]
    if len(set(header)) != len(header):
        duplicated = sorted({name for name in header if header.count(name) > 1})
        raise MedembedError(f"{path or 'standard output'}: a table cannot have two columns named {', '.join(duplicated)}")
    for k, row in enumerate(rows):
        if len(row) != len(header):
            raise MedembedError(f"{path or 'standard output'}: row {k + 1} has {len(row)} cells for {len(header)} columns")
    if table_format(path) == "parquet":
        _write_parquet(Path(path), header, rows)
        return
    text = "".join(csv_lines([header, *([_csv_cell(cell, float_format) for cell in row] for row in rows)]))
    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write_text(Path(path), text)


def _csv_cell(cell: Any, float_format: str) -> str:
    if cell is None:
        return ""
    if isinstance(cell, bool):  # a bool is an int to Python; written as the 0/1 medembed's CSVs hold
        return str(int(cell))
    if isinstance(cell, int):
        return str(cell)
    if isinstance(cell, float):
        return format(cell, float_format)
    return text_cell(str(cell))


def column_type(name: str, cells: Sequence[Any]) -> str:
    """"int", "float" or "string": the one type of a column's non-None cells (ints among floats are floats);
    a column mixing text and numbers is refused, as it has no one Parquet type."""
    kinds = set()
    for cell in cells:
        if cell is None:
            continue
        if isinstance(cell, (bool, int)):
            kinds.add("int")
        elif isinstance(cell, float):
            kinds.add("float")
        elif isinstance(cell, str):
            kinds.add("string")
        else:
            raise MedembedError(f"column {name!r}: a cell of type {type(cell).__name__} is not text or a number")
    if not kinds or kinds == {"string"}:
        return "string"
    if "string" in kinds:
        raise MedembedError(f"column {name!r} mixes text and numbers; a table column has one type")
    return "float" if "float" in kinds else "int"


def _write_parquet(path: Path, header: list[str], rows: Sequence[Sequence[Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow_types = {"int": pa.int64(), "float": pa.float64(), "string": pa.string()}
    arrays = []
    for k, name in enumerate(header):
        cells = [row[k] for row in rows]
        kind = column_type(name, cells)
        if kind == "float":
            cells = [None if cell is None else float(cell) for cell in cells]
        elif kind == "int":
            cells = [None if cell is None else int(cell) for cell in cells]
        arrays.append(pa.array(cells, type=arrow_types[kind]))
    table = pa.Table.from_arrays(arrays, names=header)
    atomic_write(path, lambda handle: pq.write_table(table, handle))


def import_pandas(what: str) -> Any:
    """pandas, or a MedembedError saying that `what` needs it and how to install it."""
    try:
        import pandas
    except ImportError:
        raise MedembedError(f"{what} needs pandas, which is not installed: {PANDAS_INSTALL}") from None
    return pandas


def table_frame(header: Sequence[str], rows: Sequence[Sequence[Any]], what: str = "a DataFrame") -> Any:
    """The table as a pandas DataFrame, its columns typed as in Parquet: float64 (NaN where None), int64 (pandas'
    nullable Int64 where a cell is None), text as text."""
    pd = import_pandas(what)
    data = {}
    for k, name in enumerate(header):
        cells = [row[k] for row in rows]
        kind = column_type(name, cells)
        if kind == "float":
            data[name] = pd.Series([float("nan") if cell is None else float(cell) for cell in cells], dtype="float64")
        elif kind == "int":
            data[name] = pd.Series(cells, dtype="Int64" if None in cells else "int64")
        else:
            data[name] = pd.Series(cells, dtype=object if None in cells or not cells else None)
    return pd.DataFrame(data, columns=list(header))
