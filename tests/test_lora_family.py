"""The LoRA variants (options of ``lora``) and the newer peft methods: what the conformance matrix does not see.

* PiSSA / OLoRA rewrite the base weights at ``apply``; the saved adapter is a plain LoRA of rank 2r that
  reproduces the trained model on the ORIGINAL base (DoRA's magnitudes and the task head included).
* rsLoRA's scaling, LoRA+'s parameter groups (built by peft), DoRA's serving facts.
* AdaLoRA's schedule: it refuses without a step count, and its callback prunes ranks inside a real
  ``transformers.Trainer`` run whose saved adapter then reloads exactly.
* Bad input gets one sentence naming the option, before any training.
* Every new method applies on the meta device (the memory estimator) and declares its guide rows.

Measured here: PiSSA/OLoRA converted adapters reload within 1.4e-6 of the trained model on the tiny T5
(float32 order of W_res + B·A against W + [B | -B0]·[A ; A0]), 1e-7 on the others; tolerance 1e-5.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402
from peftlab.errors import PeftlabError  # noqa: E402
from peftlab.methods import get_method, get_method_class  # noqa: E402
from peftlab.methods.base import GUIDE_TASK_TYPES, GuideSituation, count_parameters  # noqa: E402
from test_peft_methods import logits, single_thread, train  # noqa: E402,F401 (single_thread: autouse fixture)

NEW_METHODS = ["dora", "adalora", "vera", "loha", "lokr", "oft"]
CONVERTED_ATOL = 1e-5


# ---- PiSSA / OLoRA -------------------------------------------------------------------------------

@pytest.mark.parametrize("init,use_dora,builder,kind", [
    ("pissa", False, "tiny_bert", "seq-cls"),
    ("pissa", True, "tiny_bert", "seq-cls"),
    ("olora", False, "tiny_llama", "causal-lm"),
    ("pissa", False, "tiny_gpt2", "causal-lm"),
    ("olora", True, "tiny_t5", "seq2seq"),
])
def test_base_changing_init_saves_a_lora_for_the_original_base(init, use_dora, builder, kind, tmp_path):
    method = get_method("lora", init=init, use_dora=use_dora, r=4)
    original = getattr(tiny, builder)(kind)
    untouched = {name: p.detach().clone() for name, p in original.named_parameters()}
    model = method.apply(original, kind)
    base_changed = [name for name, p in model.get_base_model().named_parameters()
                    if "base_layer.weight" in name and not torch.equal(p, untouched[name.replace(".base_layer", "")])]
    assert base_changed, f"{init} left every base weight as it was"
    batch = tiny.batch_for(model, kind)
    train(model, batch, steps=3)
    expected = logits(model, batch)
    assert count_parameters(model)[0] == method.trainable_parameters_formula(model, kind)

    method.save(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True and config["use_dora"] == use_dora

    fresh = get_method("lora", init=init, use_dora=use_dora, r=4)  # as a later `peftlab eval` builds it
    reloaded = fresh.load(getattr(tiny, builder)(kind), tmp_path / "adapter", kind)
    diff = (logits(reloaded, batch) - expected).abs().max().item()
    assert diff <= CONVERTED_ATOL, f"converted {init} adapter differs by {diff:.3g} on the original base"


def test_olora_refuses_gpt2_conv1d_naming_the_option():
    with pytest.raises(PeftlabError, match="init=olora") as refused:
        get_method("lora", init="olora").check_supported(tiny.tiny_gpt2("causal-lm"), "causal-lm")
    assert "GPT2LMHeadModel" in str(refused.value) and "\n" not in str(refused.value)


def test_default_init_still_saves_peft_s_plain_format(tmp_path):
    method = get_method("lora")
    model = method.apply(tiny.tiny_bert("seq-cls"), "seq-cls")
    assert method.initial_adapter_state is None
    method.save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 8


# ---- rsLoRA, LoRA+, DoRA's serving facts ---------------------------------------------------------

def test_rslora_scales_by_alpha_over_sqrt_r():
    from peft.tuners.lora import LoraLayer

    for use_rslora, expected in ((False, 16 / 8), (True, 16 / math.sqrt(8))):
        model = get_method("lora", use_rslora=use_rslora).apply(tiny.tiny_bert("seq-cls"), "seq-cls")
        scalings = [layer.scaling["default"] for layer in model.modules() if isinstance(layer, LoraLayer)]
        assert scalings and scalings == pytest.approx([expected] * len(scalings))


def test_loraplus_groups_come_from_peft_with_b_at_ratio_times_the_rate():
    off = get_method("lora")
    model = off.apply(tiny.tiny_bert("seq-cls"), "seq-cls")
    assert off.optimizer_parameter_groups(model, 1e-3, 0.01) is None

    method = get_method("lora", loraplus_lr_ratio=16)
    model = method.apply(tiny.tiny_bert("seq-cls"), "seq-cls")
    groups = method.optimizer_parameter_groups(model, 1e-3, 0.01)
    assert all(set(group) == {"params", "lr", "weight_decay"} and group["params"] for group in groups)
    by_id = {}
    for group in groups:
        for param in group["params"]:
            assert id(param) not in by_id, "a parameter in two groups"
            by_id[id(param)] = group
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert set(by_id) == set(names), "every trainable parameter in exactly one group"
    for param_id, name in names.items():
        if "lora_B" in name:
            assert by_id[param_id]["lr"] == pytest.approx(16e-3)
        elif "lora_A" in name:
            assert by_id[param_id]["lr"] == pytest.approx(1e-3) and by_id[param_id]["weight_decay"] == 0.01
    torch.optim.AdamW(groups, lr=1e-3)  # what the trainer builds from them


def test_dora_is_never_in_a_mixed_batch_and_not_in_lora_s_group():
    lora, dora = get_method("lora").serving_facts(), get_method("dora").serving_facts()
    assert lora.mixed_batch and lora.mode == dora.mode == "peft"
    assert not dora.mixed_batch and dora.group != lora.group and "DoRA" in dora.note
    assert get_method("lora", use_dora=True).serving_facts() == dora  # the option is the method
    assert get_method("lora", init="pissa").serving_facts() == lora  # saved as a plain LoRA


# ---- bad input: one sentence naming the option ------------------------------------------------------

@pytest.mark.parametrize("name,options,option_named", [
    ("lora", {"init": "svd"}, "init"),
    ("lora", {"loraplus_lr_ratio": 0.5}, "loraplus_lr_ratio"),
    ("dora", {"use_dora": False}, "use_dora"),
    ("adalora", {"tinit_fraction": 0.6, "tfinal_fraction": 0.5}, "tinit_fraction"),
    ("adalora", {"target_r": 16}, "target_r"),
])
def test_impossible_options_are_refused_naming_the_option(name, options, option_named):
    with pytest.raises(PeftlabError) as refused:
        get_method(name, **options)
    message = str(refused.value)
    assert f"'{option_named}'" in message and "\n" not in message and message.endswith(".")


def test_an_option_of_another_method_is_refused_before_training():
    from peftlab.training import config_from_options

    with pytest.raises(PeftlabError, match="'use_dora'.*'ia3'"):
        config_from_options({"method": "ia3", "use_dora": "true"})
    options = config_from_options({"method": "lora", "use_dora": "true"}).method_options
    assert get_method("lora", **options).options.use_dora is True


def test_oft_block_size_must_divide_the_layer_width():
    with pytest.raises(PeftlabError, match="'block_size'.*divisor of 32"):
        get_method("oft", block_size=12).check_supported(tiny.tiny_bert("seq-cls"), "seq-cls")


# ---- AdaLoRA's schedule ----------------------------------------------------------------------------

def test_adalora_refuses_without_a_step_count():
    with pytest.raises(PeftlabError, match="^AdaLoRA needs the total step count"):
        get_method("adalora").apply(tiny.tiny_bert("seq-cls"), "seq-cls")


def test_adalora_schedule_is_fractions_of_the_steps():
    method = get_method("adalora")
    method.total_steps = 375  # minilm + SST-2 at compare's budget: 2,000 examples / 16 x 3 epochs
    config = method.apply(tiny.tiny_bert("seq-cls"), "seq-cls").peft_config["default"]
    assert (config.total_step, config.tinit, config.tfinal) == (375, 45, 165)
    assert (config.init_r, config.target_r, config.orth_reg_weight) == (12, 8, 0.1)


def test_adalora_prunes_inside_a_trainer_run_and_reloads_exactly(tmp_path):
    """A real ``transformers.Trainer``: the callback runs after every optimizer step, the ranks end at the
    budget, and the saved (rank-trimmed) adapter reproduces the trained model."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    steps, kind = 8, "seq-cls"
    method = get_method("adalora", init_r=4, target_r=2)
    method.total_steps = steps
    model = method.apply(tiny.tiny_bert(kind), kind)
    seen = []
    original = model.base_model.update_and_allocate
    model.base_model.update_and_allocate = lambda step: (seen.append(step), original(step))[1]
    batch = tiny.batch_for(model, kind, batch_size=4)
    rows = [{key: value[i].tolist() for key, value in batch.items()} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
            callbacks=method.training_callbacks(model)).train()
    assert seen == list(range(steps))
    rank_pattern = model.peft_config["default"].rank_pattern
    assert rank_pattern, "no ranks were allocated"
    kept = sum(sum(mask) for mask in rank_pattern.values())
    assert kept == 2 * len(rank_pattern), f"kept {kept} ranks over {len(rank_pattern)} layers, budget 2 each"

    eval_batch = {key: value for key, value in batch.items() if key != "labels"}
    expected = logits(model, eval_batch)
    method.save(model, tmp_path / "adapter")
    reloaded = get_method("adalora", init_r=4, target_r=2).load(tiny.tiny_bert(kind), tmp_path / "adapter", kind)
    assert (logits(reloaded, eval_batch) - expected).abs().max().item() <= 1e-6
    assert torch.isfinite(reloaded(**batch).loss)  # a loaded adapter evaluates with labels (peft 0.21 bug, fixed)


