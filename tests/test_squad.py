"""The squad task (extractive QA, kind ``qa``): readers, the official scorer, run_qa-style windows, every
method on a tiny BERT span model, and a real LoRA run on the bundled MiniLM.

SQuAD itself is Hub-only here, so every file is made by the test: the SQuAD v1.1 JSON and the Hub's
flattened JSON Lines, and for the real run a small generated reading task ("Who painted the kite?",
"What colour is the kite?" over a few sentences) whose answers are spans of the context.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tiny.py

import tiny  # noqa: E402
from peftlab.errors import PeftlabError  # noqa: E402
from peftlab.tasks import get_task, task_names  # noqa: E402
from peftlab.tasks.squad import exact_match_score, f1_score, normalize_answer, squad_scores  # noqa: E402

PEFTLAB = [sys.executable, "-m", "peftlab.cli"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def as_squad_json(records, title="test") -> dict:
    """Flattened records -> the original SQuAD v1.1 layout (one paragraph per record)."""
    return {"version": "1.1", "data": [{"title": title, "paragraphs": [
        {"context": r["context"], "qas": [{"id": r["id"], "question": r["question"], "answers": [
            {"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}]}
        for r in records]}]}


# ---- reading the files ------------------------------------------------------------------------------

CONTEXT = "Super Bowl 50 was played at Levi's Stadium in Santa Clara, California, on February 7, 2016."
SQUAD_JSON = {"version": "1.1", "data": [
    {"title": "Super_Bowl_50", "paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "q1", "question": "Where was Super Bowl 50 played?",
         "answers": [{"text": "Levi's Stadium", "answer_start": 28},
                     {"text": "Santa Clara, California", "answer_start": 46}]},
        {"id": "q2", "question": "When was Super Bowl 50 played?",
         "answers": [{"text": "February 7, 2016", "answer_start": 74}]}]}]},
    {"title": "Other", "paragraphs": [{"context": "The sky is blue.", "qas": [
        {"id": "q3", "question": "What colour is the sky?", "answers": [{"text": "blue", "answer_start": 11}]}]}]},
]}


def test_registered_as_qa_task():
    assert "squad" in task_names()
    task = get_task("squad")
    assert task.kind == "qa" and task.metric_name == "f1" and task.higher_is_better


def test_squad_v11_json_and_flattened_jsonl_read_the_same(tmp_path):
    folder = tmp_path / "squad"
    folder.mkdir()
    (folder / "dev.json").write_text(json.dumps(SQUAD_JSON))
    task = get_task("squad")
    dev = task.load("dev", tmp_path)
    assert dev.column_names == ["id", "question", "context", "answers"]
    assert len(dev) == 3
    assert dev[0] == {"id": "q1", "question": "Where was Super Bowl 50 played?", "context": CONTEXT,
                      "answers": {"text": ["Levi's Stadium", "Santa Clara, California"], "answer_start": [28, 46]}}
    assert dev[2]["context"] == "The sky is blue."

    flat = [{**row, "title": "t"} for row in dev]
    write_jsonl(folder / "train.jsonl", flat)
    train = task.load("train", tmp_path)
    assert [dict(r) for r in train] == [dict(r) for r in dev]
    (folder / "train.jsonl").unlink()  # a .json holding a JSON list of flattened records works too
    (folder / "train.json").write_text(json.dumps(flat))
    assert task.load("train", tmp_path)["id"] == ["q1", "q2", "q3"]


@pytest.mark.parametrize("name, content, needles", [
    ("dev.json", {**SQUAD_JSON, "data": [{"title": "x", "paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "bad", "question": "Where?", "answers": [{"text": "Levi's Stadium", "answer_start": 30}]}]}]}]},
     ["dev.json", "data[0].paragraphs[0].qas[0]", "'bad'", "answer_start 30", "Fix answer_start"]),
    ("dev.json", {"questions": []}, ["dev.json", "SQuAD v1.1 layout", "'questions'"]),
    ("dev.json",
     {"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "e", "question": "Q?", "answers": []}]}]}]},
     ["data[0].paragraphs[0].qas[0]", "no answer"]),
    ("dev.jsonl", [{"id": "1", "context": "The sky is blue.", "question": "Sky?",
                    "answers": {"text": ["blue"], "answer_start": [11]}},
                   {"id": "2", "context": "The sky is blue.", "answers": {"text": ["blue"], "answer_start": [11]}}],
     ["dev.jsonl, line 2", "field 'question'", "is missing"]),
    ("dev.jsonl", [{"id": "1", "context": "The sky is blue.", "question": "Sky?",
                    "answers": [{"text": "blue", "answer_start": 11}]}],
     ["dev.jsonl, line 1", "'answers'", "the Hub's format"]),
    ("dev.jsonl", [{"id": "1", "context": "The sky is blue.", "question": "Sky?",
                    "answers": {"text": ["blue"], "answer_start": [11]}},
                   {"id": "1", "context": "Grass is green.", "question": "Grass?",
                    "answers": {"text": ["green"], "answer_start": [9]}}],
     ["line 2", "id '1' is used again", "line 1"]),
])
def test_bad_files_name_file_and_record(tmp_path, name, content, needles):
    path = tmp_path / "squad" / name
    if name.endswith(".jsonl"):
        write_jsonl(path, content)
    else:
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(content))
    with pytest.raises(PeftlabError) as error:
        get_task("squad").load("dev", tmp_path)
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_invalid_json_and_missing_file(tmp_path):
    task = get_task("squad")
    with pytest.raises(PeftlabError, match=r"squad/train.json'.*train.jsonl.*rajpurkar/squad"):
        task.load("train", tmp_path)
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "dev.json").write_text('{"data": [\n  {"paragraphs": [}\n]}')
    with pytest.raises(PeftlabError, match=r"dev.json, line 2: invalid JSON"):
        task.load("dev", tmp_path)


def test_bad_file_reaches_the_cli_as_one_line(tmp_path, capsys):
    from peftlab.cli import main

    folder = tmp_path / "squad"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps({"data": [{"paragraphs": [{"context": "Sky is blue.", "qas": [
        {"id": "x", "question": "Sky?", "answers": [{"text": "blue", "answer_start": 99}]}]}]}]}))
    code = main(["train", "--task", "squad", "--data-dir", str(tmp_path), "--output", str(tmp_path / "o")])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("peftlab: error:") and "\n" not in error
    assert "train.json" in error and "qas[0]" in error and "answer_start 99" in error


# ---- the official SQuAD v1.1 scorer, against hand-computed values -------------------------------

def test_normalisation_and_scores_by_hand():
    assert normalize_answer("The  Quick, brown Fox!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match_score("the Eiffel Tower", "Eiffel Tower.") == 1.0
    assert exact_match_score("Eiffel", "Eiffel Tower") == 0.0
    assert f1_score("red car", "the red bus") == pytest.approx(0.5)  # P = R = 1/2
    assert f1_score("red car", "red") == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert f1_score("x y y", "y y z") == pytest.approx(2 / 3)  # counts clip: 2 common tokens of 3
    assert f1_score("blue", "green") == 0.0
    assert f1_score("the", "a") == 0.0  # both normalise to nothing
    # max over gold answers, then the mean over questions (fractions; the official script prints x100)
    scores = squad_scores(["Eiffel Tower", "red car", "blue"],
                          [["the Eiffel Tower."], ["the red bus", "red"], ["green", "navy"]])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert get_task("squad").compute_metrics(["Denver Broncos"], [["Broncos", "Denver Broncos"]]) == {
        "exact_match": 1.0, "f1": 1.0}


# ---- preprocessing: windows over a long context, and back to text --------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from peftlab.models import load_tokenizer

    return load_tokenizer("minilm")


def test_long_context_windows_map_back_to_the_answer(tokenizer):
    import datasets
    import numpy as np

    from peftlab.evaluation import postprocess_qa
    from peftlab.preprocess import collator, qa_window, tokenize

    filler = " ".join(f"Sentence number {i} says nothing at all." for i in range(40))
    context = f"{filler} The lighthouse on the northern cliff is painted bright crimson. {filler}"
    answer = "bright crimson"
    start = context.index(answer)
    raw = datasets.Dataset.from_list([
        {"id": "long", "question": "  What colour is the lighthouse?", "context": context,
         "answers": {"text": [answer], "answer_start": [start]}},
        {"id": "short", "question": "Who?", "context": "Ada wrote it.",
         "answers": {"text": ["Ada"], "answer_start": [0]}}])
    max_length = 64
    assert qa_window(tokenizer, 384) == (128, 128)  # run_qa.py's doc_stride at its max_seq_length
    features = tokenize(raw, "qa", tokenizer, max_length=max_length, label_names=None)
    rows = [features[i] for i in range(len(features))]
    long_rows = [r for r in rows if r["example_index"] == 0]
    assert len(long_rows) > 5 and all(r["length"] <= max_length for r in rows)
    holding = [r for r in long_rows if r["start_positions"] != 0]
    assert holding, "no window holds the answer"
    for r in holding:  # token positions -> characters -> the answer text
        offsets = r["offset_mapping"]
        assert context[offsets[r["start_positions"]][0]:offsets[r["end_positions"]][1]] == answer
        assert r["input_ids"][0] == tokenizer.cls_token_id
    for r in long_rows:
        if r not in holding:
            assert r["start_positions"] == r["end_positions"] == 0  # CLS: the answer is not in this window
        assert all(o is None for o in r["offset_mapping"][:r["token_type_ids"].index(1)])  # question tokens
    # consecutive windows overlap by the stride
    _, stride = qa_window(tokenizer, max_length)
    first, second = long_rows[0]["offset_mapping"], long_rows[1]["offset_mapping"]
    assert [o for o in first if o][-stride:] == [o for o in second if o][:stride]
    short = [r for r in rows if r["example_index"] == 1]
    assert len(short) == 1 and tokenizer.decode(short[0]["input_ids"][short[0]["start_positions"]]) == "ada"

    # the collator drops the bookkeeping columns; postprocessing finds the span across windows
    batch = collator("qa", tokenizer)(rows[:3])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"}
    starts = [np.full(r["length"], -5.0) for r in rows]
    ends = [np.full(r["length"], -5.0) for r in rows]
    index = rows.index(holding[-1])
    starts[index][holding[-1]["start_positions"]] = 3.0
    ends[index][holding[-1]["end_positions"]] = 3.0
    for r, s, e in zip(rows, starts, ends):
        s[0] = e[0] = 9.0  # CLS scores highest everywhere but never counts (SQuAD v1.1: always an answer)
    answers = postprocess_qa(raw["context"], features["example_index"], features["offset_mapping"], starts, ends)
    assert answers[0]["answer"] == answer and (answers[0]["start"], answers[0]["end"]) == (start, start + len(answer))
    assert 0 < answers[0]["score"] <= 1


# ---- every method on a tiny BERT span model ---------------------------------------------------------

MERGE_ATOL = 1e-5
RELOAD_ATOL = 1e-6


def tiny_qa(method, workdir: Path):
    torch.manual_seed(0)
    import transformers

    model = transformers.BertForQuestionAnswering(tiny.bert_config()).eval()
    kwargs = method.model_load_kwargs()
    if kwargs:  # qlora: quantise at load time, as training does with a real checkpoint
        folder = workdir / "base"
        if not (folder / "config.json").is_file():
            model.save_pretrained(str(folder))
        model = transformers.BertForQuestionAnswering.from_pretrained(str(folder), **kwargs).eval()
    return model


def qa_batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, tiny.VOCAB, (3, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 3:] = 1  # question, then context: a merged model sees segments, so must the peft model
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
            "start_positions": torch.tensor([1, 2, 3]), "end_positions": torch.tensor([2, 4, 3])}


def span_logits(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return torch.stack([out.start_logits, out.end_logits], -1).float()


@pytest.mark.parametrize("name", ["lora", "qlora", "adapter", "bitfit", "ia3", "full", "prefix-tuning",
                                  "p-tuning-v2"])
def test_method_trains_reloads_and_merges_on_qa(name, tmp_path):
    from peftlab.methods import get_method
    from peftlab.methods.base import count_parameters

    method = get_method(name)
    model = method.apply(tiny_qa(method, tmp_path), "qa")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("qa_outputs" in n for n in trainable), "the new span head must train"
    batch = qa_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    assert not [n for n in trainable if torch.equal(before[n], after[n].detach())]
    assert not [n for n in before if n not in trainable and not torch.equal(before[n], after[n].detach())]
    expected = span_logits(model, batch)
    flat = {**batch, "token_type_ids": torch.zeros_like(batch["token_type_ids"])}
    assert (span_logits(model, flat) - expected).abs().max().item() > 1e-4, "segment ids were ignored"
    method.save(model, tmp_path / "adapter")
    reloaded = get_method(name).load(tiny_qa(method, tmp_path), tmp_path / "adapter", "qa")
    assert (span_logits(reloaded, batch) - expected).abs().max().item() <= RELOAD_ATOL
    assert count_parameters(model)[0] == method.trainable_parameters_formula(model, "qa")
    if method.mergeable:
        import transformers

        merged = method.merge(model)
        assert isinstance(merged, transformers.BertForQuestionAnswering)
        assert (span_logits(merged, batch) - expected).abs().max().item() <= MERGE_ATOL


@pytest.mark.parametrize("name", ["prompt-tuning", "p-tuning"])
def test_input_prompt_methods_refuse_qa_in_one_sentence(name, tmp_path):
    from peftlab.methods import get_method

    method = get_method(name)
    with pytest.raises(PeftlabError) as error:
        method.apply(tiny_qa(method, tmp_path), "qa")
    message = str(error.value)
    assert name in message and "BertForQuestionAnswering" in message and "start/end positions" in message
    assert "p-tuning-v2" in message and "\n" not in message and message.endswith(".")


# ---- a real run: LoRA on MiniLM, then eval, predict and merge from disk ---------------------------

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "grey", "brown", "pink", "silver"]
OBJECTS = ["car", "house", "bicycle", "door", "kite", "boat", "lamp", "chair", "umbrella", "scarf", "fence", "tent",
           "truck", "balloon", "jacket", "mug", "table", "bucket", "train", "roof"]
NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Gustav", "Hana", "Ivan", "Jonas", "Keiko", "Luis"]
FILLER = ["It rained all morning.", "The market opened early that day.", "Nobody remembered the exact date.",
          "A small dog barked twice.", "The road to the village was long and quiet.", "Lunch was served at noon.",
          "Several visitors arrived by bus.", "The old clock in the hall had stopped."]
MAX_LENGTH = 32  # short windows: most contexts span two or three, so training and scoring cross windows


def painted(count: int, seed: int) -> list[dict]:
    """Questions about one fact hidden among 1-3 filler sentences: who painted an object, or its colour."""
    rng = random.Random(seed)
    records = []
    for number in range(count):
        thing, colour, name = rng.choice(OBJECTS), rng.choice(COLOURS), rng.choice(NAMES)
        fact = f"{name} painted the {thing} {colour}."
        sentences = rng.sample(FILLER, rng.randint(1, 3))
        sentences.insert(rng.randint(0, len(sentences)), fact)
        context = " ".join(sentences)
        if rng.random() < 0.5:
            question, answer = f"What colour is the {thing}?", colour
            start = context.index(fact) + fact.index(f" {colour}.") + 1
        else:
            question, answer, start = f"Who painted the {thing}?", name, context.index(fact)
        records.append({"id": f"s{seed}-{number}", "title": "paint", "context": context, "question": question,
                        "answers": {"text": [answer], "answer_start": [start]}})
    return records


@pytest.fixture(scope="module")
def paint_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("squad-data")
    write_jsonl(root / "squad" / "train.jsonl", painted(200, seed=1))  # the Hub's flattened columns
    dev = painted(60, seed=2)
    (root / "squad" / "dev.json").write_text(json.dumps(as_squad_json(dev)))  # the original v1.1 layout
    return root, dev


def run_cli(args, env=None):
    result = subprocess.run(PEFTLAB + [str(a) for a in args], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **ONE_THREAD, **(env or {})})
    return result


@pytest.fixture(scope="module")
def lora_run(paint_data, tmp_path_factory):
    root, _ = paint_data
    output = tmp_path_factory.mktemp("squad-lora") / "run"
    result = run_cli(["train", "--method", "lora", "--task", "squad", "--model", "minilm", "--data-dir", root,
                      "--output", output, "--epochs", 3, "--batch-size", 16, "--max-length", MAX_LENGTH,
                      "--precision", "fp32", "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def untrained_f1(root: Path) -> float:
    """The same seed-42 start the run had (head initialised, no training), scored the same way."""
    import transformers

    from peftlab.evaluation import evaluate_model
    from peftlab.models import load_model, load_tokenizer
    from peftlab.preprocess import tokenize

    task = get_task("squad")
    dev = task.load("dev", root)
    tokenizer = load_tokenizer("minilm")
    transformers.set_seed(42)
    model = load_model("minilm", "qa")
    features = tokenize(dev, "qa", tokenizer, max_length=MAX_LENGTH, label_names=None)
    return evaluate_model(model, task, tokenizer, features, dev)["f1"]


@pytest.mark.real
def test_lora_learns_squad_format_and_eval_predict_agree(paint_data, lora_run, tmp_path):
    root, dev = paint_data
    metrics = json.loads((lora_run / "metrics.json").read_text())
    assert metrics["kind"] == "qa" and metrics["metric_name"] == "f1"
    assert metrics["eval_examples"] == 60 and metrics["train_examples"] > 200  # long contexts: several windows
    before = untrained_f1(root)
    after = metrics["metric"]
    print(f"\nsquad-format dev F1: untrained {before:.3f} -> LoRA {after:.3f} "
          f"(EM {metrics['metrics']['exact_match']:.3f})")
    assert after >= 0.6 and after - before >= 0.3, (before, metrics["metrics"])
    manifest = json.loads((lora_run / "peftlab.json").read_text())
    assert manifest["kind"] == "qa" and manifest["max_length"] == MAX_LENGTH
    adapter_config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "QUESTION_ANS"

    # peftlab eval in a fresh process: the same F1 as training reported
    result = run_cli(["eval", "--adapter", lora_run, "--data-dir", root, "--precision", "fp32"])
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(result.stdout)
    assert evaluated["metric_name"] == "f1" and evaluated["eval_examples"] == 60
    assert evaluated["metric"] == pytest.approx(after, abs=1e-9)

    # peftlab predict in a fresh process: JSON Lines with question/context, plus --question/--context
    inputs = tmp_path / "questions.jsonl"
    write_jsonl(inputs, [{"question": r["question"], "context": r["context"]} for r in dev])
    result = run_cli(["predict", "--adapter", lora_run, "--input", inputs])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert len(lines) == len(dev)
    for line, record in zip(lines, dev):
        assert line["question"] == record["question"]
        assert line["answer"] == record["context"][line["start"]:line["end"]] and line["answer"]
        assert 0 < line["score"] <= 1
    predicted = squad_scores([line["answer"] for line in lines], [r["answers"]["text"] for r in dev])
    assert predicted["f1"] == pytest.approx(after, abs=1e-9)  # predict finds the spans eval scored

    context = "Nobody remembered the exact date. Keiko painted the kite blue. Lunch was served at noon."
    result = run_cli(["predict", "--adapter", lora_run, "--context", context, "--question", "Who painted the kite?",
                      "--question", "What colour is the kite?"])
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line)["answer"] for line in result.stdout.strip().splitlines()]
    assert len(answers) == 2 and all(a and a in context for a in answers)
    print(f"predict: {answers}")


@pytest.mark.real
def test_qa_input_mistakes_and_merge(paint_data, lora_run, tmp_path, capsys):
    from peftlab.cli import main
    from peftlab.inference import load_trained, predict
    from peftlab.merge import merge

    root, _ = paint_data
    assert main(["predict", "--adapter", str(lora_run), "--question", "Who?"]) == 2
    assert "--question and --context go together" in capsys.readouterr().err
    loaded = load_trained(lora_run, device="cpu")
    with pytest.raises(PeftlabError, match=r"input 1: a question-answering adapter needs .*'question' and 'context'"):
        predict(loaded, ["a bare text"])
    # merge: LoRA folded into a plain BertForQuestionAnswering, verified on dev questions
    report = merge(lora_run, tmp_path / "merged", samples=4, data_dir=str(root), quiet=True)
    assert report["auto_class"] == "AutoModelForQuestionAnswering" and report["kind"] == "qa"
    assert report["max_abs_diff"] <= 1e-4 and "dev set" in report["sample_source"]
    import transformers

    merged = transformers.AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "merged"))
    assert type(merged).__name__ == "BertForQuestionAnswering"
