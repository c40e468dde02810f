"""peftlab merge and peftlab export on tiny real runs (minilm, a few SST-2 / CoNLL steps, shared per session)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TEXTS = ["a gripping, funny and beautifully acted film", "the plot is thin and the jokes fall flat", "meh"]


def trained_run(tmp_path_factory, data_dir, method: str, task: str = "sst2") -> Path:
    """A tiny peftlab training run, cached for the whole session (test_serve.py uses the same cache)."""
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
    return {method: trained_run(tmp_path_factory, data_dir, method)
            for method in ("lora", "ia3", "bitfit", "prompt-tuning")}


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory, data_dir):
    """lora, ia3 and bitfit merged once (the API; the CLI path has its own test)."""
    from peftlab.merge import merge

    root = tmp_path_factory.mktemp("merged")
    return {method: (merge(runs[method], root / method, data_dir=str(data_dir), quiet=True), root / method)
            for method in ("lora", "ia3", "bitfit")}


# ---- merge ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit"])
def test_merge_reproduces_the_adapter(merged, runs, method):
    report, folder = merged[method]
    assert report["max_abs_diff"] <= 1e-4 and report["samples"] == 16 and "sst2 dev" in report["sample_source"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "peftlab_merge.json"} <= set(os.listdir(folder))
    assert not any(name.endswith((".bin", ".pt")) or name.startswith("adapter") for name in os.listdir(folder))
    written = json.loads((folder / "peftlab_merge.json").read_text())
    assert written["source_adapter"] == str(Path(runs[method]).resolve())
    assert written["method"] == method and written["max_abs_diff"] == report["max_abs_diff"]
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"} and "quantization_config" not in config


def test_merged_model_loads_with_plain_transformers(merged, runs, tmp_path):
    """A fresh interpreter (-I -S) whose site-packages lack peft and peftlab loads the merged folder."""
    import transformers

    from peftlab.inference import load_trained, predict

    site = Path(transformers.__file__).resolve().parents[1]
    shadow = tmp_path / "site-packages"
    shadow.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name in ("peft", "peftlab") or name.startswith(("peft-", "peftlab-", "__editable__")) or name.endswith(".pth"):
            continue
        (shadow / entry.name).symlink_to(entry)
    folder = merged["lora"][1]
    script = f"""
import importlib.util, json, sys
sys.path.insert(0, {str(shadow)!r})
assert importlib.util.find_spec("peft") is None and importlib.util.find_spec("peftlab") is None
import torch, transformers
model = transformers.AutoModelForSequenceClassification.from_pretrained({str(folder)!r})
tokenizer = transformers.AutoTokenizer.from_pretrained({str(folder)!r})
with torch.no_grad():
    logits = model(**tokenizer({TEXTS!r}, padding=True, truncation=True, return_tensors="pt")).logits
