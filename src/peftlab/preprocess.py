"""From normalized task examples to model inputs, per task kind.

Sequences are truncated to ``max_length`` but never padded here: the collators pad each batch to
its own longest sequence, which on short-text tasks such as SST-2 (about 13 tokens on average)
cuts the work several-fold against padding every example to 128.

Extractive QA (kind ``qa``) follows Hugging Face's ``run_qa.py`` example: question and context are
tokenized as a pair with ``truncation="only_second"``; a context longer than the window becomes several
overlapping *features* (``return_overflowing_tokens``, ``stride`` from :func:`qa_window`); each feature's
answer span is mapped from characters to token positions through the offset mapping, and a feature whose
window does not contain the whole answer is labelled with the CLS index for start and end. Every feature
keeps ``example_index`` (its row in the raw split) and ``offset_mapping`` (``None`` outside the context),
which ``peftlab.evaluation`` needs to turn span logits back into answer text.
"""

from __future__ import annotations

from typing import Any

from peftlab.kinds import TaskKind

IGNORE_INDEX = -100  # label positions the loss skips (prompt tokens, non-first sub-words, padding)
QA_EXTRA_COLUMNS = ("example_index", "offset_mapping")  # QA features' bookkeeping; not model inputs


def qa_window(tokenizer, max_length: int) -> tuple[int, int]:
    """(longest question in tokens, stride) for windows of ``max_length`` tokens.

    The stride (tokens shared by consecutive windows of a long context) is run_qa.py's doc_stride 128 at
    max_length 384, i.e. a third of the window; questions are cut to a third of the window too, so that
    every window keeps more context tokens than the stride (the tokenizer refuses anything else). SQuAD
    questions are far shorter than that.
    """
    question_limit = max(1, max_length // 3)
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - question_limit
    return question_limit, max(0, min(max_length // 3, room - 1))


def _trim_questions(tokenizer, questions: list[str], limit: int) -> list[str]:
    """Questions cut to at most ``limit`` tokens (at a token boundary)."""
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    trimmed = []
    for question, ids, offsets in zip(questions, encoded["input_ids"], encoded["offset_mapping"]):
        trimmed.append(question[:offsets[limit - 1][1]] if len(ids) > limit else question)
    return trimmed


def encode_qa(tokenizer, questions: list[str], contexts: list[str], *, max_length: int):
    """run_qa.py's tokenization: (question, context) pairs, long contexts split into overlapping windows.

    Returns the tokenizer's ``BatchEncoding`` with ``overflow_to_sample_mapping`` and ``offset_mapping``.
    Padding on the left (some tokenizers) puts the context first, as run_qa.py does.
    """
    pad_on_right = getattr(tokenizer, "padding_side", "right") == "right"
    question_limit, stride = qa_window(tokenizer, max_length)
    questions = _trim_questions(tokenizer, [q.lstrip() for q in questions], question_limit)
    first, second = (questions, contexts) if pad_on_right else (contexts, questions)
    return tokenizer(first, second, truncation="only_second" if pad_on_right else "only_first",
                     max_length=max_length, stride=stride, return_overflowing_tokens=True,
                     return_offsets_mapping=True)


def qa_features(tokenizer, encoded, answers: list[dict] | None, example_indices: list[int]) -> dict[str, list]:
    """Features of :func:`encode_qa` output: start/end token positions (when ``answers`` are given),
    ``example_index`` and the context-only ``offset_mapping`` of every window."""
    context_index = 1 if getattr(tokenizer, "padding_side", "right") == "right" else 0
    sample_mapping = encoded["overflow_to_sample_mapping"]
    features = {key: encoded[key] for key in encoded if key not in ("overflow_to_sample_mapping", "offset_mapping")}
    features["example_index"] = [example_indices[s] for s in sample_mapping]
    features["offset_mapping"] = []
    starts, ends = [], []
    for i, offsets in enumerate(encoded["offset_mapping"]):
        sequence_ids = encoded.sequence_ids(i)
        features["offset_mapping"].append(
            [list(o) if sequence_ids[k] == context_index else None for k, o in enumerate(offsets)])
        if answers is None:
            continue
        input_ids = encoded["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        answer = answers[sample_mapping[i]]
        if not answer["answer_start"]:
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        start_char = answer["answer_start"][0]
        end_char = start_char + len(answer["text"][0])
        token_start = 0
        while sequence_ids[token_start] != context_index:
            token_start += 1
        token_end = len(input_ids) - 1
        while sequence_ids[token_end] != context_index:
            token_end -= 1
        if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
            # the answer is not (wholly) inside this window: point at CLS, as run_qa.py does
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        while token_start < len(offsets) and offsets[token_start][0] <= start_char:
            token_start += 1
        starts.append(token_start - 1)
        while offsets[token_end][1] >= end_char:
            token_end -= 1
        ends.append(token_end + 1)
    if answers is not None:
        features["start_positions"] = starts
        features["end_positions"] = ends
    return features


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

    def qa(batch, indices):
        encoded = encode_qa(tokenizer, batch["question"], batch["context"], max_length=max_length)
        answers = batch["answers"] if with_labels and "answers" in batch else None
        return qa_features(tokenizer, encoded, answers, list(indices))

    kind = TaskKind.parse(kind)
    function = {TaskKind.SEQ_CLS: seq_cls, TaskKind.TOKEN_CLS: token_cls, TaskKind.CAUSAL_LM: causal_lm,
                TaskKind.SEQ2SEQ: seq2seq, TaskKind.QA: qa}[kind]
    tokenized = dataset.map(function, batched=True, with_indices=function is qa, remove_columns=dataset.column_names,
                            desc="Tokenizing", load_from_cache_file=False)
    return tokenized.map(lambda row: {"length": len(row["input_ids"])}, desc="Measuring",
                         load_from_cache_file=False)


def collator(kind: str, tokenizer, *, pad_to_multiple_of: int | None = None):
    """Pads each batch to its own longest sequence (labels with IGNORE_INDEX)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorForTokenClassification, DataCollatorWithPadding

    kind = TaskKind.parse(kind)
    if kind.is_generative:  # labels are token sequences of their own length
        inner = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=pad_to_multiple_of,
                                       label_pad_token_id=IGNORE_INDEX)
    elif kind is TaskKind.TOKEN_CLS:  # one label per token: padded like the input
        inner = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    else:  # one label per sequence (qa: start/end positions are one number per feature, like a label)
        inner = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def collate(features):
        features = [{k: v for k, v in f.items() if k != "length" and k not in QA_EXTRA_COLUMNS} for f in features]
        return inner(features)

    return collate
