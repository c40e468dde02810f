"""Your own data for every kind: the forms chosen from the columns, the dev split, headerless files, Hub datasets,
and every malformed record refused in one sentence naming the file, the line (or record) and the field."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.tasks import get_task

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, records) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def refused(*fragments: str, line: int | None = None):
    """A PeftlabError of one line holding every fragment (and ``line N``)."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(PeftlabError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            assert "\n" not in message and "Traceback" not in message, message
            for fragment in fragments:
                assert fragment in message, message
            if line is not None:
                assert re.search(rf"\bline {line}\b", message), message
            return handled
    return _Check()


# ---- the form follows from the columns ----------------------------------------------------------------------------

@pytest.mark.parametrize("task, file, options, kind, form, first", [
    ("jsonl", "chats.jsonl", {}, TaskKind.CAUSAL_LM, "chat", "messages"),
    ("json", "sharegpt.json", {}, TaskKind.CAUSAL_LM, "chat", "messages"),
    ("csv", "instructions.csv", {"prompt_column": "prompt", "response_column": "response"}, TaskKind.CAUSAL_LM,
     "instruction", "prompt"),
    ("jsonl", "notes.jsonl", {"text_column": "text"}, TaskKind.CAUSAL_LM, "text", "response"),
    ("jsonl", "translate.jsonl", {"source_column": "english", "target_column": "german"}, TaskKind.SEQ2SEQ,
     "source-target", "source"),
    ("jsonl", "entities.jsonl", {"tokens_column": "tokens", "tags_column": "tags"}, TaskKind.TOKEN_CLS, "tagging",
     "tokens"),
    ("tsv", "reviews.tsv", {"no_header": True, "text_column": "1", "label_column": "0"}, TaskKind.SEQ_CLS,
     "classification", "text"),
])
def test_every_sample_file_loads_as_its_form(task, file, options, kind, form, first):
    loaded = get_task(task, train_file=str(EXAMPLES / file), **options)
    assert loaded.kind is kind and loaded.info()["form"] == form and form in loaded.description
    train, dev = loaded.load("train"), loaded.load("dev")
    assert first in train.column_names
    assert len(train) + len(dev) == 12 and len(dev) == 1  # a seeded 10% of 12 is dev
    assert loaded.recorded_options()["dev_fraction"] == 0.1


def test_sharegpt_speakers_become_roles():
    task = get_task("json", train_file=str(EXAMPLES / "sharegpt.json"))
    messages = task.load("train")[0]["messages"]
    assert {m["role"] for m in messages} <= {"system", "user", "assistant"} and messages[-1]["role"] == "assistant"
    assert task.recorded_options()["messages_column"] == "conversations"


def test_token_classification_labels_and_scores():
    task = get_task("jsonl", train_file=str(EXAMPLES / "entities.jsonl"), tokens_column="tokens", tags_column="tags")
    train = task.load("train")
    labels = task.labels_from(train)
    assert labels[0] == "O" and {"B-PER", "I-PER", "B-LOC", "B-ORG"} <= set(labels)
    assert task.compute_metrics([["B-PER", "I-PER", "O"]], [["B-PER", "I-PER", "O"]])["f1"] == 1.0


def test_generation_scores_for_own_generative_data():
    task = get_task("csv", train_file=str(EXAMPLES / "instructions.csv"), prompt_column="prompt",
                    response_column="response")
    assert task.metric_name == "perplexity" and not task.higher_is_better
    scores = task.generation_metrics(["Rome.", "blue sky"], ["Rome.", "Red, yellow and blue."])
    assert scores["exact_match"] == 0.5 and 0 < scores["chrf"] < 1 and 0 < scores["rougeL"] < 1
    text = get_task("jsonl", train_file=str(EXAMPLES / "notes.jsonl"), text_column="text")
    with refused("no reference answers"):
        text.generation_metrics(["a"], ["b"])


