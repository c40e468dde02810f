"""compare on several tasks: suites and their average, intervals over seeds, the trivial baseline and the "no better
than the baseline" check, tuning, retries, the progress display and the bad inputs (issue 16, issue 17 item 6).

The statistics and the report are checked on numbers made up here; one small suite (a tiny BERT with MiniLM's
tokenizer, 48 real SST-2/MRPC examples, two methods, two seeds, in this process) and one tuning run train for
real, in seconds.
"""

from __future__ import annotations

import io
import json
import math
import time

import pytest

from compare_world import FAST_LATENCY, TINY_OPTIONS, make_world
from peftlab.errors import PeftlabError
from peftlab.methods.lora import LoRA


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_dir):
    return make_world(tmp_path_factory.mktemp("compare-suite"), data_dir)


# ---- statistics -----------------------------------------------------------------------------------------

def test_seed_interval_is_the_t_interval_and_overlaps_are_found():
    from scipy import stats

    from peftlab.compare import intervals_overlap, seed_interval

    values = [0.80, 0.82, 0.86]
    interval = seed_interval(values)
    expected = stats.t.interval(0.95, 2, loc=sum(values) / 3, scale=stats.sem(values))
    assert interval["mean"] == pytest.approx(0.8266667) and interval["n"] == 3
    assert (interval["low"], interval["high"]) == pytest.approx(expected)
    assert seed_interval([0.7]) == {"mean": 0.7, "sd": None, "low": None, "high": None, "n": 1}
    assert seed_interval([float("nan"), None]) is None
    assert intervals_overlap({"metric_ci_low": 0.7, "metric_ci_high": 0.8}, {"metric_ci_low": 0.79, "metric_ci_high": 0.9})
    assert not intervals_overlap({"metric_ci_low": 0.7, "metric_ci_high": 0.8},
                                 {"metric_ci_low": 0.81, "metric_ci_high": 0.9})
    assert not intervals_overlap({"metric_ci_low": None}, {"metric_ci_low": 0.1, "metric_ci_high": 0.2})


def test_no_better_than_baseline_by_each_test():
    from peftlab.compare import no_better_than_baseline

    # the case: 2.5 points above the majority class on 277 dev examples is noise (binomial)
    noise = no_better_than_baseline("accuracy", 0.5271 + 0.025, 0.5271, 277)
    assert noise.no_better is True and "binomial" in noise.test and noise.p_value > 0.05
    clear = no_better_than_baseline("accuracy", 0.81, 0.51, 872)
    assert clear.no_better is False and clear.p_value < 1e-6
    assert no_better_than_baseline("accuracy", 0.50, 0.51, 872).test == "point estimate"
    # MCC against 0 (CoLA's majority class), correlations with Fisher's z
    assert no_better_than_baseline("mcc", 0.05, 0.0, 277).no_better is True
    assert no_better_than_baseline("mcc", 0.30, 0.0, 1043).no_better is False
    assert no_better_than_baseline("pearson", 0.08, 0.0, 100).no_better is True
    assert no_better_than_baseline("pearson", 0.60, 0.0, 100).no_better is False
    # F1 tasks are tested on their accuracy too: F1 above the baseline's but accuracy not above it
    mrpc = no_better_than_baseline("f1", 0.82, 0.81, 408, metrics={"f1": 0.82, "accuracy": 0.68},
                                   baseline_metrics={"f1": 0.81, "accuracy": 0.684})
    assert mrpc.no_better is True
    # seeds: the interval decides (3 seeds, 0.66 +- 0.07 does not clear 0.51; 0.81 +- 0.005 does)
    assert no_better_than_baseline("accuracy", 0.66, 0.51, seed_values=[0.58, 0.66, 0.74]).no_better is True
    assert no_better_than_baseline("accuracy", 0.81, 0.51, seed_values=[0.805, 0.81, 0.815]).no_better is False
    # lower is better (perplexity): the check runs the other way
    assert no_better_than_baseline("perplexity", 12.0, 10.0, higher_is_better=False).no_better is True
    untested = no_better_than_baseline("f1", 0.4, 0.0, 50)  # entity F1: no one-seed test
    assert untested.no_better is None and "--repeats" in untested.detail
    assert no_better_than_baseline("accuracy", 0.8, None).no_better is None


