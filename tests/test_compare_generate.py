"""``peftlab compare --generate N`` on generation tasks, and ``--packing`` with a method that cannot pack.

A tiny Llama (``peftlab.labs.standins.smoke_llama``: a real tokenizer, random weights) on a prompt/response
JSONL, in this process: fast, and every number the comparison writes comes from a real run."""

from __future__ import annotations

import csv
import json

import pytest

from peftlab.errors import PeftlabError
from test_packing import write_pairs  # question/answer pairs of made-up words


def test_generate_scores_every_run_and_packing_refuses_prompt_methods_as_a_row(tmp_path):
    from peftlab.compare import compare
    from peftlab.labs.standins import smoke_llama

    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "cmp"
    payload = compare(methods="lora,ia3,prompt-tuning", output=out, isolate=False, echo=lambda line: None,
                      generate=5, max_new_tokens=6,
                      train_options={"task": "jsonl", "model": str(smoke_llama()), "train_file": str(data),
                                     "prompt_column": "question", "response_column": "answer", "dev_fraction": 0.25,
                                     "epochs": 1, "batch_size": 6, "max_length": 48, "packing": True,
                                     "precision": "fp32"},
                      latency={"bs1_runs": 3, "bs32_runs": 1, "budget_s": 1.0})
    rows = {row["method"]: row for row in payload["results"]}
    assert payload["settings"]["generate"] == {"examples": 5, "max_new_tokens": 6}

    refused = rows["prompt-tuning"]
    assert refused["status"] == "unsupported"
    assert "--packing" in refused["reason"] and "virtual tokens" in refused["reason"]
    assert not (out / "runs" / "prompt-tuning").exists()  # refused before any work

    for name in ("lora", "ia3"):
        row = rows[name]
        assert row["status"] == "ok", row.get("error")
        generation = row["generation"]
        assert generation["examples"] == 5 and generation["max_new_tokens"] == 6
        assert set(generation["metrics"]) == {"rougeL", "exact_match", "chrf"}
        assert all(0.0 <= value <= 1.0 for value in generation["metrics"].values())
        lines = [json.loads(line) for line in (out / "runs" / name / "generations.jsonl").read_text().splitlines()]
        assert len(lines) == 5
        assert all({"prompt", "generated", "reference"} <= set(line) for line in lines)
        assert lines[0]["prompt"] and lines[0]["reference"]

    report = (out / "report.md").read_text()
    assert "ROUGE-L ↑, 5 generated" in report and "chrF" in report
    with (out / "results.csv").open() as handle:
        table = {line["method"]: line for line in csv.DictReader(handle)}
    assert float(table["lora"]["generation_rougeL"]) == pytest.approx(rows["lora"]["generation"]["metrics"]["rougeL"])
    assert table["prompt-tuning"]["generation_rougeL"] == ""


def test_generate_on_a_task_without_references_is_one_sentence_before_any_work(tmp_path, data_dir):
    from peftlab.compare import compare

    with pytest.raises(PeftlabError, match=r"--generate 4: task 'sst2' is a seq-cls task.*Leave out --generate"):
        compare(methods="lora", output=tmp_path / "cmp", generate=4, echo=lambda line: None,
                train_options={"task": "sst2", "model": "minilm", "data_dir": str(data_dir)})
    assert not (tmp_path / "cmp").exists()
    with pytest.raises(PeftlabError, match="--generate must be a whole number of at least 0; got -1"):
        compare(methods="lora", output=tmp_path / "cmp", generate=-1, echo=lambda line: None,
                train_options={"task": "sst2", "model": "minilm", "data_dir": str(data_dir)})


def test_train_refuses_packing_for_a_prompt_method_in_one_sentence(tmp_path):
    from peftlab import train
    from peftlab.labs.standins import smoke_llama

    data = write_pairs(tmp_path / "pairs.jsonl")
    with pytest.raises(PeftlabError, match=r"Method 'p-tuning' cannot train with --packing: its virtual tokens"):
        train(method="p-tuning", task="jsonl", model=str(smoke_llama()), train_file=str(data),
              prompt_column="question", response_column="answer", packing=True, output=str(tmp_path / "run"),
              progress=False)
