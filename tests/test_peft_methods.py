"""What is special about the peft-backed methods (the common contract is in test_conformance.py).

* QLoRA: 4-bit load on CPU, training, merging into a float32 copy (dequantised or original base),
  bitsandbytes' CPU bf16 inference path kept off.
* Prefix tuning / P-Tuning v2 on BERT classification under transformers 5 (compat.py): the prefix
  reaches every layer's attention, padding stays masked, training and exact reload, token
  classification (P-Tuning v2's main use).
* Prompt tuning initialised from text or vocabulary; P-Tuning with the LSTM encoder.
* Two upstream bugs the compat shims work around, pinned so an upgrade that fixes them is noticed.

Measured here (CPU, fp32): QLoRA merged-into-dequantised-copy vs unmerged logits differ by at most
~1e-6 (tolerance 1e-5); merged into the *original* float32 weights they differ by the base's 4-bit
quantisation error (0.004-1.0 on these random tiny models, which is why that is not the default).
"""

from __future__ import annotations

import copy
import inspect
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402
from peftlab.errors import PeftlabError  # noqa: E402
from peftlab.methods import get_method  # noqa: E402
from peftlab.methods.base import count_parameters  # noqa: E402
from peftlab.methods.compat import add_prefix_compat, remove_prefix_compat  # noqa: E402

