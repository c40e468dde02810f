"""The tasks the labs added: billsum (seq2seq, ROUGE-L), guanaco (chat SFT), imdb-gen (review generation).

BillSum and Guanaco are Hub-only: they are tested on tiny files in their exact formats made here.
"""

from __future__ import annotations

import json

import pytest

from peftlab.errors import PeftlabError
from peftlab.tasks import get_task, task_names


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_registered():
    for name in ("billsum", "guanaco", "imdb-gen"):
        assert name in task_names()
    assert get_task("billsum").kind == "seq2seq"
    assert get_task("guanaco").kind == "causal-lm"
    assert get_task("imdb-gen").kind == "causal-lm"


# ---- billsum ---------------------------------------------------------------------------------------

BILLS = [
    {"text": "SECTION 1. SHORT TITLE.\n\n    This Act may be cited as the   Clean Water Act.", "summary": "Clean Water Act.",
     "title": "A bill"},
    {"text": "SEC. 2. FUNDING.\n  Funds are appropriated for schools.", "summary": "Appropriates funds for schools."},
]


def test_billsum_jsonl(tmp_path):
    write_jsonl(tmp_path / "billsum" / "train.jsonl", BILLS)
    write_jsonl(tmp_path / "billsum" / "test.jsonl", BILLS[:1])
    task = get_task("billsum")
    train = task.load("train", tmp_path)
    assert train.column_names == ["source", "target"]
    assert train[0] == {"source": "SECTION 1. SHORT TITLE. This Act may be cited as the Clean Water Act.",
                        "target": "Clean Water Act."}
    assert len(task.load("dev", tmp_path)) == 1
    assert task.metric_name == "perplexity" and not task.higher_is_better
    assert task.compute_metrics(0.0, None) == {"loss": 0.0, "perplexity": 1.0}


def test_billsum_csv_and_dev_name(tmp_path):
    folder = tmp_path / "billsum"
    folder.mkdir()
    (folder / "train.csv").write_text('text,summary,title\n"A bill, with a comma.",Short.,t\n')
    (folder / "dev.csv").write_text('text,summary\n"Another bill.",Another.\n')
    task = get_task("billsum")
    assert task.load("train", tmp_path)[0] == {"source": "A bill, with a comma.", "target": "Short."}
    assert task.load("dev", tmp_path)[0]["target"] == "Another."


def test_billsum_errors(tmp_path):
    task = get_task("billsum")
    with pytest.raises(PeftlabError, match=r"billsum/train\.jsonl.*FiscalNote/billsum"):
        task.load("train", tmp_path)
    write_jsonl(tmp_path / "billsum" / "train.jsonl", [BILLS[0], {"text": "no summary here"}])
    with pytest.raises(PeftlabError, match=r"train\.jsonl, line 2: field 'summary' is missing"):
        task.load("train", tmp_path)


def test_rouge_l():
    from peftlab.tasks.billsum import rouge_l

    score = rouge_l("The cat sat on the mat.", "the cat was on the mat")
    # LCS = the cat on the mat (5 tokens); precision 5/6, recall 5/6
    assert score["precision"] == pytest.approx(5 / 6) and score["f1"] == pytest.approx(5 / 6)
    assert rouge_l("", "anything")["f1"] == 0.0
    assert rouge_l("Identical text!", "identical TEXT")["f1"] == 1.0
    assert rouge_l("the bills were amended", "the bill is amending")["recall"] == pytest.approx(3 / 4)  # stemmed
    task = get_task("billsum")
    scores = task.generation_metrics(["the cat sat", "nothing"], ["the cat sat", "else"])
    assert scores["rougeL"] == pytest.approx(0.5)
    assert task.compute_metrics(["a b"], ["a b"])["rougeL"] == 1.0


# ---- guanaco ---------------------------------------------------------------------------------------

CHATS = [
    {"text": "### Human: What is 2+2?### Assistant: 4."},
    {"text": "### Human: Hi!### Assistant: Hello! How can I help?### Human: Name a colour.### Assistant: Blue."},
]


