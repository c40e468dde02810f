"""peftlab serve: a real uvicorn server on 127.0.0.1 (a free port, in a background thread) hit with httpx.

Three adapters of different methods over one minilm base (LoRA and IA3 and prompt tuning on SST-2),
trained for a few steps once per session (reused by test_merge_export.py when both run).
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

SST2_LABELS = ["negative", "positive"]  # GLUE's names for SST-2's classes
TEXTS = ["a gripping, funny and beautifully acted film", "the plot is thin and the jokes fall flat", "meh",
         "an uneven but ultimately rewarding experience"]


# ---- trained runs, shared with test_merge_export.py within one pytest session ---------------------------

def trained_run(tmp_path_factory, data_dir, method: str, task: str = "sst2") -> Path:
    """A tiny peftlab training run (a few steps), cached for the whole session under the base temp dir."""
    from peftlab.training import TrainConfig, train

    output = tmp_path_factory.getbasetemp() / "peftlab-runs" / f"{method}-{task}"
    if (output / "metrics.json").is_file():
        return output
    shutil.rmtree(output, ignore_errors=True)
    train(TrainConfig(method=method, task=task, model="minilm", output=str(output), epochs=1,
                      max_train_samples=16, max_eval_samples=16, batch_size=16, eval_each_epoch=False,
                      precision="fp32", progress=False, data_dir=str(data_dir)))
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    return {name: trained_run(tmp_path_factory, data_dir, method)
            for name, method in (("lora", "lora"), ("ia3", "ia3"), ("prompt", "prompt-tuning"))}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    from peftlab.serving import build
    from peftlab.serving.app import create_app

    engine = build("minilm", {name: str(path) for name, path in runs.items()})
    # run-time loads on (in process, without a key) from the session's temporary folders
    app = create_app(engine, admin=True, adapter_root=tmp_path_factory.getbasetemp())
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{config.port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client, engine
    instance.should_exit = True
    thread.join(timeout=15)
    engine.stop()


@pytest.fixture(scope="module")
def reference(runs):
    """peftlab.inference.predict on the same inputs, each adapter loaded on its own."""
    from peftlab.inference import load_trained, predict

    return {name: predict(load_trained(path, device="cpu"), TEXTS) for name, path in runs.items()}


def post(client, path, payload):
    return client.post(path, json=payload)


# ---- endpoints ------------------------------------------------------------------------------------------

def test_health_and_adapter_listing(server):
    client, _ = server
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    listing = client.get("/v1/adapters").json()
    assert listing["base"] == "minilm"
    by_name = {a["name"]: a for a in listing["adapters"]}
    assert set(by_name) == {"lora", "ia3", "prompt"}
    assert {by_name[n]["method"] for n in by_name} == {"lora", "ia3", "prompt-tuning"}
    for adapter in by_name.values():
        assert adapter["task"] == "sst2" and adapter["kind"] == "seq-cls" and adapter["labels"] == SST2_LABELS
    # three peft types: three groups over one base
    assert len({a["group"] for a in by_name.values()}) == 3


def test_adapters_share_one_copy_of_the_base_weights(server):
    _, engine = server
    pointers = set()
    for slot in engine._slots.values():
        for name, parameter in slot.model.named_parameters():
            if name.endswith("encoder.layer.3.intermediate.dense.weight"):
                pointers.add(parameter.data_ptr())
    assert len(engine._slots) == 3 and len(pointers) == 1


def test_predictions_match_peftlab_predict(server, reference):
    client, _ = server
    for name in ("lora", "ia3", "prompt"):
        response = post(client, "/v1/predict", {"adapter": name, "inputs": TEXTS})
        assert response.status_code == 200, response.text
        outputs = response.json()["outputs"]
        assert [o["label"] for o in outputs] == [r["label"] for r in reference[name]]
        for got, expected in zip(outputs, reference[name]):
            for label, probability in expected["probabilities"].items():
                assert got["probabilities"][label] == pytest.approx(probability, abs=1e-5)


def test_concurrent_requests_for_different_adapters(server, reference):
    """Requests for several adapters at once (micro-batched by the worker) give the same answers."""
    client, engine = server
    results: dict[tuple[str, int], list] = {}
    errors: list[str] = []

    def one(name: str, index: int):
        response = post(client, "/v1/predict", {"adapter": name, "inputs": TEXTS})
        if response.status_code != 200:
            errors.append(response.text)
        else:
            results[(name, index)] = [o["label"] for o in response.json()["outputs"]]

    threads = [threading.Thread(target=one, args=(name, i)) for i in range(4) for name in ("lora", "ia3", "prompt")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    for (name, _), labels in results.items():
        assert labels == [r["label"] for r in reference[name]]
    metrics = client.get("/v1/stats").json()
    assert metrics["batching"]["batches"] >= 1 and metrics["batching"]["rows"] >= 12 * len(TEXTS)


def test_requests_for_two_lora_adapters_share_one_forward(server, runs, tmp_path):
    """Two LoRA adapters in one group: requests waiting together run as one mixed-adapter batch."""
    import torch
    from safetensors.torch import load_file, save_file

    from peftlab.inference import load_trained, predict
    from peftlab.serving.engine import Control

    client, engine = server
    other = _copy_run(runs["lora"], tmp_path / "lora-b")  # a different LoRA adapter: scaled update, shifted head
    weights = other / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    for key in tensors:
        if "lora_B" in key:
            tensors[key] = tensors[key] * 50 + 0.01
        if key.endswith("classifier.bias"):
            tensors[key] = tensors[key] + torch.tensor([0.3, -0.3])
    save_file(tensors, str(weights), metadata={"format": "pt"})
    loaded = post(client, "/v1/adapters", {"name": "lora-b", "path": str(other)})
    assert loaded.status_code == 201 and loaded.json()["mixed_batching"], loaded.text
    try:
        expected = {"lora": predict(load_trained(runs["lora"], device="cpu"), TEXTS),
                    "lora-b": predict(load_trained(other, device="cpu"), TEXTS)}
        assert expected["lora"][0]["probabilities"] != pytest.approx(expected["lora-b"][0]["probabilities"])
        before = client.get("/v1/stats").json()["batching"]["mixed_adapter_batches"]
        gate = threading.Event()
        engine._queue.put(Control(lambda: gate.wait(30)))  # hold the worker so both requests queue up
        answers: dict[str, list] = {}

        def ask(name):
            answers[name] = post(client, "/v1/predict", {"adapter": name, "inputs": TEXTS}).json()["outputs"]

        threads = [threading.Thread(target=ask, args=(name,)) for name in ("lora", "lora-b")]
        for thread in threads:
            thread.start()
        deadline = time.time() + 30
        while engine._queue.qsize() < 2 and time.time() < deadline:
            time.sleep(0.01)
        gate.set()
        for thread in threads:
            thread.join(timeout=60)
        assert client.get("/v1/stats").json()["batching"]["mixed_adapter_batches"] == before + 1
        for name in ("lora", "lora-b"):
            for got, reference in zip(answers[name], expected[name]):
                assert got["label"] == reference["label"]
                for label, probability in reference["probabilities"].items():
                    assert got["probabilities"][label] == pytest.approx(probability, abs=1e-5)
    finally:
        assert client.delete("/v1/adapters/lora-b").status_code == 200


def test_metrics_per_adapter(server):
    client, _ = server
    post(client, "/v1/predict", {"adapter": "lora", "inputs": ["fine"]})
    metrics = client.get("/v1/stats").json()
    lora = metrics["adapters"]["lora"]
    assert lora["requests"] >= 1 and lora["inputs"] >= 1
    assert {"p50", "p95", "p99"} <= set(lora["latency_ms"]) and lora["latency_ms"]["p50"] > 0
    assert metrics["requests"] >= lora["requests"] and "errors" in metrics


def test_hot_load_and_unload_under_traffic(server, runs, reference):
    """A client thread keeps sending requests while adapters are loaded and unloaded: never a 5xx."""
    client, _ = server
    statuses: list[tuple[str, int]] = []
    stop = threading.Event()

    def traffic():
        with httpx.Client(base_url=str(client.base_url), timeout=60) as own:
            for index in range(400):  # bounded: at most 400 requests or until told to stop
                if stop.is_set():
                    break
                name = ("lora", "hot-lora", "hot-ia3")[index % 3]
                response = own.post("/v1/predict", json={"adapter": name, "inputs": TEXTS[:2]})
                statuses.append((name, response.status_code))
                if response.status_code == 200 and name == "hot-lora":
                    labels = [o["label"] for o in response.json()["outputs"]]
                    assert labels == [r["label"] for r in reference["lora"][:2]]

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        for _ in range(2):
            loaded = post(client, "/v1/adapters", {"name": "hot-lora", "path": str(runs["lora"])})
            assert loaded.status_code == 201, loaded.text
            assert loaded.json()["group"] == next(a["group"] for a in client.get("/v1/adapters").json()["adapters"]
                                                  if a["name"] == "lora")  # joined the live LoRA group
            loaded = post(client, "/v1/adapters", {"name": "hot-ia3", "path": str(runs["ia3"])})
            assert loaded.status_code == 201, loaded.text
            assert post(client, "/v1/predict", {"adapter": "hot-lora", "inputs": TEXTS}).status_code == 200
            time.sleep(0.3)
            assert client.delete("/v1/adapters/hot-lora").status_code == 200
            assert client.delete("/v1/adapters/hot-ia3").status_code == 200
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert statuses, "the traffic thread sent nothing"
    assert all(code < 500 for _, code in statuses), [s for s in statuses if s[1] >= 500]
    assert all(code == 200 for name, code in statuses if name == "lora")
    assert {code for name, code in statuses if name != "lora"} <= {200, 404}
    names = [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]
    assert names == ["ia3", "lora", "prompt"]
    check = post(client, "/v1/predict", {"adapter": "lora", "inputs": TEXTS})
    assert [o["label"] for o in check.json()["outputs"]] == [r["label"] for r in reference["lora"]]


def test_merged_model_served_like_an_adapter(server, runs, reference, tmp_path, data_dir):
    """A `peftlab merge` output loads at run time and answers as the unmerged LoRA adapter does."""
    from peftlab.merge import merge

    client, _ = server
    merge(runs["lora"], tmp_path / "merged", samples=4, data_dir=str(data_dir), quiet=True)
    loaded = post(client, "/v1/adapters", {"name": "merged", "path": str(tmp_path / "merged")})
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["method"] == "merged" and loaded.json()["labels"] == SST2_LABELS
    response = post(client, "/v1/predict", {"adapter": "merged", "inputs": TEXTS})
    for got, expected in zip(response.json()["outputs"], reference["lora"]):
        assert got["label"] == expected["label"]
        assert got["probabilities"]["positive"] == pytest.approx(expected["probabilities"]["positive"], abs=1e-5)
    assert client.delete("/v1/adapters/merged").status_code == 200


# ---- generation (a tiny random Llama with the minilm tokenizer as the base: fast and offline) ------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny causal-LM base folder and two peftlab run folders over it: LoRA and prompt tuning."""
    import torch
    import transformers
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    from peftlab.artifacts import RunManifest
    from peftlab.models import load_tokenizer

    root = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = load_tokenizer("minilm")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    base = root / "base"
    transformers.LlamaForCausalLM(config).save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings["model_input_names"] = ["input_ids", "attention_mask"]  # a decoder takes no token_type_ids
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    runs = {}
    for name, method, peft_config in (
            ("lm-lora", "lora", LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False)),
            ("lm-prompt", "prompt-tuning", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))):
        torch.manual_seed(1)
        model = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(str(base)), peft_config)
        run = root / name
        model.save_pretrained(str(run / "adapter"))
        RunManifest(method=method, model=str(base), kind="causal-lm", max_length=64).save(run)
        runs[name] = run
    return base, runs