QLORA_MERGE_ATOL = 1e-5  # measured max 1e-6 on the conformance cells
RELOAD_ATOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP spin contention (100x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def train(model, batch, steps=5, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


# ---- QLoRA ---------------------------------------------------------------------------------------

def quantized(builder, kind, folder: Path, method):
    base = getattr(tiny, builder)(kind)
    if not (folder / "config.json").is_file():
        base.save_pretrained(str(folder))
    return type(base).from_pretrained(str(folder), **method.model_load_kwargs())


def test_qlora_load_kwargs_follow_the_paper_and_keep_heads_out():
    method = get_method("qlora")
    kwargs = method.model_load_kwargs()
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert {"classifier", "score", "lm_head"} <= set(config.llm_int8_skip_modules)
    if not torch.cuda.is_available():
        assert config.bnb_4bit_compute_dtype == torch.float32 and kwargs["device_map"] == "cpu"
        assert method.optimizer == "adamw_torch"  # bitsandbytes' paged optimizers need CUDA
    assert method.options.optimizer == "paged_adamw_8bit"


def test_qlora_refuses_a_full_precision_base():
    with pytest.raises(PeftlabError, match="4-bit"):
        get_method("qlora").apply(tiny.tiny_bert("seq-cls"), "seq-cls")


@pytest.mark.parametrize("builder,kind", [("tiny_bert", "seq-cls"), ("tiny_llama", "causal-lm")])
def test_qlora_trains_and_merges_into_a_float32_copy(builder, kind, tmp_path):
    method = get_method("qlora", r=8)
    base = quantized(builder, kind, tmp_path / "base", method)
    linear4 = [n for n, m in base.named_modules() if type(m).__name__ == "Linear4bit"]
    assert linear4, "nothing was quantised"
    head = base.classifier if kind == "seq-cls" else base.lm_head
    assert type(head) is nn.Linear and head.weight.dtype == torch.float32  # kept out of quantisation

    model = method.apply(base, kind)
    batch = tiny.batch_for(model, kind)
    losses = train(model, batch, steps=8)
    assert losses[-1] < losses[0], losses
    assert count_parameters(model)[0] == method.trainable_parameters_formula(model, kind)
    unmerged = logits(model, batch)
    for module in model.modules():  # eval under no_grad did not switch bnb to its bf16 CPU kernel
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        assert not getattr(state, "packing_format_for_cpu", False)

    merged = method.merge(model)
    assert not [m for m in merged.modules() if type(m).__module__.startswith(("bitsandbytes", "peft"))]
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert not hasattr(merged.config, "quantization_config")
    diff = (logits(merged, batch) - unmerged).abs().max().item()
    assert diff <= QLORA_MERGE_ATOL, diff

    merged.save_pretrained(str(tmp_path / "merged"))  # a plain checkpoint of the same class
    reloaded = type(merged).from_pretrained(str(tmp_path / "merged"))
    assert (logits(reloaded, batch) - logits(merged, batch)).abs().max().item() <= RELOAD_ATOL


def test_qlora_merge_on_gpt2_gives_back_conv1d_layers(tmp_path):
    """bitsandbytes quantises GPT-2's Conv1D as transposed Linear4bit; the merged model is standard GPT-2."""
    method = get_method("qlora", r=4)
    model = method.apply(quantized("tiny_gpt2", "causal-lm", tmp_path / "base", method), "causal-lm")
    batch = tiny.batch_for(model, "causal-lm")
    train(model, batch, steps=2)
    unmerged = logits(model, batch)
    merged = method.merge(model)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert (logits(merged, batch) - unmerged).abs().max().item() <= QLORA_MERGE_ATOL


def test_qlora_merge_into_original_weights(tmp_path):
    """merge_base='original' folds the same update into the reloaded float32 checkpoint."""
    method = get_method("qlora", r=8)
    model = method.apply(quantized("tiny_bert", "seq-cls", tmp_path / "base", method), "seq-cls")
    batch = tiny.batch_for(model, "seq-cls")
    train(model, batch, steps=3)
    method.save(model, tmp_path / "adapter")
    unmerged = logits(model, batch)
    from_dequantized = method.merge(model)

    original_method = get_method("qlora", r=8, merge_base="original")
    reloaded = original_method.load(quantized("tiny_bert", "seq-cls", tmp_path / "base", method),
                                    tmp_path / "adapter", "seq-cls")
    with pytest.warns(UserWarning, match="quantisation error"):
        from_original = original_method.merge(reloaded)

    original = tiny.tiny_bert("seq-cls")
    dequantized_base = {n: p for n, p in from_dequantized.named_parameters()}
    for name, parameter in from_original.named_parameters():
        if name.startswith("classifier"):  # the trained head, identical in both
            assert torch.equal(parameter, dequantized_base[name])
            continue
        # merged(original) - merged(dequantised) == original - dequantised: the same update, other base
        update_free_gap = parameter - dequantized_base[name]
        quantisation_gap = original.get_parameter(name) - _dequantized_weight(tmp_path / "base", method, name)
        assert torch.allclose(update_free_gap, quantisation_gap, atol=1e-6), name
    gap = (logits(from_original, batch) - unmerged).abs().max().item()
    assert 0 < gap < 1.0  # the 4-bit quantisation error of the base, not exactness (measured ~5e-3)


def _dequantized_weight(folder, method, name):
    from peftlab.methods.qlora import dequantized_copy

    cache = _dequantized_weight.__dict__.setdefault("cache", {})
    if folder not in cache:
        cache[folder] = dequantized_copy(quantized("tiny_bert", "seq-cls", folder, method))
    return cache[folder].get_parameter(name)


# ---- prefix tuning / P-Tuning v2 on BERT under transformers 5 ---------------------------------

def test_upstream_peft_still_refuses_prefix_on_bert():
    """Why compat.add_prefix_compat exists. If this starts failing, peft handles `cache` and the shim can go."""
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(tiny.tiny_bert("token-cls"), PrefixTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="does not support past key values"):
        model(**tiny.batch_for(model, "token-cls"))


def _prefix_rows(model):
    """P-Tuning v2's trained tensor: (n, 2·layers·hidden), layer l's keys/values at columns [2l·d, (2l+2)·d)."""
    return model.prompt_encoder["default"].embedding.weight


@pytest.mark.parametrize("kind", ["seq-cls", "token-cls"])
def test_prefix_reaches_every_layer_on_bert(kind):
    method = get_method("p-tuning-v2", num_virtual_tokens=4)
    model = method.apply(tiny.tiny_bert(kind), kind)
    batch = {k: v for k, v in tiny.batch_for(model, kind).items() if k != "labels"}
    base = logits(tiny.tiny_bert(kind), batch)
    assert (logits(model, batch) - base).abs().max() > 1e-3  # a random prefix changes the output

    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    rows = _prefix_rows(model)
    with torch.no_grad():
        rows.zero_()
    zero = logits(model, batch)
    for layer in range(layers):
        with torch.no_grad():
            rows.zero_()
            rows[:, 2 * layer * d:(2 * layer + 2) * d] = torch.randn(rows.shape[0], 2 * d)
        assert (logits(model, batch) - zero).abs().max() > 1e-4, f"the prefix of layer {layer} has no effect"


def test_prefix_keeps_padding_masked_on_token_cls():
    """With the prefix, a padded row's real tokens get the logits they get with no padding at all."""
    model = get_method("p-tuning-v2", num_virtual_tokens=4).apply(tiny.tiny_bert("token-cls"), "token-cls")
    batch = tiny.batch_for(model, "token-cls")  # row 0 has its last two tokens padded
    padded = logits(model, {"input_ids": batch["input_ids"][:1], "attention_mask": batch["attention_mask"][:1]})
    ids = batch["input_ids"][:1, :-2]
    unpadded = logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert (padded[:, :-2] - unpadded).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", ["p-tuning-v2", "prefix-tuning"])
def test_prefix_trains_and_reloads_on_bert_token_cls(name, tmp_path):
    method = get_method(name, num_virtual_tokens=6)
    model = method.apply(tiny.tiny_bert("token-cls", num_labels=5), "token-cls")
    batch = tiny.batch_for(model, "token-cls")
    losses = train(model, batch, steps=10)
    assert losses[-1] < losses[0], losses
    assert count_parameters(model)[0] == method.trainable_parameters_formula(model, "token-cls")
    expected = logits(model, batch)
    method.save(model, tmp_path)
    fresh = tiny.tiny_bert("token-cls", num_labels=5)
    reloaded = method.load(fresh, tmp_path, "token-cls")
    assert "past_key_values" in inspect.signature(fresh.forward).parameters  # the shim, re-applied by load
    assert (logits(reloaded, batch) - expected).abs().max().item() <= RELOAD_ATOL


def test_prefix_compat_touches_only_the_instance():
    cls = type(tiny.tiny_bert("seq-cls"))
    model = add_prefix_compat(tiny.tiny_bert("seq-cls"))
    assert "past_key_values" in inspect.signature(model.forward).parameters
    assert "past_key_values" not in inspect.signature(cls.forward).parameters
    assert "past_key_values" not in inspect.signature(tiny.tiny_bert("seq-cls").forward).parameters
    batch = {k: v for k, v in tiny.batch_for(model, "seq-cls").items() if k != "labels"}
    before = logits(model, batch)
    twin = copy.deepcopy(model)  # the copy's forward runs the copy's weights
    with torch.no_grad():
        twin.classifier.bias.add_(1.0)
    assert torch.allclose(logits(model, batch), before)
    assert not torch.allclose(logits(twin, batch), before)
    remove_prefix_compat(model)
    assert "forward" not in model.__dict__
    assert torch.allclose(logits(model, batch), before)


def test_prefix_refuses_a_model_without_a_cache():
    """A classifier whose forward cannot carry a key/value prefix gets a PeftlabError, not peft's ValueError."""

    class NoCache(nn.Module):
        config = tiny.bert_config()

        def forward(self, input_ids=None, attention_mask=None, labels=None):
            return None

    with pytest.raises(PeftlabError, match="prefix-tuning.*key/value cache"):
        get_method("prefix-tuning").check_supported(NoCache(), "seq-cls")


# ---- prompt tuning initialisation -----------------------------------------------------------------

@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A whitespace word-level tokenizer whose ids fit the tiny models' 128-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "great", "fun", "film", "dull", "plot"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(str(folder))
    return folder


def test_prompt_tuning_initialised_from_text(word_tokenizer):
    method = get_method("prompt-tuning", num_virtual_tokens=7, init="text", init_text="great fun film",
                        init_tokenizer=str(word_tokenizer))
    model = method.apply(tiny.tiny_bert("seq-cls"), "seq-cls")
    prompt = model.prompt_encoder["default"].embedding.weight
    words = model.get_base_model().bert.embeddings.word_embeddings.weight
    ids = torch.tensor([2, 3, 4, 2, 3, 4, 2])  # the text's tokens, repeated to fill the 7 virtual tokens
    assert torch.equal(prompt.detach(), words[ids].detach())


def test_prompt_tuning_text_init_needs_text_and_a_tokenizer():
    with pytest.raises(PeftlabError, match="init_text"):
        get_method("prompt-tuning", init="text").apply(tiny.tiny_bert("seq-cls"), "seq-cls")
    with pytest.raises(PeftlabError, match="init_tokenizer"):  # a model built from a config has no name
        get_method("prompt-tuning", init="text", init_text="great").apply(tiny.tiny_bert("seq-cls"), "seq-cls")


def test_prompt_tuning_vocab_init_uses_word_embeddings():
    model = get_method("prompt-tuning", num_virtual_tokens=5, init="vocab").apply(tiny.tiny_bert("seq-cls"), "seq-cls")
    prompt = model.prompt_encoder["default"].embedding.weight.detach()
    words = model.get_base_model().bert.embeddings.word_embeddings.weight.detach()
    assert all(any(torch.equal(row, word) for word in words) for row in prompt)


def test_prompt_tuning_refuses_token_classification():
    with pytest.raises(PeftlabError, match="prompt-tuning.*token-cls.*p-tuning-v2"):
        get_method("prompt-tuning").apply(tiny.tiny_bert("token-cls"), "token-cls")


# ---- P-Tuning with the paper's LSTM encoder --------------------------------------------------------

def test_p_tuning_lstm_encoder_trains_and_reloads(tmp_path):
    method = get_method("p-tuning", encoder="LSTM", encoder_hidden_size=16, num_virtual_tokens=5)
    model = method.apply(tiny.tiny_bert("seq-cls"), "seq-cls")
    encoder = model.prompt_encoder["default"]
    assert isinstance(encoder.lstm_head, nn.LSTM) and encoder.lstm_head.bidirectional
    assert encoder.lstm_head.num_layers == 2
    assert count_parameters(model)[0] == method.trainable_parameters_formula(model, "seq-cls")
    batch = tiny.batch_for(model, "seq-cls")
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    train(model, batch, steps=3)
    assert all(not torch.equal(before[n], p) for n, p in encoder.named_parameters()), "an encoder tensor did not train"
    expected = logits(model, batch)
    method.save(model, tmp_path)
    reloaded = method.load(tiny.tiny_bert("seq-cls"), tmp_path, "seq-cls")
    assert not hasattr(reloaded.prompt_encoder["default"], "lstm_head")  # inference keeps only its output
    assert (logits(reloaded, batch) - expected).abs().max().item() <= RELOAD_ATOL


# ---- generate() under transformers 5 ----------------------------------------------------------------

def test_upstream_peft_prefix_generate_still_ignores_the_prefix():
    """Why compat.add_generation_compat exists. If this starts failing, peft reads `cache` and the shim can go."""
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(tiny.tiny_llama("causal-lm"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 2.0)
    model.eval()
    ids = tiny.batch_for(model, "causal-lm")["input_ids"][1:]
    with torch.no_grad():  # transformers warns "Both `past_key_values` and `cache` are set ... ignoring ..."
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        forward = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
    assert (out.logits[0] - forward).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2"])
def test_prompt_learning_generate_matches_forward_on_llama(name):
    method = get_method(name, num_virtual_tokens=4)
    model = method.apply(tiny.tiny_llama("causal-lm"), "causal-lm")
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))
    model.eval()
    ids = tiny.batch_for(model, "causal-lm")["input_ids"][1:]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        full = model(input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences)).logits
    for step, step_logits in enumerate(out.logits):
        assert (step_logits - full[:, -(len(out.logits) - step + 1)]).abs().max().item() <= 1e-5, step


