"""Chat data: conversations rendered with the tokenizer's chat template, loss on assistant turns only, the
template saved with the adapter and used by predict and the server; the real SmolLM2 learns from chat JSONL,
ShareGPT JSON and prompt/response CSV files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.errors import PeftlabError
from peftlab.preprocess import IGNORE_INDEX, encode_chat
from peftlab.tasks.chat import normalize_messages

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Blue, and then yellow."},
]


@pytest.fixture(scope="module")
def tokenizer():
    from peftlab.labs.standins import smollm2_tokenizer

    return smollm2_tokenizer()


def test_both_formats_normalize_to_roles_and_content():
    sharegpt = [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    assert normalize_messages(sharegpt, "x") == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]}]
    assert normalize_messages(parts, "x")[0]["content"] == "hello"
    with pytest.raises(PeftlabError, match="only text is supported"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "x")


def test_the_label_mask_covers_assistant_answers_and_their_end_only(tokenizer):
    ids, labels = encode_chat(tokenizer, CONVERSATION, "x")
    assert len(ids) == len(labels)
    learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    # exactly each answer's text and the end-of-turn token that stops generation
    assert tokenizer.decode(learned) == "Red.<|im_end|>Blue, and then yellow.<|im_end|>"
    special = set(tokenizer.all_special_ids)
    assert {i for i in learned if i in special} == {tokenizer.eos_token_id}  # no <|im_start|>, no role header
    # nothing of the system or user turns, nor the default system prompt, is learned
    unlearned = tokenizer.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX])
    for text in ("Answer briefly.", "Name a primary colour.", "Another one?", "<|im_start|>assistant\n"):
        assert text in unlearned
    # the ids are one tokenization of the rendered text: what the model sees when it answers
    assert ids == tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)[
        "input_ids"]


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    import copy

    rewriting = copy.deepcopy(tokenizer)  # drops earlier answers once a later turn follows (as some reasoning templates do)
    rewriting.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                               "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(PeftlabError, match=r"chats.jsonl, line 4: the chat template renders turn 3 differently"):
        encode_chat(rewriting, CONVERSATION, "chats.jsonl, line 4")


def test_a_chat_template_file_for_a_model_without_one(tmp_path, tokenizer):
    import copy

    from peftlab.tasks import get_task

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    task = get_task("jsonl", train_file=str(EXAMPLES / "chats.jsonl"))
    with pytest.raises(PeftlabError, match="has no chat template.*--chat-template FILE"):
        task.prepare_tokenizer(copy.deepcopy(bare))
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    task = get_task("jsonl", train_file=str(EXAMPLES / "chats.jsonl"), chat_template=str(template))
    prepared = task.prepare_tokenizer(copy.deepcopy(bare))
    assert prepared.chat_template == template.read_text()
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['role'] }")
    task = get_task("jsonl", train_file=str(EXAMPLES / "chats.jsonl"), chat_template=str(broken))
    with pytest.raises(PeftlabError, match="--chat-template .*broken.jinja' fails to render"):
        task.prepare_tokenizer(copy.deepcopy(bare))


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A LoRA chat run over the tiny random Llama with SmolLM2's tokenizer (its chat template)."""
    import peftlab
    from peftlab.labs.standins import smoke_llama

    run = tmp_path_factory.mktemp("chat") / "run"
    peftlab.train(method="lora", task="json", model=str(smoke_llama()), output=str(run),
                  train_file=str(EXAMPLES / "sharegpt.json"), epochs=1, batch_size=6, max_length=96, progress=False,
                  precision="fp32")
    return run


def test_the_template_is_saved_with_the_adapter_and_predict_renders_with_it(chat_run, tokenizer):
    from peftlab.inference import load_trained, predict, render_prompt

    assert (chat_run / "adapter" / "chat_template.jinja").read_text() == tokenizer.chat_template
    manifest = json.loads((chat_run / "peftlab.json").read_text())
    assert manifest["task_options"]["messages_column"] == "conversations"
    loaded = load_trained(chat_run, device="cpu")
    text, rendered = render_prompt(loaded, {"prompt": "What is 2+2?", "raw_key": "text"},
                                   loaded.tokenizer.chat_template)
    assert rendered and text == tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                                              tokenize=False, add_generation_prompt=True)
    as_text, as_messages = predict(loaded, ["What is 2+2?", [{"role": "user", "content": "What is 2+2?"}]],
                                   max_new_tokens=4)
    assert as_text["generated"] == as_messages["generated"] and as_messages["messages"][0]["role"] == "user"
    with pytest.raises(PeftlabError, match="input 1: the conversation ends with an assistant message"):
        predict(loaded, [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])


