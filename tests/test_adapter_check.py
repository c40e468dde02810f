"""peftlab.adapter_check.check_adapter: the one file-level check of an adapter folder (serve uses it; eval,
predict, merge and export are meant to). Tiny BERT folders saved by peft and by peftlab's own methods; every
refusal is one sentence whose ``reason`` names no path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tiny import tiny_bert


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base/ plus one good folder per format: peft run (LoRA, IA3, prompt tuning), plain peft folder,
    peftlab's own format (BitFit), full fine-tune, merged model."""
    import transformers
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model

    from peftlab.artifacts import RunManifest
    from peftlab.methods import get_method

    top = tmp_path_factory.mktemp("adapter-check")
    base = top / "base"
    tiny_bert("seq-cls").save_pretrained(str(base))
    made = {"base": base}
    for name, method, config in (
            ("lora", "lora", LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"])),
            ("ia3", "ia3", IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                                     feedforward_modules=["output.dense"])),
            ("prompt", "prompt-tuning", PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))):
        run = top / name
        model = transformers.BertForSequenceClassification.from_pretrained(str(base))  # records where its base is
        get_peft_model(model, config).save_pretrained(str(run / "adapter"))
        RunManifest(method=method, model=str(base), kind="seq-cls", label_names=["no", "yes"]).save(run)
        made[name] = run
    made["plain"] = made["lora"] / "adapter"
    for name in ("bitfit", "full"):
        method = get_method(name)
        run = top / name
        method.save(method.apply(tiny_bert("seq-cls"), "seq-cls"), run / "adapter")
        RunManifest(method=name, model=str(base), kind="seq-cls", label_names=["no", "yes"]).save(run)
        made[name] = run
    merged = top / "merged"
    tiny_bert("seq-cls").save_pretrained(str(merged))
    (merged / "peftlab_merge.json").write_text(json.dumps({"kind": "seq-cls", "model": str(base), "method": "lora",
                                                           "label_names": ["no", "yes"], "task": "sst2"}))
    made["merged"] = merged
    return made


def copy(folders, name: str, tmp_path: Path) -> Path:
    target = tmp_path / f"copy-of-{name}"
    shutil.copytree(folders[name], target, symlinks=True)
    return target


def refused(path, *words, **options) -> str:
    from peftlab.adapter_check import AdapterRefused, check_adapter

    with pytest.raises(AdapterRefused) as caught:
        check_adapter(path, **options)
    reason = caught.value.reason
    for word in words:
        assert word.lower() in reason.lower(), (word, reason)
    assert "/" + Path(str(path)).parts[1] + "/" not in reason, reason  # no absolute path in the reason
    assert str(path) in str(caught.value)  # the command line names the folder
    return reason


@pytest.mark.parametrize("name, method, peft_type, merged", [
    ("lora", "lora", "LORA", False), ("ia3", "ia3", "IA3", False), ("prompt", "prompt-tuning", "PROMPT_TUNING", False),
    ("plain", "lora", "LORA", False), ("bitfit", "bitfit", None, False), ("full", "full", None, False),
    ("merged", "merged", None, True),
])
def test_good_folders_pass(folders, name, method, peft_type, merged):
    from peftlab.adapter_check import check_adapter

    checked = check_adapter(folders[name], base_model=str(folders["base"]))
    assert (checked.method_name, checked.peft_type, checked.merged) == (method, peft_type, merged)
    assert checked.kind == "seq-cls" and checked.n_outputs == 2 and checked.parameters > 0
    assert all(path.suffix == ".safetensors" for path in checked.weights)
    assert checked.adapter_dir == checked.adapter_dir.resolve()


def test_what_is_not_an_adapter(folders, tmp_path):
    refused(tmp_path / "missing", "no such folder")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "neither a peftlab run folder")
    (tmp_path / "a-file").write_text("x")
    refused(tmp_path / "a-file", "no such folder")