def test_generate_endpoint(tiny_lm):
    from peftlab.inference import load_trained, predict
    from peftlab.serving import build
    from peftlab.serving.app import create_app

    base, runs = tiny_lm
    engine = build(str(base), {name: str(path) for name, path in runs.items()})
    config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=free_port(), log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    try:
        while not instance.started:
            assert thread.is_alive()
            time.sleep(0.05)
        prompts = ["hello world", "the weather today is"]
        with httpx.Client(base_url=f"http://127.0.0.1:{config.port}", timeout=60) as client:
            kinds = {a["name"]: a["kind"] for a in client.get("/v1/adapters").json()["adapters"]}
            assert kinds == {"lm-lora": "causal-lm", "lm-prompt": "causal-lm"}
            for name, run in runs.items():
                response = client.post("/v1/generate", json={"adapter": name, "inputs": prompts, "max_new_tokens": 5})
                assert response.status_code == 200, response.text
                expected = predict(load_trained(run, device="cpu"), prompts, max_new_tokens=5)
                assert [o["generated"] for o in response.json()["outputs"]] == [e["generated"] for e in expected]
            wrong = client.post("/v1/predict", json={"adapter": "lm-lora", "inputs": prompts})
            assert wrong.status_code == 422 and "/v1/generate" in wrong.json()["error"]
    finally:
        instance.should_exit = True
        thread.join(timeout=15)
        engine.stop()


