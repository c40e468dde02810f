"""Tasks: real shared data (exact counts, first rows, label sets) and every bad input a user can hand us.

Real data comes from the ``data_dir`` fixture (../shared/data or $PEFTLAB_DATA_DIR); synthetic files
live in ``tmp_path``. Every rejected input must raise a PeftlabError naming the file and the line.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from peftlab.errors import PeftlabError
from peftlab.tasks import get_task
from peftlab.tasks.base import resolve_data_dir
from peftlab.tasks.conll2003 import LABELS as CONLL_LABELS
from peftlab.tasks.conll2003 import to_iob2
from peftlab.tasks.tabular import read_rows, seeded_split


def load_both(name: str, data_dir=None, **options):
    task = get_task(name, **options)
    return task, task.load("train", data_dir), task.load("dev", data_dir)


def raises_at(match_file, line: int | None, *fragments: str):
    """Context: a PeftlabError whose message names ``match_file`` and ``line N`` (and the fragments)."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(PeftlabError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            assert str(match_file) in message, message
            if line is not None:
                assert re.search(rf"\bline {line}\b", message), message
            for fragment in fragments:
                assert fragment in message, message
            return handled

    return _Check()


# ---------------------------------------------------------------------------------------------
# real data


@pytest.fixture(scope="module")
def sst2(data_dir):
    return load_both("sst2", data_dir)


@pytest.fixture(scope="module")
def conll(data_dir):
    return load_both("conll2003", data_dir)


@pytest.fixture(scope="module")
def imdb(data_dir):
    return load_both("imdb", data_dir)


@pytest.fixture(scope="module")
def alpaca(data_dir):
    return load_both("alpaca", data_dir)


def test_sst2_real(sst2):
    task, train, dev = sst2
    assert (len(train), len(dev)) == (67_349, 872)
    assert train.column_names == ["text", "text_pair", "label"]
    assert train[0] == {"text": "when are bears bears and ", "text_pair": None, "label": "positive"}
    assert dev[0] == {"text": "it 's a charming and often affecting journey . ", "text_pair": None, "label": "positive"}
    assert Counter(train["label"]) == {"negative": 29_780, "positive": 37_569}  # the file's 0 and 1
    assert task.labels_from(train) == ["negative", "positive"] and task.kind == "seq-cls"


def test_mrpc_real_with_bom(data_dir):
    # MRPC's TSVs start with a UTF-8 BOM before the 'Quality' column name.
    task, train, dev = load_both("mrpc", data_dir)
    assert (len(train), len(dev)) == (3_668, 408)
    assert train[0]["text"].startswith("Amrozi accused his brother, whom he called \"the witness\"")
    assert train[0]["text_pair"].startswith("Referring to him as only \"the witness\"")
    assert train[0]["label"] == "equivalent"
    assert Counter(train["label"]) == {"not_equivalent": 1_194, "equivalent": 2_474}
    assert set(dev["label"]) == {"not_equivalent", "equivalent"}


def test_conll2003_real(conll):
    task, train, dev = conll
    assert (len(train), len(dev)) == (14_041, 3_250)
    assert task.kind == "token-cls" and task.metric_name == "f1"
    assert task.label_names == ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    assert train[0] == {
        "tokens": ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
        "tags": ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"],
    }
    assert train[1] == {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}
    assert dev[0]["tokens"][:3] == ["CRICKET", "-", "LEICESTERSHIRE"]
    tags = Counter(tag for sentence in train["tags"] for tag in sentence)
    assert set(tags) == set(CONLL_LABELS)
    assert not any("-DOCSTART-" in sentence for sentence in train["tokens"][:2000])
    # scoring: tag strings or ids, seqeval entity F1
    gold = dev["tags"][:50]
    assert task.compute_metrics(gold, gold)["f1"] == 1.0
    ids = [[CONLL_LABELS.index(t) for t in s] for s in gold]
    assert task.compute_metrics(ids, gold)["f1"] == 1.0
    all_o = [["O"] * len(s) for s in gold]
    assert task.compute_metrics(all_o, gold)["f1"] == 0.0


