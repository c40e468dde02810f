"""The conformance matrix: every registered method on every tiny architecture and task kind.

Cells: tiny BERT seq-cls, tiny BERT token-cls, tiny GPT-2 causal-lm (Conv1D layers), tiny Llama
causal-lm, tiny T5 seq2seq. For every (method, cell) the method either refuses with a one-sentence
``PeftlabError`` at ``check_supported``/``apply`` time, or:

1. three AdamW steps (lr 1e-2, no weight decay) change every trainable tensor and no frozen one; as in
   training, ``method.total_steps`` is set before ``apply`` and the method's ``training_callbacks`` run
   after each optimizer step (AdaLoRA prunes its ranks there, so its reload covers a rank pattern);
2. the trainable parameter count equals ``method.trainable_parameters_formula(model, kind)``;
3. after ``save``, a fresh process builds the same-seed base, calls ``method.load`` and reproduces the
   in-process logits within 1e-6 (and the same greedy ``generate()`` tokens);
4. mergeable methods: ``merge()`` returns a plain transformers model (no peft/peftlab/bitsandbytes
   modules) whose logits equal the unmerged ones within 1e-5 (QLoRA merges into a float32 copy of
   the dequantised base; measured max difference on these cells: 1e-6);
5. ``generate()`` works on the causal-LM and seq2seq cells, and its per-step logits equal a full
   forward pass over the generated sequence (within 1e-5).

The matrix covers the methods whose module imports; ``test_every_registered_method_imports`` fails
until every registry entry has landed. All in-process work runs once per module (a fixture); the
fresh-process reload of every cell runs in ONE subprocess (this file run as a script).

Runs single-threaded: on a loaded 2-core machine torch's 2-thread kernels spin on each other and a
32x32 matmul takes 16 ms instead of 2 us (measured), which made these tiny cells 100x slower.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tiny.py, also when run as a script

import tiny  # noqa: E402
from peftlab.errors import PeftlabError  # noqa: E402
from peftlab.methods import get_method_class, method_names  # noqa: E402
from peftlab.methods.base import ALL_KINDS, CATEGORIES, PeftMethod, count_parameters  # noqa: E402

CELLS = {
    "bert-seq-cls": ("tiny_bert", "seq-cls"),
    "bert-token-cls": ("tiny_bert", "token-cls"),
    "gpt2-causal-lm": ("tiny_gpt2", "causal-lm"),
    "llama-causal-lm": ("tiny_llama", "causal-lm"),
    "t5-seq2seq": ("tiny_t5", "seq2seq"),
}
GENERATIVE = ("causal-lm", "seq2seq")
STEPS, LR = 3, 1e-2
RELOAD_ATOL = 1e-6
MERGE_ATOL = 1e-5
PLAIN_MODULE_PREFIXES = ("peft", "peftlab", "bitsandbytes")


def _importable_methods() -> list[str]:
    names = []
    for name in method_names():
        try:
            get_method_class(name)
        except Exception:  # being written by someone else: covered by test_every_registered_method_imports
            continue
        names.append(name)
    return names


METHODS = _importable_methods()
MATRIX = [(m, c) for m in METHODS for c in CELLS]


# ---- building the same base in this process and in the fresh one --------------------------------

def build_base(method, cell: str, workdir: Path):
    """The seed-0 tiny model for ``cell``, loaded through from_pretrained when the method needs load kwargs."""
    builder, kind = CELLS[cell]
    model = getattr(tiny, builder)(kind)
    load_kwargs = method.model_load_kwargs()
    if load_kwargs:  # qlora: quantise at load time, as the trainer does with a real checkpoint
        folder = workdir / f"base-{cell}"
        if not (folder / "config.json").is_file():
            model.save_pretrained(str(folder))
        model = type(model).from_pretrained(str(folder), **load_kwargs)
        model.eval()
    return model


def cell_batch(model, kind):
    return tiny.batch_for(model, kind)


def logits_of(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.detach().float().cpu()


def generate_ids(model, batch) -> torch.Tensor:
    return _generate(model, batch).sequences.detach().cpu()


def _generate(model, batch):
    ids = batch["input_ids"][1:]  # the unpadded rows
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                              do_sample=False, output_logits=True, return_dict_in_generate=True)


def generate_vs_forward(model, batch, kind) -> tuple[torch.Tensor, float]:
    """Greedy generate(), and how far its per-step logits are from a full forward pass over the result.

    The two must agree: a cache that loses the prompt/prefix, or virtual tokens prepended again at
    every step, shows up here (both happened with peft 0.21 under transformers 5, see compat.py).
    Logits are indexed from the end, so virtual-token positions in the output do not matter.
    """
    out = _generate(model, batch)
    sequences, steps = out.sequences, len(out.logits)
    with torch.no_grad():
        if kind == "causal-lm":
            full = model(input_ids=sequences, attention_mask=torch.ones_like(sequences)).logits
            at = [full[:, -(steps - i + 1)] for i in range(steps)]
        else:
            ids = batch["input_ids"][1:]
            full = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=sequences[:, :-1]).logits
            at = [full[:, -(steps - i)] for i in range(steps)]
    diff = max((step.float() - expected.float()).abs().max().item() for step, expected in zip(out.logits, at))
    return sequences.detach().cpu(), diff


# ---- the in-process phase ------------------------------------------------------------------------

def run_cell(name: str, cell: str, workdir: Path) -> dict:
    builder, kind = CELLS[cell]
    method = get_method_class(name)()
    result: dict = {"method": name, "cell": cell, "kind": kind, "options": method.options_dict()}
    base = build_base(method, cell, workdir)
    try:
        method.check_supported(base, kind)
    except PeftlabError as error:
        result["unsupported"] = str(error)
        return result
    method.total_steps = STEPS  # as the trainer does before apply (AdaLoRA schedules its rank budget on it)
    model = method.apply(base, kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    batch = cell_batch(model, kind)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    callbacks = method.training_callbacks(model)
    model.train()
    for step in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        for callback in callbacks:  # where the Trainer calls them: after the step, before zero_grad
            callback.on_optimizer_step(None, SimpleNamespace(global_step=step), None, model=model)
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    result["unchanged_trainable"] = sorted(n for n in trainable if torch.equal(before[n], after[n].detach()))
    result["changed_frozen"] = sorted(n for n in before if n not in trainable and not torch.equal(before[n], after[n].detach()))
    result["n_trainable_tensors"] = len(trainable)
    result["trainable"] = count_parameters(model)[0]
    result["formula"] = method.trainable_parameters_formula(model, kind)
    result["logits"] = logits_of(model, batch)
    if kind in GENERATIVE:
        result["generated"], result["generate_vs_forward"] = generate_vs_forward(model, batch, kind)
    adapter_dir = workdir / f"{name}-{cell}"
    method.save(model, adapter_dir)
    result["adapter_dir"] = str(adapter_dir)
    if method.mergeable:
        merged = method.merge(model)
        result["merged_class"] = f"{type(merged).__module__}.{type(merged).__name__}"
        result["merged_is_pretrained"] = _is_pretrained(merged)
        result["foreign_modules"] = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in merged.modules()
                                            if type(m).__module__.startswith(PLAIN_MODULE_PREFIXES)})
        result["merged_logits"] = logits_of(merged, batch)
    else:
        with pytest.raises(PeftlabError) as refused:
            method.merge(model)
        result["merge_refusal"] = str(refused.value)
    return result


def _is_pretrained(model) -> bool:
    import transformers

    return isinstance(model, transformers.PreTrainedModel)


def _safe_run_cell(name, cell, workdir):
    try:
        return run_cell(name, cell, workdir)
    except Exception:
        return {"method": name, "cell": cell, "error": traceback.format_exc()}


# ---- the fresh-process phase (this file run as a script) -----------------------------------------

def reload_main(manifest_path: str) -> None:
    torch.set_num_threads(1)
    manifest = json.loads(Path(manifest_path).read_text())
    outputs = {}
    for entry in manifest["cells"]:
        key = f"{entry['method']}|{entry['cell']}"
        try:
            method = get_method_class(entry["method"])(**entry["options"])
            kind = CELLS[entry["cell"]][1]
            base = build_base(method, entry["cell"], Path(manifest["workdir"]))
            model = method.load(base, Path(entry["adapter_dir"]), kind)
            batch = cell_batch(model, kind)
            outputs[key] = {"logits": logits_of(model, batch)}
            if kind in GENERATIVE:
                outputs[key]["generated"] = generate_ids(model, batch)
        except Exception:
            outputs[key] = {"error": traceback.format_exc()}
    torch.save(outputs, manifest["output"])


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Every (method, cell) run in process, then every saved cell reloaded in one fresh process."""
    workdir = tmp_path_factory.mktemp("conformance")
    results = {(m, c): _safe_run_cell(m, c, workdir) for m, c in MATRIX}
    saved = [r for r in results.values() if "adapter_dir" in r]
    manifest = {"workdir": str(workdir), "output": str(workdir / "reloaded.pt"),
                "cells": [{k: r[k] for k in ("method", "cell", "options", "adapter_dir")} for r in saved]}
    (workdir / "manifest.json").write_text(json.dumps(manifest))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.run([sys.executable, __file__, str(workdir / "manifest.json")], env=env,
                             capture_output=True, text=True, timeout=600)
    reloaded = torch.load(manifest["output"]) if process.returncode == 0 else {}
    for result in saved:
        key = f"{result['method']}|{result['cell']}"
        result["reloaded"] = reloaded.get(key, {"error": f"fresh process failed (exit {process.returncode}):\n"
                                                          f"{process.stderr[-4000:]}"})
    return results


