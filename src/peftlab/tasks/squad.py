"""SQuAD v1.1: extractive question answering (Rajpurkar et al. 2016), scored by exact match and F1.

Every question is answered by a span of its paragraph (``context``). The model is a start/end span
head on every token (``AutoModelForQuestionAnswering``); see ``peftlab.preprocess`` for how long
contexts are cut into overlapping windows and ``peftlab.evaluation`` for how spans become answers.

Hub source: ``rajpurkar/squad`` (``train`` 87,599 / ``validation`` 10,570 questions; dev = validation).

Local layout, under ``<data_dir>/squad/``, for each split (``train``, ``dev``) one of:

* ``train.json`` / ``dev.json`` (also accepted: the official file names ``train-v1.1.json`` /
  ``dev-v1.1.json``): the original SQuAD v1.1 JSON,
  ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
  "answers": [{"text", "answer_start"}]}]}]}]}``;
* ``train.jsonl`` / ``dev.jsonl``: one question per line with the Hub's flattened columns
  ``{"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}``
  (``title`` optional).

Normalized rows (task kind ``qa``): ``id`` (str), ``question`` (str), ``context`` (str), ``answers``
(``{"text": [str], "answer_start": [int]}``; dev questions usually carry several gold answers). Local
files are checked: every question needs at least one answer whose ``answer_start`` points at its
``text`` inside the context, otherwise the error names the file and the record.

Metric: ``exact_match`` and ``f1`` (``metric_name``), as the official SQuAD v1.1 evaluation script
defines them, reported as fractions in [0, 1] like peftlab's other scores (the official script prints
them multiplied by 100).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.tasks.base import Task, load_hub_dataset
from peftlab.tasks.tabular import is_file, read_rows, read_text

HUB_PATH = "rajpurkar/squad"
HUB_SPLITS = {"train": "train", "dev": "validation"}
LOCAL_FILES = {"train": ("train.json", "train.jsonl", "train-v1.1.json"),
               "dev": ("dev.json", "dev.jsonl", "dev-v1.1.json")}
COLUMNS = ("id", "question", "context", "answers")


# ---- the official SQuAD v1.1 scorer ----------------------------------------------------------------
# Mirrors evaluate-v1.1.py, the official SQuAD v1.1 evaluation script (normalize_answer, f1_score,
# exact_match_score, metric_max_over_ground_truths), line for line. Written here because the `evaluate`
# package (whose "squad" metric wraps the same script) is not installed and fetches scripts from the Hub.

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, remove punctuation, remove the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between the normalised prediction and one normalised gold answer."""
    prediction_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(truth_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean over questions of the best score against any gold answer (fractions, not percentages)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    exact = f1 = 0.0
    for prediction, truths in zip(predictions, references):
        if not truths:
            raise ValueError("every question needs at least one gold answer (SQuAD v1.1)")
        exact += max(exact_match_score(prediction, truth) for truth in truths)
        f1 += max(f1_score(prediction, truth) for truth in truths)
    return {"exact_match": exact / len(predictions), "f1": f1 / len(predictions)}


# ---- reading the files -------------------------------------------------------------------------------

def _text(where: str, record: dict, key: str, what: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        problem = ("is missing" if key not in record else
                   "is empty" if isinstance(value, str) else f"is a JSON {type(value).__name__}, not a string")
        raise PeftlabError(f"{where}: field '{key}' ({what}) {problem}. Every SQuAD question needs a non-empty "
                           "'question' and 'context' and at least one answer.")
    return value


def check_answers(where: str, context: str, texts: list, starts: list) -> dict[str, list]:
    """The answers of one question, checked against its context: every ``answer_start`` must point at its text."""
    if not texts:
        raise PeftlabError(f"{where}: the question has no answer. SQuAD v1.1 questions all have one (unanswerable "
                           "SQuAD 2.0 questions are not supported): add an answer or drop the question.")
    if len(texts) != len(starts):
        raise PeftlabError(f"{where}: 'answers' has {len(texts)} texts but {len(starts)} answer_start values; "
                           "give one answer_start per text.")
    clean_texts, clean_starts = [], []
    for number, (text, start) in enumerate(zip(texts, starts), start=1):
        if not isinstance(text, str) or not text.strip():
            raise PeftlabError(f"{where}: answer {number} has no text (got {text!r}). Give each answer a non-empty "
                               "'text'.")
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(context) - len(text):
            raise PeftlabError(
                f"{where}: answer {number} ({text[:40]!r}) has answer_start {start!r}, which is not a character "
                f"position inside the context ({len(context)} characters). answer_start is the 0-based offset of "
                "the answer text in the context.")
        found = context[start:start + len(text)]
        if found != text:
            raise PeftlabError(
                f"{where}: answer {number} {text[:40]!r} is not at answer_start {start} of the context (the context "
                f"has {found[:40]!r} there). Fix answer_start: it is the 0-based character offset of the answer "
                "text in the context.")
        clean_texts.append(text)
        clean_starts.append(start)
    return {"text": clean_texts, "answer_start": clean_starts}


def _record(where: str, question_id: Any, question: str, context: str, answers: dict) -> dict:
    if isinstance(question_id, bool) or not isinstance(question_id, (str, int)) or str(question_id).strip() == "":
        raise PeftlabError(f"{where}: field 'id' is missing or not a string (got {question_id!r}). Give every "
                           "question a unique id.")
    return {"id": str(question_id), "question": question, "context": context, "answers": answers}


def read_squad_json(path: Path) -> list[dict]:
    """The questions of an original SQuAD v1.1 JSON file, in normalized form."""
    text = read_text(path)
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise PeftlabError(f"{path}, line {error.lineno}: invalid JSON ({error.msg}, column {error.colno}). "
                           "A SQuAD .json file is one JSON object {\"data\": [...]}.") from None
    if isinstance(payload, list):  # a JSON list of flattened (Hub-style) records, one per question
        return read_squad_jsonl(path)
    articles = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(articles, list):
        found = f"a JSON {type(payload).__name__}" + (f" with keys {', '.join(map(repr, list(payload)[:5]))}"
                                                      if isinstance(payload, dict) else "")
        raise PeftlabError(
            f"{path}: expected the SQuAD v1.1 layout {{\"data\": [{{\"title\", \"paragraphs\": [{{\"context\", "
            f"\"qas\": [...]}}]}}]}} but found {found}. For one question per line use a .jsonl file with the Hub's "
            "columns (id, title, context, question, answers).")
    records: list[dict] = []
    seen: dict[str, str] = {}
    for a, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise PeftlabError(f"{path}, data[{a}]: expected an object with a 'paragraphs' list. Each SQuAD article "
                               "is {\"title\": ..., \"paragraphs\": [{\"context\": ..., \"qas\": [...]}]}.")
        for p, paragraph in enumerate(paragraphs):
            where_paragraph = f"{path}, data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise PeftlabError(f"{where_paragraph}: expected an object with 'context' and a 'qas' list of "
                                   "questions.")
            context = _text(where_paragraph, paragraph, "context", "the paragraph")
            for q, qa in enumerate(paragraph["qas"]):
                where = f"{where_paragraph}.qas[{q}]"
                if not isinstance(qa, dict):
                    raise PeftlabError(f"{where}: expected a question object {{\"id\", \"question\", \"answers\"}}.")
                where = f"{where} (id {qa.get('id')!r})" if "id" in qa else where
                if qa.get("is_impossible"):
                    raise PeftlabError(f"{where}: the question is marked is_impossible (SQuAD 2.0). peftlab's squad "
                                       "task is SQuAD v1.1, where every question has an answer: drop it.")
                answers = qa.get("answers")
                if not isinstance(answers, list) or not all(isinstance(x, dict) for x in answers):
                    raise PeftlabError(f"{where}: 'answers' must be a list of {{\"text\", \"answer_start\"}} objects "
                                       f"(got {type(answers).__name__}).")
                record = _record(where, qa.get("id"), _text(where, qa, "question", "the question"), context,
                                 check_answers(where, context, [x.get("text") for x in answers],
                                               [x.get("answer_start") for x in answers]))
                _unique(record, where, seen)
                records.append(record)
    if not records:
        raise PeftlabError(f"{path}: no questions found (the 'data' list has no paragraphs with 'qas').")
    return records


def read_squad_jsonl(path: Path) -> list[dict]:
    """One question per line with the Hub's columns (id, title, context, question, answers{text, answer_start});
    also a JSON list of such records."""
    records: list[dict] = []
    seen: dict[str, str] = {}
    for line_number, row in read_rows(path, delimiter=None):
        where = f"{path}, line {line_number}"
        answers = row.get("answers")
        if not isinstance(answers, dict) or not isinstance(answers.get("text"), list) \
                or not isinstance(answers.get("answer_start"), list):
            raise PeftlabError(
                f"{where}: field 'answers' must be {{\"text\": [...], \"answer_start\": [...]}} (the Hub's format); "
                f"got {json.dumps(answers)[:80] if 'answers' in row else 'nothing'}.")
        context = _text(where, row, "context", "the paragraph")
        record = _record(where, row.get("id"), _text(where, row, "question", "the question"), context,
                         check_answers(where, context, answers["text"], answers["answer_start"]))
        _unique(record, where, seen)
        records.append(record)
    return records


def _unique(record: dict, where: str, seen: dict[str, str]) -> None:
    if record["id"] in seen:
        raise PeftlabError(f"{where}: id {record['id']!r} is used again (first at {seen[record['id']]}). Question "
                           "ids must be unique: predictions are matched to questions by id.")
    seen[record["id"]] = where


class SquadTask(Task):
    def __init__(self, name: str = "squad", **options):
        super().__init__(
            name=name,
            kind=TaskKind.QA,
            metric_name="f1",
            description="SQuAD v1.1 extractive question answering (exact match and F1, official definitions)",
            options=options,
        )

    def _load_local(self, split: str, data_dir: Path | None):
        import datasets

        folder = data_dir / "squad"
        candidates = [folder / name for name in LOCAL_FILES[split]]
        path = next((p for p in candidates if is_file(p)), None)
        if path is None:
            raise PeftlabError(
                f"Task '{self.name}': expected the {split} file at '{candidates[0]}' (or {candidates[1].name}): the "
                "original SQuAD v1.1 JSON, or JSON Lines with the Hub's columns id, title, context, question, "
                "answers. Put the files there, or unset --data-dir/$PEFTLAB_DATA_DIR to load rajpurkar/squad from "
                "the Hub.")
        records = read_squad_jsonl(path) if path.suffix == ".jsonl" else read_squad_json(path)
        return datasets.Dataset.from_list(records)

    def _load_hub(self, split: str):
        raw = load_hub_dataset(HUB_PATH, None, HUB_SPLITS[split], self.name)
        return raw.select_columns(list(COLUMNS))

    def compute_metrics(self, predictions, references):
        """``predictions``: one answer string per question; ``references``: the gold answer strings of each."""
        return squad_scores(list(predictions), [list(r) for r in references])