def test_the_generate_endpoint_takes_messages(chat_run):
    from test_serve_auth import running

    import httpx

    from peftlab.inference import load_trained, predict
    from peftlab.serving import build
    from peftlab.serving.app import create_app

    manifest = json.loads((chat_run / "peftlab.json").read_text())
    engine = build(manifest["model"], {"chat": str(chat_run)})
    conversation = {"messages": [{"role": "user", "content": "Say hello."}]}
    try:
        with running(create_app(engine)) as url, httpx.Client(base_url=url, timeout=60) as client:
            response = client.post("/v1/generate", json={"adapter": "chat", "inputs": [conversation, "Say hello."],
                                                         "max_new_tokens": 4})
            assert response.status_code == 200, response.text
            outputs = response.json()["outputs"]
            bad = client.post("/v1/generate", json={"adapter": "chat", "inputs": [{"messages": [{"role": "x"}]}]})
            assert bad.status_code == 422 and "message 1" in bad.json()["error"]
    finally:
        engine.stop()
    expected = predict(load_trained(chat_run, device="cpu"), [conversation, "Say hello."], max_new_tokens=4)
    assert [o["generated"] for o in outputs] == [e["generated"] for e in expected]
    assert outputs[0]["generated"] == outputs[1]["generated"]  # a bare text is the user's turn


# ---- the real SmolLM2: each chat form lowers dev perplexity -------------------------------------------------------

def alpaca_files(folder: Path, data_dir: Path, n_train: int = 72, n_dev: int = 16) -> dict[str, tuple[Path, Path]]:
    """Chat JSONL, ShareGPT JSON and prompt/response CSV files made from the shared Alpaca sample (short answers)."""
    import csv

    records = [r for r in json.loads((data_dir / "alpaca" / "alpaca_en_demo.json").read_text())
               if not r.get("input") and len(r["output"]) < 300][: n_train + n_dev]
    parts = {"train": records[:n_train], "dev": records[n_train:]}
    files = {}
    for split, rows in parts.items():
        chat = folder / f"{split}.jsonl"
        chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                          {"role": "assistant", "content": r["output"]}]}) + "\n"
                                for r in rows))
        share = folder / f"{split}.json"
        share.write_text(json.dumps([{"conversations": [{"from": "human", "value": r["instruction"]},
                                                        {"from": "gpt", "value": r["output"]}]} for r in rows]))
        table = folder / f"{split}.csv"
        with table.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["prompt", "response"])
            writer.writerows([(f"Instruction: {r['instruction']}\nAnswer: ", r["output"]) for r in rows])
        files.setdefault("jsonl", []).append(chat)
        files.setdefault("json", []).append(share)
        files.setdefault("csv", []).append(table)
    return {task: tuple(paths) for task, paths in files.items()}


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("task", ["jsonl", "json", "csv"], ids=["chat-jsonl", "sharegpt-json", "prompt-response-csv"])
def test_smollm2_learns_from_each_form(task, tmp_path, data_dir):
    from peftlab.evaluation import evaluate_model
    from peftlab.hardware import resolve_precision
    from peftlab.training import TrainingParts, config_from_options, prepare, train

    train_file, dev_file = alpaca_files(tmp_path, data_dir)[task]
    columns = {"prompt_column": "prompt", "response_column": "response"} if task == "csv" else {}
    run = tmp_path / "run"
    config = config_from_options(dict(method="lora", task=task, model="smollm2", output=str(run),
                                      train_file=str(train_file), dev_file=str(dev_file), epochs=2, batch_size=4,
                                      max_length=256, lr=2e-3, progress=False, eval_each_epoch=False, **columns))
    prepared = prepare(config)  # LoRA starts as the identity: this is the base model
    base = evaluate_model(prepared.model, prepared.task, prepared.tokenizer, prepared.dev_data,
                          precision=resolve_precision(config.precision))["perplexity"]
    metrics = train(config, parts=TrainingParts(prepared=prepared))
    assert metrics["metric"] <= 0.9 * base, (base, metrics["metric"])
    if task == "jsonl":  # a fresh process answers a bare text through the saved chat template
        assert (run / "adapter" / "chat_template.jinja").is_file()
        answer = subprocess.run([sys.executable, "-m", "peftlab.cli", "predict", "--adapter", str(run), "--text",
                                 "Name three primary colours.", "--max-new-tokens", "24"],
                                capture_output=True, text=True, timeout=300)
        assert answer.returncode == 0, answer.stderr[-2000:]
        result = json.loads(answer.stdout.strip().splitlines()[-1])
        assert result["prompt"] == "Name three primary colours." and result["generated"].strip()
        assert "<|im_start|>" not in result["generated"] and "user" not in result["generated"].split()[:1]
