"""The OpenAI-compatible endpoints, called with the official ``openai`` client against a real server on
127.0.0.1: completions, chat through the tokenizer's chat template, streaming, stop strings, the base as a
model, OpenAI's error shape. A tiny random Llama (with minilm's tokenizer and a small chat template) keeps
it fast; one slow test trains a few LoRA steps of SmolLM2 on Alpaca and chats with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from test_serve_auth import running  # noqa: E402

KEY = "sk-peftlab-test-0123456789"
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny causal-LM base folder (with a chat template) and a LoRA run over it that changes its outputs."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from peftlab.artifacts import RunManifest
    from peftlab.models import load_tokenizer

    root = tmp_path_factory.mktemp("openai")
    tokenizer = load_tokenizer("minilm")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id)
    base = root / "base"
    transformers.LlamaForCausalLM(config).save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings["model_input_names"] = ["input_ids", "attention_mask"]
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    torch.manual_seed(1)
    model = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(str(base)),
                           LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False, lora_alpha=64))
    run = root / "lm-lora"
    model.save_pretrained(str(run / "adapter"))
    RunManifest(method="lora", model=str(base), kind="causal-lm", max_length=64).save(run)
    return base, run


@pytest.fixture(scope="module")
def server(world):
    from peftlab.serving import build
    from peftlab.serving.app import create_app

    base, run = world
    engine = build(str(base), {"lm-lora": str(run)})
    try:
        with running(create_app(engine, api_keys=[KEY])) as url:
            yield url, engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(folder: Path, prompt: str, max_new_tokens: int, adapter: Path | None = None) -> str:
    """The reference: transformers' greedy generate on the same prompt (with the adapter, or the bare base)."""
    import torch
    import transformers
    from peft import PeftModel

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter / "adapter"))
    model.eval()
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def reference(world):
    base, run = world
    chat = CHAT_TEMPLATE.replace("{{ message['role'] }}", "user").replace("{{ message['content'] }}", "tell me a story")
    chat_prompt = "user: tell me a story\nassistant:"
    assert chat  # the template renders the messages this way
    return {"adapter": greedy(base, "the quick brown fox", 12, run), "base": greedy(base, "the quick brown fox", 12),
            "chat": greedy(base, chat_prompt, 10, run)}


def test_models_lists_the_base_and_the_adapter(client):
    ids = [model.id for model in client.models.list().data]
    assert ids == ["base", "lm-lora"]


def test_completion_through_the_adapter(client, reference):
    answer = client.completions.create(model="lm-lora", prompt="the quick brown fox", max_tokens=12, temperature=0)
    choice = answer.choices[0]
    assert answer.object == "text_completion" and answer.model == "lm-lora"
    assert choice.text == reference["adapter"] and choice.text.strip()
    assert choice.finish_reason in ("length", "stop")
    if choice.finish_reason == "length":
        assert answer.usage.completion_tokens == 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_the_base_is_a_model_too(client, reference):
    answer = client.completions.create(model="base", prompt="the quick brown fox", max_tokens=12, temperature=0)
    assert answer.choices[0].text == reference["base"]
    assert reference["base"] != reference["adapter"]  # the adapter changes the outputs


def test_chat_uses_the_chat_template(client, reference):
    answer = client.chat.completions.create(model="lm-lora", max_tokens=10, temperature=0,
                                            messages=[{"role": "user", "content": "tell me a story"}])
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == reference["chat"]