def test_dev_fraction_is_seeded_and_a_dev_file_wins(tmp_path):
    options = dict(train_file=str(EXAMPLES / "chats.jsonl"), dev_fraction=0.25)
    first = get_task("jsonl", **options).load("dev")["messages"]
    assert get_task("jsonl", **options).load("dev")["messages"] == first and len(first) == 3
    dev = jsonl(tmp_path / "dev.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                        {"role": "assistant", "content": "b"}]}])
    task = get_task("jsonl", train_file=str(EXAMPLES / "chats.jsonl"), dev_file=str(dev))
    assert len(task.load("train")) == 12 and len(task.load("dev")) == 1 and "dev_fraction" not in task.recorded_options()
    with refused("--dev-fraction must be a number between 0 and 1"):
        get_task("jsonl", train_file=str(dev), dev_fraction="1.5")


def test_kind_and_columns_must_agree(tmp_path):
    with refused("--kind seq2seq does not fit"):
        get_task("csv", train_file=str(EXAMPLES / "instructions.csv"), prompt_column="prompt",
                 response_column="response", kind="seq2seq")
    with refused("describe different forms"):
        get_task("csv", train_file=str(EXAMPLES / "instructions.csv"), prompt_column="prompt", label_column="x")
    with refused("instruction needs --response-column"):
        get_task("csv", train_file=str(EXAMPLES / "instructions.csv"), prompt_column="prompt")
    with refused("--text-column and --label-column", "--prompt-column and --response-column"):
        get_task("csv", train_file=str(EXAMPLES / "instructions.csv"))
    with refused("classification needs --label-column"):
        get_task("jsonl", train_file=str(EXAMPLES / "notes.jsonl"), text_column="text", kind="seq-cls")


def test_routing_of_the_options_and_the_flags():
    from peftlab.cli import build_parser
    from peftlab.training import config_from_options

    config = config_from_options({"dataset": "org/name", "prompt_column": "q", "response_column": "a",
                                  "dev_fraction": "0.2", "packing": True})
    assert config.task == "hub" and config.packing and config.task_options["dev_fraction"] == "0.2"
    args = build_parser()[0].parse_args(["train", "--task", "tsv", "--no-header", "--text-column", "1",
                                         "--label-column", "0", "--packing", "--chat-template", "t.jinja"])
    assert args.no_header is True and args.text_column == "1" and args.packing and args.chat_template == "t.jinja"


# ---- bad input: file, line (or record) and field ------------------------------------------------------------------

def chat(*turns):
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


GOOD = chat(("user", "hi"), ("assistant", "hello"))


@pytest.mark.parametrize("bad, fragments", [
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, ("message 1 has no 'role'",)),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, ("message 1 has no 'content'",)),
    ({"messages": [{"role": "robot", "content": "hi"}]}, ("unknown role 'robot'", "system, user, assistant")),
    ({"messages": [{"from": "alien", "value": "hi"}]}, ("unknown from 'alien'",)),
    ({"messages": [{"role": "user", "content": None}]}, ("field 'content' is null",)),
    ({"messages": "hello"}, ("field 'messages' is a JSON str, not a list of messages",)),
])
def test_malformed_messages_name_file_line_and_field(tmp_path, bad, fragments):
    path = jsonl(tmp_path / "chats.jsonl", [GOOD, GOOD, bad])
    with refused(str(path), "field 'messages'", *fragments, line=3):
        get_task("jsonl", train_file=str(path)).load("train")


def test_conversations_without_an_answer_are_skipped_and_counted(tmp_path, capfd):
    path = jsonl(tmp_path / "chats.jsonl", [GOOD, chat(("user", "anyone?")), GOOD, GOOD, chat(("system", "s"))])
    task = get_task("jsonl", train_file=str(path), dev_fraction=0.3)
    assert len(task.load("train")) + len(task.load("dev")) == 3
    assert f"skipped 2 of 5 conversations in {path} with no assistant turn (first: {path}, line 2)" in capfd.readouterr().err
    nothing = jsonl(tmp_path / "none.jsonl", [chat(("user", "a")), chat(("user", "b"))])
    with refused(str(nothing), "none of the 2 conversations has an assistant turn", line=1):
        get_task("jsonl", train_file=str(nothing)).load("train")


def test_tokens_and_tags_of_different_lengths(tmp_path):
    path = jsonl(tmp_path / "ner.jsonl", [{"words": ["a", "b"], "labels": ["O", "O"]},
                                          {"words": ["Ada", "wrote"], "labels": ["B-PER"]}])
    with refused(str(path), "fields 'words' and 'labels' have different lengths (2 tokens, 1 tags)", line=2):
        get_task("jsonl", train_file=str(path), tokens_column="words", tags_column="labels").load("train")


def test_missing_column_lists_the_columns_there(tmp_path):
    path = write(tmp_path / "pairs.csv", "question,answer\nq,a\nr,b\n")
    with refused(str(path), "line 1 (the header)", "no column 'prompt' (from --prompt-column)",
                 "Columns present: 'question', 'answer'"):
        get_task("csv", train_file=str(path), prompt_column="prompt", response_column="answer").load("train")
    records = jsonl(tmp_path / "chats.jsonl", [{"conversation": []}])
    with refused(str(records), "no column 'dialog' (from --messages-column)", "'conversation'", line=1):
        get_task("jsonl", train_file=str(records), messages_column="dialog").load("train")


def test_an_empty_response_names_its_field(tmp_path):
    path = write(tmp_path / "pairs.csv", "prompt,response\nq,a\nr,\n")
    with refused(str(path), "field 'response' is empty", line=3):
        get_task("csv", train_file=str(path), prompt_column="prompt", response_column="response").load("train")


