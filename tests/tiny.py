"""Tiny random models of each architecture peftlab supports, for fast unit tests of code paths.

Real-model tests use the bundled ``minilm``/``smollm2``; these exist to exercise every
(method, model kind) cell in seconds. Each builder returns a fresh model with fixed seed.
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 128


def _seeded(build):
    def wrapper(*args, **kwargs):
        torch.manual_seed(kwargs.pop("seed", 0))
        model = build(*args, **kwargs)
        model.eval()
        return model
    wrapper.__name__ = build.__name__
    return wrapper


def bert_config(**overrides):
    values = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    values.update(overrides)
    return transformers.BertConfig(**values)


@_seeded
def tiny_bert(kind: str = "seq-cls", num_labels: int = 2):
    config = bert_config(num_labels=num_labels)
    if kind == "seq-cls":
        return transformers.BertForSequenceClassification(config)
    if kind == "token-cls":
        return transformers.BertForTokenClassification(config)
    raise ValueError(kind)


@_seeded
def tiny_gpt2(kind: str = "causal-lm", num_labels: int = 2):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     num_labels=num_labels, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    if kind == "causal-lm":
        return transformers.GPT2LMHeadModel(config)
    if kind == "seq-cls":
        return transformers.GPT2ForSequenceClassification(config)
    raise ValueError(kind)


@_seeded
def tiny_llama(kind: str = "causal-lm", num_labels: int = 2):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, num_labels=num_labels, pad_token_id=0)
    if kind == "causal-lm":
        return transformers.LlamaForCausalLM(config)
    if kind == "seq-cls":
        return transformers.LlamaForSequenceClassification(config)
    raise ValueError(kind)


@_seeded
def tiny_t5(kind: str = "seq2seq", num_labels: int = 2):
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)
    if kind == "seq2seq":
        return transformers.T5ForConditionalGeneration(config)
    raise ValueError(kind)


def batch_for(model, kind: str, batch_size: int = 3, length: int = 7, seed: int = 0) -> dict:
    """A random batch with labels that ``model(**batch).loss`` accepts."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0  # one padded row, so padding paths run too
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if kind == "seq-cls":
        batch["labels"] = torch.randint(0, model.config.num_labels, (batch_size,), generator=generator)
    elif kind == "token-cls":
        batch["labels"] = torch.randint(0, model.config.num_labels, (batch_size, length), generator=generator)
    elif kind == "causal-lm":
        batch["labels"] = input_ids.clone()
    elif kind == "seq2seq":
        batch["labels"] = torch.randint(2, VOCAB, (batch_size, 5), generator=generator)
    return batch
