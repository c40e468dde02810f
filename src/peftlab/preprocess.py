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

import sys
from typing import Any

from peftlab.errors import PeftlabError
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


def encode_pair(tokenizer, prompt: str, response: str | None) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a prompt and its response (+ EOS): the loss is on the response only, so the model
    learns to answer, not to repeat prompts. An empty prompt (plain text) leaves every token to learn."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] if response is not None else []
    if response is not None and tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def render_chat(tokenizer, messages: list[dict], where: str, *, add_generation_prompt: bool = False) -> str:
    """The conversation through the tokenizer's chat template; one sentence naming ``where`` when it fails."""
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as error:  # noqa: BLE001 - jinja raises many types (a role the template refuses, ...)
        raise PeftlabError(f"{where}: the chat template fails to render this conversation ({type(error).__name__}: "
                           f"{str(error).splitlines()[0][:200] if str(error) else 'no message'}); fix the record or "
                           "pass --chat-template FILE.") from None


def assistant_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character spans of its assistant answers).

    An answer's span is what rendering it adds after the conversation so far with the generation prompt
    (``add_generation_prompt=True``): its text and the template's end-of-turn, without the assistant header
    (what generation is given, not what it produces). This needs a template that renders a conversation's
    start the same whatever follows, as chat templates do; one that does not is refused naming ``where``."""
    full = render_chat(tokenizer, messages, where)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = render_chat(tokenizer, messages[:index], where, add_generation_prompt=True)
        except PeftlabError:
            if index:
                raise
            before = ""  # a conversation that opens with the assistant: some templates cannot render no messages
        through = render_chat(tokenizer, messages[:index + 1], where)
        if not (through.startswith(before) and full.startswith(through)):
            raise PeftlabError(f"{where}: the chat template renders turn {index + 1} differently once later turns "
                               "follow, so the assistant's tokens cannot be told apart; use a template that renders "
                               "earlier turns unchanged (--chat-template FILE).")
        spans.append((len(before), len(through)))
    return full, spans


def encode_chat(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a conversation: the loss is on the assistant turns only.

    Labelled: the tokens of each assistant answer and the end-of-sequence token that ends it (which is what
    generation stops on). Not labelled: system and user turns, the role headers, every other special token of
    the template, and what follows the end of a turn (its newline). Written here because transformers' own
    ``return_assistant_tokens_mask`` needs ``{% generation %}`` markers that few templates have (SmolLM2's
    has none); the spans come from rendering prefixes (:func:`assistant_spans`) and the tokens are mapped to
    them through the offsets of one tokenization of the whole text, so the ids are exactly what the model
    sees at inference."""
    text, spans = assistant_spans(tokenizer, messages, where)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    special = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        ended = False
        for position, (token_start, _token_end) in enumerate(offsets):
            if ended or not start <= token_start < end or ids[position] in special:
                continue
            labels[position] = ids[position]
            ended = ids[position] == tokenizer.eos_token_id  # nothing after the turn's end is learned
    return list(ids), labels


def report_dropped(dropped: list[str], total: int, max_length: int) -> None:
    """Rows whose answer starts beyond ``max_length`` tokens are left out, counted and named (never trained on
    an empty answer); when that is every row, one sentence instead."""
    if len(dropped) == total:
        raise PeftlabError(f"Every one of the {total} examples has its prompt fill --max-length {max_length} before "
                           f"the answer starts (first: {dropped[0]}); raise --max-length or shorten the prompts.")
    print(f"peftlab: left out {len(dropped)} of {total} examples whose prompt fills --max-length {max_length} before "
          f"the answer starts (first: {dropped[0]}); raise --max-length to keep them.", file=sys.stderr, flush=True)


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

    dropped: list[str] = []  # causal LM rows whose answer starts beyond max_length

    def causal_lm(batch):
        input_ids, labels = [], []
        wheres = batch.get("where") or [None] * len(next(iter(batch.values())))
        if "messages" in batch:
            encoded_rows = [encode_chat(tokenizer, messages, where or f"row {i + 1}")
                            for i, (messages, where) in enumerate(zip(batch["messages"], wheres))]
        else:
            encoded_rows = [encode_pair(tokenizer, prompt, response if with_labels else None)
                            for prompt, response in zip(batch["prompt"],
                                                        batch.get("response") or [""] * len(batch["prompt"]))]
        for (ids, row_labels), where in zip(encoded_rows, wheres):
            ids, row_labels = ids[:max_length], row_labels[:max_length]
            if with_labels and all(label == IGNORE_INDEX for label in row_labels[1:]):
                dropped.append(where or f"row {len(dropped) + 1}")  # nothing left to learn: counted, not trained
                continue
            input_ids.append(ids)
            labels.append(row_labels)
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
    if dropped:
        report_dropped(dropped, len(dataset), max_length)
    return tokenized.map(lambda row: {"length": len(row["input_ids"])}, desc="Measuring",
                         load_from_cache_file=False)