# ---- the real encoder ---------------------------------------------------------------------------------

@pytest.mark.real
def test_p_tuning_v2_token_classification_on_real_minilm(tmp_path):
    """P-Tuning v2's main use on the real BERT: the prefix changes the output, trains, and reloads exactly."""
    from peftlab.models import load_model, load_tokenizer

    labels = ["O", "B-PER", "I-PER"]
    tokenizer = load_tokenizer("minilm")
    batch = dict(tokenizer(["Ada Lovelace wrote programs", "it rained"], padding=True, return_tensors="pt"))
    batch["labels"] = torch.zeros_like(batch["input_ids"])
    batch["labels"][0, 1:3] = torch.tensor([1, 2])
    torch.manual_seed(0)
    base = load_model("minilm", "token-cls", label_names=labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    before = logits(base, inputs)
    method = get_method("p-tuning-v2")
    model = method.apply(base, "token-cls")
    assert (logits(model, inputs) - before).abs().max() > 1e-4
    losses = train(model, batch, steps=5, lr=method.learning_rate)
    assert losses[-1] < losses[0], losses
    expected = logits(model, batch)
    method.save(model, tmp_path)
    reloaded = method.load(load_model("minilm", "token-cls", label_names=labels), tmp_path, "token-cls")
    assert (logits(reloaded, batch) - expected).abs().max().item() <= RELOAD_ATOL