def test_guanaco_split_at_last_assistant(tmp_path):
    write_jsonl(tmp_path / "guanaco" / "train.jsonl", CHATS)
    write_jsonl(tmp_path / "guanaco" / "test.jsonl", CHATS[:1])
    task = get_task("guanaco")
    train = task.load("train", tmp_path)
    assert train[0] == {"prompt": "### Human: What is 2+2?### Assistant:", "response": " 4."}
    multi = train[1]
    assert multi["prompt"].endswith("### Human: Name a colour.### Assistant:")
    assert multi["prompt"].startswith("### Human: Hi!### Assistant: Hello!")  # earlier turns are context
    assert multi["prompt"] + multi["response"] == CHATS[1]["text"]
    assert len(task.load("dev", tmp_path)) == 1
    assert task.metric_name == "perplexity"


def test_guanaco_without_test_file_splits_train(tmp_path):
    write_jsonl(tmp_path / "guanaco" / "train.jsonl",
                [{"text": f"### Human: q{i}### Assistant: a{i}"} for i in range(20)])
    task = get_task("guanaco")
    train, dev = task.load("train", tmp_path), task.load("dev", tmp_path)
    assert (len(train), len(dev)) == (18, 2)
    assert not set(train["prompt"]) & set(dev["prompt"])


def test_guanaco_errors_and_prompt(tmp_path):
    task = get_task("guanaco")
    with pytest.raises(PeftlabError, match="guanaco/train.jsonl"):
        task.load("train", tmp_path)
    write_jsonl(tmp_path / "guanaco" / "train.jsonl", [CHATS[0], {"text": "### Human: no answer"}])
    with pytest.raises(PeftlabError, match=r"line 2: the conversation has no answer"):
        task.load("train", tmp_path)
    write_jsonl(tmp_path / "guanaco" / "train.jsonl", [{"text": "### Human: q### Assistant:   "}])
    with pytest.raises(PeftlabError, match="line 1"):
        task.load("train", tmp_path)
    assert task.format_prompt("Hello") == "### Human: Hello### Assistant:"
    assert task.format_prompt("### Human: x### Assistant:") == "### Human: x### Assistant:"


# ---- imdb-gen ------------------------------------------------------------------------------------

def test_truncate_review():
    from peftlab.tasks.imdb_gen import truncate_review

    assert truncate_review("short  review") == "short review"
    words = [f"w{i}" for i in range(100)]
    assert truncate_review(" ".join(words), 10) == " ".join(words[:10])
    sentence = " ".join(words[:40]) + ". " + " ".join(words[40:100])
    assert truncate_review(sentence, 64).endswith("w39.")  # back to the sentence end in the second half
    early = " ".join(words[:5]) + ". " + " ".join(words[5:100])
    assert len(truncate_review(early, 64).split()) == 64  # a sentence end in the first half is not used


def test_imdb_gen_prompts():
    from peftlab.tasks.imdb_gen import prompt_for, sentiment_of_prompt

    assert prompt_for("positive") == prompt_for("1") == prompt_for("POS") == "Write a positive movie review:\n"
    assert prompt_for("negative") == "Write a negative movie review:\n"
    assert sentiment_of_prompt(prompt_for(0)) == "negative"
    assert sentiment_of_prompt("hello") is None
    with pytest.raises(ValueError):
        prompt_for("neutral")
    task = get_task("imdb-gen")
    assert task.format_prompt("positive") == "Write a positive movie review:\n"
    assert task.format_prompt("Write a poem") == "Write a poem"


@pytest.mark.real
def test_imdb_gen_on_shared_data(data_dir):
    imdb, gen = get_task("imdb"), get_task("imdb-gen")
    for split in ("train", "dev"):
        reviews, generated = imdb.load(split, data_dir), gen.load(split, data_dir)
        assert len(reviews) == len(generated)  # same deterministic split as the imdb task
        for i in (0, 1, len(reviews) - 1):
            sentiment = "positive" if reviews[i]["label"] == "1" else "negative"
            assert generated[i]["prompt"] == f"Write a {sentiment} movie review:\n"
            assert len(generated[i]["response"].split()) <= 64
            assert reviews[i]["text"].startswith(generated[i]["response"].split(" ")[0])
    assert (len(gen.load("train", data_dir)), len(gen.load("dev", data_dir))) == (1600, 400)


# ---- the new tasks through preprocessing -----------------------------------------------------------