def test_trivial_baselines_use_the_task_scorer():
    import datasets

    from peftlab.compare import trivial_baseline
    from peftlab.tasks import get_task

    def rows(labels):
        return datasets.Dataset.from_list([{"text": "x", "text_pair": None, "label": label} for label in labels])

    sst2 = trivial_baseline(get_task("sst2"), rows(["positive"] * 6 + ["negative"] * 4),
                            rows(["positive"] * 3 + ["negative"] * 5))
    assert sst2["metric"] == pytest.approx(3 / 8) and "majority class 'positive'" in sst2["description"]
    cola = trivial_baseline(get_task("cola"), rows(["acceptable"] * 7 + ["unacceptable"] * 3),
                            rows(["acceptable"] * 6 + ["unacceptable"] * 4))
    assert cola["metric_name"] == "mcc" and cola["metric"] == 0.0 and cola["metrics"]["accuracy"] == pytest.approx(0.6)
    mrpc = trivial_baseline(get_task("mrpc"), rows(["equivalent"] * 7 + ["not_equivalent"] * 3),
                            rows(["equivalent"] * 7 + ["not_equivalent"] * 3))
    assert mrpc["metric"] == pytest.approx(2 * 0.7 / 1.7) and mrpc["metrics"]["accuracy"] == pytest.approx(0.7)
    stsb = trivial_baseline(get_task("stsb"), rows([1.0, 2.0, 3.0]), rows([0.5, 4.0, 2.5]))
    assert stsb["metric"] == 0.0 and "training mean (2)" in stsb["description"]
    # a tie goes to the first label in the task's order
    tie = trivial_baseline(get_task("sst2"), rows(["positive", "negative"]), rows(["negative"]))
    assert "'negative'" in tie["description"] and tie["metric"] == 1.0
    assert trivial_baseline(get_task("alpaca"), None, None) is None  # perplexity: none


def test_baseline_warning_for_peftlab_train():
    import datasets

    from peftlab.compare import baseline_warning
    from peftlab.tasks import get_task

    train = datasets.Dataset.from_list([{"text": "x", "text_pair": None, "label": "positive"}] * 6
                                       + [{"text": "y", "text_pair": None, "label": "negative"}] * 4)
    dev = datasets.Dataset.from_list([{"text": "x", "text_pair": None, "label": "positive"}] * 50
                                     + [{"text": "y", "text_pair": None, "label": "negative"}] * 50)
    warning = baseline_warning(get_task("sst2"), train, dev, None, {"accuracy": 0.52})
    assert warning.startswith("Warning: dev accuracy 0.5200 is no better than the trivial baseline")
    assert "majority class 'positive'" in warning and "binomial" in warning
    assert baseline_warning(get_task("sst2"), train, dev, None, {"accuracy": 0.80}) is None


# ---- names, suites and option checks (nothing trains) -----------------------------------------------------