def _squash(text: str) -> str:
    """'P-Tuning v2' and 'p-tuning-v2' alike: lower case, letters and digits only."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _cell(matrix, name, cell) -> dict:
    result = matrix[(name, cell)]
    if "error" in result:
        pytest.fail(f"{name} on {cell} raised:\n{result['error']}")
    if "unsupported" in result:
        pytest.skip(f"unsupported: {result['unsupported']}")
    return result


# ---- the tests -------------------------------------------------------------------------------------

def test_every_registered_method_imports():
    missing = []
    for name in method_names():
        try:
            get_method_class(name)
        except Exception as error:  # noqa: BLE001 - report whatever stops the import
            missing.append(f"{name}: {type(error).__name__}: {error}")
    assert not missing, "registered methods that do not import:\n" + "\n".join(missing)


@pytest.mark.parametrize("name", METHODS)
def test_method_declares_its_interface(name):
    cls = get_method_class(name)
    assert cls.name == name
    assert cls.category in CATEGORIES
    assert cls.paper and cls.summary
    assert cls.kinds and set(cls.kinds) <= set(ALL_KINDS)
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    assert "learning_rate" in fields
    for field in fields.values():
        assert field.metadata.get("help"), f"{name}: option {field.name} has no help text"
        assert field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
    method = cls()
    assert isinstance(method.inference_cost(), str) and method.inference_cost()
    if not cls.mergeable:
        why = method.why_not_mergeable()
        assert why.endswith(".") and len(why) > 20


@pytest.mark.parametrize("name,cell", MATRIX)
def test_check_supported_accepts_or_refuses_in_one_sentence(name, cell, tmp_path):
    """A kind outside ``method.kinds`` must be refused; any refusal names method and model, and says why."""
    builder, kind = CELLS[cell]
    method = get_method_class(name)()
    model = build_base(method, cell, tmp_path)
    try:
        method.check_supported(model, kind)
    except PeftlabError as error:
        refusal = error
    else:
        assert kind in method.kinds, f"{name} accepts {kind} on {cell} although its kinds are {method.kinds}"
        return  # supported: the other tests cover the cell
    message = str(refusal)
    assert _squash(name) in _squash(message), f"does not name the method: {message}"
    assert type(model).__name__ in message or model.config.model_type in message, message
    assert "\n" not in message and message.rstrip().endswith("."), message
    assert len(message) > len(name) + len(type(model).__name__) + 30, f"says what, not why: {message}"
    with pytest.raises(PeftlabError):  # apply() checks too, without a prior check_supported call
        get_method_class(name)().apply(build_base(method, cell, tmp_path), kind)


@pytest.mark.parametrize("name,cell", MATRIX)
def test_training_changes_trainable_and_only_trainable(name, cell, matrix):
    result = _cell(matrix, name, cell)
    assert result["n_trainable_tensors"] > 0
    assert not result["unchanged_trainable"], f"trainable tensors that did not change: {result['unchanged_trainable']}"
    assert not result["changed_frozen"], f"frozen tensors that changed: {result['changed_frozen']}"


@pytest.mark.parametrize("name,cell", MATRIX)
def test_trainable_count_matches_formula(name, cell, matrix):
    result = _cell(matrix, name, cell)
    assert result["trainable"] == result["formula"], (result["trainable"], result["formula"])


@pytest.mark.parametrize("name,cell", MATRIX)
def test_reload_in_fresh_process_is_exact(name, cell, matrix):
    result = _cell(matrix, name, cell)
    reloaded = result["reloaded"]
    assert "error" not in reloaded, reloaded.get("error")
    assert reloaded["logits"].shape == result["logits"].shape
    diff = (reloaded["logits"] - result["logits"]).abs().max().item()
    assert diff <= RELOAD_ATOL, f"max |diff| {diff:.3g} after reload"
    if "generated" in result:
        assert torch.equal(reloaded["generated"], result["generated"])


@pytest.mark.parametrize("name,cell", MATRIX)
def test_merge_gives_plain_equivalent_model(name, cell, matrix):
    result = _cell(matrix, name, cell)
    if "merge_refusal" in result:
        assert name in result["merge_refusal"]
        pytest.skip("not mergeable")
    assert result["merged_is_pretrained"], result["merged_class"]
    assert not result["foreign_modules"], f"merged model still has {result['foreign_modules']}"
    diff = (result["merged_logits"] - result["logits"]).abs().max().item()
    assert diff <= MERGE_ATOL, f"merged vs unmerged max |diff| {diff:.3g}"


@pytest.mark.parametrize("name,cell", [(m, c) for m, c in MATRIX if CELLS[c][1] in GENERATIVE])
def test_generate_works(name, cell, matrix):
    result = _cell(matrix, name, cell)
    generated = result["generated"]
    assert generated.shape[0] == 2
    assert generated.dtype == torch.long and int(generated.max()) < tiny.VOCAB
    if CELLS[cell][1] == "causal-lm":
        assert generated.shape[1] > 7, "no new tokens"
    else:
        assert generated.shape[1] >= 2
    diff = result["generate_vs_forward"]
    assert diff <= MERGE_ATOL, f"generate() step logits differ from a full forward pass by {diff:.3g}"


# ---- the real model -----------------------------------------------------------------------------

PEFT_METHODS = [m for m in METHODS if issubclass(get_method_class(m), PeftMethod)]


@pytest.mark.real
def test_every_peft_method_on_real_minilm(tmp_path):
    """Each peft-backed method applies to all-MiniLM-L6-v2, trains a step and reloads exactly."""
    from peftlab.models import load_model, load_tokenizer

    tokenizer = load_tokenizer("minilm")
    batch = dict(tokenizer(["a gripping, funny film", "dull and far too long"], padding=True,
                           return_tensors="pt"))
    batch["labels"] = torch.tensor([1, 0])
    report = []
    for name in PEFT_METHODS:
        method = get_method_class(name)()
        load = dict(label_names=["negative", "positive"], **method.model_load_kwargs())
        method.total_steps = 1  # one step below, set before apply as training does
        model = method.apply(load_model("minilm", "seq-cls", **load), "seq-cls")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        model.train()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        expected = logits_of(model, batch)
        method.save(model, tmp_path / name)
        reloaded = method.load(load_model("minilm", "seq-cls", **load), tmp_path / name, "seq-cls")
        diff = (logits_of(reloaded, batch) - expected).abs().max().item()
        report.append((name, loss.item(), diff))
        assert torch.isfinite(loss)
    bad = [(n, d) for n, _, d in report if d > RELOAD_ATOL]
    assert not bad, f"reload differs: {bad}"


if __name__ == "__main__":
    reload_main(sys.argv[1])