# ---- bad requests -----------------------------------------------------------------------------------------

def test_unknown_adapter_is_404_with_the_names(server):
    client, _ = server
    response = post(client, "/v1/predict", {"adapter": "nope", "inputs": ["x"]})
    assert response.status_code == 404
    body = response.json()
    assert "nope" in body["error"] and sorted(body["adapters"]) == ["ia3", "lora", "prompt"]
    assert client.delete("/v1/adapters/nope").status_code == 404


@pytest.mark.parametrize("body, status, words", [
    ('{"adapter": "lora", "inputs": ["x"', 400, "malformed json"),
    ('not json at all', 400, "malformed json"),
    ('{"inputs": ["x"]}', 422, "adapter"),
    ('{"adapter": "lora"}', 422, "inputs"),
    ('{"adapter": "lora", "inputs": []}', 422, "inputs"),
    ('{"adapter": "lora", "inputs": "just a string"}', 422, "inputs"),
    ('{"adapter": "lora", "inputs": ["x"], "temperature": 2}', 422, "temperature"),
    ('{"adapter": "lora", "inputs": [42]}', 422, "input 1"),
    ('{"adapter": "lora", "inputs": [{"txt": "typo"}]}', 422, "text"),
    ('{"adapter": "lora", "inputs": [' + ",".join(['"x"'] * 65) + ']}', 413, "64"),
    ('{"adapter": "lora", "inputs": ["' + "long " * 1000 + '"]}', 413, "characters"),
])
def test_bad_requests_get_a_4xx_with_a_message(server, body, status, words):
    client, _ = server
    response = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert words in response.json()["error"].lower()


