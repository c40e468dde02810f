"""Per-rank memory of ZeRO-3 with the base built partitioned (``zero.Init``): 1 rank against 2, full FT and LoRA.

    python benchmarks/zero3_memory.py --json benchmarks/results/zero3-memory.json
    python benchmarks/zero3_memory.py --methods lora --ranks 2 --steps 4      # one cell

Each cell is one ``peftlab train --deepspeed zero3`` run (``--nproc 2`` for 2 ranks) on the bundled SmolLM2-135M
and Alpaca (fp32 on CPU, batch 1 per rank, 64 tokens, no evaluation during training). A small hook, loaded into
every rank through ``sitecustomize`` from a temporary folder (nothing in peftlab is patched), records per rank:

* ``param_mib_after_load``: the parameter storage the rank holds when ``Trainer.train`` starts (a partitioned
  parameter counts its own slice, ``ds_tensor``; the rest their whole storage);
* ``load_peak_mib``: the process's peak RSS (VmHWM) up to then: imports, data, tokenizer, the model load;
* ``train_peak_mib``: the peak RSS during ``Trainer.train`` (VmHWM reset when it starts, Linux clear_refs);
* ``model_state_mib``: at the end of training, every live tensor's storage counted once (parameters, their
  fp32 master partitions, gradient partitions, Adam moments): what the rank keeps between steps.

The numbers are for docs/scaling.md and the per-rank memory estimate (tests/test_memory_scale.py holds them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r'''
import importlib.abc, importlib.util, json, os, sys

def _status(key):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0

def _live_tensor_bytes():
    import gc, torch
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                key = storage.data_ptr()
                if key and key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
        except Exception:
            continue
    return total

def _patch(trainer_class):
    original = trainer_class.train
    def train(self, *args, **kwargs):
        stored = 0
        for parameter in self.model.parameters():
            shard = getattr(parameter, "ds_tensor", None)
            tensor = shard if shard is not None else parameter
            stored += tensor.numel() * tensor.element_size()
        report = {"param_bytes_after_load": stored, "load_peak_rss": _status("VmHWM:"),
                  "rss_at_train_start": _status("VmRSS:")}
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        result = original(self, *args, **kwargs)
        report["train_peak_rss"] = _status("VmHWM:")
        report["model_state_bytes"] = _live_tensor_bytes()
        with open(f"{os.environ['PEFTLAB_MEMORY_PROBE']}.rank{os.environ.get('RANK', '0')}.json", "w") as out:
            json.dump(report, out)
        return result
    trainer_class.train = train

class _AfterTrainerImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            _patch(module.Trainer)
        spec.loader.exec_module = exec_module
        return spec

if os.environ.get("PEFTLAB_MEMORY_PROBE"):
    sys.meta_path.insert(0, _AfterTrainerImport())
'''

MiB = 2**20


def run_cell(method: str, ranks: int, steps: int, data_dir: str | None, work: Path) -> dict:
    probe_dir = work / "probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    output = work / f"{method}-{ranks}"
    report = work / f"{method}-{ranks}"
    command = [sys.executable, "-m", "peftlab.cli", "train", "--method", method, "--task", "alpaca", "--model", "smollm2",
               "--max-train-samples", str(steps * ranks), "--max-eval-samples", "4", "--epochs", "1",
               "--logging-steps", "1", "--precision", "fp32", "--max-length", "64", "--batch-size", "1",
               "--no-eval-each-epoch", "--no-progress", "--deepspeed", "zero3", "--output", str(output)]
    if ranks > 1:
        command += ["--nproc", str(ranks)]
    if data_dir:
        command += ["--data-dir", data_dir]
    env = dict(os.environ, PEFTLAB_MEMORY_PROBE=str(report), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(probe_dir), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{method} on {ranks} rank(s) failed:\n{(result.stdout + result.stderr)[-3000:]}")
    cell = {"method": method, "ranks": ranks, "steps_per_rank": steps, "per_rank": []}
    for rank in range(ranks):
        values = json.loads(Path(f"{report}.rank{rank}.json").read_text())
        cell["per_rank"].append({
            "rank": rank,
            "param_mib_after_load": round(values["param_bytes_after_load"] / MiB, 1),
            "load_peak_mib": round(values["load_peak_rss"] / MiB, 1),
            "rss_at_train_start_mib": round(values["rss_at_train_start"] / MiB, 1),
            "train_peak_mib": round(values["train_peak_rss"] / MiB, 1),
            "model_state_mib": round(values["model_state_bytes"] / MiB, 1),
        })
    return cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per rank")
    parser.add_argument("--data-dir", default=os.environ.get("PEFTLAB_DATA_DIR"))
    parser.add_argument("--json", default=None, help="write the cells here")
    args = parser.parse_args(argv)
    cells = []
    with tempfile.TemporaryDirectory(prefix="zero3-memory-") as folder:
        for method in args.methods.split(","):
            for ranks in (int(r) for r in args.ranks.split(",")):
                cell = run_cell(method, ranks, args.steps, args.data_dir, Path(folder))
                cells.append(cell)
                for row in cell["per_rank"]:
                    print(f"{method:5} {ranks} rank(s) rank {row['rank']}: params after load {row['param_mib_after_load']:8.1f} MiB"
                          f" · load peak {row['load_peak_mib']:7.1f} · train peak {row['train_peak_mib']:7.1f}"
                          f" · model state {row['model_state_mib']:7.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": "smollm2", "task": "alpaca", "precision": "fp32",
                                               "max_length": 64, "batch_size_per_rank": 1, "cells": cells}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
