"""Reading delimited and JSON files the way real files are, with errors that name the line.

Written by hand because the readers in the stack (``csv``, ``datasets``' CSV builder, pandas) either
choke on GLUE's unbalanced quotes or report problems without the file and line a user needs.

Tolerated: a UTF-8 byte-order mark, a stray repeated header row, CRLF or CR line ends, blank lines
(a trailing one included), quoted fields that span lines (line numbers stay physical: the line a
record starts on), and Unicode line-separator characters inside a field (``\\x85``, ``\\u2028``:
IMDB reviews contain them; only ``\\n``, ``\\r\\n`` and ``\\r`` end a line).

Rejected with one message naming the file and line: a file that does not exist, is not UTF-8, is
empty or has a header but no rows; a missing column; a ragged row; a delimiter that does not match
the extension; invalid JSON.

Also here: :func:`seeded_split`, the deterministic train/dev split used by the tasks whose source has
one split only (IMDB sample, Alpaca).
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from pathlib import Path

from peftlab.errors import PeftlabError

csv.field_size_limit(sys.maxsize)

SPLIT_SEED = 42


def delimiter_for(path: Path) -> str | None:
    """The delimiter a file's extension promises: ``\\t``, ``,`` or None for JSON (Lines)."""
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


def read_text(path: str | Path) -> str:
    """A whole UTF-8 file (BOM dropped); a clear error if it is missing, empty or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"Data file '{path}' does not exist{' (it is a folder)' if path.is_dir() else ''}.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise PeftlabError(
            f"{path}, line {line}: the file is not UTF-8 (byte 0x{data[error.start]:02x}). "
            "Save it as UTF-8 and try again."
        ) from None
    if not text.strip():
        raise PeftlabError(f"{path}, line 1: the file is empty{'' if not text else ' (only blank lines)'}. "
                           "Give it a header row and data rows, or point the option at the right file.")
    return text


def read_rows(
    path: str | Path,
    *,
    delimiter: str | None = "",
    header: bool | list[str] = True,
    quoting: int = csv.QUOTE_MINIMAL,
) -> list[tuple[int, dict]]:
    """(line number, row dict) for every data row of a CSV/TSV/JSON Lines file.

    ``delimiter=""`` picks by extension; ``None`` reads JSON Lines (or a JSON list). ``header`` is
    True to read column names from the first line, or the list of names for headerless files
    (CoLA's GLUE files). Line numbers are 1-based physical lines (where the record starts); for a
    JSON list they are the line each object starts on.
    """
    path = Path(path)
    if delimiter == "":
        delimiter = delimiter_for(path)
    text = read_text(path)
    if delimiter is None:
        return _read_json_rows(path, text)

    # newline="" splits lines on \n, \r\n and \r only (str.splitlines would also split on \x85,
    # \u2028, ... which occur inside real review text) and leaves the csv module to handle quoted
    # newlines.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    rows: list[tuple[int, dict]] = []
    columns: list[str]
    last_line = 0  # physical line the previous record ended on
    if header is True:
        first = []
        while not first or all(not v.strip() for v in first):  # skip leading blank lines
            try:
                first = next(reader)
            except StopIteration:
                raise PeftlabError(f"{path}, line 1: the file is empty.") from None
        header_line = reader.line_num
        last_line = reader.line_num
        columns = [c.strip() for c in first]
        if len(columns) == 1:
            other = "," if delimiter == "\t" else "\t"
            if other in columns[0]:
                raise PeftlabError(
                    f"{path}, line {header_line}: the header has one column but contains "
                    f"{'commas' if other == ',' else 'tabs'}; the file looks "
                    f"{'comma' if other == ',' else 'tab'}-separated while its extension says "
                    f"{'tab' if delimiter == chr(9) else 'comma'}-separated. Rename it to "
                    f"{'.csv' if other == ',' else '.tsv'} (or save it with "
                    f"{'tabs' if delimiter == chr(9) else 'commas'})."
                )
        duplicates = sorted({c for c in columns if c and columns.count(c) > 1})  # "" = unnamed, unused
        if duplicates:
            raise PeftlabError(
                f"{path}, line {header_line}: the header names column{'s' if len(duplicates) > 1 else ''} "
                f"{', '.join(repr(d) for d in duplicates)} more than once. Give every column a distinct name."
            )
    else:
        columns = list(header)
    try:
        for values in reader:
            line_number = last_line + 1
            last_line = reader.line_num
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
    except csv.Error as error:
        raise PeftlabError(
            f"{path}, line {reader.line_num}: cannot parse the row ({error}). Check the quoting."
        ) from None
    if not rows:
        if header is True:
            raise PeftlabError(f"{path}, line {last_line + 1}: no data rows after the header (line {header_line}).")
        raise PeftlabError(f"{path}, line 1: the file has no data rows.")
    return rows


def _line_of(text: str, offset: int, cache: list[int]) -> int:
    """1-based line number of ``offset``; ``cache`` = [last offset, its line] for sequential calls."""
    start, line = cache
    if offset < start:
        start, line = 0, 1
    line += text.count("\n", start, offset)
    cache[0], cache[1] = offset, line
    return line


def _read_json_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _read_json_list(path, text)
    rows = []
    for line_number, line in enumerate(io.StringIO(text, newline=""), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PeftlabError(
                f"{path}, line {line_number}: invalid JSON ({error.msg}, column {error.colno}). "
                "A .jsonl file needs one complete JSON object per line."
            ) from None
        if not isinstance(record, dict):
            raise PeftlabError(
                f"{path}, line {line_number}: expected a JSON object per line, found {type(record).__name__}."
            )
        rows.append((line_number, record))
    if not rows:
        raise PeftlabError(f"{path}, line 1: the file has no JSON records.")
    return rows


def _read_json_list(path: Path, text: str) -> list[tuple[int, dict]]:
    """A JSON array of objects, each paired with the line it starts on."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise PeftlabError(f"{path}, line {error.lineno}: invalid JSON ({error.msg}, column {error.colno}).") from None
    if not isinstance(records, list):
        raise PeftlabError(f"{path}: expected a JSON list of objects.")
    # Valid JSON: walk it again with raw_decode to learn where each element starts.
    decoder = json.JSONDecoder()
    whitespace = " \t\n\r"
    position = text.index("[") + 1
    cache = [0, 1]
    rows = []
    for index, record in enumerate(records):
        while text[position] in whitespace or text[position] == ",":
            position += 1
        line = _line_of(text, position, cache)
        _, position = decoder.raw_decode(text, position)
        if not isinstance(record, dict):
            raise PeftlabError(
                f"{path}, line {line}: record {index + 1} is a JSON {type(record).__name__}, not an object."
            )
        rows.append((line, record))
    if not rows:
        raise PeftlabError(f"{path}, line 1: the file is an empty JSON list; it needs at least one record.")
    return rows


def require_columns(path: Path, line_number: int, row: dict, names: list[str]) -> None:
    missing = [n for n in names if n not in row]
    if missing:
        raise PeftlabError(
            f"{path}, line {line_number}: missing column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)}. Columns present: {', '.join(repr(c) for c in row)}."
        )


def seeded_split(n: int, dev_fraction: float, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """Deterministic (train indices, dev indices) for ``n`` rows.

    A Fisher-Yates shuffle driven by ``random.Random(seed).random()`` (whose sequence Python
    guarantees across versions, unlike ``shuffle``); the last ``round(n * dev_fraction)`` shuffled
    positions (at least one, and never all) are dev, the rest train. Each list keeps shuffled order.
    """
    order = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    n_dev = min(max(1, round(n * dev_fraction)), n - 1) if n > 1 else 0
    return order[: n - n_dev], order[n - n_dev:]
