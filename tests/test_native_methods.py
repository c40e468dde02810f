"""The methods peftlab implements itself: bottleneck adapters, BitFit and full fine-tuning.

Every (method, tiny architecture) cell: training moves exactly the trainable tensors, the trainable
count equals the paper formula, save -> load into a fresh base reproduces the outputs, merge gives a
plain transformers model, generate() works, and a tampered weights file is refused.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import tiny
from peftlab.errors import PeftlabError
from peftlab.methods import get_method, get_method_class
from peftlab.methods.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterLayer
from peftlab.methods.base import count_parameters


CASES = {
    "bert-seq-cls": (tiny.tiny_bert, "seq-cls"),
    "bert-token-cls": (tiny.tiny_bert, "token-cls"),
    "gpt2-causal-lm": (tiny.tiny_gpt2, "causal-lm"),
    "llama-causal-lm": (tiny.tiny_llama, "causal-lm"),
    "t5-seq2seq": (tiny.tiny_t5, "seq2seq"),
}
SUPPORTED = {
    "adapter": list(CASES),
    "bitfit": ["bert-seq-cls", "bert-token-cls", "gpt2-causal-lm"],  # Llama and T5 have no biases
    "full": list(CASES),
}
CELLS = [(method, case) for method, cases in SUPPORTED.items() for case in cases]
GENERATIVE = {"gpt2-causal-lm", "llama-causal-lm", "t5-seq2seq"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine threads spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cell_id(cell):
    return f"{cell[0]}-{cell[1]}"


def build(case: str):
    builder, kind = CASES[case]
    return builder(kind)


def logits(model, case: str) -> torch.Tensor:
    _, kind = CASES[case]
    model.eval()
    with torch.no_grad():
        return model(**tiny.batch_for(model, kind, seed=123)).logits


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@functools.cache
def trained(method_name: str, case: str) -> SimpleNamespace:
    """Apply the method to a seed-built tiny model and take a few AdamW steps (cached per cell)."""
    _, kind = CASES[case]
    torch.manual_seed(0)
    method = get_method(method_name)
    base_logits = logits(build(case), case)
    model = method.apply(build(case), kind)
    applied_logits = logits(model, case)
    before = snapshot(model)
    # every parameter goes to the optimiser: frozen ones must stay put because they get no gradient
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(3):
        loss = model(**tiny.batch_for(model, kind, seed=step)).loss
        loss.backward()
        frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen_with_grad, frozen_with_grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return SimpleNamespace(method=method, model=model, kind=kind, before=before, base_logits=base_logits,
                           applied_logits=applied_logits, logits=logits(model, case))


# ---- (a) training moves every trainable tensor and no frozen one -----------------------------------

@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_training_changes_exactly_the_trainable_tensors(cell):
    run = trained(*cell)
    after = dict(run.model.named_parameters())
    assert set(after) == set(run.before)
    unchanged_trainable = [n for n, p in after.items() if p.requires_grad and torch.equal(p, run.before[n])]
    changed_frozen = [n for n, p in after.items() if not p.requires_grad and not torch.equal(p, run.before[n])]
    assert not unchanged_trainable, unchanged_trainable
    assert not changed_frozen, changed_frozen
    assert not torch.allclose(run.logits, run.base_logits)


@pytest.mark.parametrize("case", ["bert-seq-cls", "bert-token-cls"])
@pytest.mark.parametrize("method_name", ["adapter", "bitfit", "full"])
def test_classification_head_always_trains(method_name, case):
    model = trained(method_name, case).model
    assert all(p.requires_grad for p in model.classifier.parameters())


def test_bitfit_trains_only_biases_and_head():
    model = trained("bitfit", "bert-seq-cls").model
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in model.named_parameters() if n.endswith(".bias") or n.startswith("classifier.")}
    assert "bert.encoder.layer.0.attention.output.LayerNorm.bias" in names  # layer-norm biases are biases too


# ---- (b) the trainable count is the paper's formula -----------------------------------------------

@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_trainable_count_matches_formula(cell):
    run = trained(*cell)
    assert count_parameters(run.model)[0] == run.method.trainable_parameters_formula(run.model, run.kind)


def test_adapter_formula_by_hand():
    # tiny BERT: d = 32, m = 32 // 16 = 2, 2 layers, 2 adapters per layer; seq-cls head 32·2 + 2
    d, m, layers = 32, 2, 2
    model = get_method("adapter").apply(tiny.tiny_bert("seq-cls"), "seq-cls")
    assert get_method("adapter").trainable_parameters_formula(model, "seq-cls") == \
        layers * 2 * (2 * d * m + d + m) + (d * 2 + 2)
    # T5 counts encoder and decoder layers; causal/seq2seq models have no new head
    t5 = get_method("adapter").apply(tiny.tiny_t5(), "seq2seq")
    assert count_parameters(t5)[0] == (2 + 2) * 2 * (2 * d * m + d + m)


@pytest.mark.parametrize("case", ["bert-seq-cls", "t5-seq2seq", "llama-causal-lm"])
def test_pfeiffer_variant_is_ffn_only(case):
    _, kind = CASES[case]
    houlsby = get_method("adapter").apply(build(case), kind)
    method = get_method("adapter", variant="pfeiffer", reduction_factor=8, non_linearity="gelu")
    model = method.apply(build(case), kind)
    injected = method.injected_modules(model)
    assert len(injected) * 2 == len(get_method("adapter").injected_modules(houlsby))
    assert count_parameters(model)[0] == method.trainable_parameters_formula(model, kind)


def test_adapter_injection_sites():
    bert = get_method("adapter").apply(tiny.tiny_bert("seq-cls"), "seq-cls")
    layer = bert.bert.encoder.layer[0]
    assert isinstance(layer.attention.output.dense, AdapterLayer)  # before dropout + residual + LayerNorm
    assert isinstance(layer.output.dense, AdapterLayer)
    assert not isinstance(layer.intermediate.dense, AdapterLayer)
    gpt2 = get_method("adapter").apply(tiny.tiny_gpt2(), "causal-lm")
    assert type(gpt2.transformer.h[0].attn.c_proj.base_layer).__name__ == "Conv1D"
    assert isinstance(gpt2.transformer.h[1].mlp.c_proj, AdapterLayer)
    llama = get_method("adapter").apply(tiny.tiny_llama(), "causal-lm")
    assert isinstance(llama.model.layers[1].self_attn.o_proj, AdapterLayer)
    assert isinstance(llama.model.layers[1].mlp.down_proj, AdapterLayer)
    t5 = get_method("adapter").apply(tiny.tiny_t5(), "seq2seq")
    ffn = t5.decoder.block[1].layer[2].DenseReluDense
    assert isinstance(ffn.wo, AdapterLayer) and ffn.wo.weight is ffn.wo.base_layer.weight  # T5 reads wo.weight
    assert isinstance(t5.encoder.block[0].layer[0].SelfAttention.o, AdapterLayer)
    assert not isinstance(t5.decoder.block[0].layer[1].EncDecAttention.o, AdapterLayer)


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_starts_as_identity(case):
    run = trained("adapter", case)
    torch.testing.assert_close(run.applied_logits, run.base_logits, rtol=0, atol=0)


# ---- (c) save -> load into a fresh base reproduces the outputs ------------------------------------

@functools.cache
def saved(method_name: str, case: str, root: str) -> Path:
    directory = Path(root) / f"{method_name}-{case}"
    trained(method_name, case).method.save(trained(method_name, case).model, directory)
    return directory


@pytest.fixture(scope="module")
def save_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("native"))


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_save_load_reproduces_outputs(cell, save_root):
    method_name, case = cell
    run = trained(*cell)
    directory = saved(method_name, case, save_root)
    loaded = get_method(method_name).load(build(case), directory, run.kind)
    assert (logits(loaded, case) - run.logits).abs().max().item() <= 1e-6
    if method_name == "full":
        assert type(loaded) is type(run.model)
        assert (directory / "model.safetensors").is_file()
        return
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert config["method"] == method_name and config["kind"] == run.kind
    assert config["base_model"]["model_type"] == run.model.config.model_type
    assert config["peftlab_version"] and "options" in config
    tensors = load_file(str(directory / WEIGHTS_NAME))
    assert set(tensors) == {n for n, p in run.model.named_parameters() if p.requires_grad}  # only trained ones
    if method_name == "adapter":
        assert len(config["injected_modules"]) == len(get_method("adapter").injected_modules(run.model))


def test_load_uses_the_saved_options(tmp_path):
    method = get_method("adapter", variant="pfeiffer", reduction_factor=4)
    model = method.apply(tiny.tiny_bert("seq-cls"), "seq-cls")
    method.save(model, tmp_path)
    loader = get_method("adapter")  # defaults: houlsby, 16
    loaded = loader.load(tiny.tiny_bert("seq-cls"), tmp_path, "seq-cls")
    assert loader.options.variant == "pfeiffer" and loader.options.reduction_factor == 4
    assert count_parameters(loaded)[0] == count_parameters(model)[0]


def test_reload_in_a_fresh_process_is_exact(save_root, tmp_path):
    cells = [("adapter", "bert-seq-cls"), ("bitfit", "gpt2-causal-lm"), ("full", "bert-token-cls"),
             ("adapter", "t5-seq2seq")]
    expected = {}
    for method_name, case in cells:
        directory = saved(method_name, case, save_root)
        expected[str(directory)] = (method_name, case, trained(method_name, case).logits)
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_native_methods as t
        from peftlab.methods import get_method
        worst = 0.0
        for directory, (method_name, case, want) in torch.load({str(tmp_path / 'expected.pt')!r}).items():
            model = get_method(method_name).load(t.build(case), directory, t.CASES[case][1])
            worst = max(worst, (t.logits(model, case) - want).abs().max().item())
        print("MAXDIFF", worst)
    """)
    env = {**os.environ, "PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    worst = float(result.stdout.split("MAXDIFF")[-1])
    assert worst <= 1e-6


# ---- (d) merge ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", [c for c in CELLS if c[0] in ("bitfit", "full")], ids=cell_id)
def test_merge_gives_a_plain_model(cell, tmp_path):
    method_name, case = cell
    run = trained(*cell)
    merged = run.method.merge(copy.deepcopy(run.model))
    assert isinstance(merged, transformers.PreTrainedModel)
    assert not [type(m) for m in merged.modules() if type(m).__module__.startswith("peftlab")]
    assert (logits(merged, case) - run.logits).abs().max().item() <= 1e-5
    merged.save_pretrained(tmp_path)  # plain transformers round trip
    reloaded = type(merged).from_pretrained(tmp_path)
    assert (logits(reloaded, case) - run.logits).abs().max().item() <= 1e-5


def test_adapter_is_not_mergeable():
    run = trained("adapter", "bert-seq-cls")
    assert get_method_class("adapter").mergeable is False
    with pytest.raises(PeftlabError, match="cannot be merged"):
        run.method.merge(run.model)


# ---- (e) generation -------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", [c for c in CELLS if c[1] in GENERATIVE], ids=cell_id)
def test_generate_after_apply(cell):
    run = trained(*cell)
    prompt = tiny.batch_for(run.model, run.kind, batch_size=2, length=5, seed=7)
    inputs = {"input_ids": prompt["input_ids"], "attention_mask": torch.ones_like(prompt["input_ids"])}
    with torch.no_grad():
        cached = run.model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = run.model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape[0] == 2 and cached.shape[1] >= 4
    assert torch.equal(cached, uncached)  # the adapters run on the KV-cache path too


# ---- (f) a tampered or mismatched adapter is refused ----------------------------------------------

def _tamper(directory: Path, target: Path, how: str) -> Path:
    import shutil

    shutil.copytree(directory, target)
    weights = target / ("model.safetensors" if (target / "model.safetensors").is_file() else WEIGHTS_NAME)
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    if how == "missing":
        del tensors[name]
    elif how == "shape":
        tensors[name] = torch.zeros(*[s + 1 for s in tensors[name].shape])
    elif how == "unexpected":
        tensors["extra.bias"] = torch.zeros(3)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("how", ["missing", "shape", "unexpected"])
@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_tampered_weights_are_refused(cell, how, save_root, tmp_path):
    method_name, case = cell
    directory = _tamper(saved(method_name, case, save_root), tmp_path / "tampered", how)
    word = {"missing": "missing", "shape": "shape", "unexpected": "unexpected"}[how]
    with pytest.raises(PeftlabError, match=word):
        get_method(method_name).load(build(case), directory, CASES[case][1])


def test_mismatched_adapters_are_refused(save_root, tmp_path):
    bert_adapter = saved("adapter", "bert-seq-cls", save_root)
    with pytest.raises(PeftlabError, match="bert model"):
        get_method("adapter").load(tiny.tiny_gpt2(), bert_adapter, "seq-cls")
    with pytest.raises(PeftlabError, match="seq-cls tasks"):
        get_method("adapter").load(tiny.tiny_bert("token-cls"), bert_adapter, "token-cls")
    with pytest.raises(PeftlabError, match="'adapter' adapter, not a 'bitfit'"):
        get_method("bitfit").load(tiny.tiny_bert("seq-cls"), bert_adapter, "seq-cls")
    with pytest.raises(PeftlabError, match="no peftlab_adapter_config.json"):
        get_method("adapter").load(tiny.tiny_bert("seq-cls"), tmp_path, "seq-cls")
    # a deeper base: same architecture, more layers -> refused, not silently half-loaded
    deeper = transformers.BertForSequenceClassification(tiny.bert_config(num_hidden_layers=3, num_labels=2))
    with pytest.raises(PeftlabError, match="does not fit"):
        get_method("adapter").load(deeper, bert_adapter, "seq-cls")
    (tmp_path / CONFIG_NAME).write_text("{not json")
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(PeftlabError, match="not valid JSON"):
        get_method("adapter").load(tiny.tiny_bert("seq-cls"), tmp_path, "seq-cls")


# ---- support checks and options ---------------------------------------------------------------------

@pytest.mark.parametrize("case", ["llama-causal-lm", "t5-seq2seq"])
def test_bitfit_refuses_models_without_biases(case):
    _, kind = CASES[case]
    method = get_method("bitfit")
    with pytest.raises(PeftlabError, match="no bias terms") as error:
        method.check_supported(build(case), kind)
    assert str(error.value).count(". ") == 0  # one sentence
    if case.startswith("llama"):
        assert str(error.value).startswith("Llama-family models have no bias terms in their linear layers, "
                                           "so BitFit has nothing to train on")
    with pytest.raises(PeftlabError, match="no bias terms"):
        method.apply(build(case), kind)


def test_adapter_option_errors():
    with pytest.raises(PeftlabError, match="variant"):
        get_method("adapter", variant="parallel").apply(tiny.tiny_bert(), "seq-cls")
    with pytest.raises(PeftlabError, match="non_linearity"):
        get_method("adapter", non_linearity="softmax").apply(tiny.tiny_bert(), "seq-cls")
    with pytest.raises(PeftlabError, match="bottleneck would be empty"):
        get_method("adapter", reduction_factor=64).apply(tiny.tiny_bert(), "seq-cls")
    with pytest.raises(PeftlabError, match="reduction_factor"):
        get_method("adapter", reduction_factor="x")
    model = get_method("adapter").apply(tiny.tiny_bert(), "seq-cls")
    with pytest.raises(PeftlabError, match="already has bottleneck adapters"):
        get_method("adapter").apply(model, "seq-cls")


def test_save_before_apply_is_refused(tmp_path):
    with pytest.raises(PeftlabError, match="apply"):
        get_method("bitfit").save(tiny.tiny_bert(), tmp_path)


@pytest.mark.parametrize("name,category,mergeable,lr", [
    ("adapter", "additive", False, 1e-3), ("bitfit", "selective", True, 5e-3), ("full", "full", True, 5e-5)])
def test_method_metadata(name, category, mergeable, lr):
    cls = get_method_class(name)
    assert cls.category == category and cls.mergeable is mergeable and cls.paper and cls.summary
    assert get_method(name).learning_rate == lr
    assert cls.warmup_ratio == (0.1 if name == "bitfit" else 0.06)  # BitFit's high rate needs a longer warm-up
    assert get_method_class("p-tuning").warmup_ratio == 0.1 and get_method_class("lora").warmup_ratio == 0.06
    assert all(f.metadata.get("help") for f in cls.option_fields())
    assert isinstance(get_method(name).inference_cost(), str)


# ---- the real bundled encoder ---------------------------------------------------------------------

@pytest.mark.real
@pytest.mark.parametrize("method_name", ["adapter", "bitfit"])
def test_real_minilm(method_name, tmp_path):
    from peftlab.models import load_model

    def base():
        return load_model("minilm", "seq-cls", label_names=["0", "1"])

    torch.manual_seed(0)
    method = get_method(method_name)
    model = method.apply(base(), "seq-cls")
    assert count_parameters(model)[0] == method.trainable_parameters_formula(model, "seq-cls")
    if method_name == "adapter":  # MiniLM: d = 384, m = 24, 6 layers, head 384·2 + 2
        assert count_parameters(model)[0] == 6 * 2 * (2 * 384 * 24 + 384 + 24) + 770
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 30000, (2, 12), generator=generator),
             "attention_mask": torch.ones(2, 12, dtype=torch.long), "labels": torch.tensor([0, 1])}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    method.save(model, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).stat().st_size < 1_000_000  # only the trained tensors
    loaded = get_method(method_name).load(base(), tmp_path, "seq-cls")
    with torch.no_grad():
        got = loaded(**batch).logits
    assert (got - want).abs().max().item() <= 1e-6
