"""peftlab serve's access rules and error answers, against real uvicorn servers on 127.0.0.1.

A tiny random BERT base (MiniLM's tokenizer) and LoRA adapters saved over it by peft, so the servers start
in seconds; one slow test runs the real ``peftlab serve`` command on the bundled ``minilm``.

Two servers share one engine: ``open`` (no key, no admin, no docs: the defaults) and ``secure`` (two API
keys, ``admin``, an adapter root, ``docs``). The last section checks that the server hosts an adapter as its
method declares (``serving_facts()``), with a DoRA-like method registered from this file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

KEYS = ["key-one-0123456789", "key-two-9876543210"]
SURROGATE_INPUTS = ['["\\ud800"]', '[{"text": "fine", "text_pair": "\\udfff"}]', '[{"text": "a\\ud800b"}]']


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(app):
    """``app`` served by uvicorn on a free loopback port (a background thread); yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def save_lora_run(base: Path, run: Path, seed: int = 1, method: str = "lora", **lora_options) -> Path:
    """A peftlab run folder (peftlab.json + adapter/) holding a LoRA classification adapter over ``base``."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from peftlab.artifacts import RunManifest

    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification.from_pretrained(str(base))
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                                  init_lora_weights=False, **lora_options))
    peft_model.save_pretrained(str(run / "adapter"))
    RunManifest(method=method, model=str(base), kind="seq-cls", label_names=["neg", "pos"], max_length=32).save(run)
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """base/ (tiny BERT), root/ (the adapter root: one good run) and outside/ (a good run outside the root)."""
    import torch
    import transformers

    from peftlab.models import load_tokenizer

    top = tmp_path_factory.mktemp("serve-auth")
    tokenizer = load_tokenizer("minilm")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     num_labels=2)
    base = top / "base"
    transformers.BertForSequenceClassification(config).save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    root, outside = top / "root", top / "outside"
    save_lora_run(base, root / "good")
    save_lora_run(base, outside / "elsewhere", seed=2)
    return {"top": top, "base": base, "root": root, "outside": outside}


@pytest.fixture(scope="module")
def servers(world):
    from peftlab.serving import build
    from peftlab.serving.app import create_app

    engine = build(str(world["base"]), {"a": str(world["root"] / "good")})
    secure = create_app(engine, api_keys=KEYS, admin=True, adapter_root=world["root"], docs=True)
    try:
        with running(create_app(engine)) as open_url, running(secure) as secure_url:
            with httpx.Client(base_url=open_url, timeout=60) as open_client, \
                    httpx.Client(base_url=secure_url, timeout=60) as anonymous, \
                    httpx.Client(base_url=secure_url, timeout=60,
                                 headers={"Authorization": f"Bearer {KEYS[0]}"}) as keyed:
                yield {"open": open_client, "anonymous": anonymous, "keyed": keyed, "engine": engine}
    finally:
        engine.stop()


def assert_error(response, status: int, *words: str) -> dict:
    """The documented error shape: status, JSON {"error": one sentence}, no server path anywhere."""
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert "detail" not in body
    for word in words:
        assert word.lower() in body["error"].lower(), (word, body["error"])
    home = str(Path.home())
    assert "/tmp/" not in response.text and (len(home) < 2 or home + "/" not in response.text), response.text
    return body


# ---- defaults: no key, no admin, no docs ---------------------------------------------------------------

def test_defaults_admin_and_docs_are_off(servers):
    client = servers["open"]
    assert_error(client.post("/v1/adapters", json={"name": "x", "path": "good"}), 404, "not found")
    assert_error(client.delete("/v1/adapters/a"), 404, "not found")
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert_error(client.get(path), 404)
    # inference stays open on loopback without a key, as before
    response = client.post("/v1/predict", json={"adapter": "a", "inputs": ["fine"]})
    assert response.status_code == 200 and response.json()["outputs"][0]["label"] in ("neg", "pos")
    assert client.get("/health").json()["status"] == "ok"


def test_listing_and_health_show_no_paths(servers, world):
    for client in (servers["open"], servers["keyed"]):
        for path in ("/v1/adapters", "/health", "/metrics"):
            response = client.get(path)
            assert response.status_code == 200
            assert str(world["top"]) not in response.text and "/tmp/" not in response.text, (path, response.text)
    listing = servers["open"].get("/v1/adapters").json()
    assert listing["base"] == "base"  # a local base folder is shown by its last name only
    (entry,) = listing["adapters"]
    assert entry["name"] == "a" and entry["method"] == "lora" and entry["kind"] == "seq-cls"
    assert "path" not in entry


@pytest.mark.parametrize("method, path, status", [
    ("get", "/nowhere", 404), ("get", "/v1/predict", 405), ("put", "/v1/adapters", 405), ("get", "/v1", 404),
])
def test_framework_errors_have_the_error_shape(servers, method, path, status):
    assert_error(getattr(servers["open"], method)(path), status)


@pytest.mark.parametrize("content, status", [
    (b'{"adapter": "a", "inputs": ["\xff\xfe broken"]}', 400),  # invalid UTF-8
    (b"[" * 100_000 + b"]" * 100_000, 400),  # nested beyond the JSON parser's depth
    (b'{"adapter": "a", "inputs": ' + b"[" * 500 + b"]" * 500 + b"}", 422),  # deep but parseable: not an input
    (b'{"adapter": 3, "inputs": ["x"]}', 422),  # validation
    (b'{"adapter": "a", "inputs": ["x"', 400),  # malformed
])
def test_bad_bodies_have_the_error_shape(servers, content, status):
    response = servers["open"].post("/v1/predict", content=content, headers={"content-type": "application/json"})
    assert_error(response, status)


@pytest.mark.parametrize("inputs", SURROGATE_INPUTS)
def test_a_lone_surrogate_is_422_not_500(servers, inputs):
    content = '{"adapter": "a", "inputs": ' + inputs + "}"
    response = servers["open"].post("/v1/predict", content=content.encode(), headers={"content-type": "application/json"})
    assert_error(response, 422, "unicode")
    for name in ('"\\ud800"', '"a\\udc80"'):
        response = servers["open"].post("/v1/predict", content=('{"adapter": ' + name + ', "inputs": ["x"]}').encode(),
                                        headers={"content-type": "application/json"})
        assert_error(response, 422, "unicode")
    assert servers["open"].get("/health").status_code == 200


def test_a_chunked_body_over_the_limit_is_413(servers):
    def chunks():
        yield b'{"adapter": "a", "inputs": ["'
        for _ in range(1200):
            yield b"x" * 1000
        yield b'"]}'

    response = servers["open"].post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413)


# ---- API keys ------------------------------------------------------------------------------------------

def test_a_key_is_required_when_one_is_set(servers):
    anonymous = servers["anonymous"]
    request = {"adapter": "a", "inputs": ["fine"]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS[0]}"},
                    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEYS[0]}x"}):
        response = anonymous.post("/v1/predict", json=request, headers=headers)
        assert_error(response, 401, "api key")
        assert response.headers["www-authenticate"].startswith("Bearer")
    for path in ("/v1/adapters", "/metrics"):
        assert_error(anonymous.get(path), 401)
    for key in KEYS:  # every configured key works; the scheme is case-insensitive
        for scheme in ("Bearer", "bearer"):
            response = anonymous.post("/v1/predict", json=request, headers={"Authorization": f"{scheme} {key}"})
            assert response.status_code == 200, response.text
    # liveness stays open, but says no more than that without a key
    assert anonymous.get("/health").json() == {"status": "ok"}
    assert servers["keyed"].get("/health").json()["adapters"] == 1


def test_admin_endpoints_need_the_key(servers):
    anonymous = servers["anonymous"]
    assert_error(anonymous.post("/v1/adapters", json={"name": "x", "path": "good"}), 401)
    assert_error(anonymous.delete("/v1/adapters/a"), 401)
    assert [a["name"] for a in servers["keyed"].get("/v1/adapters").json()["adapters"]] == ["a"]


def test_docs_only_when_asked(servers):
    assert servers["anonymous"].get("/openapi.json").status_code == 200
    assert servers["anonymous"].get("/docs").status_code == 200
    assert_error(servers["open"].get("/openapi.json"), 404)


# ---- run-time loading: only from under the adapter root ----------------------------------------------

def test_load_and_unload_from_inside_the_root(servers, world):
    keyed = servers["keyed"]
    for path in ("good", str(world["root"] / "good"), "good/../good"):
        response = keyed.post("/v1/adapters", json={"name": "b", "path": path})
        assert response.status_code == 201, response.text
        assert str(world["top"]) not in response.text
        assert keyed.post("/v1/predict", json={"adapter": "b", "inputs": ["fine"]}).status_code == 200
        assert keyed.delete("/v1/adapters/b").status_code == 200


def test_missing_and_forbidden_paths_get_one_answer(servers, world):
    keyed, root, outside = servers["keyed"], world["root"], world["outside"]
    (root / "link").symlink_to(outside / "elsewhere", target_is_directory=True)
    (root / "a-file").write_text("not a folder")
    requests = [
        "missing",  # inside the root, does not exist
        str(root / "missing"),
        str(outside / "elsewhere"),  # a valid run outside the root
        "../outside/elsewhere",  # .. leaving the root
        "good/../../outside/elsewhere",
        "link",  # a symlink inside the root pointing out
        "/etc",
        "a-file",
        "someone/some-adapter",  # a Hub id without --allow-hub
        "",
        "x" * 5000,
    ]
    answers = {path: keyed.post("/v1/adapters", json={"name": "probe", "path": path}) for path in requests}
    first = answers["missing"]
    assert_error(first, 422, "does not exist")
    for path, response in answers.items():
        assert (response.status_code, response.content) == (first.status_code, first.content), path
    assert [a["name"] for a in keyed.get("/v1/adapters").json()["adapters"]] == ["a"]


def _copy_run(world, name: str) -> Path:
    target = world["root"] / name
    shutil.copytree(world["root"] / "good", target)
    return target


def test_a_run_that_points_outside_itself_is_refused(servers, world):
    keyed = servers["keyed"]
    escape = _copy_run(world, "escape")
    manifest = json.loads((escape / "peftlab.json").read_text())
    for adapter_dir in ("../../outside/elsewhere/adapter", str(world["outside"] / "elsewhere" / "adapter")):
        manifest["adapter_dir"] = adapter_dir
        (escape / "peftlab.json").write_text(json.dumps(manifest))
        assert_error(keyed.post("/v1/adapters", json={"name": "escape", "path": "escape"}), 422, "adapter_dir")

    linked = _copy_run(world, "linked-weights")
    weights = linked / "adapter" / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(world["outside"] / "elsewhere" / "adapter" / "adapter_model.safetensors")
    assert_error(keyed.post("/v1/adapters", json={"name": "linked", "path": "linked-weights"}), 422, "outside")


def test_a_config_that_disagrees_with_its_weights_is_refused(servers, world):
    """LoRA tensors under a config saying IA3 (a plain peft folder): refused, not loaded with its weights dropped."""
    folder = world["root"] / "relabelled"
    shutil.copytree(world["root"] / "good" / "adapter", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    body = assert_error(servers["keyed"].post("/v1/adapters", json={"name": "relabelled", "path": "relabelled"}),
                        422, "IA3", "disagree")
    assert "lora_" in body["error"]


def test_a_lone_surrogate_in_a_load_request_is_422(servers):
    content = b'{"name": "\\ud800", "path": "good"}'
    response = servers["keyed"].post("/v1/adapters", content=content, headers={"content-type": "application/json"})
    assert_error(response, 422)


# ---- the command line ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arguments, words", [
    (["--port", "-5"], "--port -5"),
    (["--port", "70000"], "1 to 65535"),
    (["--admin"], "api key"),
    (["--admin", "--api-key", "k"], "--adapter-root"),
    (["--adapter-root", "."], "--admin"),
    (["--allow-hub"], "--admin"),
    (["--admin", "--api-key", "k", "--adapter-root", "/no/such/folder"], "not a folder"),
    (["--api-key", ""], "empty key"),
])
def test_cli_refuses_unsafe_or_invalid_options(arguments, words, capsys, monkeypatch):
    from peftlab.cli import main

    monkeypatch.delenv("PEFTLAB_API_KEY", raising=False)
    assert main(["serve", "--base", "minilm", *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert words.lower() in error.lower(), error


def test_api_keys_from_the_environment():
    from peftlab.errors import PeftlabError
    from peftlab.serving import api_keys_from

    assert api_keys_from(None, {"PEFTLAB_API_KEY": "a1, b2"}) == ["a1", "b2"]
    assert api_keys_from(["flag"], {"PEFTLAB_API_KEY": "env"}) == ["flag"]
    assert api_keys_from(None, {}) == []
    with pytest.raises(PeftlabError, match="PEFTLAB_API_KEY"):
        api_keys_from(None, {"PEFTLAB_API_KEY": "a1,,b2"})


def test_a_public_host_without_a_key_is_warned_about(capsys, tmp_path):
    from peftlab.serving import check_options

    common = dict(port=8000, admin=False, adapter_root=None, allow_hub=False)
    check_options(host="0.0.0.0", api_keys=[], **common)
    assert "without an API key" in capsys.readouterr().err
    for host, keys in (("127.0.0.1", []), ("localhost", []), ("::1", []), ("0.0.0.0", ["k"])):
        check_options(host=host, api_keys=keys, **common)
        assert capsys.readouterr().err == "", host


@pytest.mark.slow
def test_the_serve_command_on_minilm(tmp_path):
    """The real command: minilm, a key, --admin and an adapter root; the same rules hold end to end."""
    import torch
    from peft import LoraConfig, get_peft_model

    from peftlab.artifacts import RunManifest
    from peftlab.models import load_model

    root = tmp_path / "root"
    torch.manual_seed(0)
    model = get_peft_model(load_model("minilm", "seq-cls", label_names=["neg", "pos"]),
                           LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    model.save_pretrained(str(root / "run" / "adapter"))
    RunManifest(method="lora", model="minilm", kind="seq-cls", label_names=["neg", "pos"]).save(root / "run")
    shutil.copytree(root / "run", tmp_path / "outside")
    port = free_port()
    environment = {**os.environ, "PEFTLAB_API_KEY": "secret-key-1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "peftlab.cli", "serve", "--base", "minilm", "--adapter", f"sst2={root / 'run'}",
         "--port", str(port), "--admin", "--adapter-root", str(root)],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None, process.stderr.read()[-2000:]
            assert time.time() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        keyed = {"Authorization": "Bearer secret-key-1"}
        assert_error(httpx.post(url + "/v1/predict", json={"adapter": "sst2", "inputs": ["fine"]}), 401)
        assert httpx.post(url + "/v1/predict", json={"adapter": "sst2", "inputs": ["fine"]}, headers=keyed,
                          timeout=60).status_code == 200
        assert_error(httpx.get(url + "/openapi.json", headers=keyed), 404)  # no --docs
        outside = httpx.post(url + "/v1/adapters", json={"name": "x", "path": str(tmp_path / "outside")},
                             headers=keyed, timeout=60)
        missing = httpx.post(url + "/v1/adapters", json={"name": "x", "path": "missing"}, headers=keyed, timeout=60)
        assert (outside.status_code, outside.content) == (missing.status_code, missing.content)
        loaded = httpx.post(url + "/v1/adapters", json={"name": "again", "path": "run"}, headers=keyed, timeout=60)
        assert loaded.status_code == 201 and str(tmp_path) not in loaded.text
        listing = httpx.get(url + "/v1/adapters", headers=keyed).text
        assert str(tmp_path) not in listing and "minilm" in listing
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---- hosting follows the method's declared facts ------------------------------------------------------

@pytest.fixture
def dora_like():
    """A LoRA variant registered from here that declares what DoRA needs: a group of its own, no mixed batches
    (peft refuses ``adapter_names`` when DoRA is enabled)."""
    from peftlab.methods import register_method, unregister_method
    from peftlab.methods.base import ServingFacts
    from peftlab.methods.lora import LoRA

    class DoraLike(LoRA):
        name = "dora-like-test"

        def serving_facts(self):
            return ServingFacts(mode="peft", group="LORA-DORA", mixed_batch=False, note="weight-decomposed LoRA")

    register_method(DoraLike)
    yield DoraLike.name
    unregister_method(DoraLike.name)


def test_a_method_that_cannot_mix_batches_never_shares_a_forward(world, dora_like, tmp_path):
    from peftlab.inference import load_trained, predict
    from peftlab.serving import build
    from peftlab.serving.engine import Control, Job

    runs = {name: save_lora_run(world["base"], tmp_path / name, seed=seed, method=dora_like, use_dora=True)
            for name, seed in (("d1", 3), ("d2", 4))}
    engine = build(str(world["base"]), {"a": str(world["root"] / "good"), **{n: str(p) for n, p in runs.items()}})
    try:
        info = {entry["name"]: entry for entry in engine.adapters()}
        assert info["d1"]["group"] == info["d2"]["group"] != info["a"]["group"]  # DoRA adapters share their own group
        assert info["a"]["mixed_batching"] and not info["d1"]["mixed_batching"]
        assert "weight-decomposed LoRA" in info["d1"]["notes"]
        texts = ["a fine film", "dull", "the plot is thin"]
        expected = {name: predict(load_trained(run, device="cpu"), texts) for name, run in runs.items()}
        gate = threading.Event()
        engine._queue.put(Control(lambda: gate.wait(30)))  # hold the worker so the three requests batch together
        jobs = [Job(entry=engine.entry(name), op="predict", records=[{"text": t, "text_pair": None} for t in texts],
                    raw=texts) for name in ("d1", "d2", "a", "d1")]
        futures = [engine.submit(job) for job in jobs]
        gate.set()
        answers = [future.result(timeout=60) for future in futures]
        assert engine.metrics()["batching"]["mixed_adapter_batches"] == 0
        for name, answer in zip(("d1", "d2", "a", "d1"), answers):
            if name in expected:
                for got, reference in zip(answer, expected[name]):
                    assert got["label"] == reference["label"]
                    assert got["probabilities"]["pos"] == pytest.approx(reference["probabilities"]["pos"], abs=1e-5)
    finally:
        engine.stop()


def test_a_quantised_base_method_is_served_on_the_full_precision_base(world, tmp_path):
    """QLoRA declares quantized_base: its adapter loads through the unquantised method of its peft type, joins
    the LoRA group and answers as that LoRA adapter does; its note says so."""
    from peftlab.inference import load_trained, predict
    from peftlab.methods import get_method_class, method_names
    from peftlab.serving import build
    from peftlab.serving.engine import Job

    quantised = next(name for name in method_names() if get_method_class(name).quantized_base)
    run = save_lora_run(world["base"], tmp_path / "q", seed=5, method=quantised)
    plain = save_lora_run(world["base"], tmp_path / "p", seed=5)  # the same weights as a plain LoRA run
    engine = build(str(world["base"]), {"a": str(world["root"] / "good"), "q": str(run)})
    try:
        info = {entry["name"]: entry for entry in engine.adapters()}
        assert info["q"]["group"] == info["a"]["group"] and info["q"]["mixed_batching"]
        assert any("full-precision" in note for note in info["q"]["notes"])
        texts = ["a fine film", "dull"]
        job = Job(entry=engine.entry("q"), op="predict", records=[{"text": t, "text_pair": None} for t in texts],
                  raw=texts)
        answer = engine.submit(job).result(timeout=60)
        for got, reference in zip(answer, predict(load_trained(plain, device="cpu"), texts)):
            assert got["probabilities"]["pos"] == pytest.approx(reference["probabilities"]["pos"], abs=1e-5)
    finally:
        engine.stop()


def test_hub_ids_load_only_with_allow_hub(world, monkeypatch, tmp_path):
    """With allow_hub an owner/name is fetched (here: a stand-in for huggingface_hub that copies a folder) into
    plain files and checked like any folder; without it, or when the fetch fails, the one not-found answer."""
    import huggingface_hub

    from peftlab.serving.adapters import NotFoundOrNotAllowed, locate

    fetched = []

    def fake_snapshot_download(repo_id, allow_patterns=None, local_dir=None, **_):
        if repo_id != "someone/good-adapter":
            raise huggingface_hub.errors.RepositoryNotFoundError("no such repository")
        fetched.append((repo_id, allow_patterns))
        shutil.copytree(world["root"] / "good" / "adapter", local_dir, dirs_exist_ok=True)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(NotFoundOrNotAllowed):
        locate("someone/good-adapter", root=world["root"], allow_hub=False)
    with pytest.raises(NotFoundOrNotAllowed) as missing:
        locate("someone/missing", root=None, allow_hub=True)
    folder = locate("someone/good-adapter", root=None, allow_hub=True)
    assert fetched == [("someone/good-adapter", ["*.json", "*.safetensors"])]
    assert str(missing.value) == str(NotFoundOrNotAllowed())
    from peftlab.adapter_check import check_adapter

    checked = check_adapter(folder, base_model=str(world["base"]))
    assert checked.peft_type == "LORA" and not checked.from_run