def test_bad_inputs_get_one_sentence(tmp_path):
    from peftlab.compare import compare, parse_tasks
    from peftlab.compare.parallel import check_workers, plan_workers
    from peftlab.compare.ray_backend import check_reachable
    from peftlab.compare.tuning import check_tune

    with pytest.raises(PeftlabError, match=r"Unknown task 'nope'.*Valid names:.*mrpc"):
        parse_tasks("sst2,nope", None, None)
    with pytest.raises(PeftlabError, match="either --suite or --tasks"):
        parse_tasks("sst2", "glue", None)
    assert parse_tasks(None, "glue", None) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]
    assert parse_tasks("sst2, mrpc,sst2", None, None) == ["sst2", "mrpc"]
    assert parse_tasks(None, None, "rte") == ["rte"]
    with pytest.raises(PeftlabError, match="--trials must be a positive whole number; got 0"):
        check_tune("lr", 0)
    with pytest.raises(PeftlabError, match="not tunable"):
        check_tune("batch_size", 4)
    with pytest.raises(PeftlabError, match="add --tune lr"):
        check_tune(None, 4)
    assert check_tune("lr", None) == ("lr", 8)
    with pytest.raises(PeftlabError, match="--workers must be a positive whole number"):
        check_workers(0)
    cpu = plan_workers(8, gpus=0, cores=2)
    assert cpu.count == 2 and [s["threads"] for s in cpu.slots] == [1, 1]
    assert "--workers 8 capped at 2" in cpu.notes[0] and "2 CPU core(s)" in cpu.notes[0]
    gpu = plan_workers(3, gpus=2, cores=16)
    assert gpu.count == 2 and [s["environment"]["CUDA_VISIBLE_DEVICES"] for s in gpu.slots] == ["0", "1"]
    assert "2 GPU(s), one per worker" in gpu.notes[0] and gpu.slots[0]["threads"] == 8
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = "5,7"  # the user's choice is honoured (restored by conftest)
    assert [s["environment"]["CUDA_VISIBLE_DEVICES"] for s in plan_workers(2, gpus=2, cores=4).slots] == ["5", "7"]

    import socket

    with socket.socket() as probe:  # a loopback port nobody listens at
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    began = time.perf_counter()
    with pytest.raises(PeftlabError, match=rf"Cannot reach the Ray cluster at '127.0.0.1:{port}'"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.perf_counter() - began < 30
    with pytest.raises(PeftlabError, match="is not HOST:PORT"):
        check_reachable("nonsense")

    output = tmp_path / "never"
    for arguments, message in ((dict(repeats=0), "--repeats"), (dict(tune="lr", trials=0), "--trials"),
                               (dict(workers=0), "--workers"), (dict(workers=2), "drop --no-isolate"),
                               (dict(tasks="sst2,mrpc,sst3"), "Unknown task 'sst3'")):
        with pytest.raises(PeftlabError, match=message):
            compare(methods="lora", output=output, train_options={"task": "sst2"}, echo=lambda m: None,
                    isolate="workers" not in arguments, **arguments)
    with pytest.raises(PeftlabError, match="drop --lr"):
        compare(methods="lora", output=output, train_options={"task": "sst2", "lr": 1e-3}, tune="lr")
    assert not output.exists()


def test_cli_bad_inputs_exit_2_with_a_sentence(capsys):
    from peftlab.cli import main

    for argv, message in ((["--tasks", "sst2,nope"], "Unknown task 'nope'"), (["--trials", "0", "--tune", "lr"],
                                                                             "--trials must be a positive"),
                          (["--repeats", "0"], "--repeats must be a positive")):
        assert main(["compare", "--methods", "lora", *argv, "--output", "/nonexistent/never"]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and message in error[0], error


# ---- the report on made-up numbers ---------------------------------------------------------------------------

def made_up_suite() -> dict:
    from peftlab.compare import aggregate, compare_rows, suite_rows

    info = {"sst2": {"metric_name": "accuracy", "higher_is_better": True, "score_metrics": ["accuracy"]},
            "mrpc": {"metric_name": "f1", "higher_is_better": True, "score_metrics": ["f1", "accuracy"]}}
    baselines = {"sst2": {"metric_name": "accuracy", "metric": 0.51, "metrics": {"accuracy": 0.51},
                          "description": "majority class 'positive'", "eval_examples": 872},
                 "mrpc": {"metric_name": "f1", "metric": 0.81, "metrics": {"f1": 0.81, "accuracy": 0.684},
                          "description": "majority class 'equivalent'", "eval_examples": 408}}
    scores = {("lora", "sst2"): [0.81, 0.82], ("lora", "mrpc"): [(0.88, 0.80), (0.885, 0.81)],
              ("bitfit", "sst2"): [0.78, 0.80], ("bitfit", "mrpc"): [(0.81, 0.684), (0.81, 0.684)]}
    runs, rows = [], []
    for task in ("sst2", "mrpc"):
        task_rows = []
        for method, fraction in (("lora", 0.003), ("bitfit", 0.001)):
            task_runs = []
            for seed, value in zip((42, 43), scores[(method, task)]):
                metrics = {"accuracy": value} if task == "sst2" else {"f1": value[0], "accuracy": value[1]}
                task_runs.append({"method": method, "task": task, "seed": seed, "status": "ok", "category": "x",
                                  "metric_name": info[task]["metric_name"], "metric": metrics[info[task]["metric_name"]],
                                  "metrics": metrics, "trainable_fraction": fraction, "trainable_params": 100,
                                  "eval_examples": baselines[task]["eval_examples"], "lr_source": "default",
                                  "learning_rate": 2e-3})
            runs += task_runs
            task_rows.append(aggregate(method, task_runs, None, tuple(info[task]["score_metrics"])))
        compare_rows(task_rows, higher_is_better=True, trivial=baselines[task])
        rows += task_rows
    suite = suite_rows(runs, rows, info, baselines, ["lora", "bitfit"], [42, 43])
    settings = {"task": "sst2", "tasks": ["sst2", "mrpc", "cola"], "suite": None, "model": "tiny",
                "metric_name": "accuracy", "higher_is_better": True, "repeats": 2, "seeds": [42, 43],
                "task_info": {**info, "cola": {"missing": "Task 'cola': no data."}}, "max_train_samples": 64,
                "epochs": 1, "batch_size": 16, "precision": "fp32", "latency": {}}
    return {"settings": settings, "environment": {"command": "peftlab compare --tasks sst2,mrpc,cola"},
            "complete": True, "wall_seconds": 1.0, "results": rows, "runs": runs, "baselines": baselines,
            "suite": suite, "tuning": []}


def test_suite_average_glue_convention_baseline_first_and_report(tmp_path):
    from peftlab.report import write_report

    payload = made_up_suite()
    rows = {(r["method"], r["task"]): r for r in payload["results"]}
    # MRPC's score is the mean of F1 and accuracy; the suite average is per seed, then over seeds
    assert rows[("lora", "mrpc")]["score"] == pytest.approx(((0.88 + 0.80) / 2 + (0.885 + 0.81) / 2) / 2)
    suite = {e["method"]: e for e in payload["suite"]["rows"]}
    per_seed = [(0.81 + (0.88 + 0.80) / 2) / 2, (0.82 + (0.885 + 0.81) / 2) / 2]
    assert suite["lora"]["average"] == pytest.approx(sum(per_seed) / 2)
    assert suite["lora"]["average_sd"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2))
    assert suite["lora"]["average_ci_low"] < suite["lora"]["average"] < suite["lora"]["average_ci_high"]
    assert payload["suite"]["baseline_average"] == pytest.approx((0.51 + (0.81 + 0.684) / 2) / 2)
    # BitFit on MRPC sits exactly on the majority class: flagged, and never Pareto-optimal although smallest
    assert rows[("bitfit", "mrpc")]["no_better_than_baseline"] is True and rows[("bitfit", "mrpc")]["pareto"] is False
    assert rows[("lora", "mrpc")]["pareto"] is True and rows[("lora", "sst2")]["no_better_than_baseline"] is False
    assert rows[("bitfit", "sst2")]["overlaps"] == ["lora"]  # 0.79 +- 0.014 over 2 seeds: t-intervals overlap

    files = write_report(tmp_path, payload)
    assert {"csv", "suite", "markdown", "html"} <= set(files) and (tmp_path / "plots" / "mrpc-pareto.png").is_file()
    report = (tmp_path / "report.md").read_text()
    assert "## Suite average" in report and "| trivial baseline |" in report
    assert report.index("trivial baseline: majority class 'positive'") < report.index("| 1 | lora")
    assert "bitfit ⚠" in report and "cola did not run: Task 'cola': no data." in report
    assert "mean of both (MRPC, QQP: F1 and accuracy" in report and "95% interval" in report
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 + 2 * 4 and '<tr class="baseline">' in html
    assert_renders_in_chromium(tmp_path / "report.html", tmp_path / "report.png")


def assert_renders_in_chromium(page, screenshot):
    """The report in a real headless browser (Debian's chromium, as tests/test_compare.py): not blank."""
    import os
    import subprocess
    from pathlib import Path

    import numpy as np
    from PIL import Image

    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).is_file():
        pytest.fail(f"{chromium} is missing: `make test` installs it (apt-get install -y chromium); "
                    "set CHROMIUM=/path/to/chromium to use another build.")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={screenshot}", "--window-size=1200,1600", Path(page).as_uri()],
                   capture_output=True, text=True, timeout=120, check=True)
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.shape == (1600, 1200) and pixels.std() > 20 and (pixels < 128).mean() > 0.01


