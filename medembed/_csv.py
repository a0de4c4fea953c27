"""CSV cells of user text that a spreadsheet shows as text, not runs as a formula, and that read back unchanged.

Image ids, paths, study ids and other column text come from users and file names; a cell such as
``=cmd|' /C calc'!A0.jpg`` opened in a spreadsheet is a formula (CSV injection). As OWASP recommends, every
writer passes such cells through ``text_cell``, which puts a single quote before a leading ``= + - @``, tab or
carriage return; every reader of medembed's own CSVs passes them through ``read_text_cell``, which removes
exactly that quote. Numbers medembed formats (probabilities, metrics) are written as they are, and so is text
that is a plain decimal number (``-0.5``, ``+3``, ``-1e-3``): a spreadsheet reads it as a number, not a formula.

The pair is exact: ``read_text_cell(text_cell(v)) == v`` for every string, a value that itself starts with
quotes before one of those characters included (``'=x`` is written ``''=x``).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def text_cell(value: str) -> str:
    """``value`` (user text) as a CSV cell: one more leading quote where it starts, after any quotes, with one
    of FORMULA_STARTS and is not a plain number."""
    value = str(value)
    if value.lstrip("'").startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def read_text_cell(cell: str) -> str:
    """The user text that ``text_cell`` wrote as ``cell``: the one quote it added removed."""
    if cell.startswith("'") and cell.lstrip("'").startswith(FORMULA_STARTS):
        return cell[1:]
    return cell


def csv_lines(rows: Iterable[Iterable]) -> Iterator[str]:
    """Each row as one CSV line ending in "\n", a field holding "\r" or "\n" quoted.

    Python 3.11's writer quotes only the characters of its line terminator, so with "\n" a field "\rx" went out
    bare and came back as a line break: rows are written with "\r\n" (quoting both) and end in "\n"."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    for row in rows:
        writer.writerow(row)
        yield buffer.getvalue()[:-2] + "\n"
        buffer.seek(0)
        buffer.truncate()
