"""``peftlab compare`` end to end on the real bundled MiniLM and real SST-2, with a tiny budget.

One comparison (lora, bitfit, prompt-tuning; 64 examples, 1 epoch, 64 dev examples) is run once
through the command line and shared by the tests that read its files; the resume test continues a
second comparison from one of its finished runs and makes another method diverge on purpose. The
unsupported-method and bad-name checks never train.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab.methods.lora import LoRA

PEFTLAB = [sys.executable, "-m", "peftlab.cli"]
TINY_BUDGET = ["--max-train-samples", "64", "--epochs", "1", "--max-eval-samples", "64"]
METHODS = ("lora", "bitfit", "prompt-tuning")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def run_cli(args, data_dir, timeout=900):
    environment = {**os.environ, "PEFTLAB_DATA_DIR": str(data_dir)}
    result = subprocess.run(PEFTLAB + [str(a) for a in args], capture_output=True, text=True, env=environment,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"peftlab {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory, data_dir):
    output = tmp_path_factory.mktemp("compare") / "sst2"
    started = time.perf_counter()
    result = run_cli(["compare", "--task", "sst2", "--model", "minilm", "--methods", ",".join(METHODS),
                      "--output", output, *TINY_BUDGET], data_dir)
    return output, result, time.perf_counter() - started


def load_results(output: Path) -> dict:
    return json.loads((output / "results.json").read_text())


# ---- the comparison's files ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.real
def test_compare_writes_every_file_with_sane_numbers(tiny_compare):
    from PIL import Image

    from peftlab.compare import COMPARE_KEYS, METRIC_KEYS

    output, result, _ = tiny_compare
    for name in ("results.json", "results.csv", "report.md", "report.html", "pareto.png", "train_time.png",
                 "peak_memory.png", "latency.png"):
        assert (output / name).is_file(), name
    payload = load_results(output)
    environment = payload["environment"]
    for key in ("python", "torch", "transformers", "peft", "device", "threads", "cpu", "date", "command"):
        assert environment.get(key) not in (None, ""), key
    assert environment["command"].startswith("peftlab compare --task sst2")
    assert payload["complete"] is True

    rows = {row["method"]: row for row in payload["results"]}
    assert list(rows) == list(METHODS)
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row.get("error"))
        assert set(METRIC_KEYS) | set(COMPARE_KEYS) <= set(row), name
        assert 0 < row["trainable_fraction"] <= 1
        assert 0 < row["trainable_params"] < row["total_params"]
        assert 0 <= row["metric"] <= 1 and row["metric_name"] == "accuracy" and row["higher_is_better"] is True
        assert row["train_examples"] == 64 and row["eval_examples"] == 64 and row["epochs"] == 1
        assert row["seed"] == 42
        assert row["train_seconds"] > 0 and row["train_tokens_per_second"] > 0
        assert row["peak_memory_mb"] > 100
        assert row["latency_ms_bs1"] > 0 and row["latency_ms_bs32"] > 0
        assert row["latency_runs"]["bs32_rows"] == 32
        adapter = output / row["run_dir"] / "adapter"
        assert row["adapter_bytes"] == sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file()) > 0
        assert (output / row["run_dir"] / "result.json").is_file()
        assert (output / row["log"]).is_file()
        assert row["isolated"] is True
        assert row["inference_cost"]
        assert row["metric_delta_vs_full"] is None  # full did not run
    # each method trained with its own default learning rate
    assert rows["lora"]["learning_rate"] != rows["prompt-tuning"]["learning_rate"]
    # mergeable methods are also timed merged; prompt tuning cannot merge
    assert rows["lora"]["latency_ms_bs1_merged"] > 0 and rows["bitfit"]["latency_ms_bs32_merged"] > 0
    assert rows["prompt-tuning"]["latency_ms_bs1_merged"] is None
    assert rows["prompt-tuning"]["trainable_params"] < rows["bitfit"]["trainable_params"] < rows["lora"]["trainable_params"]
    # issue 16: the front is taken over the methods above the trivial baseline (at this tiny budget all three may
    # sit on the majority class); a method no better than the baseline is never on it
    from peftlab.report import pareto_flags

    trivial = payload["baselines"]["sst2"]
    assert trivial["metric_name"] == "accuracy" and trivial["eval_examples"] == 64 and 0 < trivial["metric"] < 1
    candidates = [r if not r["no_better_than_baseline"] else {**r, "status": "no-better"} for r in rows.values()]
    assert [r["pareto"] for r in rows.values()] == pareto_flags(candidates, higher_is_better=True)
    for row in rows.values():
        assert row["baseline_metric"] == trivial["metric"] and row["baseline_test"]["test"] != "none"
        assert not (row["pareto"] and row["no_better_than_baseline"])
    if not rows["prompt-tuning"]["no_better_than_baseline"]:
        assert rows["prompt-tuning"]["pareto"]  # the smallest method above the baseline is always on the front

    with (output / "results.csv").open() as stream:
        table = list(csv.DictReader(stream))
    assert [r["method"] for r in table] == list(METHODS)
    assert all(float(r["trainable_percent"]) > 0 for r in table)

    report = (output / "report.md").read_text()
    assert environment["command"] in report
    for name in METHODS:
        assert name in report
    assert "dev accuracy" in report and "Δ vs full" in report

    with Image.open(output / "pareto.png") as image:
        image.load()
        assert image.size[0] > 400 and image.size[1] > 300


@pytest.mark.slow
@pytest.mark.real
def test_report_html_is_self_contained_and_renders_in_headless_chromium(tiny_compare, tmp_path):
    import numpy as np
    from PIL import Image

    output, _, _ = tiny_compare
    page = (output / "report.html").read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]+)"', page)
    assert len(sources) == 4
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            image.load()
            assert image.size[0] > 200
    assert not re.search(r'(src|href)="(https?:)?//', page), "the report must not load anything from the network"

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install -y chromium); "
                    "set CHROMIUM=/path/to/chromium to use another build.")
    screenshot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={screenshot}", "--window-size=1200,2000", (output / "report.html").as_uri()],
                   capture_output=True, text=True, timeout=120, check=True)
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.shape == (2000, 1200)
    assert pixels.std() > 20, "the rendered report looks blank"
    assert (pixels < 128).mean() > 0.01  # text, table rules and plots, not an empty page


# ---- resume, and a method that fails ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.real
def test_resume_reuses_finished_runs_and_a_diverged_method_is_recorded(tiny_compare, tmp_path, data_dir):
    source, _, _ = tiny_compare
    output = tmp_path / "resumed"
    shutil.copytree(source / "runs" / "lora", output / "runs" / "lora")
    finished = output / "runs" / "lora" / "result.json"
    before = (finished.read_bytes(), finished.stat().st_mtime_ns)
    log_before = (output / "runs" / "lora" / "compare.log").stat().st_mtime_ns
    # bitfit with an absurd learning rate (8 steps of 8, so the run continues after the blow-up): its
    # weights and gradients become NaN; the comparison records it and goes on with the next method
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("bitfit:\n  lr: 1.0e+30\n  batch_size: 8\n")
    result = run_cli(["compare", "--task", "sst2", "--model", "minilm", "--methods", "bitfit,lora,ia3",
                      "--output", output, "--resume", "--config", recipe, *TINY_BUDGET], data_dir)
    assert "lora: finished earlier, reused" in result.stdout
    assert (finished.read_bytes(), finished.stat().st_mtime_ns) == before  # not re-run, not rewritten
    assert (output / "runs" / "lora" / "compare.log").stat().st_mtime_ns == log_before

    rows = {row["method"]: row for row in load_results(output)["results"]}
    assert list(rows) == ["bitfit", "lora", "ia3"]
    assert rows["bitfit"]["status"] == "failed"
    assert "diverged" in rows["bitfit"]["error"] and "nan" in rows["bitfit"]["error"].lower()
    assert rows["bitfit"]["trainable_params"] > 0  # it trained; what is known is kept
    assert rows["lora"]["status"] == "ok"
    assert rows["lora"]["metric"] == load_results(source)["results"][0]["metric"]
    assert rows["ia3"]["status"] == "ok" and rows["ia3"]["latency_ms_bs1"] > 0
    report = (output / "report.md").read_text()
    assert "Not compared" in report and "diverged" in report
    assert json.loads((output / "runs" / "bitfit" / "result.json").read_text())["status"] == "failed"

    # without --resume, a folder that holds a comparison is refused (nothing is overwritten)
    environment = {**os.environ, "PEFTLAB_DATA_DIR": str(data_dir)}
    again = subprocess.run(PEFTLAB + ["compare", "--task", "sst2", "--methods", "lora", "--output", str(output),
                                      *TINY_BUDGET], capture_output=True, text=True, env=environment, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr


# ---- checks that train nothing ------------------------------------------------------------------------------

def test_unknown_method_or_task_names_the_valid_ones_before_any_work(tmp_path):
    from peftlab.compare import compare
    from peftlab.errors import PeftlabError

    output = tmp_path / "never"
    with pytest.raises(PeftlabError, match=r"Unknown method 'lorra'.*Valid names:.*bitfit.*Did you mean 'lora'"):
        compare(methods="lorra,bitfit", output=output, train_options={"task": "sst2"})
    with pytest.raises(PeftlabError, match=r"Unknown task 'sst3'.*Valid names:.*sst2"):
        compare(methods="lora", output=output, train_options={"task": "sst3"})
    with pytest.raises(PeftlabError, match="--repeats"):
        compare(methods="lora", output=output, repeats=0, train_options={"task": "sst2"})
    with pytest.raises(PeftlabError, match="--methods"):
        compare(methods="lora", output=output, train_options={"task": "sst2", "method": "lora"})
    with pytest.raises(PeftlabError, match=r"Unknown method 'lorra'"):  # a recipe's `methods:` is checked too
        compare(output=output, train_options={"task": "sst2", "methods": "lorra"})
    with pytest.raises(PeftlabError, match=r"recipe has options for ia3"):
        compare(methods="lora", output=output, train_options={"task": "sst2", "ia3": {"lr": 1e-3}})
    with pytest.raises(PeftlabError, match=r"Unknown option 'r'"):  # per-method options are checked per method
        compare(methods="bitfit", output=output, train_options={"task": "sst2", "bitfit": {"r": 4}})
    assert not output.exists()


def test_a_method_the_model_cannot_take_is_listed_as_unsupported(tmp_path):
    """BitFit on a Llama (no bias terms): reported with the reason, not dropped; nothing is trained."""
    import tiny

    from peftlab.compare import compare

    model_dir = tmp_path / "tiny-llama"
    tiny.tiny_llama().config.save_pretrained(model_dir)  # the support check needs only the config
    output = tmp_path / "compare"
    payload = compare(methods="bitfit", output=output, echo=lambda message: None,
                      train_options={"task": "alpaca", "model": str(model_dir)})
    [row] = payload["results"]
    assert row["status"] == "unsupported"
    assert "no bias terms" in row["reason"]
    assert row["category"] == "selective" and row["metric"] is None
    assert not (output / "runs").exists()
    saved = load_results(output)
    assert saved["results"][0]["status"] == "unsupported"
    assert saved["settings"]["metric_name"] == "perplexity" and saved["settings"]["higher_is_better"] is False
    report = (output / "report.md").read_text()
    assert "bitfit" in report and "unsupported" in report and "no bias terms" in report
    assert (output / "pareto.png").stat().st_size > 1000 and "data:image/png;base64," in (output / "report.html").read_text()


def test_pareto_front_and_seed_aggregation():
    from peftlab.compare import aggregate
    from peftlab.report import pareto_flags, ranked

    rows = [
        {"method": "a", "status": "ok", "trainable_fraction": 0.001, "metric": 0.70},
        {"method": "b", "status": "ok", "trainable_fraction": 0.010, "metric": 0.80},
        {"method": "c", "status": "ok", "trainable_fraction": 0.020, "metric": 0.75},  # bigger and worse than b
        {"method": "d", "status": "ok", "trainable_fraction": 1.000, "metric": 0.85},
        {"method": "e", "status": "failed", "trainable_fraction": None, "metric": None},
    ]
    assert pareto_flags(rows, higher_is_better=True) == [True, True, False, True, False]
    # perplexity: lower is better
    assert pareto_flags(rows, higher_is_better=False) == [True, False, False, False, False]
    assert [r["method"] for r in ranked(rows, True)] == ["d", "b", "c", "a", "e"]

    runs = [{"method": "lora", "status": "ok", "seed": 42 + i, "metric": m, "train_seconds": t,
             "metrics": {"accuracy": m}, "trainable_fraction": 0.003}
            for i, (m, t) in enumerate([(0.80, 10.0), (0.82, 12.0), (0.84, 14.0)])]
    row = aggregate("lora", runs, None)
    assert row["status"] == "ok" and row["repeats"] == 3 and row["seeds"] == [42, 43, 44]
    assert row["metric"] == pytest.approx(0.82) and row["metric_std"] == pytest.approx(0.02)
    assert row["train_seconds"] == pytest.approx(12.0) and row["train_seconds_std"] == pytest.approx(2.0)
    assert row["metrics"]["accuracy"] == pytest.approx(0.82) and len(row["runs"]) == 3
    runs[1] = {**runs[1], "status": "failed", "error": "training diverged"}
    row = aggregate("lora", runs, None)
    assert row["status"] == "failed" and "seed 43: training diverged" in row["error"]
    assert row["metric"] == pytest.approx(0.82)  # the mean over the seeds that finished


# ---- a method registered from outside peftlab ------------------------------------------------------------------

class PluginLoRA(LoRA):
    """LoRA under another name, defined at the top of this module so that a worker process can import it."""

    name = "plugin-lora"


def test_a_registered_method_and_the_baseline_flag_need_no_method_names(tmp_path):
    """compare reads the methods' declared facts: a method registered from outside is compared (here it is
    unsupported, so nothing trains), and "Δ vs full" is measured against whichever row trains all weights."""
    import tiny

    from peftlab.compare import compare, compare_rows, method_source
    from peftlab.errors import PeftlabError
    from peftlab.kinds import TaskKind
    from peftlab.methods import register_method, unregister_method
    from peftlab.methods.bitfit import BitFit
    from peftlab.report import format_delta

    class ClassifierOnly(BitFit):  # defined in a function: a worker process could not import it
        name = "classifier-only"
        kinds = (TaskKind.SEQ_CLS,)

    register_method(ClassifierOnly)
    try:
        model_dir = tmp_path / "tiny-llama"
        tiny.tiny_llama().config.save_pretrained(model_dir)
        payload = compare(methods="classifier-only", output=tmp_path / "compare", echo=lambda message: None,
                          train_options={"task": "alpaca", "model": str(model_dir)})
        [row] = payload["results"]
        assert row["method"] == "classifier-only" and row["status"] == "unsupported"
        assert row["category"] == "selective" and row["trains_all_weights"] is False
        assert "seq-cls" in row["reason"]
        with pytest.raises(PeftlabError, match="cannot import.*--no-isolate"):
            method_source("classifier-only")
    finally:
        unregister_method("classifier-only")
    assert method_source("lora") is None  # peftlab's own methods: every process has them

    rows = [{"method": "mine", "status": "ok", "metric": 0.9, "trainable_fraction": 1.0, "trains_all_weights": True},
            {"method": "small", "status": "ok", "metric": 0.8, "trainable_fraction": 0.01, "trains_all_weights": False}]
    compare_rows(rows, higher_is_better=True)
    assert rows[0]["metric_delta_vs_full"] == 0 and rows[1]["metric_delta_vs_full"] == pytest.approx(-0.1)
    assert format_delta(rows[0]) == "-" and format_delta(rows[1]) == "-0.1000"


@pytest.mark.slow
@pytest.mark.real
def test_a_registered_method_trains_in_its_own_worker_process(tmp_path, data_dir, monkeypatch):
    """register_method in this process only: the isolated worker imports the class the spec names."""
    from peftlab.compare import compare
    from peftlab.methods import register_method, unregister_method

    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(data_dir))
    monkeypatch.delenv("PEFTLAB_PLUGINS", raising=False)
    register_method(PluginLoRA)
    try:
        payload = compare(methods="plugin-lora", output=tmp_path / "compare", echo=lambda message: None,
                          latency={"bs1_runs": 3, "bs32_runs": 3, "budget_s": 1.0},
                          train_options={"task": "sst2", "model": "minilm", "max_train_samples": 16,
                                         "max_eval_samples": 16, "epochs": 1})
    finally:
        unregister_method("plugin-lora")
    [row] = payload["results"]
    assert row["status"] == "ok", row["error"]
    assert row["method"] == "plugin-lora" and row["isolated"] is True and row["category"] == "reparameterization"
    assert row["trains_all_weights"] is False and row["latency_ms_bs1_merged"] > 0
    spec = json.loads((tmp_path / "compare" / "runs" / "plugin-lora" / "compare-spec.json").read_text())
    assert spec["method_source"]["module"] == "test_compare"