def collator(kind: str, tokenizer, *, pad_to_multiple_of: int | None = None, pack_to: int | None = None):
    """Pads each batch to its own longest sequence (labels with IGNORE_INDEX); with ``pack_to`` (causal LM,
    ``--packing``) packs it into rows of at most that many tokens instead (:class:`PackingCollator`)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorForTokenClassification, DataCollatorWithPadding

    kind = TaskKind.parse(kind)
    if pack_to is not None:
        check_packing_kind(kind)
        return PackingCollator(tokenizer, pack_to)
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


# ---- packing (causal LM) ----------------------------------------------------------------------------------

def check_packing_kind(kind) -> None:
    if TaskKind.parse(kind) is not TaskKind.CAUSAL_LM:
        raise PeftlabError(f"--packing is for causal LM tasks (several examples in one row); this is a {kind} task: "
                           "leave out --packing.")


class PackingCollator:
    """A batch's examples packed into rows of at most ``capacity`` tokens, with no attention across examples.

    First-fit decreasing puts the examples into rows; each example keeps its own position ids (0, 1, ...), and
    no attention mask is sent, so transformers builds a block-diagonal causal mask from the position ids (its
    padding-free format, as ``DataCollatorWithFlattening`` uses, but in rows of bounded length: attention costs
    rows x capacity^2, not the square of all the batch's tokens). A row shorter than the longest is filled with
    a padding segment of its own positions, which attends only to itself and is never learned. The first label
    of every example is ignored (nothing before it in the example predicts it), exactly what the padded batch's
    shifted loss leaves out, so the loss and its token count equal the padded run's. ``use_cache=False``: a
    cache would switch transformers' packed-sequence detection off."""

    def __init__(self, tokenizer, capacity: int):
        self.capacity = int(capacity)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """Indices of the examples in each row (first-fit decreasing)."""
        rows: list[list[int]] = []
        room: list[int] = []
        for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            size = lengths[index]
            slot = next((r for r, free in enumerate(room) if free >= size), None)
            if slot is None:
                rows.append([index])
                room.append(max(0, self.capacity - size))
            else:
                rows[slot].append(index)
                room[slot] -= size
        return rows

    def __call__(self, features):
        import torch

        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) if "labels" in f else list(f["input_ids"]) for f in features]
        packed = []
        for row in self.rows([len(i) for i in ids]):
            row_ids, row_labels, positions = [], [], []
            for index in row:
                row_ids += ids[index]
                row_labels += [IGNORE_INDEX] + labels[index][1:]
                positions += list(range(len(ids[index])))
            packed.append((row_ids, row_labels, positions))
        width = max(len(r[0]) for r in packed)
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for row_ids, row_labels, positions in packed:
            fill = width - len(row_ids)
            batch["input_ids"].append(row_ids + [self.pad_id] * fill)
            batch["labels"].append(row_labels + [IGNORE_INDEX] * fill)
            batch["position_ids"].append(positions + list(range(fill)))
        tensors = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
        return {**tensors, "use_cache": False}


def check_packing(model, kind, *, tolerance: float = 1e-3) -> None:
    """Refuse ``--packing`` in one sentence unless this model (with its method applied) gives every example of
    a packed row the logits it gives the example alone: the attention implementation must honour position ids
    as sequence boundaries, and the method must not add tokens (prompt tuning) or a cache (prefix tuning)."""
    import torch

    check_packing_kind(kind)
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 4:
        return
    generator = torch.Generator().manual_seed(0)
    pieces = [torch.randint(vocab // 4, vocab // 2, (length,), generator=generator) for length in (5, 7)]
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [model(input_ids=p[None].to(device), use_cache=False).logits[0].float().cpu() for p in pieces]
            position_ids = torch.cat([torch.arange(len(p)) for p in pieces])[None].to(device)
            together = model(input_ids=torch.cat(pieces)[None].to(device), position_ids=position_ids,
                             use_cache=False).logits[0].float().cpu()
        apart = torch.cat(alone)
        problem = (f"its outputs have {together.shape[0]} positions for {apart.shape[0]} tokens"
                   if together.shape != apart.shape else None)
        if problem is None:
            scale = max(1.0, float(apart.abs().max()))
            difference = float((together - apart).abs().max())
            if difference > tolerance * scale:
                problem = f"an example's logits change by {difference:.3g} when another shares its row"
    except Exception as error:  # noqa: BLE001 - a model or method that cannot take position ids this way
        problem = f"a packed forward fails ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})"
    finally:
        if was_training:
            model.train()
    if problem is not None:
        raise PeftlabError(f"--packing is not exact with this model and method: {problem} (the attention "
                           "implementation must honour position ids, and virtual tokens or a prefix cache mix the "
                           "examples); leave out --packing.")