def test_manifest_problems(folders, tmp_path):
    run = copy(folders, "lora", tmp_path)
    manifest = run / "peftlab.json"
    good = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    refused(run, "peftlab.json", "not valid JSON")
    manifest.write_text(json.dumps({**good, "method": "no-such-method"}))
    refused(run, "no-such-method")
    manifest.write_text(json.dumps({**good, "surprise": 1}))
    refused(run, "not a valid run manifest")
    manifest.write_text(json.dumps({**good, "kind": "poetry"}))
    refused(run, "poetry")
    manifest.write_text(json.dumps({**good, "method_options": {"r": "eight"}}))
    refused(run, "'r'")
    manifest.write_text(json.dumps({**good, "label_names": "yes"}))
    refused(run, "label_names")
    manifest.write_text(json.dumps({**good, "max_length": "long"}))
    refused(run, "max_length")
    for adapter_dir in ("../lora/adapter", str(folders["lora"] / "adapter"), ""):
        manifest.write_text(json.dumps({**good, "adapter_dir": adapter_dir}))
        reason = refused(run, "adapter_dir", "inside the run folder")
        assert str(folders["lora"]) not in reason
    manifest.write_text(json.dumps({**good, "adapter_dir": "elsewhere"}))
    (run / "elsewhere").symlink_to(folders["ia3"] / "adapter", target_is_directory=True)
    refused(run, "leads outside")


def test_peft_type_must_agree_with_the_manifest_and_the_weights(folders, tmp_path):
    run = copy(folders, "lora", tmp_path)
    config_path = run / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    refused(run, "says peft_type 'IA3'", "'lora' run")
    # a plain peft folder has no manifest: the tensor names give it away
    plain = copy(folders, "plain", tmp_path)
    (plain / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    refused(plain, "IA3", "'lora_' tensors", "disagree")
    (plain / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PROMPT_TUNING"}))
    refused(plain, "PROMPT_TUNING", "disagree")
    prompt = copy(folders, "prompt", tmp_path)
    shutil.copy(folders["lora"] / "adapter" / "adapter_model.safetensors", prompt / "adapter" / "adapter_model.safetensors")
    refused(prompt, "PROMPT_TUNING", "disagree")


def test_weights_must_be_whole_safetensors(folders, tmp_path):
    run = copy(folders, "lora", tmp_path)
    weights = run / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-7])
    refused(run, "safetensors", "incomplete")
    weights.write_bytes(data + b"extra")
    refused(run, "incomplete")
    weights.write_bytes(b"not a safetensors file at all")
    refused(run, "not a readable safetensors file")
    weights.unlink()
    refused(run, "has no adapter_model.safetensors")
    run = copy(folders, "lora", tmp_path / "pickled")
    (run / "adapter" / "optimizer.pt").write_bytes(b"\x80\x04K\x01.")
    refused(run, "pickle", "optimizer.pt")
    run = copy(folders, "full", tmp_path)
    (run / "adapter" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    refused(run, "missing", "model-00001-of-00002.safetensors")


def test_custom_code_is_refused(folders, tmp_path):
    run = copy(folders, "lora", tmp_path)
    config_path = run / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "auto_mapping": {"base_model_class": "X"}}))
    refused(run, "custom code")
    merged = copy(folders, "merged", tmp_path)
    config = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.Model"}}))
    refused(merged, "custom code")


def test_the_base_model_must_match(folders, tmp_path):
    from peftlab.adapter_check import check_adapter

    other = tmp_path / "other-base"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name in ("lora", "bitfit", "full", "merged"):
        reason = refused(folders[name], "base", base_model=str(other))
        assert "other-base" in reason or "llama" in reason
    refused(folders["plain"], "'base'", base_model="bert-base-uncased")  # a local folder shown by its last name
    check_adapter(folders["lora"])  # without a base there is nothing to compare


def test_a_classification_adapter_needs_a_head(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    plain = copy(folders, "plain", tmp_path)
    weights = plain / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if "classifier" not in k}, str(weights))
    refused(plain, "no trained classification head")
