"""The distributed labs (1.2 DDP, 1.3 DeepSpeed): what this machine offers, launching ``peftlab train`` in N
processes from a notebook, and the tables and plots that compare the runs.

A data-parallel run needs one process per rank, started together by a launcher (``torchrun``), so it cannot
run inside a notebook's kernel: :func:`launch` starts it beside the kernel and streams rank 0's output.
``$PEFTLAB_LAB_NPROC`` sets N (``Lab.nproc``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from peftlab import plots
from peftlab.errors import PeftlabError
from peftlab.labs.lab import load_metrics


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
    # the launcher (and so its ranks) gets SIGTERM when this kernel dies: peftlab.distributed's preexec hook
    dies_with_us = distributed.child_dies_with_us
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, cwd=str(Path.cwd()),
                               preexec_fn=dies_with_us if sys.platform.startswith("linux") else None)
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
    figure = plots.figure(11, 3.4)
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
    figure = plots.figure(9, 3.4)
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


__all__ = ["distributed_report", "LAUNCHER_ENV_DROP", "write_recipe", "launch", "compare_runs", "plot_comparison",
           "zero_memory", "plot_zero_memory"]
