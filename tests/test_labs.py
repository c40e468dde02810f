"""The labs: every recipe parses, every notebook is what labs/make_notebooks.py writes, and every notebook
runs top to bottom in a fresh kernel with PEFTLAB_SMOKE=1 (01 -> 04 in order, sharing one output folder
per lab, as a learner would run them).

The kernel is this interpreter (a kernelspec written for ``sys.executable``), so the notebooks see the same
environment as the tests. Labs run ``$PEFTLAB_LAB_WORKERS`` at a time (default 2; each kernel single-threaded
unless ``$OMP_NUM_THREADS`` says otherwise). Only the labs whose case is collected run (``-k 1.1-hf-basics``);
``$PEFTLAB_LABS`` (comma-separated) limits them further. A notebook whose kernel dies or does not start (not a
failing cell) is retried once, and the first failure is reported with the result.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LABS_DIR = ROOT / "labs"


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", LABS_DIR / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_notebooks", module)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()
LAB_NAMES = [lab.name for lab in GENERATOR.LABS]
STAGES = GENERATOR.NOTEBOOKS
KERNEL_NAME = "peftlab-test-venv"


def _selected() -> list[str]:
    wanted = [name.strip() for name in os.environ.get("PEFTLAB_LABS", "").split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(LAB_NAMES))
    if unknown:
        raise ValueError(f"$PEFTLAB_LABS names unknown labs: {', '.join(unknown)}")
    return wanted or LAB_NAMES


# ---- recipes and generated files (fast) ------------------------------------------------------------

@pytest.mark.parametrize("lab", LAB_NAMES)
@pytest.mark.parametrize("variant", ["recipe.yaml", "recipe.offline.yaml"])
def test_recipe_parses(lab, variant):
    from peftlab.methods import get_method
    from peftlab.tasks import get_task
    from peftlab.training import config_from_options, load_recipe

    path = LABS_DIR / lab / variant
    config = config_from_options(load_recipe(path))
    spec = next(s for s in GENERATOR.LABS if s.name == lab)
    assert config.method == spec.method
    get_method(config.method, **config.method_options)  # option types check
    assert get_task(config.task).kind == spec.kind
    assert str(config.output_dir()).startswith(f"runs/labs/{lab}/")
    if variant == "recipe.offline.yaml":
        assert config.model in ("minilm", "smollm2") or config.model.startswith(f"runs/labs/{lab}/")
    else:
        assert config.model not in ("minilm", "smollm2")  # the Hub default names the paper's model


def test_notebooks_are_generated():
    """The committed notebooks are exactly what labs/make_notebooks.py writes (edit the generator, not them)."""
    changed = GENERATOR.write_all(check=True)
    assert not changed, f"regenerate with `python labs/make_notebooks.py`: {[str(p) for p in changed]}"
    for lab in LAB_NAMES:
        for stage in STAGES:
            notebook = json.loads((LABS_DIR / lab / f"{stage}.ipynb").read_text())
            sources = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
            assert "!peftlab" not in sources and "subprocess" not in sources  # the Python API, not the CLI
            assert notebook["metadata"]["kernelspec"]["name"] == "python3"


def _open_lab(monkeypatch, name: str, output: Path):
    """``labs.Lab.open(name)`` from inside its folder, runs under ``output``, offline recipe, no smoke."""
    from peftlab import labs

    monkeypatch.chdir(LABS_DIR / name)
    monkeypatch.setenv("PEFTLAB_LAB_OUTPUT", str(output))
    monkeypatch.delenv("PEFTLAB_SMOKE", raising=False)
    monkeypatch.delenv("PEFTLAB_LAB_RECIPE", raising=False)
    return labs.Lab.open(name)


def test_lab_paths_follow_output(tmp_path, monkeypatch):
    from peftlab import labs

    lab = _open_lab(monkeypatch, "03-prompt-tuning", tmp_path / "out")
    assert lab.folder == LABS_DIR / "03-prompt-tuning" and lab.root == ROOT
    options = lab.options()
    assert options["model"] == str(tmp_path / "out" / "tiny-t5")
    assert options["data_dir"] == str(tmp_path / "out" / "data")
    assert options["output"] == str(tmp_path / "out" / "run")
    monkeypatch.setenv("PEFTLAB_SMOKE", "1")
    monkeypatch.setenv("PEFTLAB_LAB_RECIPE", "hub")
    hub = labs.Lab.open("03-prompt-tuning").options()
    assert hub["model"] == "google-t5/t5-small" and hub["max_train_samples"] == labs.SMOKE_BUDGET["max_train_samples"]
    assert hub["max_length"] == 64


# ---- executing every notebook ----------------------------------------------------------------------

def _kernelspec(folder: Path) -> Path:
    """A kernelspec that starts ipykernel with this very interpreter (the venv's python)."""
    spec_dir = folder / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "peftlab tests", "language": "python"}))
    return folder