def test_progress_live_table_and_plain_lines():
    from rich.console import Console

    from peftlab.compare.parallel import Job
    from peftlab.compare.progress import Progress

    jobs = [Job(("run", "sst2", m, 42), m, m, "sst2", None, {}) for m in ("lora", "bitfit")]
    lines = []
    plain = Progress(jobs, echo=lines.append)
    assert plain.live is None
    plain.start(jobs[0])
    plain.done(jobs[0], {"status": "ok"}, "ok: dev accuracy 0.8000")
    plain.reused(jobs[1], "ok")
    assert lines == ["[1/2] lora: training (2 to go)", "[1/2] lora: ok: dev accuracy 0.8000",
                     "[2/2] bitfit: finished earlier, reused (ok)"]
    live = Progress(jobs, live=True)
    try:
        live.start(jobs[1])
        console = Console(file=io.StringIO(), width=120, record=True)
        console.print(live.render())
        screen = console.export_text()
    finally:
        live.close()
    assert "lora" in screen and "training bitfit" in screen and "0/2 runs done" in screen and "0/1" in screen


# ---- for real, small ---------------------------------------------------------------------------------------

class FlakyLoRA(LoRA):
    """LoRA that crashes on its first training in a process (a stand-in for a killed or crashed run)."""

    name = "flaky-lora"
    crashed = False

    def apply(self, model, kind):
        if not FlakyLoRA.crashed:
            FlakyLoRA.crashed = True
            raise RuntimeError("simulated crash")
        return super().apply(model, kind)


