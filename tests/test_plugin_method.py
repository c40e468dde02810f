"""A method registered from outside the package works in every command, with no edit in src/.

The method is LayerNorm tuning, defined in tests/plugin_ln_tuning.py (one file, one ``register_method``
call). It trains on the real minilm and SST-2, reloads in a fresh process (``peftlab eval``, which finds
it through ``$PEFTLAB_PLUGINS``), and appears in ``peftlab methods``, ``compare``, ``recommend``, the memory
estimate and ``serve``. tests/test_architecture.py checks the other half: nobody outside methods/ names a
method.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import plugin_ln_tuning  # noqa: F401  (registers "ln-tuning")

NAME = "ln-tuning"
TESTS = Path(__file__).parent


def plugin_env(data_dir) -> dict[str, str]:
    env = dict(os.environ, PEFTLAB_PLUGINS="plugin_ln_tuning", PEFTLAB_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> Path:
    import peftlab

    output = tmp_path_factory.mktemp("plugin") / "ln-sst2"
    peftlab.train(method=NAME, task="sst2", model="minilm", output=str(output), epochs=1, max_train_samples=64,
                  max_eval_samples=32, batch_size=16, precision="fp32", progress=False, data_dir=str(data_dir))
    return output


def test_methods_table_lists_it_with_its_facts():
    from peftlab.catalog import methods_table

    rows = {row["method"]: row for row in methods_table()}
    assert rows[NAME]["category"] == "selective" and rows[NAME]["mergeable"] is False


@pytest.mark.real
def test_it_is_counted_estimated_and_ranked_on_a_real_model():
    from peftlab.memory import estimate
    from peftlab.recommend import recommend

    footprint = estimate("minilm", NAME, "seq-cls", batch_size=8, seq_length=128, device="cpu")
    assert footprint.trainable_params > 0 and footprint.peak_bytes > footprint.trainable_params * 4
    ranking = recommend(model="minilm", task_type="classification", memory="8GB", device="cpu")
    row = next(r for r in ranking["ranking"] if r["method"] == NAME)
    assert row["status"] != "unsupported" and row["trainable_params"] == footprint.trainable_params


@pytest.mark.slow
@pytest.mark.real
def test_it_trains_and_reloads_in_a_fresh_process(run, data_dir):
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == NAME and 0 < metrics["trainable_params"] < metrics["total_params"] / 100
    result = subprocess.run([sys.executable, "-m", "peftlab.cli", "eval", "--adapter", str(run),
                             "--max-eval-samples", "32"], capture_output=True, text=True, env=plugin_env(data_dir),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = json.loads(result.stdout[result.stdout.index("{"):])  # the reloaded adapter scores the same
    assert evaluated["metric"] == pytest.approx(metrics["metric"], abs=1e-4), (metrics["metric"], evaluated)


@pytest.mark.slow
@pytest.mark.real
def test_serve_hosts_it_beside_a_builtin_method(run, data_dir):
    from fastapi.testclient import TestClient

    from peftlab.inference import load_trained, predict
    from peftlab.serving import build
    from peftlab.serving.app import create_app

    engine = build("minilm", {"ln": str(run)})
    try:
        with TestClient(create_app(engine)) as client:
            [listed] = client.get("/v1/adapters").json()["adapters"]
            assert listed["method"] == NAME
            answer = client.post("/v1/predict", json={"adapter": "ln", "inputs": ["a gripping, funny film"]})
            assert answer.status_code == 200, answer.text
    finally:
        engine.stop()
    expected = predict(load_trained(run, device="cpu"), ["a gripping, funny film"])[0]
    [output] = answer.json()["outputs"]
    for label, probability in expected["probabilities"].items():
        assert output["probabilities"][label] == pytest.approx(probability, abs=1e-5)


@pytest.mark.slow
@pytest.mark.real
def test_compare_measures_it(tmp_path, data_dir, monkeypatch):
    from peftlab.compare import compare

    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(data_dir))
    payload = compare(methods=NAME, output=tmp_path / "compare", echo=lambda message: None,
                      latency={"bs1_runs": 3, "bs32_runs": 3, "budget_s": 1.0},
                      train_options={"task": "sst2", "model": "minilm", "epochs": 1, "max_train_samples": 64,
                                     "max_eval_samples": 32, "batch_size": 16})
    [row] = payload["results"]
    assert row["method"] == NAME and row["status"] == "ok", row.get("reason")
    assert row["trainable_params"] > 0 and row["category"] == "selective"