def test_imdb_real(imdb, data_dir):
    task, train, dev = imdb
    # 2,000 reviews + the header + one stray repeated header row: the stray one is dropped.
    assert (len(train), len(dev)) == (1_600, 400)
    assert Counter(list(train["label"]) + list(dev["label"])) == {"0": 1_022, "1": 978}
    assert "text" not in list(train["text"]) + list(dev["text"])
    assert not any("<br" in text for text in list(train["text"]) + list(dev["text"]))
    assert task.label_names == ["0", "1"] and task.metric_name == "accuracy"
    # the file's first review is somewhere, cleaned, with its label
    first = next(r for r in list(train) + list(dev) if r["text"].startswith("Dumb is as dumb does"))
    assert first["label"] == "0"
    # deterministic: a fresh task gives the same split (seed 42), and train/dev partition the file
    again = get_task("imdb").load("dev", data_dir)
    assert again["text"] == dev["text"]
    assert train[0]["text"].startswith("This one is a cut above the usual softcore")
    raw_rows = read_rows(data_dir / "imdb" / "imdb.csv")
    assert len(raw_rows) == 2_000


def test_alpaca_real(alpaca, data_dir):
    task, train, dev = alpaca
    assert (len(train), len(dev)) == (899, 100)
    assert task.kind == "causal-lm" and task.metric_name == "perplexity" and task.higher_is_better is False
    prompts = list(train["prompt"]) + list(dev["prompt"])
    assert all(p.endswith("### Response:\n") for p in prompts)
    assert sum("### Input:\n" in p for p in prompts) == 412
    crepes = [r for r in list(train) + list(dev) if "Describe a process of making crepes." in r["prompt"]]
    assert len(crepes) == 1
    assert crepes[0]["prompt"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nDescribe a process of making crepes.\n\n### Response:\n"
    )
    assert crepes[0]["response"].startswith("Making crepes is an easy and delicious process!")
    assert train[0]["prompt"].endswith(
        "### Instruction:\nSuggest a new tagline for the article.\n\n### Input:\nCNN's consultant on political "
        "television advertising believes that the cost to influence the 2008 election may exceed $3 billion."
        "\n\n### Response:\n"
    )
    assert task.compute_metrics(math.log(2.0), None) == {"loss": pytest.approx(math.log(2.0)),
                                                         "perplexity": pytest.approx(2.0)}


def test_seeded_split():
    train, dev = seeded_split(999, 0.1)
    assert (len(train), len(dev)) == (899, 100)
    assert sorted(train + dev) == list(range(999))
    assert seeded_split(999, 0.1) == (train, dev)
    assert seeded_split(2_000, 0.2)[1][:5] == seeded_split(2_000, 0.2, seed=42)[1][:5]
    assert seeded_split(2_000, 0.2) != seeded_split(2_000, 0.2, seed=1)
    assert [len(part) for part in seeded_split(2, 0.1)] == [1, 1]


# ---------------------------------------------------------------------------------------------
# GLUE layout edge cases (synthetic)


def test_cola_headerless_works_and_names_bad_line(tmp_path):
    folder = tmp_path / "glue" / "CoLA"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text(
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
        "gj04\t0\t*\tOne more pseudo generalization and I'm giving up.\n"
    )
    (folder / "dev.tsv").write_text("gj04\t1\t\tFine.\ngj04\t7\t\tBad label.\n")
    task = get_task("cola")
    train = task.load("train", tmp_path)
    assert len(train) == 2
    assert train[0] == {"text": "Our friends won't buy this analysis, let alone the next one we propose.",
                        "text_pair": None, "label": "acceptable"}
    with raises_at("dev.tsv", 2, "'7'", "unacceptable (0), acceptable (1)"):
        task.load("dev", tmp_path)