@pytest.mark.real
def test_new_tasks_tokenize(tmp_path, data_dir):
    from peftlab.models import load_tokenizer
    from peftlab.preprocess import IGNORE_INDEX, tokenize

    tokenizer = load_tokenizer("minilm")
    write_jsonl(tmp_path / "billsum" / "train.jsonl", BILLS)
    write_jsonl(tmp_path / "guanaco" / "train.jsonl", CHATS)
    billsum = tokenize(get_task("billsum").load("train", tmp_path), "seq2seq", tokenizer, max_length=32,
                       label_names=None)
    assert billsum[0]["labels"][0] == tokenizer.cls_token_id and max(billsum["length"]) <= 32
    guanaco = tokenize(get_task("guanaco").load("train", tmp_path), "causal-lm", tokenizer, max_length=64,
                       label_names=None)
    prompt_length = len(tokenizer(CHATS[0]["text"].split("### Assistant:")[0] + "### Assistant:")["input_ids"])
    labels = guanaco[0]["labels"]
    assert labels[:prompt_length] == [IGNORE_INDEX] * prompt_length  # loss on the answer only
    assert all(label != IGNORE_INDEX for label in labels[prompt_length:])
    reviews = tokenize(get_task("imdb-gen").load("dev", data_dir).select(range(4)), "causal-lm", tokenizer,
                       max_length=128, label_names=None)
    assert all(any(label != IGNORE_INDEX for label in row) for row in reviews["labels"])


# ---- alpaca's prompt for predict/serve -------------------------------------------------------------


def test_alpaca_prompt_template_used_by_predict():
    from types import SimpleNamespace

    from peftlab import inference
    from peftlab.tasks.alpaca import format_prompt

    task = get_task("alpaca")
    assert task.format_prompt("Name a colour.") == format_prompt("Name a colour.")
    assert task.format_prompt("Name a colour.").endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    assert "### Input:\nred, green\n\n" in task.format_prompt("Pick one.", "red, green")
    # peftlab predict formats a bare instruction with the task's template (and an "input" field when given)
    loaded = SimpleNamespace(manifest=SimpleNamespace(task="alpaca", task_options={}))
    assert inference.format_prompt(loaded, {"prompt": "Pick one.", "input": "red, green"}) == \
        format_prompt("Pick one.", "red, green")


# ---- peftlab eval --generate: ROUGE-L of generated summaries -----------------------------------------


def test_eval_generate_scores_billsum_with_rouge_l(tmp_path):
    """Train LoRA on a tiny random T5 (the seq2seq code path; its summaries are noise), then `peftlab eval
    --generate` in a fresh process: dev perplexity plus ROUGE-L of generated summaries, recomputable."""
    import subprocess
    import sys

    import peftlab
    from peftlab import labs

    model_dir = labs.build_tiny_t5(tmp_path / "t5")
    data = tmp_path / "data"
    write_jsonl(data / "billsum" / "train.jsonl", BILLS * 8)
    write_jsonl(data / "billsum" / "test.jsonl", BILLS)
    run = tmp_path / "run"
    peftlab.train(method="lora", task="billsum", model=str(model_dir), output=str(run), data_dir=str(data),
                  epochs=1, batch_size=8, max_length=64, progress=False)
    result = subprocess.run([sys.executable, "-m", "peftlab.cli", "eval", "--adapter", str(run), "--data-dir",
                             str(data), "--generate", "2", "--max-new-tokens", "8"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(result.stdout)
    assert payload["metric_name"] == "perplexity" and payload["metric"] > 1
    generation = payload["generation"]
    assert generation["examples"] == 2 and len(generation["samples"]) == 2
    assert [s["reference"] for s in generation["samples"]] == [b["summary"] for b in BILLS]
    scores = get_task("billsum").generation_metrics([s["generated"] for s in generation["samples"]],
                                                    [s["reference"] for s in generation["samples"]])
    assert generation["metrics"]["rougeL"] == pytest.approx(scores["rougeL"])
    assert 0.0 <= scores["rougeL"] <= 1.0


def test_generate_needs_a_generation_metric():
    from peftlab.inference import generation_scores

    with pytest.raises(PeftlabError, match=r"Task 'sst2' has no generation metric.*billsum"):
        generation_scores(None, get_task("sst2"), [])
