"""peftlab push / merge --push: offline it stops in one sentence within seconds; what would go up is a folder
that loads with plain peft and with peftlab, with its card (the upload itself is stood in for: no Hub here)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from peftlab import hub
from peftlab.cli import main
from peftlab.errors import PeftlabError


def lora_run(root: Path) -> tuple[Path, Path]:
    """(tiny BERT base folder, a peftlab run folder with a LoRA adapter and metrics over it)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from peftlab.artifacts import RunManifest
    from peftlab.models import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     num_labels=2)
    base = root / "base"
    transformers.BertForSequenceClassification(config).save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    run = root / "run"
    model = get_peft_model(transformers.BertForSequenceClassification.from_pretrained(str(base)),
                           LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                      init_lora_weights=False))
    model.save_pretrained(str(run / "adapter"))
    RunManifest(method="lora", model=str(base), kind="seq-cls", task="sst2", label_names=["neg", "pos"],
                max_length=32).save(run)
    (run / "metrics.json").write_text(json.dumps({"metrics": {"accuracy": 0.75}, "epochs": 1.0, "device": "cpu"}))
    return base, run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return lora_run(tmp_path_factory.mktemp("push"))


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again on return: nothing listens there


def test_offline_push_is_one_sentence_within_seconds(world, monkeypatch, capsys):
    _, run = world
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    assert main(["push", "--adapter", str(run), "--repo", "me/lora-tiny"]) == 2
    assert time.monotonic() - started < 10
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "offline" in error.lower() and "HF_HUB_OFFLINE" in error


def test_no_network_is_one_sentence_within_seconds(world, monkeypatch, capsys):
    from huggingface_hub import constants

    _, run = world
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # loopback: a port nobody listens on
    started = time.monotonic()
    assert main(["push", "--adapter", str(run), "--repo", "me/lora-tiny", "--private"]) == 2
    assert time.monotonic() - started < 10
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "cannot be reached" in error


def test_merge_push_checks_the_hub_before_merging(world, monkeypatch, tmp_path, capsys):
    _, run = world
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["merge", "--adapter", str(run), "--output", str(tmp_path / "merged"), "--push", "me/merged"]) == 2
    assert "offline" in capsys.readouterr().err.lower()
    assert not (tmp_path / "merged").exists()  # nothing merged: the check came first


@pytest.mark.parametrize("repo", ["no-slash", "a/b/c", "me/../x", "", "me/name.git", "-x/y"])
def test_bad_repo_ids(repo):
    with pytest.raises(PeftlabError, match="ORG/NAME"):
        hub.check_repo_id(repo)


def test_the_uploaded_folder_loads_with_peft_and_with_peftlab(world, tmp_path):
    import torch
    import transformers
    from huggingface_hub import ModelCard
    from peft import PeftModel

    from peftlab.adapter_check import check_adapter
    from peftlab.inference import load_trained, predict

    base, run = world
    folder = hub.stage(check_adapter(run), tmp_path / "upload", "me/lora-tiny")
    names = sorted(p.name for p in folder.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "peftlab.json", "metrics.json", "README.md"} <= set(names)
    assert json.loads((folder / "peftlab.json").read_text())["adapter_dir"] == "."
    card = ModelCard.load(folder / "README.md")
    assert 'PeftModel.from_pretrained(base, "me/lora-tiny")' in card.text
    assert card.data.eval_results[0].metric_value == pytest.approx(0.75)
    # plain peft, as the card says
    plain = PeftModel.from_pretrained(transformers.BertForSequenceClassification.from_pretrained(str(base)), str(folder))
    # peftlab keeps the labels and task
    loaded = load_trained(folder, device="cpu")
    assert loaded.manifest.label_names == ["neg", "pos"] and loaded.manifest.task == "sst2"
    reference = load_trained(run, device="cpu")
    texts = ["fine", "not fine at all"]
    assert [r["probabilities"] for r in predict(loaded, texts)] == [r["probabilities"] for r in predict(reference, texts)]
    with torch.no_grad():
        inputs = loaded.tokenizer(texts, return_tensors="pt", padding=True)
        assert torch.allclose(plain.eval()(**inputs).logits, loaded.model(**inputs).logits, atol=1e-6)