def test_glue_bom_and_stray_header_tolerated(tmp_path):
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_bytes("\ufeffsentence\tlabel\r\ngood\t1\r\nsentence\tlabel\r\nbad\t0\r\n\r\n".encode())
    (folder / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    train = get_task("sst2").load("train", tmp_path)
    assert train["text"] == ["good", "bad"] and train["label"] == ["positive", "negative"]


def test_glue_missing_file_names_layout(tmp_path):
    with pytest.raises(PeftlabError, match="glue/SST-2/train.tsv"):
        get_task("sst2").load("train", tmp_path)


def test_missing_data_dir_and_offline_hub(monkeypatch, tmp_path):
    monkeypatch.delenv("PEFTLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub and datasets read HF_HUB_OFFLINE at import: set their copies too, or this
    # test would wait ~20 s on network retries when another test imported them first.
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(PeftlabError, match="--data-dir") as info:
        get_task("sst2").load("train")
    assert "Traceback" not in str(info.value)
    with pytest.raises(PeftlabError, match="--data-dir"):
        resolve_data_dir(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# CoNLL (synthetic)


def write_conll(folder, train: str, dev: str = "A DT B-NP O\n"):
    (folder / "conll2003").mkdir(parents=True, exist_ok=True)
    (folder / "conll2003" / "train.txt").write_text(train)
    (folder / "conll2003" / "valid.txt").write_text(dev)


def test_conll_malformed_line(tmp_path):
    write_conll(tmp_path, "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP\n")
    with raises_at("train.txt", 4, "expected 4"):
        get_task("conll2003").load("train", tmp_path)


def test_conll_unknown_tag(tmp_path):
    write_conll(tmp_path, "EU NNP B-NP B-ORG\n\nParis NNP B-NP B-CITY\n")
    with raises_at("train.txt", 3, "B-CITY", "B-PER"):
        get_task("conll2003").load("train", tmp_path)


def test_conll_iob1_converted_and_no_trailing_blank(tmp_path):
    write_conll(tmp_path, "-DOCSTART- -X- -X- O\n\r\nEU NNP I-NP I-ORG\r\nsays VBZ B-VP O\r\nPeter NNP B-NP I-PER")
    train = get_task("conll2003").load("train", tmp_path)
    assert train[0] == {"tokens": ["EU", "says", "Peter"], "tags": ["B-ORG", "O", "B-PER"]}
    assert to_iob2(["B-PER", "I-PER", "I-LOC", "O", "I-LOC"]) == ["B-PER", "I-PER", "B-LOC", "O", "B-LOC"]


def test_conll_empty_file(tmp_path):
    write_conll(tmp_path, "")
    with raises_at("train.txt", 1, "empty"):
        get_task("conll2003").load("train", tmp_path)


# ---------------------------------------------------------------------------------------------
# the user's own files


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def file_task(name, train, dev, **options):
    options = {"text_column": "review", "label_column": "stars", **options}
    return get_task(name, train_file=str(train), dev_file=str(dev), **options)


@pytest.fixture
def reviews(tmp_path):
    train = write(tmp_path / "a.csv", "review,stars\n\"Great, really.\",5\nmeh,3\n\"bad\nvery bad\",1\nok,10\n")
    dev = write(tmp_path / "b.csv", "review,stars\nfine,5\nawful,1\n")
    return train, dev


def test_files_csv_roundtrip(reviews):
    train_file, dev_file = reviews
    task = file_task("csv", train_file, dev_file)
    train, dev = task.load("train"), task.load("dev")
    assert task.kind == "seq-cls" and task.metric_name == "accuracy" and task.local_only
    assert train[0] == {"text": "Great, really.", "text_pair": None, "label": "5"}
    assert train[2]["text"] == "bad\nvery bad"
    assert task.labels_from(train) == ["1", "3", "5", "10"]  # numeric order
    assert task.label_names == ["1", "3", "5", "10"] and task.info()["options"]["label_names"] == task.label_names
    assert len(dev) == 2
    scores = task.compute_metrics([0, 2, 1], [0, 2, 2])
    assert scores["accuracy"] == pytest.approx(2 / 3) and "f1" in scores


def test_files_dev_before_train_derives_labels(tmp_path, reviews):
    train_file, _ = reviews
    dev = write(tmp_path / "dev.csv", "review,stars\nfine,5\n\"two\nlines\",4\n")
    task = file_task("csv", train_file, dev)
    with raises_at("dev.csv", 3, "'4'", "'stars'", "1, 3, 5, 10"):
        task.load("dev")


def test_files_unknown_label_in_dev_with_label_names(tmp_path):
    train = write(tmp_path / "t.jsonl", '{"review": "a", "stars": "pos"}\n{"review": "b", "stars": "neg"}\n')
    dev = write(tmp_path / "d.jsonl", '{"review": "c", "stars": "pos"}\n\n{"review": "d", "stars": "mixed"}\n')
    task = file_task("jsonl", train, dev, label_names="neg,pos")
    assert task.load("train")["label"] == ["pos", "neg"]
    assert task.labels_from(None) == ["neg", "pos"]
    with raises_at("d.jsonl", 3, "'mixed'", "--label-names", "neg, pos"):
        task.load("dev")


def test_files_missing_column(tmp_path, reviews):
    _, dev = reviews
    train = write(tmp_path / "bad.csv", "text,stars\nhello,1\n")
    with raises_at("bad.csv", 1, "'review'", "--text-column", "Columns present: 'text', 'stars'"):
        file_task("csv", train, dev).load("train")
    jsonl = write(tmp_path / "bad.jsonl", '{"review": "x", "score": 1}\n')
    with raises_at("bad.jsonl", 1, "first record", "'stars'", "'score'"):
        file_task("jsonl", jsonl, dev).load("train")


def test_files_other_delimiter_read_when_the_header_then_has_the_columns(tmp_path, reviews):
    # sniffed (issue 13): the header read with the delimiter the file uses has the requested columns;
    # refusals naming both delimiters are in test_data_adversarial.py
    _, dev = reviews
    train = write(tmp_path / "really_commas.tsv", "review,stars\n\"good, fine\",1\n")
    assert file_task("tsv", train, dev).load("train")["text"] == ["good, fine"]
    train = write(tmp_path / "really_tabs.csv", "review\tstars\ngood, fine\t1\n")
    assert file_task("csv", train, dev).load("train")["label"] == ["1"]


def test_files_empty_and_header_only(tmp_path, reviews):
    _, dev = reviews
    empty = write(tmp_path / "empty.csv", "")
    with raises_at("empty.csv", 1, "empty"):
        file_task("csv", empty, dev).load("train")
    header_only = write(tmp_path / "header.csv", "review,stars\n")
    with raises_at("header.csv", 2, "no data rows"):
        file_task("csv", header_only, dev).load("train")
    empty_jsonl = write(tmp_path / "empty.jsonl", "\n\n")
    with raises_at("empty.jsonl", 1, "empty"):
        file_task("jsonl", empty_jsonl, dev).load("train")


def test_files_missing_options_name_the_flags(reviews):
    train, dev = reviews
    with pytest.raises(PeftlabError, match="--train-file") as info:
        get_task("csv", dev_file=str(dev), text_column="review", label_column="stars").load("train")
    assert "--dev-file" not in str(info.value).split("Example")[0]
    with pytest.raises(PeftlabError, match="--text-column and --label-column"):
        get_task("csv", train_file=str(train), dev_file=str(dev)).load("train")
    with pytest.raises(PeftlabError, match="--dev-file"):
        get_task("csv", train_file=str(train), text_column="review", label_column="stars").load("dev")


def test_files_missing_file(tmp_path, reviews):
    _, dev = reviews
    with pytest.raises(PeftlabError, match=r"--train-file .*nope\.csv.* does not exist"):
        file_task("csv", tmp_path / "nope.csv", dev).load("train")


def test_files_bom_stray_header_crlf_and_unicode_separators(tmp_path, reviews):
    _, dev = reviews
    train = tmp_path / "messy.csv"
    train.write_bytes("\ufeffreview,stars\r\nfirst\x85half,1\r\nreview,stars\r\n\"a\u2028b\",3\r\n\r\n".encode())
    data = file_task("csv", train, dev).load("train")
    assert data["text"] == ["first\x85half", "a\u2028b"] and data["label"] == ["1", "3"]


def test_files_ragged_row_line_counts_multiline_records(tmp_path, reviews):
    _, dev = reviews
    train = write(tmp_path / "ragged.csv", "review,stars\n\"one\ntwo\nthree\",1\nextra,2,oops\n")
    with raises_at("ragged.csv", 5, "expected 2 fields"):
        file_task("csv", train, dev).load("train")


def test_files_not_utf8(tmp_path, reviews):
    _, dev = reviews
    train = tmp_path / "latin1.csv"
    train.write_bytes("review,stars\nok,1\ncaf\xe9,2\n".encode("latin-1"))
    with raises_at("latin1.csv", 3, "UTF-8"):
        file_task("csv", train, dev).load("train")


def test_files_invalid_json(tmp_path, reviews):
    _, dev = reviews
    train = write(tmp_path / "broken.jsonl", '{"review": "a", "stars": 1}\n{"review": "b", "stars": 2\n')
    with raises_at("broken.jsonl", 2, "invalid JSON"):
        file_task("jsonl", train, dev).load("train")
    listed = write(tmp_path / "list.json", '[\n  {"review": "a", "stars": 1},\n  {"review": "b"}\n]\n')
    with raises_at("list.json", 3, "'stars'"):
        file_task("jsonl", listed, dev).load("train")


def test_files_jsonl_pair_and_scalar_labels(tmp_path):
    train = write(tmp_path / "t.jsonl", '{"q": "a?", "p": "b", "y": 1}\n{"q": "c?", "p": "d", "y": 0}\n'
                                        '{"q": "e?", "p": "f", "y": 2}\n')
    dev = write(tmp_path / "d.jsonl", '{"q": "g?", "p": "h", "y": 2}\n')
    task = get_task("jsonl", train_file=str(train), dev_file=str(dev), text_column="q", text_pair_column="p",
                    label_column="y")
    data = task.load("train")
    assert data[0] == {"text": "a?", "text_pair": "b", "label": "1"}
    assert task.labels_from(data) == ["0", "1", "2"]
    assert task.load("dev")["label"] == ["2"]
    # three labels: macro F1 even when the dev set only holds two of them
    scores = task.compute_metrics([0, 1, 1], [0, 1, 0])
    assert scores["f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_files_regression(tmp_path):
    train = write(tmp_path / "t.tsv", "s\tscore\na\t0.5\nb\t4\nc\t2.25\n")
    dev = write(tmp_path / "d.tsv", "s\tscore\nd\t1\ne\tseveral\n")
    task = get_task("tsv", train_file=str(train), dev_file=str(dev), text_column="s", label_column="score",
                    regression=True)
    assert task.is_regression and task.metric_name == "pearson"
    assert task.load("train")["label"] == [0.5, 4.0, 2.25]
    assert task.labels_from(None) is None
    with raises_at("d.tsv", 3, "'several'", "not a number"):
        task.load("dev")
    assert task.compute_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 3.5])["pearson"] == pytest.approx(0.9934, abs=1e-3)


def test_files_format_follows_extension(tmp_path):
    # --task csv with TSV files: each file is read by its extension; .txt falls back to the task's format
    train = write(tmp_path / "t.tsv", "review\tstars\nx, y\t1\n")
    dev = write(tmp_path / "d.txt", "review,stars\nz,1\n")
    task = file_task("csv", train, dev)
    assert task.load("train")["text"] == ["x, y"]
    assert task.load("dev")["text"] == ["z"]
    with pytest.raises(PeftlabError, match="--label-names and --regression"):
        file_task("csv", train, dev, regression=True, label_names=["a", "b"])


def test_alpaca_bad_record_and_imdb_bad_label(tmp_path):
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "alpaca_en_demo.json").write_text(
        '[\n  {"instruction": "Say hi.", "input": "", "output": "Hi."},\n'
        '  {"instruction": "Add.", "input": "1, 2"}\n]\n'
    )
    with raises_at("alpaca_en_demo.json", 3, "'output' is missing"):
        get_task("alpaca").load("train", tmp_path)
    (tmp_path / "imdb").mkdir()
    (tmp_path / "imdb" / "imdb.csv").write_text('text,label\n"Good.<br /><br />Really",1\nmeh,pos\n')
    with raises_at("imdb.csv", 3, "'pos'"):
        get_task("imdb").load("train", tmp_path)


def test_files_ignore_a_stale_data_dir(monkeypatch, reviews):
    train, dev = reviews
    monkeypatch.setenv("PEFTLAB_DATA_DIR", "/nonexistent/peftlab-data")
    assert len(file_task("csv", train, dev).load("train", "/also/nonexistent")) == 4


def test_duplicate_header_names_rejected(tmp_path):
    path = write(tmp_path / "dup.csv", "review,stars,review\na,1,b\n")
    with raises_at("dup.csv", 1, "'review'", "more than once"):
        read_rows(path)