# ---- what the rest of peftlab asks --------------------------------------------------------------

@pytest.mark.parametrize("name,options", [(n, {}) for n in NEW_METHODS] + [("lora", {"init": "pissa"})])
def test_applies_on_the_meta_device_for_the_memory_estimate(name, options):
    method = get_method(name, **options)
    with torch.device("meta"):
        model = tiny.tiny_bert("seq-cls")
    applied, facts = method.apply_for_estimate(model, "seq-cls")
    assert isinstance(facts, dict)
    assert count_parameters(applied)[0] == method.trainable_parameters_formula(applied, "seq-cls")


@pytest.mark.parametrize("name", NEW_METHODS)
def test_declares_its_facts_and_guide_rows(name):
    cls = get_method_class(name)
    method = cls()
    assert cls.peft_type and cls.mergeable and method.serving_facts().mode == "peft"
    assert set(cls.guide) == set(GUIDE_TASK_TYPES)
    for points, reason in cls.guide.values():
        assert 0 <= points <= 3 and len(reason) > 30
    assert all(len(reason) > 30 for _, reason in method.guide_adjustments(GuideSituation(base_params=int(7e9))))
    assert "merged" in method.inference_cost()


@pytest.mark.parametrize("name", ["loha", "lokr", "oft"])
def test_layer_types_peft_cannot_wrap_are_refused_in_one_sentence(name):
    with pytest.raises(PeftlabError) as refused:
        get_method(name).check_supported(tiny.tiny_gpt2("causal-lm"), "causal-lm")
    message = str(refused.value)
    assert "Conv1D" in message and f"'{name}'" in message and message.count(". ") == 0 and message.endswith(".")