def test_a_suite_in_this_process(world, tmp_path, monkeypatch):
    """sst2 + mrpc + cola (no data) x lora, bitfit x 2 seeds: per-task rows with intervals and baselines, the
    suite average, the multi-task serving cost, the report; a crashed run is retried once; --resume reuses all."""
    from peftlab.compare import compare
    from peftlab.methods import register_method, unregister_method

    base, data = world
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(data))
    register_method(FlakyLoRA)
    try:
        lines = []
        payload = compare(methods="flaky-lora,bitfit", output=tmp_path / "suite", repeats=2, tasks="sst2,mrpc,cola",
                          isolate=False, echo=lines.append, latency=FAST_LATENCY,
                          train_options={"model": str(base), **TINY_OPTIONS})
    finally:
        unregister_method("flaky-lora")
    text = "\n".join(lines)
    assert "cola: left out: Task 'cola': expected the train file" in text
    settings = payload["settings"]
    assert settings["tasks"] == ["sst2", "mrpc", "cola"] and settings["task_info"]["cola"]["missing"]
    assert len(payload["runs"]) == 8 and {(r["task"], r["seed"]) for r in payload["runs"]} == {
        (t, s) for t in ("sst2", "mrpc") for s in (42, 43)}
    rows = {(r["method"], r["task"]): r for r in payload["results"]}
    assert set(rows) == {(m, t) for m in ("flaky-lora", "bitfit") for t in ("sst2", "mrpc")}
    first = payload["runs"][0]
    assert first["method"] == "flaky-lora" and first["attempts"] == 2 and first["status"] == "ok"
    for row in rows.values():
        assert row["status"] == "ok" and row["repeats"] == 2 and row["seeds"] == [42, 43]
        assert row["metric_ci_low"] <= row["metric"] <= row["metric_ci_high"]
        assert row["baseline_metric"] == payload["baselines"][row["task"]]["metric"]
        assert row["baseline_test"]["test"] in ("point estimate", "95% t-interval over 2 seeds")
        assert row["lr_source"] == "default" and row["run_dir"] is None
        assert [r["run_dir"] for r in row["runs"]] == [f"runs/{row['task']}/{row['method']}-seed{s}" for s in (42, 43)]
    assert rows[("bitfit", "mrpc")]["metric_name"] == "f1" and "accuracy" in rows[("bitfit", "mrpc")]["metrics"]
    assert payload["baselines"]["mrpc"]["description"].startswith("majority class 'equivalent'")
    suite = payload["suite"]
    assert suite["tasks"] == ["sst2", "mrpc"] and suite["left_out"] == {"cola": "its data could not be loaded"}
    assert all(e["average"] is not None and e["seeds_averaged"] == 2 for e in suite["rows"])
    multitask = {e["method"]: e for e in payload["multitask"]["rows"]}
    assert multitask["flaky-lora"]["mixed_batch"] is True and multitask["bitfit"]["mixed_batch"] is False
    for entry in multitask.values():
        assert entry["status"] == "ok", entry
        assert entry["adapter_bytes_total"] == sum(rows[(entry["method"], t)]["adapter_bytes"] for t in ("sst2", "mrpc"))
        assert entry["runtime_rss_mb"] < entry["serve_rss_mb"] < 4000
    assert payload["multitask"]["full_model_per_task_mb"] > 100
    saved = json.loads((tmp_path / "suite" / "results.json").read_text())
    assert saved["complete"] is True and saved["multitask"]["rows"]
    report = (tmp_path / "suite" / "report.md").read_text()
    assert "## Suite average" in report and "## Serving every task" in report and "## mrpc: dev f1" in report

    # --resume with two workers: every finished cell is reused, nothing trains
    lines = []
    compare(methods="bitfit", output=tmp_path / "suite", repeats=2, tasks="sst2,mrpc", resume=True, workers=2,
            echo=lines.append, multitask=False, latency=FAST_LATENCY, train_options={"model": str(base), **TINY_OPTIONS})
    assert sum("finished earlier, reused" in line for line in lines) == 4, lines


