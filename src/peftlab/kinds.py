"""What a task kind is, defined once: the five kinds, their facts, and user input -> record.

A kind decides the model head, the normalized data schema (``peftlab.tasks.base``), the collator and the
metric family. Everything that used to test a kind string against a hand-written tuple asks the kind
instead (``kind.has_new_head``, ``kind.is_classification``, ...). ``TaskKind`` is a ``StrEnum``, so a kind
compares equal to its string (``TaskKind.SEQ_CLS == "seq-cls"``) and is written to JSON as that string:
run folders saved before this type existed read back unchanged.

This module imports nothing heavy: the CLI, the server and the memory estimator use it before torch loads.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from peftlab.errors import PeftlabError, did_you_mean


class TaskKind(StrEnum):
    SEQ_CLS = "seq-cls"  # sequence classification and regression
    TOKEN_CLS = "token-cls"  # token classification (NER, tagging)
    CAUSAL_LM = "causal-lm"  # decoder-only generation
    SEQ2SEQ = "seq2seq"  # encoder-decoder generation
    QA = "qa"  # extractive question answering (span head)

    # ---- parsing --------------------------------------------------------------------------------
    @classmethod
    def parse(cls, value: Any, where: str = "task kind") -> "TaskKind":
        """A kind from its string (or a kind); one sentence naming the valid ones otherwise."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value))
        except ValueError:
            raise PeftlabError(f"Unknown {where} {value!r}. {did_you_mean(str(value), [k.value for k in cls])}") from None

    @classmethod
    def from_peft_task_type(cls, task_type: str | None) -> "TaskKind":
        """peft's ``task_type`` (``SEQ_CLS``...) -> kind; peft's default for a missing one is causal LM."""
        wanted = str(task_type or "CAUSAL_LM").upper()
        for kind in cls:
            if kind.peft_task_type == wanted:
                return kind
        return cls.CAUSAL_LM

    # ---- facts ------------------------------------------------------------------------------------
    @property
    def peft_task_type(self) -> str:
        """peft's ``TaskType`` name for this kind."""
        return _FACTS[self][0]

    @property
    def auto_class(self) -> str:
        """The transformers ``AutoModelFor...`` class that builds a base model with this kind's head."""
        return _FACTS[self][1]

    @property
    def is_classification(self) -> bool:
        """A label per sequence or per token (``num_labels`` sized head, label names saved with the run)."""
        return self in (TaskKind.SEQ_CLS, TaskKind.TOKEN_CLS)

    @property
    def has_new_head(self) -> bool:
        """The model gets a newly initialised task head that always trains (classification, QA's span head)."""
        return self in (TaskKind.SEQ_CLS, TaskKind.TOKEN_CLS, TaskKind.QA)

    @property
    def is_generative(self) -> bool:
        """Outputs are generated text (``generate()``), scored by loss/perplexity and generation metrics."""
        return self in (TaskKind.CAUSAL_LM, TaskKind.SEQ2SEQ)

    @property
    def servable(self) -> bool:
        """``peftlab serve`` hosts adapters of this kind (QA's span post-processing is not served yet)."""
        return self is not TaskKind.QA

    # ---- inputs -------------------------------------------------------------------------------------
    def record_from_example(self, row: dict[str, Any]) -> dict[str, Any]:
        """The input a user would give for a normalized dataset row (labels and references dropped).

        Used wherever a run is exercised on its own dev data: merge and export checks, compare's latency,
        the labs' inference stage, the server's warm-up."""
        if self is TaskKind.TOKEN_CLS:
            return {"tokens": list(row["tokens"])}
        if self is TaskKind.CAUSAL_LM:
            if row.get("messages"):  # a conversation: everything before its last answer
                from peftlab.tasks.chat import split_last_answer

                return {"messages": split_last_answer(list(row["messages"]))[0]}
            return {"prompt": row["prompt"]}
        if self is TaskKind.SEQ2SEQ:
            return {"source": row["source"]}
        if self is TaskKind.QA:
            return {"question": row["question"], "context": row["context"]}
        record = {"text": row["text"]}
        if row.get("text_pair"):
            record["text_pair"] = row["text_pair"]
        return record

    def reference_from_example(self, row: dict[str, Any]) -> Any:
        """The text a generative row expects (causal LM: ``response``; seq2seq: ``target``); None otherwise."""
        if self is TaskKind.CAUSAL_LM:
            if row.get("messages"):  # a conversation: its last answer
                from peftlab.tasks.chat import split_last_answer

                return split_last_answer(list(row["messages"]))[1]
            return row.get("response")
        if self is TaskKind.SEQ2SEQ:
            return row.get("target")
        return None

    def record_from_input(self, value: Any, where: str) -> dict[str, Any]:
        """A user's input (a string or a JSON object) -> the record ``predict`` and the server work on.

        ``where`` names the input in errors ("input 3", "texts.jsonl line 7")."""
        if self is TaskKind.QA:
            fields = {key: value.get(key) if isinstance(value, dict) else None for key in ("question", "context")}
            missing = [key for key, text in fields.items() if not isinstance(text, str) or not text.strip()]
            if missing:
                raise PeftlabError(
                    f"{where}: a question-answering adapter needs a non-empty 'question' and 'context' "
                    f"(missing: {', '.join(missing)}); on the command line use --question ... --context "
                    "..., in a JSON Lines file {\"question\": ..., \"context\": ...} per line.")
            return fields
        if self is TaskKind.CAUSAL_LM and (isinstance(value, list) or (isinstance(value, dict) and "messages" in value)):
            from peftlab.tasks.chat import normalize_messages  # a conversation to continue (chat adapters)

            messages = normalize_messages(value["messages"] if isinstance(value, dict) else value, where)
            if messages[-1]["role"] == "assistant":
                raise PeftlabError(f"{where}: the conversation ends with an assistant message; end it with the user's "
                                   "turn for the model to answer.")
            return {"messages": messages}
        if isinstance(value, str):
            value = {"text": value}
        if not isinstance(value, dict):
            raise PeftlabError(f"{where}: expected a JSON object or a string.")
        if self is TaskKind.TOKEN_CLS:
            if "tokens" in value:
                if not isinstance(value["tokens"], list):
                    raise PeftlabError(f"{where}: 'tokens' must be a list of words.")
                return {"tokens": [str(token) for token in value["tokens"]]}
            if "text" in value:
                return {"tokens": str(value["text"]).split()}
            raise PeftlabError(f"{where}: needs 'text' or 'tokens'.")
        if self is TaskKind.CAUSAL_LM:
            for key in ("prompt", "instruction", "text"):
                if key in value:
                    return {"prompt": str(value[key]), "input": str(value.get("input", "")), "raw_key": key}
            raise PeftlabError(f"{where}: needs 'text', 'instruction', 'prompt' or 'messages'.")
        if self is TaskKind.SEQ2SEQ:
            for key in ("source", "text"):
                if key in value:
                    return {"source": str(value[key])}
            raise PeftlabError(f"{where}: needs 'text' or 'source'.")
        if "text" not in value:
            raise PeftlabError(f"{where}: needs a 'text' field (and 'text_pair' for pair tasks).")
        return {"text": str(value["text"]), "text_pair": value.get("text_pair")}


# kind -> (peft TaskType, transformers auto class)
_FACTS: dict[TaskKind, tuple[str, str]] = {
    TaskKind.SEQ_CLS: ("SEQ_CLS", "AutoModelForSequenceClassification"),
    TaskKind.TOKEN_CLS: ("TOKEN_CLS", "AutoModelForTokenClassification"),
    TaskKind.CAUSAL_LM: ("CAUSAL_LM", "AutoModelForCausalLM"),
    TaskKind.SEQ2SEQ: ("SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM"),
    TaskKind.QA: ("QUESTION_ANS", "AutoModelForQuestionAnswering"),  # a start/end span head on every token
}

ALL_KINDS: tuple[TaskKind, ...] = tuple(TaskKind)
HEAD_KINDS: tuple[TaskKind, ...] = tuple(kind for kind in TaskKind if kind.has_new_head)
CLASSIFICATION_KINDS: tuple[TaskKind, ...] = tuple(kind for kind in TaskKind if kind.is_classification)

__all__ = ["TaskKind", "ALL_KINDS", "HEAD_KINDS", "CLASSIFICATION_KINDS"]