def test_wrong_endpoint_for_the_adapter_kind(server):
    client, _ = server
    response = post(client, "/v1/generate", {"adapter": "lora", "inputs": ["x"], "max_new_tokens": 4})
    assert response.status_code == 422 and "/v1/predict" in response.json()["error"]
    response = post(client, "/v1/generate", {"adapter": "lora", "inputs": ["x"], "max_new_tokens": 100000})
    assert response.status_code == 422


def test_oversized_body_is_refused(server):
    client, _ = server
    response = client.post("/v1/predict", content=b"{" + b" " * 1_100_000 + b"}",
                           headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_server_keeps_serving_after_bad_requests(server):
    client, _ = server
    client.post("/v1/predict", content="{{{", headers={"content-type": "application/json"})
    assert client.get("/health").status_code == 200
    assert post(client, "/v1/predict", {"adapter": "ia3", "inputs": ["good"]}).status_code == 200
    assert client.get("/v1/stats").json()["errors"] >= 1


# ---- refused adapter folders --------------------------------------------------------------------------------

def _copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _rewrite_tensors(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _bad_folders(runs, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (folder, words the refusal must contain)."""
    import torch

    cases = {}
    folder = _copy_run(runs["lora"], root / "incomplete")
    (folder / "adapter" / "adapter_model.safetensors").unlink()
    cases["incomplete"] = (folder, "incomplete")

    folder = _copy_run(runs["lora"], root / "pickle")
    (folder / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    cases["pickle"] = (folder, "pickle")

    folder = _copy_run(runs["lora"], root / "shapes")

    def shrink(tensors):
        key = next(k for k in tensors if k.endswith("lora_A.weight"))
        tensors[key] = torch.zeros(8, 100)

    _rewrite_tensors(folder / "adapter" / "adapter_model.safetensors", shrink)
    cases["shapes"] = (folder, "do not fit")

    folder = _copy_run(runs["ia3"], root / "missing")

    def drop(tensors):
        del tensors[next(k for k in tensors if "ia3_l" in k)]

    _rewrite_tensors(folder / "adapter" / "adapter_model.safetensors", drop)
    cases["missing"] = (folder, "missing")

    folder = _copy_run(runs["lora"], root / "otherbase")
    manifest = json.loads((folder / "peftlab.json").read_text())
    manifest["model"] = "bert-base-uncased"
    (folder / "peftlab.json").write_text(json.dumps(manifest))
    cases["otherbase"] = (folder, "bert-base-uncased")

    other = root / "another-model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    folder = _copy_run(runs["prompt"], root / "otherpeftbase")
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(other)
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    cases["otherpeftbase"] = (folder, "another-model")

    folder = _copy_run(runs["lora"], root / "garbage")
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file")
    cases["garbage"] = (folder, "safetensors")

    cases["nowhere"] = (root / "does-not-exist", "does not exist")
    return cases


def test_refused_adapter_folders_get_422_with_the_reason(server, runs, tmp_path):
    client, _ = server
    for name, (folder, words) in _bad_folders(runs, tmp_path).items():
        response = post(client, "/v1/adapters", {"name": f"bad-{name}", "path": str(folder)})
        assert response.status_code == 422, (name, response.text)
        assert words in response.json()["error"], (name, response.json()["error"])
    names = [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]
    assert names == ["ia3", "lora", "prompt"]
    # the live LoRA group is untouched by the refused loads
    assert post(client, "/v1/predict", {"adapter": "lora", "inputs": TEXTS}).status_code == 200


def test_load_request_errors(server, runs):
    client, _ = server
    taken = post(client, "/v1/adapters", {"name": "lora", "path": str(runs["lora"])})
    assert taken.status_code == 409 and "already loaded" in taken.json()["error"]
    invalid = post(client, "/v1/adapters", {"name": "../etc", "path": str(runs["lora"])})
    assert invalid.status_code == 422 and "not valid" in invalid.json()["error"]
    assert post(client, "/v1/adapters", {"name": "x"}).status_code == 422


def test_cli_refuses_a_bad_adapter_at_startup(runs, tmp_path, capsys):
    from peftlab.cli import main

    folder = _copy_run(runs["lora"], tmp_path / "pickled")
    (folder / "adapter" / "extra.pkl").write_bytes(b"\x80\x04K\x01.")
    code = main(["serve", "--base", "minilm", "--adapter", f"bad={folder}", "--port", "1"])
    assert code == 2
    error = capsys.readouterr().err
    assert "Refusing adapter 'bad'" in error and "pickle" in error and "Traceback" not in error