def test_prompts_longer_than_max_length_are_counted_and_reported(tmp_path, capfd):
    from peftlab.labs.standins import smollm2_tokenizer
    from peftlab.preprocess import tokenize

    tokenizer = smollm2_tokenizer()
    path = jsonl(tmp_path / "pairs.jsonl", [{"p": "short", "r": "yes"}, {"p": "word " * 80, "r": "no"},
                                            {"p": "tiny", "r": "ok"}])
    task = get_task("jsonl", train_file=str(path), dev_file=str(path), prompt_column="p", response_column="r")
    kept = tokenize(task.load("train"), task.kind, tokenizer, max_length=32, label_names=None)
    assert len(kept) == 2 and all(len(ids) <= 32 for ids in kept["input_ids"])
    assert ("left out 1 of 3 examples whose prompt fills --max-length 32 before the answer starts (first: "
            f"{path}, line 2)") in capfd.readouterr().err
    long_only = jsonl(tmp_path / "long.jsonl", [{"p": "word " * 80, "r": "no"}] * 3)
    task = get_task("jsonl", train_file=str(long_only), dev_file=str(long_only), prompt_column="p", response_column="r")
    with refused("Every one of the 3 examples has its prompt fill --max-length 32", f"{long_only}, line 1"):
        tokenize(task.load("train"), task.kind, tokenizer, max_length=32, label_names=None)


def test_a_template_that_fails_to_render_names_the_record(tmp_path):
    from peftlab.labs.standins import smollm2_tokenizer
    from peftlab.preprocess import tokenize

    tokenizer = smollm2_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('no system turns') }}{% endif %}{{ m['content'] }}{% endfor %}")
    path = jsonl(tmp_path / "chats.jsonl", [GOOD, GOOD, chat(("system", "s"), ("user", "u"), ("assistant", "a"))])
    task = get_task("jsonl", train_file=str(path), dev_file=str(path))
    with refused(f"{path}, line 3", "the chat template fails to render", "no system turns"):
        tokenize(task.load("train"), task.kind, tokenizer, max_length=64, label_names=None)


# ---- Hub datasets ------------------------------------------------------------------------------------------------

def test_an_unreachable_hub_dataset_is_one_sentence_within_seconds(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with refused("Cannot load dataset 'nobody/no-such-dataset' from the Hugging Face Hub", "pass local files"):
        get_task("hub", dataset="nobody/no-such-dataset", prompt_column="q", response_column="a").load("train")
    assert time.perf_counter() - started < 5


def test_a_dataset_folder_reads_like_the_hub(tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    jsonl(folder / "train.jsonl", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(6)])
    jsonl(folder / "test.jsonl", [{"q": "last", "a": "one"}])
    task = get_task("hub", dataset=str(folder), prompt_column="q", response_column="a")
    assert task.kind is TaskKind.CAUSAL_LM and len(task.load("train")) == 6 and task.load("dev")["response"] == ["one"]
    assert task.load("train")["where"][0] == f"{folder} (train split), record 1"
    with refused("has no split 'valid' (--dev-split)", "train, test"):
        get_task("hub", dataset=str(folder), prompt_column="q", response_column="a", dev_split="valid").load("dev")
    missing = get_task("hub", dataset=str(folder), prompt_column="prompt", response_column="a")
    with refused(f"{folder} (train split), record 1 (first record)", "no column 'prompt'", "'q', 'a'"):
        missing.load("train")
    assert get_task("hub").kind  # builds without options (the registry's check), fails only when loading
    with refused("needs --dataset ORG/NAME"):
        get_task("hub").load("train")


# ---- training and scoring the non-LM kinds -----------------------------------------------------------------------

def test_seq2seq_on_a_source_target_file_trains_and_evaluates(tmp_path):
    import peftlab
    from peftlab import labs
    from peftlab.inference import evaluate

    model = labs.build_tiny_t5(tmp_path / "t5")
    run = tmp_path / "run"
    metrics = peftlab.train(method="lora", task="jsonl", model=str(model), output=str(run),
                            train_file=str(EXAMPLES / "translate.jsonl"), source_column="english",
                            target_column="german", dev_fraction=0.25, epochs=1, batch_size=4, max_length=32,
                            progress=False)
    assert metrics["kind"] == "seq2seq" and metrics["metric_name"] == "perplexity" and metrics["metric"] > 1
    result = evaluate(str(run), generate=2, max_new_tokens=4)
    assert result["metric"] == pytest.approx(metrics["metric"], rel=1e-3)
    assert set(result["generation"]["metrics"]) == {"rougeL", "exact_match", "chrf"}
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["generation"]["samples"] == result["generation"]["samples"]


def test_token_classification_on_a_tokens_tags_file_trains_and_evaluates(tmp_path):
    import peftlab
    from peftlab.inference import evaluate, load_trained, predict

    run = tmp_path / "run"
    metrics = peftlab.train(method="lora", task="jsonl", model="minilm", output=str(run),
                            train_file=str(EXAMPLES / "entities.jsonl"), tokens_column="tokens", tags_column="tags",
                            dev_fraction=0.25, epochs=1, batch_size=4, max_length=32, progress=False)
    assert metrics["kind"] == "token-cls" and metrics["metric_name"] == "f1" and 0 <= metrics["metric"] <= 1
    manifest = json.loads((run / "peftlab.json").read_text())
    assert manifest["label_names"][0] == "O" and manifest["task_options"]["dev_fraction"] == 0.25
    assert evaluate(str(run))["metric"] == pytest.approx(metrics["metric"])
    tagged = predict(load_trained(run), [{"tokens": ["Ada", "visited", "Paris", "."]}])[0]
    assert len(tagged["tags"]) == 4 and set(tagged["tags"]) <= set(manifest["label_names"])