def test_push_creates_the_repo_and_uploads_the_staged_folder(world, monkeypatch):
    """The calls to huggingface_hub, with a loopback listener standing in for the Hub's address."""
    from huggingface_hub import HfApi, constants

    _, run = world
    calls = {}

    def create_repo(self, repo_id, **options):
        calls["create"] = (repo_id, options)
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, **options):
        calls["files"] = sorted(p.name for p in Path(options["folder_path"]).iterdir())
        calls["upload"] = options

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        url = hub.push(run, "me/lora-tiny", private=True, quiet=True)
    finally:
        listener.close()
    assert url == "https://hub.example/me/lora-tiny"
    assert calls["create"] == ("me/lora-tiny", {"private": True, "exist_ok": True})
    assert calls["upload"]["repo_id"] == "me/lora-tiny"
    assert "README.md" in calls["files"] and "adapter_model.safetensors" in calls["files"]


def test_a_merged_model_gets_a_card(world, tmp_path):
    from huggingface_hub import ModelCard

    from peftlab.merge import merge

    _, run = world
    merge(run, tmp_path / "merged", samples=2, quiet=True)
    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert card.data.to_dict()["library_name"] == "transformers" and "lora" in card.data.tags
    assert card.data.eval_results[0].metric_value == pytest.approx(0.75)
    from peftlab.adapter_check import check_adapter

    staged = hub.stage(check_adapter(tmp_path / "merged"), tmp_path / "upload", "me/merged")
    report = json.loads((staged / "peftlab_merge.json").read_text())
    assert str(tmp_path) not in json.dumps(report)  # no local paths go to the Hub
    assert "me/merged" in (staged / "README.md").read_text()


def test_serve_loads_a_pushed_adapter_by_repo_id(world, tmp_path, monkeypatch):
    """serve --adapter NAME=ORG/NAME: the pushed layout, fetched (a stand-in for snapshot_download), served."""
    import shutil

    import huggingface_hub

    from peftlab.adapter_check import check_adapter
    from peftlab.serving import build

    base, run = world
    hub_copy = hub.stage(check_adapter(run), tmp_path / "on-the-hub", "me/lora-tiny")
    fetched = []

    def fake_snapshot_download(repo_id, allow_patterns=None, local_dir=None, **_):
        fetched.append(repo_id)
        shutil.copytree(hub_copy, local_dir, dirs_exist_ok=True)
        return local_dir

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    engine = build(str(base), {"tiny": "me/lora-tiny"})
    try:
        (info,) = engine.adapters()
        assert fetched == ["me/lora-tiny"] and info["name"] == "tiny" and info["labels"] == ["neg", "pos"]
    finally:
        engine.stop()


def test_serve_with_an_unreachable_repo_id_is_one_sentence(world, monkeypatch, capsys):
    base, _ = world
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["serve", "--base", str(base), "--adapter", "x=me/not-here-at-all"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "me/not-here-at-all" in error and "HF_HUB_OFFLINE" in error


def test_predict_and_merge_take_a_pushed_adapter_by_repo_id(world, tmp_path, monkeypatch):
    """eval/predict/merge accept ORG/NAME wherever a folder works (a stand-in for snapshot_download)."""
    import shutil

    import huggingface_hub

    import peftlab
    from peftlab.adapter_check import check_adapter
    from peftlab.merge import merge

    base, run = world
    hub_copy = hub.stage(check_adapter(run), tmp_path / "on-the-hub", "me/lora-tiny")

    def fake_snapshot_download(repo_id, allow_patterns=None, local_dir=None, **_):
        shutil.copytree(hub_copy, local_dir, dirs_exist_ok=True)
        return local_dir

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    by_id = peftlab.predict("me/lora-tiny", ["a gripping, funny film"])
    by_folder = peftlab.predict(str(run), ["a gripping, funny film"])
    assert by_id == by_folder and by_id[0]["label"] in ("neg", "pos")
    report = merge("me/lora-tiny", tmp_path / "merged", samples=2, quiet=True)
    assert report["method"] == "lora" and (tmp_path / "merged" / "config.json").is_file()