assert "peft" not in sys.modules and "peftlab" not in sys.modules
print(json.dumps({{"id2label": model.config.id2label, "probabilities": logits.softmax(-1).tolist()}}))
"""
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["id2label"] == {"0": "negative", "1": "positive"}
    expected = predict(load_trained(runs["lora"], device="cpu"), TEXTS)
    for row, reference in zip(payload["probabilities"], expected):
        assert row == pytest.approx([reference["probabilities"]["negative"], reference["probabilities"]["positive"]],
                                    abs=1e-5)


def test_merge_cli_prints_the_difference(runs, tmp_path, capsys, data_dir):
    from peftlab.cli import main

    out = tmp_path / "cli-merged"
    assert main(["merge", "--adapter", str(runs["ia3"]), "--output", str(out), "--samples", "4"]) == 0
    printed = capsys.readouterr().out
    assert "max |merged - unmerged|" in printed and "from_pretrained" in printed
    report = json.loads((out / "peftlab_merge.json").read_text())
    assert report["samples"] == 4
    # the tolerance is relative to the outputs' scale (at least 1): allowed = 1e-4 x max(1, max |logit|)
    assert report["output_scale"] >= 1 and report["allowed_abs_diff"] == pytest.approx(1e-4 * report["output_scale"])
    assert report["max_abs_diff"] <= report["allowed_abs_diff"]


def test_merge_fails_above_the_tolerance(runs, tmp_path, capsys, monkeypatch):
    """A merge that changes the function (here: a nudged head bias) is caught and nothing is written."""
    import torch

    import peftlab.merge
    from peftlab.cli import main

    original = peftlab.merge.merged_model

    def nudged(loaded):
        model = original(loaded)
        with torch.no_grad():
            model.classifier.bias.add_(1e-2)
        return model

    monkeypatch.setattr(peftlab.merge, "merged_model", nudged)
    out = tmp_path / "strict"
    assert main(["merge", "--adapter", str(runs["lora"]), "--output", str(out), "--samples", "4"]) == 2
    error = capsys.readouterr().err
    assert "above the tolerance" in error and "Traceback" not in error
    assert not out.exists() and not list(tmp_path.glob(".strict*"))


def _fake_run(root: Path, method: str) -> Path:
    """A run folder whose manifest names a method (merge refuses before reading any weights)."""
    from peftlab.artifacts import RunManifest

    root.mkdir(parents=True)
    (root / "adapter").mkdir()
    RunManifest(method=method, model="minilm", kind="seq-cls", task="sst2", label_names=["0", "1"]).save(root)
    return root


@pytest.mark.parametrize("method", ["adapter", "prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2"])
def test_merge_refuses_non_mergeable_methods_in_one_sentence(runs, tmp_path, capsys, method):
    from peftlab.cli import main

    adapter = runs[method] if method in runs else _fake_run(tmp_path / method, method)
    code = main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in error
    assert len(error.splitlines()) == 1 and error.count(". ") == 0, error
    assert f"'{method}' cannot be merged" in error and "peftlab serve" in error and "peftlab export" in error
    assert not (tmp_path / "out").exists()


# ---- export ------------------------------------------------------------------------------------------------

def _ort_vs_torch(onnx_file: Path, torch_model, tokenizer, texts, per_token=False) -> float:
    """Independent check: onnxruntime vs the PyTorch model on a batch shape the export never saw."""
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if per_token:
        encoded = tokenizer([t.split() for t in texts], is_split_into_words=True, padding=True, return_tensors="pt")
    else:
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
    got = session.run(["logits"], {n: encoded[n].numpy() for n in names})[0]
    with torch.no_grad():
        expected = torch_model(**{n: encoded[n] for n in names}).logits.numpy()
    if per_token:
        mask = encoded["attention_mask"].numpy().astype(bool)
        return float(np.abs(got - expected)[mask].max())
    return float(np.abs(got - expected).max())


def _symbolic_axes(onnx_file: Path) -> list[list[str]]:
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    return [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input]


def test_export_merged_model_folder_with_int8(merged, tmp_path, data_dir):
    import transformers

    from peftlab.export import export

    folder = merged["lora"][1]
    out = tmp_path / "onnx"
    report = export(model=str(folder), output=str(out), quantize="int8", data_dir=str(data_dir),
                    max_eval_samples=64, quiet=True)
    assert report["verification"]["max_abs_diff"] <= 1e-4 and report["verification"]["tolerance"] == 1e-4
    assert report["merged"] and report["kind"] == "seq-cls" and report["inputs"][:2] == ["input_ids", "attention_mask"]
    assert all(dims == ["batch", "sequence"] for dims in _symbolic_axes(out / "model.onnx"))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))  # the tokenizer ships beside the graph
    texts = TEXTS + ["one more, somewhat longer review of a film that nobody saw", "ok"]
    assert _ort_vs_torch(out / "model.onnx", model, tokenizer, texts) <= 1e-4

    quant = report["quantization"]
    assert quant["eval_examples"] == 64 and quant["metric_name"] == "accuracy"
    assert 0.0 <= quant["int8_metric"] <= 1.0 and 0.0 <= quant["fp32_metric"] <= 1.0
    assert quant["int8_bytes"] < 0.5 * quant["fp32_bytes"] and 0.0 <= quant["prediction_agreement"] <= 1.0
    assert quant["int8_bytes"] == (out / "model.int8.onnx").stat().st_size
    assert json.loads((out / "export_report.json").read_text())["quantization"]["int8_metric"] == quant["int8_metric"]


def test_export_adapter_merges_first(runs, tmp_path, data_dir):
    from peftlab.export import export

    report = export(adapter=str(runs["ia3"]), output=str(tmp_path / "ia3"), data_dir=str(data_dir), quiet=True)
    assert report["merged"] and report["method"] == "ia3" and report["verification"]["max_abs_diff"] <= 1e-4
    assert "quantization" not in report and not (tmp_path / "ia3" / "model.int8.onnx").exists()


def test_export_token_classification(tmp_path_factory, tmp_path, data_dir):
    import transformers

    from peftlab.export import export
    from peftlab.merge import merge

    run = trained_run(tmp_path_factory, data_dir, "lora", "conll2003")
    folder = tmp_path / "merged-ner"
    merge(run, folder, samples=4, data_dir=str(data_dir), quiet=True)
    report = export(model=str(folder), output=str(tmp_path / "ner"), data_dir=str(data_dir), quiet=True)
    assert report["kind"] == "token-cls" and report["dynamic_axes"]["logits"] == {0: "batch", 1: "sequence"}
    assert report["verification"]["max_abs_diff"] <= 1e-4
    model = transformers.AutoModelForTokenClassification.from_pretrained(str(folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    texts = ["John Smith lives in New York", "EU rejects German call", "Peter"]
    assert _ort_vs_torch(tmp_path / "ner" / "model.onnx", model, tokenizer, texts, per_token=True) <= 1e-4


def test_export_unmerged_prompt_tuning(runs, tmp_path, data_dir):
    """Not mergeable: exported through peft's forward, verified like any other graph (or refused clearly)."""
    from peftlab.errors import PeftlabError
    from peftlab.export import export

    try:
        report = export(adapter=str(runs["prompt-tuning"]), output=str(tmp_path / "pt"), data_dir=str(data_dir),
                        quiet=True)
    except PeftlabError as error:
        assert "prompt-tuning" in str(error) and "peftlab serve" in str(error)
        return
    assert not report["merged"] and report["verification"]["max_abs_diff"] <= 1e-4


def test_export_cli_errors(tmp_path, capsys):
    from peftlab.cli import main

    assert main(["export", "--model", str(tmp_path / "nothing"), "--output", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