def test_streaming_completion_and_chat(client, reference):
    chunks = list(client.completions.create(model="lm-lora", prompt="the quick brown fox", max_tokens=12,
                                            temperature=0, stream=True))
    assert len(chunks) >= 2
    assert "".join(chunk.choices[0].text for chunk in chunks) == reference["adapter"]
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])

    chunks = list(client.chat.completions.create(model="lm-lora", max_tokens=10, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "tell me a story"}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == reference["chat"]
    assert chunks[-1].choices[0].finish_reason is not None


def test_stop_strings_end_the_text_before_them(client, reference):
    words = reference["adapter"].split()
    assert len(words) >= 3
    stop = " " + words[2]
    expected = reference["adapter"][:reference["adapter"].index(stop)]
    answer = client.completions.create(model="lm-lora", prompt="the quick brown fox", max_tokens=12, temperature=0,
                                       stop=[stop])
    assert answer.choices[0].text == expected and answer.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="lm-lora", prompt="the quick brown fox", max_tokens=12,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_follows_the_seed(client):
    def sample(seed):
        return client.completions.create(model="lm-lora", prompt="once upon", max_tokens=8, temperature=1.5,
                                         top_p=0.9, seed=seed).choices[0].text

    assert sample(7) == sample(7)


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    body = caught.value.response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return caught.value.status_code, body["error"]


def test_unknown_model_is_openai_404(client):
    status, error = error_of(lambda: client.completions.create(model="nope", prompt="hi", max_tokens=2))
    assert status == 404 and error["code"] == "model_not_found" and error["param"] == "model"
    assert "lm-lora" in error["message"] and error["type"] == "invalid_request_error"
    status, error = error_of(lambda: client.chat.completions.create(
        model="nope", max_tokens=2, messages=[{"role": "user", "content": "hi"}]))
    assert status == 404 and error["code"] == "model_not_found"


@pytest.mark.parametrize("options, param", [
    ({"n": 2}, "n"), ({"logprobs": 2}, "logprobs"), ({"echo": True}, "echo"), ({"best_of": 3}, "best_of"),
    ({"max_tokens": 100_000}, "max_tokens"), ({"temperature": 5}, "temperature"),
])
def test_unsupported_parameters_are_400_naming_them(client, options, param):
    status, error = error_of(lambda: client.completions.create(model="lm-lora", prompt="hi", **options))
    assert status == 400 and error["param"] == param and param in error["message"]


def test_chat_logprobs_and_n_are_400(client):
    for options, param in (({"logprobs": True}, "logprobs"), ({"n": 3}, "n")):
        status, error = error_of(lambda: client.chat.completions.create(
            model="lm-lora", messages=[{"role": "user", "content": "hi"}], **options))
        assert status == 400 and error["param"] == param


def test_the_key_is_required(server):
    url, _ = server
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.response.json()["error"]["type"] == "authentication_error"


def test_a_tokenizer_without_a_chat_template_is_400():
    from types import SimpleNamespace

    from peftlab.serving.openai import ChatRequest, OpenAIError, chat_prompt

    request = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(OpenAIError) as caught:
        chat_prompt(SimpleNamespace(chat_template=None), request)
    assert caught.value.status == 400 and caught.value.param == "messages"


def test_stop_holdback():
    from peftlab.serving.generation import first_stop, safe_length

    assert safe_length("hello wor", ["world"]) == len("hello ")
    assert safe_length("hello", ["xyz"]) == 5
    assert first_stop("a b END c", ["END", "b"]) == 2


# ---- the real SmolLM2, a few LoRA steps on Alpaca -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.real
def test_chat_with_a_smollm2_lora_adapter(tmp_path, data_dir):
    from peftlab.serving import build
    from peftlab.serving.app import create_app
    from peftlab.training import TrainConfig, train

    run = tmp_path / "smollm2-lora"
    train(TrainConfig(method="lora", task="alpaca", model="smollm2", output=str(run), epochs=1, max_train_samples=8,
                      max_eval_samples=4, batch_size=4, max_length=64, eval_each_epoch=False, precision="fp32",
                      progress=False, data_dir=str(data_dir)))
    engine = build("smollm2", {"alpaca": str(run)}, threads=2)
    try:
        with running(create_app(engine, api_keys=[KEY])) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)
            assert {m.id for m in client.models.list().data} == {"smollm2", "alpaca"}
            answer = client.chat.completions.create(
                model="alpaca", max_tokens=12, temperature=0,
                messages=[{"role": "user", "content": "What is the capital of France?"}])
            text = answer.choices[0].message.content
            assert text.strip() and "Paris" in text, text
            chunks = list(client.chat.completions.create(
                model="alpaca", max_tokens=12, temperature=0, stream=True,
                messages=[{"role": "user", "content": "What is the capital of France?"}]))
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
            plain = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                              temperature=0)
            assert "Paris" in plain.choices[0].text
    finally:
        engine.stop()