def test_tune_lr_carves_validation_from_train_and_the_runs_use_the_chosen_rate(world, tmp_path, monkeypatch):
    from peftlab.compare import compare

    base, data = world
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(data))
    payload = compare(methods="bitfit", output=tmp_path / "tuned", tasks="sst2", tune="lr", trials=3, isolate=False,
                      echo=lambda m: None, latency=FAST_LATENCY,
                      train_options={"model": str(base), **TINY_OPTIONS, "epochs": 2, "report_to": "tensorboard"})
    [tuning] = payload["tuning"]
    assert tuning["status"] == "ok" and tuning["trials"] == 3 and len(tuning["trial_records"]) == 3
    assert tuning["validation_examples"] == round(0.2 * TINY_OPTIONS["max_train_samples"])
    default = tuning["default_lr"]
    assert tuning["trial_records"][0]["lr"] == default  # the default is the first trial
    assert all(default / 10 <= r["lr"] <= default * 10 for r in tuning["trial_records"])
    assert all(len(r["epoch_scores"]) >= 1 for r in tuning["trial_records"] if r["state"] != "failed")
    assert tuning["best_score"] >= tuning["default_score"]
    [row] = payload["results"]
    assert row["lr_source"] == "tuned" and row["learning_rate"] == pytest.approx(tuning["chosen_lr"])
    assert row["tune"]["chosen_lr"] == tuning["chosen_lr"]
    assert (tmp_path / "tuned" / "tuning" / "bitfit" / "tune.json").is_file()
    assert not list((tmp_path / "tuned" / "tuning" / "bitfit").glob("trial-*"))  # trial weights are not kept
    assert "(tuned)" in (tmp_path / "tuned" / "report.md").read_text()
    # --report-to (issue 17): the run logged to its own TensorBoard folder, the comparison's table as a summary
    assert list((tmp_path / "tuned" / "runs" / "bitfit" / "tensorboard").rglob("events.out.tfevents.*"))
    assert list((tmp_path / "tuned" / "tensorboard").rglob("events.out.tfevents.*"))
