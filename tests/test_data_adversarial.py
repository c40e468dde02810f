"""Data files as an adversarial user hands them over (issue 13, data items).

Every bad file is built at run time in ``tmp_path``, some from the real shared data
($PEFTLAB_DATA_DIR, the ``data_dir`` fixture). Each must end in exactly one ``PeftlabError`` whose
message is one sentence on one line naming the file, the line and the field where there is one, and
what to do; and nothing may be written: the data files are byte-for-byte unchanged and no output
folder appears.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import re
import zipfile
from pathlib import Path

import pytest

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.tasks import get_task, task_names
from peftlab.tasks.glue import GLUE
from peftlab.tasks.tabular import read_rows, sniff_delimiter

# ---- helpers --------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (what 'nothing is written' compares)."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and os.access(path, os.R_OK):
            with open(path, "rb") as handle:  # not Path.read_bytes, which one test makes fail
                digests[str(path.relative_to(folder))] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


class Refused:
    """``with Refused(tmp_path, path, line, *fragments) as info:`` -- the one-sentence PeftlabError contract.

    The error must be a PeftlabError (not a subclass, not a KeyError or ValueError from below), one line,
    one sentence (no '. X' sentence break outside quotes and brackets), naming ``path`` and ``line N``
    (when ``line`` is given) and containing every fragment; the folder must be unchanged afterwards."""

    def __init__(self, folder: Path, path, line: int | None, *fragments: str):
        self.folder, self.path, self.line, self.fragments = folder, str(path), line, fragments

    def __enter__(self):
        self.before = snapshot(self.folder)
        self.ctx = pytest.raises(PeftlabError)
        self.info = self.ctx.__enter__()
        return self.info

    def __exit__(self, *exc):
        handled = self.ctx.__exit__(*exc)
        error = self.info.value
        assert type(error) is PeftlabError, type(error)
        assert_one_sentence(str(error), self.path, self.line, *self.fragments)
        assert snapshot(self.folder) == self.before, "a refused file changed something on disk"
        return handled


def assert_one_sentence(message: str, path: str, line: int | None, *fragments: str) -> None:
    assert "\n" not in message and "Traceback" not in message, message
    assert path in message, message
    if line is not None:
        assert re.search(rf"\bline {line}\b", message), message
    for fragment in fragments:
        assert fragment in message, message
    outside = re.sub(r"'[^']*'|\"[^\"]*\"|\([^()]*\)", "", message.replace(path, "PATH"))
    assert not re.search(r"[.!?]\s+[A-Z]", outside), f"more than one sentence: {message}"
    assert message.endswith((".", ")")), message


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def csv_text(rows: list[list[str]], delimiter: str) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def user_task(name: str, train: Path, dev: Path | None = None, **options):
    options = {"text_column": "review", "label_column": "stars", **options}
    return get_task(name, train_file=str(train), dev_file=str(dev or train), **options)


@pytest.fixture(scope="module")
def imdb_rows(data_dir) -> list[list[str]]:
    """The first 40 real IMDB reviews (text with commas, quotes, semicolons) with their 0/1 labels."""
    rows = read_rows(data_dir / "imdb" / "imdb.csv", delimiter=",")[:40]
    return [[row["text"], row["label"]] for _, row in rows]


@pytest.fixture(scope="module")
def sst2_lines(data_dir) -> list[str]:
    """The header and first 200 lines of the real SST-2 train.tsv."""
    with open(data_dir / "glue" / "SST-2" / "train.tsv", encoding="utf-8") as handle:
        return [next(handle) for _ in range(201)]


def glue_folder(root: Path, directory: str, train: str | bytes, dev: str | bytes | None = None) -> Path:
    folder = root / "glue" / directory
    folder.mkdir(parents=True)
    for name, content in (("train.tsv", train), ("dev.tsv", dev if dev is not None else train)):
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


# ---- 1. missing-value labels -------------------------------------------------------------------------------

MARKERS = ["NaN", "nan", "NA", "N/A", "n/a", "null", "NULL", "None", "#N/A", "<NA>", "-nan"]


@pytest.mark.parametrize("marker", MARKERS)
@pytest.mark.parametrize("extension", [".csv", ".tsv"])
def test_missing_value_label_is_refused_with_file_line_and_field(tmp_path, imdb_rows, marker, extension):
    rows = [["review", "stars"]] + [list(row) for row in imdb_rows[:12]]
    rows[7][1] = marker  # file line 8
    delimiter = "\t" if extension == ".tsv" else ","
    train = write(tmp_path / f"reviews{extension}", csv_text(rows, delimiter))
    with Refused(tmp_path, train, 8, "field 'stars'", f"'{marker}'", "missing-value", "fill in the label"):
        user_task(extension[1:], train).load("train")


@pytest.mark.parametrize("label", ["", "   "])
def test_empty_label_is_refused(tmp_path, imdb_rows, label):
    rows = [["review", "stars"]] + [list(row) for row in imdb_rows[:5]]
    rows[3][1] = label  # line 4
    train = write(tmp_path / "reviews.csv", csv_text(rows, ","))
    with Refused(tmp_path, train, 4, "field 'stars'", "is empty", "fill it in"):
        user_task("csv", train).load("train")


def test_missing_label_in_the_dev_file_is_refused_too(tmp_path, imdb_rows):
    train = write(tmp_path / "train.csv", csv_text([["review", "stars"]] + imdb_rows[:20], ","))
    dev_rows = [["review", "stars"]] + [list(row) for row in imdb_rows[20:30]]
    dev_rows[10][1] = "nan"
    dev = write(tmp_path / "dev.csv", csv_text(dev_rows, ","))
    task = user_task("csv", train, dev)
    assert task.labels_from(task.load("train")) == ["0", "1"]
    with Refused(tmp_path, dev, 11, "field 'stars'", "'nan'"):
        task.load("dev")


@pytest.mark.parametrize("value, shown", [("NaN", "NaN"), ("Infinity", "Infinity"), ("null", "null"),
                                          ('"NaN"', "'NaN'"), ('"NA"', "'NA'"), ('""', "empty"), ("[1]", "list")])
def test_jsonl_missing_labels_are_refused(tmp_path, value, shown):
    train = write(tmp_path / "t.jsonl", '{"review": "good", "stars": "pos"}\n\n'
                                        f'{{"review": "odd", "stars": {value}}}\n')
    with Refused(tmp_path, train, 3, "field 'stars'", shown):
        user_task("jsonl", train).load("train")


def test_a_marker_listed_in_label_names_is_a_real_class(tmp_path):
    train = write(tmp_path / "regions.csv", "review,stars\nToronto,NA\nLyon,EU\n")
    task = user_task("csv", train, label_names="EU,NA")
    assert task.load("train")["label"] == ["NA", "EU"] and task.labels_from(None) == ["EU", "NA"]
    with Refused(tmp_path, train, 2, "'NA'", "--label-names"):
        user_task("csv", train).load("train")  # without it, 'NA' is a hole in the data


@pytest.mark.parametrize("value, fragment", [("nan", "not a finite number"), ("inf", "not a finite number"),
                                             ("-Infinity", "not a finite number"), ("NA", "not a number"),
                                             ("", "is empty")])
def test_regression_labels_must_be_finite_numbers(tmp_path, value, fragment):
    train = write(tmp_path / "scores.tsv", f"review\tstars\na\t0.5\nb\t{value}\nc\t2\n")
    with Refused(tmp_path, train, 3, "field 'stars'", fragment):
        user_task("tsv", train, regression=True).load("train")


def test_regression_json_nan_is_refused(tmp_path):
    train = write(tmp_path / "scores.jsonl", '{"review": "a", "stars": 1.5}\n{"review": "b", "stars": NaN}\n')
    with Refused(tmp_path, train, 2, "field 'stars'", "NaN"):
        user_task("jsonl", train, regression=True).load("train")


def test_glue_regression_score_must_be_finite(tmp_path):
    glue_folder(tmp_path, "STS-B", "sentence1\tsentence2\tscore\na\tb\t3.2\nc\td\tnan\n")
    with Refused(tmp_path, tmp_path / "glue" / "STS-B" / "train.tsv", 3, "field 'score'", "'nan'", "finite"):
        get_task("stsb").load("train", tmp_path)


def test_cli_refuses_a_nan_label_and_writes_nothing(tmp_path, imdb_rows, capsys):
    from peftlab.cli import main

    rows = [["review", "stars"]] + [list(row) for row in imdb_rows[:10]]
    rows[5][1] = "NaN"
    data = tmp_path / "data"
    data.mkdir()
    train = write(data / "train.csv", csv_text(rows, ","))
    before = snapshot(data)
    output = tmp_path / "run"
    code = main(["train", "--task", "csv", "--train-file", str(train), "--dev-file", str(train),
                 "--text-column", "review", "--label-column", "stars", "--output", str(output)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("peftlab: error: ") and len(error.splitlines()) == 1, error
    assert_one_sentence(error.removeprefix("peftlab: error: "), str(train), 6, "field 'stars'", "'NaN'")
    assert snapshot(data) == before
    assert not output.exists() or not [p for p in output.rglob("*") if p.is_file()], "a refused run wrote files"


# ---- 2. the delimiter ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("delimiter", [";", "|", "\t"])
def test_other_delimiter_in_a_csv_is_read_when_the_header_has_the_columns(tmp_path, imdb_rows, delimiter):
    train = write(tmp_path / "reviews.csv", csv_text([["review", "stars"]] + imdb_rows, delimiter))
    data = user_task("csv", train).load("train")
    assert data["text"] == [text for text, _ in imdb_rows]  # commas inside the reviews survive
    assert data["label"] == [label for _, label in imdb_rows]
    assert any("," in text for text in data["text"])


def test_comma_separated_tsv_is_read_when_the_header_has_the_columns(tmp_path, sst2_lines):
    rows = [line.rstrip("\n").split("\t") for line in sst2_lines]
    train = write(tmp_path / "sst2_commas.tsv", csv_text([["review", "stars"]] + rows[1:], ","))
    data = user_task("tsv", train).load("train")
    assert len(data) == 200 and data["text"][0] == rows[1][0] and any("," in t for t in data["text"])


def test_pipe_separated_txt_is_read(tmp_path, imdb_rows):
    train = write(tmp_path / "reviews.txt", csv_text([["review", "stars"]] + imdb_rows, "|"))
    assert len(user_task("csv", train).load("train")) == len(imdb_rows)


def test_semicolon_csv_without_the_requested_column_names_both_delimiters(tmp_path, imdb_rows):
    train = write(tmp_path / "reviews.csv", csv_text([["review", "score"]] + imdb_rows, ";"))
    with Refused(tmp_path, train, 1, "semicolon-separated (';')", "comma-separated (',')", "'stars'",
                 "'review', 'score'") as info:
        user_task("csv", train).load("train")
    assert "fields" not in str(info.value)  # not "wrong field count"


def test_tab_separated_csv_without_the_column_names_both_delimiters(tmp_path):
    train = write(tmp_path / "reviews.csv", "text\tstars\ngood, really\t1\nbad\t0\n")
    with Refused(tmp_path, train, 1, "tab-separated", "comma-separated", "'review'"):
        user_task("csv", train).load("train")


def test_real_glue_tsv_with_commas_is_read_as_tsv(tmp_path, sst2_lines):
    glue_folder(tmp_path, "SST-2", "".join(sst2_lines))
    data = get_task("sst2").load("train", tmp_path)
    assert len(data) == 200 and any("," in text for text in data["text"])
    assert data["text"][0] == sst2_lines[1].split("\t")[0]


def test_comma_separated_glue_file_is_refused_without_rename_advice(tmp_path, sst2_lines):
    rows = [line.rstrip("\n").split("\t") for line in sst2_lines]
    glue_folder(tmp_path, "SST-2", csv_text(rows, ","))
    path = tmp_path / "glue" / "SST-2" / "train.tsv"
    with Refused(tmp_path, path, 1, "comma-separated (',')", "tab-separated ('\\t')", "GLUE's raw layout",
                 "save it tab-separated") as info:
        get_task("sst2").load("train", tmp_path)
    assert "rename" not in str(info.value).lower() and ".csv" not in str(info.value)


def test_comma_separated_headerless_cola_names_the_delimiter(tmp_path):
    glue_folder(tmp_path, "CoLA", "gj04,1,,Our friends won't buy this analysis.\ngj04,0,*,One more.\n")
    with Refused(tmp_path, tmp_path / "glue" / "CoLA" / "train.tsv", 1, "expected 4 fields",
                 "comma-separated", "tab-separated", "check the delimiter"):
        get_task("cola").load("train", tmp_path)


def test_sniffer_is_restricted_to_four_delimiters():
    assert sniff_delimiter("a;b\nx, y;1\n") == ";"
    assert sniff_delimiter("a:b\nx:1\n") in (None, ",", ";", "\t", "|")
    assert sniff_delimiter("text\nhello world\n") is None


# ---- 3. unreadable files ---------------------------------------------------------------------------------------


def test_a_folder_as_train_file(tmp_path):
    folder = tmp_path / "train.csv"
    folder.mkdir()
    with Refused(tmp_path, folder, None, "--train-file", "is a folder"):
        user_task("csv", folder).load("train")


def test_a_pipe_as_train_file(tmp_path):
    fifo = tmp_path / "train.csv"
    os.mkfifo(fifo)
    with Refused(tmp_path, fifo, None, "--train-file", "not a regular file"):
        user_task("csv", fifo).load("train")


def test_permission_denied(tmp_path, monkeypatch, imdb_rows):
    train = write(tmp_path / "secret.csv", csv_text([["review", "stars"]] + imdb_rows, ","))
    real_read_bytes = Path.read_bytes

    def denied(self):
        if self == train:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)  # root reads everything: simulate a foreign file
    with Refused(tmp_path, train, None, "cannot be read (permission denied)", "read access"):
        user_task("csv", train).load("train")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_permission_denied_for_real(tmp_path):
    train = write(tmp_path / "secret.csv", "review,stars\na,1\n")
    train.chmod(0)
    try:
        with Refused(tmp_path, train, None, "permission denied"):
            user_task("csv", train).load("train")
    finally:
        train.chmod(0o644)


def test_invalid_utf8(tmp_path, imdb_rows):
    text = csv_text([["review", "stars"]] + imdb_rows[:6], ",")
    train = tmp_path / "latin1.csv"
    train.write_bytes(text.encode("utf-8") + "Café crème,1\n".encode("latin-1"))
    with Refused(tmp_path, train, text.count("\n") + 1, "not UTF-8", "byte 0xe9", "save it as UTF-8"):
        user_task("csv", train).load("train")


@pytest.mark.parametrize("kind", ["gzip", "zip", "utf16", "nul", "random"])
def test_binary_files(tmp_path, data_dir, kind):
    real = (data_dir / "imdb" / "imdb.csv").read_bytes()[:20_000]
    content, fragment = {
        "gzip": (gzip.compress(real), "gzip-compressed"),
        "zip": (None, "zip archive"),
        "utf16": (real.decode("utf-8").encode("utf-16"), "UTF-16"),
        "nul": (b"review,stars\nfine,1\n\x00\x00\x00\x00", "binary"),
        "random": (bytes(range(256)) * 8, "binary"),
    }[kind]
    train = tmp_path / "reviews.csv"
    if kind == "zip":
        with zipfile.ZipFile(train, "w") as archive:
            archive.writestr("imdb.csv", real)
    else:
        train.write_bytes(content)
    with Refused(tmp_path, train, None, fragment):
        user_task("csv", train).load("train")


def test_binary_file_in_a_named_task_layout(tmp_path, data_dir):
    real = (data_dir / "conll2003" / "valid.txt").read_bytes()[:5_000]
    (tmp_path / "conll2003").mkdir()
    (tmp_path / "conll2003" / "train.txt").write_bytes(gzip.compress(real))
    with Refused(tmp_path, tmp_path / "conll2003" / "train.txt", None, "gzip-compressed", "decompress"):
        get_task("conll2003").load("train", tmp_path)


def test_cli_refuses_a_folder_and_writes_nothing(tmp_path, capsys):
    from peftlab.cli import main

    folder = tmp_path / "train.csv"
    folder.mkdir()
    output = tmp_path / "run"
    code = main(["train", "--task", "csv", "--train-file", str(folder), "--dev-file", str(folder),
                 "--text-column", "review", "--label-column", "stars", "--output", str(output)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "Traceback" not in error, error
    assert_one_sentence(error.removeprefix("peftlab: error: "), str(folder), None, "is a folder")
    assert not output.exists() or not [p for p in output.rglob("*") if p.is_file()]


# ---- 4. GLUE label names -----------------------------------------------------------------------------------------

# The datasets library's GLUE features: ClassLabel(names=[...]) in id order (nyu-mll/glue).
GLUE_NAMES = {
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "wnli": ["not_entailment", "entailment"],
    "stsb": None,
}


@pytest.mark.parametrize("name", list(GLUE_NAMES))
def test_glue_label_names_are_glues_own(name):
    task = get_task(name)
    assert task.label_names == GLUE_NAMES[name] and task.is_regression == (GLUE_NAMES[name] is None)


def test_glue_files_with_ids_and_with_names(tmp_path, sst2_lines):
    glue_folder(tmp_path, "SST-2", "".join(sst2_lines[:21]))
    data = get_task("sst2").load("train", tmp_path)
    ids = [line.rstrip("\n").split("\t")[1] for line in sst2_lines[1:21]]
    assert data["label"] == [GLUE_NAMES["sst2"][int(i)] for i in ids]
    glue_folder(tmp_path, "RTE", "index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tA man rests.\tentailment\n"
                                 "1\tIt rains.\tIt is dry.\tnot_entailment\n")
    assert get_task("rte").load("train", tmp_path)["label"] == ["entailment", "not_entailment"]
    glue_folder(tmp_path, "WNLI", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\t1\n1\tc\td\t0\n")
    assert get_task("wnli").load("dev", tmp_path)["label"] == ["entailment", "not_entailment"]


def test_glue_unknown_label_lists_names_and_ids(tmp_path):
    glue_folder(tmp_path, "MRPC", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta\tb\n2\t3\t4\tc\td\n")
    with Refused(tmp_path, tmp_path / "glue" / "MRPC" / "train.tsv", 3, "'2'", "field 'Quality'",
                 "not_equivalent (0), equivalent (1)", "fix the label"):
        get_task("mrpc").load("train", tmp_path)


def test_glue_hub_rows_get_the_names(monkeypatch):
    import peftlab.tasks.glue as glue

    monkeypatch.delenv("PEFTLAB_DATA_DIR", raising=False)

    rows = [{"sentence": "fine", "label": 1, "idx": 0}, {"sentence": "bad", "label": 0, "idx": 1}]
    monkeypatch.setattr(glue, "load_hub_dataset", lambda *args: rows)
    assert get_task("cola").load("train")["label"] == ["acceptable", "unacceptable"]
    old = get_task("cola")
    old.use_saved_label_names(["0", "1"])
    assert old.load("train")["label"] == ["1", "0"]


def test_runs_saved_with_0_1_names_read_the_same_ids(data_dir):
    """A run saved before GLUE's names has label_names ["0", "1"] in peftlab.json; its dev data must carry
    those strings, map to the same ids, and score the same."""
    new = get_task("sst2")
    old = get_task("sst2")
    old.use_saved_label_names(["0", "1"])
    new_dev, old_dev = new.load("dev", data_dir), old.load("dev", data_dir)
    assert old.label_names == ["0", "1"] and set(old_dev["label"]) == {"0", "1"}
    new_ids = [new.label_names.index(label) for label in new_dev["label"]]
    old_ids = [old.label_names.index(label) for label in old_dev["label"]]
    assert new_ids == old_ids
    predictions = [(i + k) % 2 for k, i in enumerate(new_ids)]
    assert new.compute_metrics(predictions, new_ids) == old.compute_metrics(predictions, old_ids)
    # names other than the old ids are left alone; other tasks have nothing to adapt
    other = get_task("sst2")
    other.use_saved_label_names(["neg", "pos"])
    assert other.label_names == ["negative", "positive"]
    conll = get_task("conll2003")
    conll.use_saved_label_names(["0", "1"])
    assert conll.label_names[0] == "O"


def test_old_run_labels_tokenize_to_the_same_ids(data_dir):
    """preprocess.tokenize keyed on the saved names: old and new runs give identical label ids."""
    from peftlab.models import load_tokenizer
    from peftlab.preprocess import tokenize

    tokenizer = load_tokenizer("minilm")
    new, old = get_task("mrpc"), get_task("mrpc")
    old.use_saved_label_names(["0", "1"])
    new_dev = tokenize(new.load("dev", data_dir).select(range(64)), new.kind, tokenizer, max_length=64,
                       label_names=new.label_names)
    old_dev = tokenize(old.load("dev", data_dir).select(range(64)), old.kind, tokenizer, max_length=64,
                       label_names=["0", "1"])
    assert new_dev["labels"] == old_dev["labels"] and set(new_dev["labels"]) == {0, 1}


@pytest.mark.real
def test_a_run_saved_with_0_1_names_still_evaluates(tmp_path, data_dir):
    """eval of a GLUE run from before GLUE's names (tests/data/legacy-407067a: label_names ["0", "1"])."""
    import shutil

    from peftlab.inference import evaluate

    run = tmp_path / "lora-sst2"
    shutil.copytree(Path(__file__).parent / "data" / "legacy-407067a" / "lora-sst2", run)
    result = evaluate(str(run), data_dir=str(data_dir), max_eval_samples=32)
    assert result["eval_examples"] == 32 and 0.0 <= result["metric"] <= 1.0


def test_glue_spec_label_order_matches_the_table():
    for name, spec in GLUE.items():
        assert (list(spec.label_names) if spec.label_names else None) == GLUE_NAMES[name]


# ---- 5. kinds --------------------------------------------------------------------------------------------------


def test_every_task_states_a_taskkind():
    for name in task_names():
        kind = get_task(name).kind
        assert isinstance(kind, TaskKind), name
    assert get_task("sst2").kind.is_classification and get_task("squad").kind is TaskKind.QA


def test_task_modules_write_no_kind_strings():
    folder = Path(__file__).resolve().parents[1] / "src" / "peftlab" / "tasks"
    literals = {f'"{kind.value}"' for kind in TaskKind} | {f"'{kind.value}'" for kind in TaskKind}
    for module in folder.glob("*.py"):
        code = "\n".join(line for line in module.read_text().splitlines()
                         if not line.lstrip().startswith(("#", "``", "*")))
        code = re.sub(r'"""[\s\S]*?"""', "", code)
        found = [literal for literal in literals if literal in code]
        assert not found, f"{module.name} compares or sets kinds by string: {found}"
