"""Model cards: every method and every task kind gives a README.md that huggingface_hub reads as Hub metadata
(base model, library, pipeline tag, datasets, licence, tags with the method, a model-index with the dev
metrics), written from a run folder's peftlab.json and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from peftlab import modelcard
from peftlab.artifacts import RunManifest
from peftlab.kinds import TaskKind
from peftlab.methods import get_method, get_method_class, method_names

# one task per kind (the dev metric each reports)
TASKS = {TaskKind.SEQ_CLS: ("sst2", {"accuracy": 0.8123}), TaskKind.TOKEN_CLS: ("conll2003", {"f1": 0.71}),
         TaskKind.CAUSAL_LM: ("alpaca", {"perplexity": 12.5, "loss": 2.52}),
         TaskKind.SEQ2SEQ: ("billsum", {"perplexity": 9.1}), TaskKind.QA: ("squad", {"f1": 0.55, "exact_match": 0.41})}


def fake_run(root: Path, method: str, kind: TaskKind, model: str = "minilm") -> Path:
    """A run folder as `peftlab train` leaves it, without weights: peftlab.json, metrics.json, adapter/."""
    task, scores = TASKS[kind]
    run = root / f"{method}-{kind}"
    (run / "adapter").mkdir(parents=True)
    options = get_method(method).options_dict()
    labels = ["negative", "positive"] if kind is TaskKind.SEQ_CLS else (["O", "B-PER", "I-PER"]
                                                                         if kind is TaskKind.TOKEN_CLS else None)
    RunManifest(method=method, model=model, kind=kind, task=task, method_options=options, label_names=labels,
                max_length=64, precision="bf16", peftlab_version="0.1.0").save(run)
    metric_name = next(iter(scores))
    (run / "metrics.json").write_text(json.dumps({
        "method": method, "task": task, "model": model, "kind": str(kind), "metric_name": metric_name,
        "metric": scores[metric_name], "metrics": scores, "trainable_params": 1234, "total_params": 22_700_000,
        "train_examples": 2000, "eval_examples": 872, "epochs": 2.0, "steps": 126, "effective_batch_size": 32,
        "learning_rate": 2e-3, "warmup_ratio": 0.06, "precision": "bf16", "device": "cpu", "train_seconds": 238.4,
        "train_samples_per_second": 16.8, "peak_memory_mb": 1830.5, "seed": 42}))
    return run


CELLS = [(method, kind) for method in method_names() for kind in TaskKind if kind in get_method_class(method).kinds]


@pytest.mark.parametrize("method, kind", CELLS, ids=[f"{m}-{k}" for m, k in CELLS])
def test_every_method_and_kind_gives_a_card_the_hub_reads(tmp_path, method, kind):
    run = fake_run(tmp_path, method, kind)
    path = modelcard.write_card(run)
    assert path == run / "adapter" / "README.md"
    card = ModelCard.load(path)
    data = card.data.to_dict()
    task, scores = TASKS[kind]
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == modelcard.pipeline_tag(kind) and data["pipeline_tag"]
    assert method in data["tags"] and "peftlab" in data["tags"] and task in data["tags"]
    method_class = get_method_class(method)
    expected_library = ("transformers" if method_class.trains_all_weights else
                        "peft" if method_class.peft_type else "peftlab")
    assert data["library_name"] == expected_library
    if kind is TaskKind.SEQ_CLS:  # GLUE's Hub id is not declared by the task yet (see the report)
        assert data.get("datasets") in (None, ["nyu-mll/glue"])
    else:
        assert data["datasets"] and "/" in data["datasets"][0]
    # the model-index: one result per dev metric, with the measured values
    results = card.data.eval_results
    assert {r.metric_type: r.metric_value for r in results} == pytest.approx(scores)
    assert all(r.task_type == data["pipeline_tag"] and r.dataset_split == "dev" for r in results)
    text = card.text
    assert "## Dev results" in text and "## Method options" in text and "## Training budget" in text
    assert "## Hardware" in text and "1,830" in text and "bf16" in text
    for option in get_method(method).options_dict():
        assert f"`{option}`" in text
    assert "peftlab predict --adapter" in text and "load_trained(" in text
    if method_class.peft_type:
        assert "PeftModel.from_pretrained(base" in text and kind.auto_class in text
    elif method_class.trains_all_weights:
        assert f"{kind.auto_class}.from_pretrained(" in text


def test_the_repo_id_appears_in_the_loading_code(tmp_path):
    run = fake_run(tmp_path, "lora", TaskKind.SEQ_CLS)
    card = modelcard.card_for(RunManifest(**json.loads((run / "peftlab.json").read_text())),
                              modelcard.read_metrics(run), repo_id="org/lora-sst2")
    assert 'PeftModel.from_pretrained(base, "org/lora-sst2")' in card.text
    assert "num_labels=2" in card.text
    assert card.data.to_dict()["model-index"][0]["name"] == "lora-sst2"


def test_base_models_by_hub_id_or_folder(tmp_path):
    assert modelcard.base_model_facts("org/base") == ("org/base", None)
    assert modelcard.base_model_facts("not a hub id") == (None, None)
    folder = tmp_path / "my-base"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\nbase_model: org/original\n---\n# mine\n")
    assert modelcard.base_model_facts(str(folder)) == ("org/original", "mit")


def test_a_run_without_metrics_still_gets_a_card(tmp_path):
    run = fake_run(tmp_path, "ia3", TaskKind.SEQ_CLS, model="org/base")
    (run / "metrics.json").unlink()
    card = ModelCard.load(modelcard.write_card(run))
    assert card.data.to_dict()["base_model"] == "org/base" and not card.data.eval_results


def test_not_a_run_folder_is_one_sentence(tmp_path):
    from peftlab.errors import PeftlabError

    with pytest.raises(PeftlabError, match="not a peftlab run folder"):
        modelcard.write_card(tmp_path)


def test_a_merged_model_card(tmp_path):
    run = fake_run(tmp_path, "lora", TaskKind.SEQ_CLS)
    out = tmp_path / "merged"
    out.mkdir()
    report = {"source_adapter": str(run), "method": "lora", "model": "minilm", "kind": "seq-cls", "task": "sst2",
              "samples": 16, "sample_source": "sst2 dev set (first 16 examples)", "max_abs_diff": 1.2e-7,
              "allowed_abs_diff": 1e-4}
    card = ModelCard.load(modelcard.write_merged_card(out, report))
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and "merged" in data["tags"] and "lora" in data["tags"]
    assert data["pipeline_tag"] == "text-classification"
    assert "AutoModelForSequenceClassification.from_pretrained(" in card.text and "PeftModel" not in card.text
    assert "## Merge check" in card.text and card.data.eval_results[0].metric_value == pytest.approx(0.8123)
