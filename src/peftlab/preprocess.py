"""From normalized task examples to model inputs, per task kind.

Sequences are truncated to ``max_length`` but never padded here: the collators pad each batch to
its own longest sequence, which on short-text tasks such as SST-2 (about 13 tokens on average)
cuts the work several-fold against padding every example to 128.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100  # label positions the loss skips (prompt tokens, non-first sub-words, padding)


def tokenize(dataset, kind: str, tokenizer, *, max_length: int, label_names: list[str] | None,
             is_regression: bool = False, with_labels: bool = True):
    """Tokenize a normalized dataset; adds a ``length`` column (real tokens) used for grouping and throughput."""
    label_to_id = {label: index for index, label in enumerate(label_names or [])}

    def seq_cls(batch: dict[str, list]) -> dict[str, Any]:
        pairs = batch.get("text_pair")
        has_pairs = pairs is not None and any(p is not None for p in pairs)
        encoded = tokenizer(
            batch["text"], [p or "" for p in pairs] if has_pairs else None,
            truncation=True, max_length=max_length,
        )
        if with_labels and "label" in batch:
            if is_regression:
                encoded["labels"] = [float(v) for v in batch["label"]]
            else:
                encoded["labels"] = [label_to_id[str(v)] for v in batch["label"]]
        return encoded

    def token_cls(batch):
        encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        if with_labels and "tags" in batch:
            all_labels = []
            for row, tags in enumerate(batch["tags"]):
                previous = None
                labels = []
                for word in encoded.word_ids(row):
                    # only the first sub-word of each word carries the word's tag
                    labels.append(IGNORE_INDEX if word is None or word == previous else label_to_id[tags[word]])
                    previous = word
                all_labels.append(labels)
            encoded["labels"] = all_labels
        return encoded

    def causal_lm(batch):
        input_ids, labels = [], []
        for prompt, response in zip(batch["prompt"], batch.get("response") or [""] * len(batch["prompt"])):
            prompt_ids = tokenizer(prompt)["input_ids"]
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] if with_labels else []
            if with_labels and tokenizer.eos_token_id is not None:
                response_ids = response_ids + [tokenizer.eos_token_id]
            ids = (prompt_ids + response_ids)[:max_length]
            input_ids.append(ids)
            # the loss is on the response only: the model learns to answer, not to repeat prompts
            labels.append(([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length])
        encoded = {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids]}
        if with_labels:
            encoded["labels"] = labels
        return encoded

    def seq2seq(batch):
        encoded = tokenizer(batch["source"], truncation=True, max_length=max_length)
        if with_labels and "target" in batch:
            encoded["labels"] = tokenizer(text_target=batch["target"], truncation=True, max_length=max_length)["input_ids"]
        return encoded

    function = {"seq-cls": seq_cls, "token-cls": token_cls, "causal-lm": causal_lm, "seq2seq": seq2seq}[kind]
    tokenized = dataset.map(function, batched=True, remove_columns=dataset.column_names,
                            desc="Tokenizing", load_from_cache_file=False)
    return tokenized.map(lambda row: {"length": len(row["input_ids"])}, desc="Measuring",
                         load_from_cache_file=False)


def collator(kind: str, tokenizer, *, pad_to_multiple_of: int | None = None):
    """Pads each batch to its own longest sequence (labels with IGNORE_INDEX)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorForTokenClassification, DataCollatorWithPadding

    if kind == "seq-cls":
        inner = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    elif kind == "token-cls":
        inner = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    else:
        inner = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=pad_to_multiple_of,
                                       label_pad_token_id=IGNORE_INDEX)

    def collate(features):
        features = [{k: v for k, v in f.items() if k != "length"} for f in features]
        return inner(features)

    return collate