def _execute(lab: str, stage: str, env: dict[str, str]):
    """(executed notebook, error text or None, infrastructure failure?) for one notebook in a fresh kernel."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(LABS_DIR / lab / f"{stage}.ipynb", as_version=4)
    client = NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=900, startup_timeout=300,
                            allow_errors=False, resources={"metadata": {"path": str(LABS_DIR / lab)}})
    try:
        client.execute(env=env)
        return notebook, None, False
    except CellExecutionError as failure:  # a cell raised: a real failure of the notebook
        return notebook, _plain(str(failure))[-4000:], False
    except Exception:  # noqa: BLE001 - the kernel died (killed for memory on a busy machine), did not start, ...
        return notebook, traceback.format_exc()[-4000:], True


def _plain(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # IPython's tracebacks are coloured


def _run_lab(lab: str, output: Path, env: dict[str, str]) -> dict[str, dict]:
    import nbformat

    results: dict[str, dict] = {}
    for stage in STAGES:
        started = time.perf_counter()
        notebook, error, infrastructure = _execute(lab, stage, env)
        retried = None
        if infrastructure:  # not the notebook's fault: one more try, and both outcomes are reported
            retried = error
            notebook, error, _ = _execute(lab, stage, env)
        seconds = time.perf_counter() - started
        executed = output / "executed" / f"{stage}.ipynb"
        executed.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, executed)
        images = sum(1 for cell in notebook.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []) if "image/png" in out.get("data", {}))
        results[stage] = {"error": error, "seconds": seconds, "images": images, "executed": str(executed),
                          "retried_after": retried}
        if error is not None:
            break  # the next stages read what this one writes
    return results


# What a test process may have set that must not reach the kernels (a leftover process group, a GPU mask).
KERNEL_ENV_DROP = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "PEFTLAB_LAB_OUTPUT", "PEFTLAB_LAB_RECIPE", "MPLBACKEND")


def _collected_labs(request) -> list[str]:
    """The labs whose notebook test was collected (``-k`` selects labs), limited by ``$PEFTLAB_LABS``."""
    collected = {item.callspec.params["lab"] for item in request.session.items
                 if getattr(item, "originalname", None) == "test_lab_notebooks_run" and hasattr(item, "callspec")}
    return [lab for lab in _selected() if lab in collected] or _selected()


@pytest.fixture(scope="module")
def executed(request, tmp_path_factory, data_dir):
    base = tmp_path_factory.mktemp("labs")
    jupyter_path = _kernelspec(base / "jupyter")
    workers = max(1, int(os.environ.get("PEFTLAB_LAB_WORKERS", "2")))
    env = {key: value for key, value in os.environ.items() if key not in KERNEL_ENV_DROP}
    env.update({
        "PEFTLAB_SMOKE": "1",
        "PEFTLAB_DATA_DIR": str(data_dir),
        "PEFTLAB_LAB_RECIPE": "offline",
        "JUPYTER_PATH": os.pathsep.join(filter(None, [str(jupyter_path), os.environ.get("JUPYTER_PATH")])),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    })
    # One thread per kernel: with the cores shared (two workers, or other jobs on the machine) torch's thread
    # pool oversubscribes and a small matmul gets 4-20x slower; measured on the 2-core machines here.
    env.setdefault("OMP_NUM_THREADS", "1")
    saved = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]  # the kernelspec lookup happens in this process
    results: dict[str, dict] = {}
    started = time.perf_counter()
    import resource

    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        selected = _collected_labs(request)
        # the slowest labs first, so that two workers finish together
        order = sorted(selected, key=lambda name: name not in ("01-lora-qlora", "08-p-tuning-v2", "04-prefix-tuning",
                                                             "1.2-ddp", "1.3-alpaca-deepspeed"))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {}
            for lab in order:
                lab_env = dict(env, PEFTLAB_LAB_OUTPUT=str(base / lab))
                futures[lab] = pool.submit(_run_lab, lab, base / lab, lab_env)
            for lab, future in futures.items():
                try:
                    results[lab] = future.result()
                except Exception:  # noqa: BLE001 - a bug in the runner: this lab's case fails, the others report
                    results[lab] = {STAGES[0]: {"error": "the test runner failed:\n" + traceback.format_exc()[-4000:],
                                                "seconds": 0.0, "images": 0, "executed": "", "retried_after": None}}
    finally:
        if saved is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = saved
    total = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the kernels (reaped children): the wall time an idle machine would need is about this / cores
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    timing = {lab: {stage: round(r["seconds"], 1) for stage, r in stages.items()} for lab, stages in results.items()}
    (base / "timing.json").write_text(json.dumps({"total_seconds": round(total, 1), "kernel_cpu_seconds": round(cpu, 1),
                                                  "workers": workers, "labs": timing}, indent=1))
    print(f"\nlab notebooks: {total:.0f} s wall, {cpu:.0f} s kernel CPU, {workers} worker(s); per notebook: "
          f"{json.dumps(timing)}")
    return results


def test_kernel_is_this_interpreter(tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager

    manager = KernelSpecManager(kernel_dirs=[str(_kernelspec(tmp_path) / "kernels")])
    assert manager.get_kernel_spec(KERNEL_NAME).argv[0] == sys.executable


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("lab", LAB_NAMES)
def test_lab_notebooks_run(executed, lab):
    if lab not in executed:
        pytest.skip("not selected by $PEFTLAB_LABS")
    results = executed[lab]
    for stage in STAGES:
        assert stage in results, f"{lab}: {stage} did not run (an earlier notebook failed)"
        result = results[stage]
        retried = (f"\n(first attempt failed outside the notebook and was retried:\n{result['retried_after']})"
                   if result["retried_after"] else "")
        assert result["error"] is None, f"{lab}/{stage}.ipynb failed (executed copy: {result['executed']}):\n" \
                                        f"{result['error']}{retried}"
    # the plots a learner expects: token lengths (01), loss curve (02), latency (03)
    for stage in ("01-Setup", "02-Train", "03-Inference"):
        assert results[stage]["images"] >= 1, f"{lab}/{stage}.ipynb shows no plot"


def test_plot_helpers(tmp_path):
    from peftlab import labs

    run = tmp_path / "run"
    run.mkdir()
    records = [{"type": "train", "step": s, "epoch": s / 4, "loss": 1.0 / s} for s in range(1, 9)]
    records += [{"type": "eval", "step": 4, "epoch": 1.0, "eval_accuracy": 0.6},
                {"type": "eval", "step": 8, "epoch": 2.0, "eval_accuracy": 0.7}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "metrics.json").write_text(json.dumps({
        "method": "lora", "task": "sst2", "model": "minilm", "metric_name": "accuracy", "metric": 0.7,
        "trainable_params": 10, "trainable_fraction": 0.01, "train_seconds": 1.0, "train_samples_per_second": 5.0,
        "peak_memory_mb": 100.0}))
    figure = labs.plot_loss({"lora": run})
    loss_axis, metric_axis = figure.axes
    assert list(loss_axis.lines[0].get_ydata()) == [r["loss"] for r in records[:8]]
    assert list(metric_axis.lines[0].get_ydata()) == [0.6, 0.7]
    table = labs.summary({"lora": run})
    assert table.loc[0, "value"] == 0.7 and table.loc[0, "trainable"] == "10"
    latency = labs.plot_latency({"a": [{"batch_size": 1, "ms_per_example": 3.0}, {"batch_size": 32, "ms_per_example": 1.0}],
                                 "b": [{"batch_size": 1, "ms_per_example": 4.0}, {"batch_size": 32, "ms_per_example": 2.0}]})
    assert [round(p.get_height(), 1) for p in latency.axes[0].patches] == [3.0, 1.0, 4.0, 2.0]
    histogram = labs.plot_token_lengths({"sst2": [5, 10, 200]}, max_length=128)
    assert "33% cut" in histogram.axes[0].get_legend().get_texts()[0].get_text()
    with pytest.raises(Exception, match="02-Train"):
        labs.read_log(tmp_path / "missing")


def test_lead_sentence_and_standins(tmp_path):
    from peftlab import labs

    assert labs.lead_sentence("First one here. Second.") == "First one here."
    assert labs.lead_sentence("no end") == "no end"
    folder = labs.build_tiny_t5(tmp_path / "t5")
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    assert config.model_type == "t5" and config.vocab_size == 30522 and config.num_layers == 2
    assert labs.build_tiny_t5(tmp_path / "t5") == folder  # built once
    from transformers import AutoTokenizer

    assert list(AutoTokenizer.from_pretrained(folder)("a bill")) == ["input_ids", "attention_mask"]  # no segment ids


def test_optional_steps_degrade(capsys):
    from peftlab import labs

    assert labs.optional("peftlab.no_such_module") is None
    assert "the step is skipped" in capsys.readouterr().out
    assert labs.optional("peftlab.labs", "no_such_function") is None
    assert labs.optional("peftlab.labs", "optional") is labs.optional


# ---- the distributed labs' helpers (1.2 DDP, 1.3 DeepSpeed) ------------------------------------------

def test_zero_memory_reproduces_the_zero_paper():
    """7.5B parameters, mixed-precision Adam, 64 ranks: 120 / 31.4 / 16.6 / 1.9 GB per rank (Rajbhandari et al.)."""
    from peftlab import labs

    table = labs.zero_memory(7_500_000_000, 7_500_000_000, 64, "bf16")
    gigabytes = [round(value * 2**20 / 1e9, 1) for value in table["this run (MiB/rank)"]]
    assert gigabytes == [120.0, 31.4, 16.6, 1.9]
    assert table["full fine-tuning (MiB/rank)"].tolist() == table["this run (MiB/rank)"].tolist()
    # LoRA: the frozen base dominates; only ZeRO-3 partitions it. fp32 under ZeRO keeps a master copy (12 bytes)
    lora = labs.zero_memory(1_000_000, 1_000, 2, "fp32")
    mib = 2**20
    assert lora.loc["DDP", "this run (MiB/rank)"] == round((4e6 + 4e3 + 8e3) / mib, 1)
    assert lora.loc["ZeRO-2", "this run (MiB/rank)"] == round((4e6 + (4e3 + 12e3) / 2) / mib, 1)
    assert lora.loc["ZeRO-3", "this run (MiB/rank)"] == round((4e6 + 4e3 + 12e3) / 2 / mib, 1)
    figure = labs.plot_zero_memory(lora)
    assert len(figure.axes) == 2 and len(figure.axes[0].patches) == 4


def test_launch_recipe_round_trips_and_bad_launches_are_refused(tmp_path, monkeypatch):
    from peftlab import labs
    from peftlab.errors import PeftlabError
    from peftlab.training import config_from_options, load_recipe

    lab = _open_lab(monkeypatch, "1.3-alpaca-deepspeed", tmp_path / "out")
    options = lab.options()
    recipe = labs.write_recipe(options, tmp_path / "out" / "run.recipe.yaml", comment="test")
    config = config_from_options(load_recipe(recipe))
    assert config.deepspeed == "zero2" and config.model == "smollm2" and config.method_options["r"] == 16
    assert config.output == str(tmp_path / "out" / "run")

    assert lab.nproc(2) == 2
    monkeypatch.setenv("PEFTLAB_LAB_NPROC", "4")
    assert lab.nproc(2) == 4
    monkeypatch.setenv("PEFTLAB_LAB_NPROC", "zero")
    with pytest.raises(PeftlabError, match="PEFTLAB_LAB_NPROC"):
        lab.nproc(2)
    with pytest.raises(PeftlabError, match="positive"):
        labs.launch(options, 0)
    with pytest.raises(PeftlabError, match="output"):
        labs.launch({"method": "lora"}, 1)
    # a run that fails in the child: the error carries the end of its output
    with pytest.raises(PeftlabError, match=r"failed \(exit code [1-9][\s\S]*no-such-method"):
        labs.launch({"method": "no-such-method", "output": str(tmp_path / "bad")}, 1, echo=False)


def test_comparison_and_adapter_tables(tmp_path):
    import torch
    from safetensors.torch import save_file

    from peftlab import labs

    def result(nproc, batch, wall, train, speed, accuracy):
        return {"nproc": nproc, "options": {"batch_size": batch}, "wall_seconds": wall,
                "metrics": {"effective_batch_size": 32, "steps": 125, "train_seconds": train,
                            "train_samples_per_second": speed, "metric_name": "accuracy", "metric": accuracy,
                            "peak_memory_mb": 900.0}}

    table = labs.compare_runs({"2 processes": result(2, 16, 60.0, 40.0, 100.0, 0.85),
                               "1 process": result(1, 32, 50.0, 35.0, 114.3, 0.86)})
    assert table.loc["2 processes", "processes"] == 2 and table.loc["1 process", "batch / process"] == 32
    assert table["batch / step"].tolist() == [32, 32] and table["accuracy"].tolist() == [0.85, 0.86]
    figure = labs.plot_comparison(table)
    assert [round(p.get_height(), 2) for p in figure.axes[2].patches] == [0.85, 0.86]

    (tmp_path / "adapter").mkdir()
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(4)}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    tensors = labs.adapter_tensors(tmp_path).set_index("tensor")
    assert tensors.loc["a", "shape"] == (2, 3) and tensors.loc["a", "elements"] == 6
    assert tensors.loc["b", "norm"] == 0.0 and abs(tensors.loc["a", "norm"] - 6 ** 0.5) < 1e-6
    with pytest.raises(Exception, match="02-Train"):
        labs.adapter_tensors(tmp_path / "missing")
