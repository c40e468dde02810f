"""Reading delimited and JSON Lines files the way real files are, with errors that name the line.

Written by hand because the readers in the stack (``csv``, ``datasets``' CSV builder, pandas) either
choke on GLUE's unbalanced quotes or report problems without the file and line a user needs.
Tolerated: a UTF-8 byte-order mark, a stray repeated header row, CRLF line ends, a trailing blank
line. Rejected with one message: a missing column, a ragged row, a file with no rows, a delimiter
that does not match the file.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from peftlab.errors import PeftlabError

csv.field_size_limit(sys.maxsize)


def delimiter_for(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return "\t"
    if suffix == ".csv":
        return ","
    if suffix in (".jsonl", ".json"):
        return None
    raise PeftlabError(
        f"Cannot tell the format of '{path}' from its extension '{suffix or '(none)'}'. "
        "Use a .csv, .tsv or .jsonl file."
    )


def read_rows(
    path: str | Path,
    *,
    delimiter: str | None = "",
    header: bool | list[str] = True,
    quoting: int = csv.QUOTE_MINIMAL,
) -> list[tuple[int, dict]]:
    """(line number, row dict) for every data row of a CSV/TSV/JSONL file.

    ``delimiter=""`` picks by extension; ``None`` reads JSON Lines (or a JSON list). ``header`` is
    True to read column names from the first line, or the list of names for headerless files
    (CoLA's GLUE files).
    """
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"Data file '{path}' does not exist.")
    if delimiter == "":
        delimiter = delimiter_for(path)
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if not text.strip():
        raise PeftlabError(f"Data file '{path}' is empty.")
    if delimiter is None:
        return _read_json_rows(path, text)

    lines = text.splitlines()
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    rows: list[tuple[int, dict]] = []
    columns: list[str]
    if header is True:
        columns = [c.strip() for c in next(reader)]
        if len(columns) == 1 and len(lines) > 1:
            other = "," if delimiter == "\t" else "\t"
            if other in lines[0]:
                raise PeftlabError(
                    f"{path}, line 1: the header has one column but contains "
                    f"{'commas' if other == ',' else 'tabs'}; the file looks "
                    f"{'comma' if other == ',' else 'tab'}-separated while its extension says "
                    f"{'tab' if delimiter == chr(9) else 'comma'}-separated. Rename it to "
                    f"{'.csv' if other == ',' else '.tsv'}."
                )
        first_line = 2
    else:
        columns = list(header)
        first_line = 1
    for offset, values in enumerate(reader):
        line_number = first_line + offset
        if not values or all(not v.strip() for v in values):
            continue
        if [v.strip() for v in values] == columns:
            continue  # a stray repeated header row (seen in real scraped CSVs)
        if len(values) != len(columns):
            raise PeftlabError(
                f"{path}, line {line_number}: expected {len(columns)} fields "
                f"({', '.join(columns)}) but found {len(values)}. Check the delimiter and quoting."
            )
        rows.append((line_number, dict(zip(columns, values))))
    if not rows:
        raise PeftlabError(f"Data file '{path}' has a header but no data rows.")
    return rows


def _read_json_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise PeftlabError(f"{path}, line {error.lineno}: invalid JSON ({error.msg}).") from None
        rows = []
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise PeftlabError(f"{path}: record {index} is not a JSON object.")
            rows.append((index + 1, record))
        return rows
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PeftlabError(f"{path}, line {line_number}: invalid JSON ({error.msg}).") from None
        if not isinstance(record, dict):
            raise PeftlabError(f"{path}, line {line_number}: expected a JSON object per line.")
        rows.append((line_number, record))
    if not rows:
        raise PeftlabError(f"Data file '{path}' has no records.")
    return rows


def require_columns(path: Path, line_number: int, row: dict, names: list[str]) -> None:
    missing = [n for n in names if n not in row]
    if missing:
        raise PeftlabError(
            f"{path}, line {line_number}: missing column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)}. Columns present: {', '.join(repr(c) for c in row)}."
        )
