"""Reading delimited and JSON files the way real files are, with errors that name the line.

Written by hand because the readers in the stack (``csv``, ``datasets``' CSV builder, pandas) either
choke on GLUE's unbalanced quotes or report problems without the file and line a user needs.

Tolerated: a UTF-8 byte-order mark, a stray repeated header row, CRLF or CR line ends, blank lines
(a trailing one included), quoted fields that span lines (line numbers stay physical: the line a
record starts on), and Unicode line-separator characters inside a field (``\\x85``, ``\\u2028``:
IMDB reviews contain them; only ``\\n``, ``\\r\\n`` and ``\\r`` end a line).

Rejected with one sentence naming the file (and the line, where there is one): a file that does not
exist, is a folder or not a regular file, cannot be read (permissions), is binary, compressed,
UTF-16 or otherwise not UTF-8, is empty or has a header but no rows; a missing column; a ragged row;
invalid JSON.

The delimiter: when the header read with the expected delimiter lacks the columns the caller needs,
the first lines are sniffed (``csv.Sniffer``, restricted to ``, ; tab |``). A file that then has the
columns is read with the delimiter it uses (a ``;``-separated ``.csv``, a comma-separated ``.tsv``);
otherwise the error names the delimiter found and the one expected.

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


def is_file(path: str | Path) -> bool:
    """``Path.is_file``, except that a folder this process may not enter is one sentence, not a PermissionError."""
    try:
        return Path(path).is_file()
    except OSError as error:
        raise PeftlabError(f"Data file '{path}' cannot be reached ({_reason(error)}); give this user access to "
                           "its folder or copy the file somewhere readable.") from None


def check_file(path: str | Path, what: str = "Data file") -> None:
    """One sentence unless ``path`` is an existing regular file (``what`` names it: ``--train-file``...)."""
    path = Path(path)
    if is_file(path):
        return
    if path.is_dir():
        raise PeftlabError(f"{what} '{path}' is a folder, not a file; point it at the data file inside.")
    if path.exists():
        raise PeftlabError(f"{what} '{path}' is not a regular file (a device, pipe or socket); give a file on disk.")
    raise PeftlabError(f"{what} '{path}' does not exist; check the path (relative paths start from {Path.cwd()}).")


def _reason(error: OSError) -> str:
    return (error.strerror or type(error).__name__).lower()


# Leading bytes of files that are not text, and what to do about them.
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip)"),
    (b"PK\x03\x04", "a zip archive (or an Excel .xlsx workbook)",
     "extract the file, or save the sheet as CSV (UTF-8)"),
    (b"BZh", "bzip2-compressed", "decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (unzstd)"),
    (b"PAR1", "a Parquet file", "convert it to CSV or JSON Lines"),
    (b"%PDF", "a PDF document", "export the table as CSV"),
    (b"\xd0\xcf\x11\xe0", "an old Excel .xls workbook", "save the sheet as CSV (UTF-8)"),
)
_UTF16 = (b"\xff\xfe", b"\xfe\xff")


def read_text(path: str | Path, what: str = "Data file") -> str:
    """A whole UTF-8 file (BOM dropped); one sentence naming the file if it cannot be read as UTF-8 text."""
    path = Path(path)
    check_file(path, what)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PeftlabError(f"{what} '{path}' cannot be read ({_reason(error)}); give this user read access "
                           "(chmod +r) or copy the file somewhere readable.") from None
    for magic, kind, remedy in _MAGIC:
        if data.startswith(magic):
            raise PeftlabError(f"{path}: the file is {kind}, not text; {remedy}.")
    if data.startswith(_UTF16):
        raise PeftlabError(f"{path}: the file is UTF-16 text (as Excel's 'Unicode Text' saves it), not UTF-8; "
                           "save it as UTF-8 (Excel: 'CSV UTF-8').")
    if b"\x00" in data:
        line = data[: data.index(b"\x00")].count(b"\n") + 1
        raise PeftlabError(f"{path}, line {line}: the file is binary (it contains NUL bytes), not text; point the "
                           "option at the data file itself.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise PeftlabError(
            f"{path}, line {line}: the file is not UTF-8 (byte 0x{data[error.start]:02x}); "
            "save it as UTF-8 and try again."
        ) from None
    if not text.strip():
        raise PeftlabError(f"{path}, line 1: the file is empty{'' if not text else ' (only blank lines)'}; "
                           "give it a header row and data rows, or point the option at the right file.")
    return text


DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
SNIFF_LINES = 20  # the first lines csv.Sniffer looks at (header and data)


def describe_delimiter(delimiter: str) -> str:
    """``comma-separated (',')`` and so on."""
    return f"{DELIMITER_NAMES.get(delimiter, 'other')}-separated ({delimiter!r})"


def sniff_delimiter(text: str) -> str | None:
    """The delimiter the first lines of ``text`` use, as ``csv.Sniffer`` judges among ``, ; tab |``; None if unclear."""
    lines = [line for line in text[:65536].replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip()]
    for sample in ("\n".join(lines[:SNIFF_LINES]), lines[0] if lines else ""):
        try:
            return csv.Sniffer().sniff(sample, delimiters="".join(DELIMITER_NAMES)).delimiter
        except csv.Error:
            continue
    return None


def read_rows(
    path: str | Path,
    *,
    delimiter: str | None = "",
    header: bool | list[str] = True,
    quoting: int = csv.QUOTE_MINIMAL,
    columns: list[str] | None = None,
    follow_sniffed: bool = True,
    expected_by: str | None = None,
) -> list[tuple[int, dict]]:
    """(line number, row dict) for every data row of a CSV/TSV/JSON Lines file.

    ``delimiter=""`` picks by extension; ``None`` reads JSON Lines (or a JSON list). ``header`` is
    True to read column names from the first line, the list of names for headerless files
    (CoLA's GLUE files), or False for a headerless file whose columns are named by position
    (``"0"``, ``"1"``, ...). Line numbers are 1-based physical lines (where the record starts); for a
    JSON list they are the line each object starts on.

    ``columns`` are the columns the caller needs. When the header lacks them (or, without
    ``columns``, has a single column) and the first lines use another delimiter (``csv.Sniffer``),
    the file is read with that delimiter if ``follow_sniffed`` and its header then has them;
    otherwise the error names both delimiters. ``expected_by`` says where the expected delimiter
    comes from (default: the file's extension; GLUE: "GLUE's raw layout").
    """
    path = Path(path)
    if delimiter == "":
        delimiter = delimiter_for(path)
    text = read_text(path)
    if delimiter is None:
        return _read_json_rows(path, text)
    expected_by = expected_by or (f"its {path.suffix.lower()} extension" if path.suffix else "the task's format")

    reader, names, header_line = _open_delimited(path, text, delimiter, quoting, header)
    if header is True and _lacks(names, columns):
        found = sniff_delimiter(text)
        if found is not None and found != delimiter:
            sniffed = _open_delimited(path, text, found, quoting, header)
            if follow_sniffed and columns and not _lacks(sniffed[1], columns):
                reader, names, header_line = sniffed
                delimiter = found
            else:
                raise _delimiter_error(path, header_line, found, delimiter, expected_by, columns, sniffed[1],
                                       follow_sniffed)
    return _data_rows(path, text, reader, names, header_line, header is True, delimiter, expected_by)


def _lacks(names: list[str], columns: list[str] | None) -> bool:
    """True when a header needs a second look: it misses a wanted column, or (none wanted) has only one."""
    return any(column not in names for column in columns) if columns else len(names) == 1


def _open_delimited(path: Path, text: str, delimiter: str, quoting: int, header: bool | list[str]):
    """(reader positioned after the header, column names, header line) for one delimiter."""
    # newline="" splits lines on \n, \r\n and \r only (str.splitlines would also split on \x85,
    # \u2028, ... which occur inside real review text) and leaves the csv module to handle quoted
    # newlines.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    if header is False:  # no header row: the columns are named by position, "0", "1", ...
        probe = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
        try:
            first = next((row for row in probe if row and any(v.strip() for v in row)), [])
        except csv.Error as error:
            raise PeftlabError(f"{path}, line {probe.line_num}: cannot parse the row ({error}); check the quoting.") \
                from None
        return reader, [str(i) for i in range(len(first))], 0
    if header is not True:
        return reader, list(header), 0
    first: list[str] = []
    try:
        while not first or all(not v.strip() for v in first):  # skip leading blank lines
            first = next(reader)
    except StopIteration:
        raise PeftlabError(f"{path}, line 1: the file is empty.") from None
    except csv.Error as error:
        raise PeftlabError(f"{path}, line {reader.line_num}: cannot parse the header ({error}); check the quoting.") \
            from None
    names = [c.strip() for c in first]
    duplicates = sorted({c for c in names if c and names.count(c) > 1})  # "" = unnamed, unused
    if duplicates:
        raise PeftlabError(
            f"{path}, line {reader.line_num}: the header names column{'s' if len(duplicates) > 1 else ''} "
            f"{', '.join(repr(d) for d in duplicates)} more than once. Give every column a distinct name."
        )
    return reader, names, reader.line_num


def _delimiter_error(path: Path, line: int, found: str, expected: str, expected_by: str, columns, found_names,
                     follow_sniffed: bool) -> PeftlabError:
    where = f"{path}, line {line}: the file looks {describe_delimiter(found)} but {expected_by} means " \
            f"{describe_delimiter(expected)}"
    if follow_sniffed and columns:
        missing = ", ".join(repr(c) for c in columns if c not in found_names)
        return PeftlabError(f"{where}, and read either way its header has no column {missing} "
                            f"({DELIMITER_NAMES.get(found)}-separated it has {', '.join(repr(c) for c in found_names)}); "
                            "fix the column option or the header.")
    return PeftlabError(f"{where}; save it {DELIMITER_NAMES.get(expected, 'correctly')}-separated.")


def _data_rows(path: Path, text: str, reader, columns: list[str], header_line: int, has_header: bool, delimiter: str,
               expected_by: str) -> list[tuple[int, dict]]:
    rows: list[tuple[int, dict]] = []
    last_line = header_line  # physical line the previous record ended on
    try:
        for values in reader:
            line_number = last_line + 1
            last_line = reader.line_num
            if not values or all(not v.strip() for v in values):
                continue
            if has_header and [v.strip() for v in values] == columns:
                continue  # a stray repeated header row (seen in real scraped CSVs)
            if len(values) != len(columns):
                found = sniff_delimiter(text)
                hint = (f" (the file looks {describe_delimiter(found)} but {expected_by} means "
                        f"{describe_delimiter(delimiter)})" if found not in (None, delimiter) else "")
                raise PeftlabError(
                    f"{path}, line {line_number}: expected {len(columns)} fields "
                    f"({', '.join(columns)}) but found {len(values)}{hint}; check the delimiter and quoting."
                )
            rows.append((line_number, dict(zip(columns, values))))
    except csv.Error as error:
        raise PeftlabError(
            f"{path}, line {reader.line_num}: cannot parse the row ({error}). Check the quoting."
        ) from None
    if not rows:
        if has_header:
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
