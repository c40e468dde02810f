"""peftlab's GPU check: what a maintainer with CUDA GPUs runs to see that the GPU paths work (under 8 minutes).

    bash scripts/gpu-check.sh --data-dir ../shared/data            # every step this machine can run
    bash scripts/gpu-check.sh --data-dir DATA --only lora,qlora     # some steps
    bash scripts/gpu-check.sh --list                                # the steps and what each proves

Each step prints one line, ``PASS``, ``FAIL`` or ``SKIP`` with the step's name, its seconds and a detail; a
JSON summary goes to ``--json`` (default ``OUTPUT/summary.json``). The exit status is 1 when a step failed,
2 for a usage error, else 0. Nothing comes from the Hub: the models are the bundled ones (SmolLM2-135M,
all-MiniLM-L6-v2) and the data the ``--data-dir`` folder (the layout of ../shared/data: ``alpaca/``,
``glue/SST-2/``). Steps that need a GPU are skipped without one (that part runs in CI), the DDP, FSDP and
ZeRO-3 steps without two; the runs are small (a few hundred examples), so the check measures that things
work, not how fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DEFAULT_BUDGET = 450.0  # seconds for all steps; the rest are skipped when it is spent


class StepFailed(Exception):
    """A step's check did not hold: its message is the FAIL line's detail."""


class StepSkipped(Exception):
    """A step cannot run here (its message says why)."""


@dataclass
class Context:
    output: Path
    data_dir: Path | None
    gpus: int
    bf16: bool
    timeout: float
    results: dict[str, dict] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if self.data_dir:
            env["PEFTLAB_DATA_DIR"] = str(self.data_dir)
        return env

    def peftlab(self, *args: str, timeout: float | None = None) -> str:
        """Run ``peftlab ARGS``; its output; StepFailed with the last lines when it fails."""
        command = [sys.executable, "-m", "peftlab.cli", *args]
        try:
            result = subprocess.run(command, env=self.env(), capture_output=True, text=True,
                                    timeout=timeout or self.timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise StepFailed(f"`peftlab {args[0]}` did not finish within {timeout or self.timeout:.0f} s") from None
        output = result.stdout + result.stderr
        if result.returncode != 0:
            last = [line for line in output.splitlines() if line.strip()][-3:]
            raise StepFailed(f"`peftlab {' '.join(args[:1])}` exited {result.returncode}: " + " | ".join(last)[-400:])
        return output

    def train(self, name: str, *args: str, nproc: int = 1) -> Path:
        run = self.output / name
        common = ["train", "--task", "alpaca", "--model", "smollm2", "--max-train-samples", "256",
                  "--max-eval-samples", "16", "--epochs", "1", "--batch-size", "8", "--max-length", "128",
                  "--logging-steps", "1", "--no-eval-each-epoch", "--no-progress", "--output", str(run)]
        if nproc > 1:
            common += ["--nproc", str(nproc)]
        self.peftlab(*common, *args)
        return run


def losses(run: Path) -> list[float]:
    values = []
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "train" and "loss" in record:
            values.append(float(record["loss"]))
    return values


def loss_goes_down(run: Path) -> str:
    """The mean loss of the last quarter of steps is below the first quarter's."""
    values = losses(run)
    if len(values) < 4:
        raise StepFailed(f"only {len(values)} logged steps in {run / 'log.jsonl'}")
    quarter = max(1, len(values) // 4)
    first, last = sum(values[:quarter]) / quarter, sum(values[-quarter:]) / quarter
    if not last < first:
        raise StepFailed(f"loss did not go down: {first:.3f} (first {quarter} steps) -> {last:.3f} (last {quarter})")
    return f"loss {first:.3f} -> {last:.3f} over {len(values)} steps"


def need(ctx: Context, gpus: int = 1, bf16: bool = False, data: str | None = None) -> None:
    if ctx.gpus < gpus:
        raise StepSkipped("no CUDA GPU visible" if ctx.gpus == 0 else f"needs {gpus} GPUs, {ctx.gpus} visible")
    if bf16 and not ctx.bf16:
        raise StepSkipped("this GPU has no bf16")
    if data and (ctx.data_dir is None or not (ctx.data_dir / data).exists()):
        raise StepSkipped(f"no {data}/ in --data-dir {ctx.data_dir}" if ctx.data_dir else "no --data-dir given")


# ---- the steps ------------------------------------------------------------------------------------

def step_env(ctx: Context) -> str:
    report = json.loads(ctx.peftlab("env", "--json", "--no-models", *(["--data-dir", str(ctx.data_dir)]
                                                                       if ctx.data_dir else []), timeout=120))
    devices = report["devices"]
    names = ", ".join(gpu.get("name", "?") for gpu in devices.get("gpus", [])) or "no GPU"
    packages = report["packages"]
    return f"torch {packages.get('torch')}, CUDA {devices.get('cuda')}: {names}"


def step_lora(ctx: Context) -> str:
    need(ctx, bf16=True, data="alpaca")
    return loss_goes_down(ctx.train("lora", "--method", "lora", "--precision", "bf16"))


def step_qlora(ctx: Context) -> str:
    need(ctx, bf16=True, data="alpaca")
    run = ctx.train("qlora", "--method", "qlora", "--precision", "bf16", "--quant-type", "nf4", "--double-quant", "true")
    options = json.loads((run / "peftlab.json").read_text()).get("method_options", {})
    if options.get("quant_type") != "nf4" or not options.get("double_quant"):
        raise StepFailed(f"the run's manifest says quant_type={options.get('quant_type')!r}, "
                         f"double_quant={options.get('double_quant')!r}")
    return "NF4 + double quantisation, " + loss_goes_down(run)


def step_compare(ctx: Context) -> str:
    need(ctx, data="glue/SST-2")
    out = ctx.output / "compare"
    ctx.peftlab("compare", "--methods", "lora,bitfit", "--task", "sst2", "--model", "minilm", "--epochs", "1",
                "--max-train-samples", "256", "--max-eval-samples", "128", "--no-progress", "--output", str(out))
    payload = json.loads((out / "results.json").read_text())
    text = json.dumps(payload)
    missing = [name for name in ("lora", "bitfit") if f'"{name}"' not in text]
    if missing:
        raise StepFailed(f"results.json has no row for {', '.join(missing)}")
    return f"lora and bitfit compared on minilm (results in {out})"


def step_merge(ctx: Context) -> str:
    need(ctx, bf16=True, data="alpaca")
    run = ctx.output / "lora"
    if not (run / "adapter").exists():
        raise StepSkipped("the lora step did not leave a run to merge")
    ctx.peftlab("merge", "--adapter", str(run), "--output", str(ctx.output / "merged"), "--samples", "8")
    return "merged outputs match the adapter's (peftlab merge's own check)"


def step_serve(ctx: Context) -> str:
    need(ctx, bf16=True, data="alpaca")
    run = ctx.output / "lora"
    if not (run / "adapter").exists():
        raise StepSkipped("the lora step did not leave a run to serve")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (ctx.output / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "peftlab.cli", "serve", "--base", "smollm2", "--adapter",
                               f"chat={run}", "--host", "127.0.0.1", "--port", str(port)], env=ctx.env(),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + min(ctx.timeout, 180)
        while True:
            if server.poll() is not None:
                raise StepFailed(f"the server exited with {server.returncode} (log: {ctx.output / 'serve.log'})")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise StepFailed("the server did not answer /health in time")
            time.sleep(1)
        body = json.dumps({"adapter": "chat", "inputs": ["Give three tips for staying healthy."],
                           "max_new_tokens": 16}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", data=body,
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        generated = answer["outputs"][0].get("generated", "")
        if not generated.strip():
            raise StepFailed(f"empty generation: {answer}")
        return f"/v1/generate answered: {generated.strip()[:60]!r}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def _parallel(ctx: Context, name: str, *args: str) -> str:
    need(ctx, gpus=2, bf16=True, data="alpaca")
    run = ctx.train(name, "--method", "lora", "--precision", "bf16", *args, nproc=ctx.gpus)
    return f"{ctx.gpus} ranks (NCCL), " + loss_goes_down(run)


def step_ddp(ctx: Context) -> str:
    return _parallel(ctx, "ddp")


def step_fsdp(ctx: Context) -> str:
    return _parallel(ctx, "fsdp", "--fsdp", "full_shard")


def step_fsdp_full(ctx: Context) -> str:
    need(ctx, gpus=2, bf16=True, data="alpaca")
    run = ctx.train("fsdp-full", "--method", "full", "--precision", "bf16", "--fsdp", "shard_grad_op", nproc=ctx.gpus)
    return f"full fine-tuning, {ctx.gpus} ranks, " + loss_goes_down(run)


def step_fsdp_qlora(ctx: Context) -> str:
    need(ctx, gpus=2, bf16=True, data="alpaca")
    run = ctx.train("fsdp-qlora", "--method", "qlora", "--precision", "bf16", "--fsdp", "full_shard", nproc=ctx.gpus)
    return f"4-bit base whole on each rank, LoRA sharded, {ctx.gpus} ranks, " + loss_goes_down(run)


def step_zero3(ctx: Context) -> str:
    return _parallel(ctx, "zero3", "--deepspeed", "zero3")


@dataclass(frozen=True)
class Step:
    name: str
    proves: str
    run: Callable[[Context], str]


STEPS = [
    Step("env", "peftlab env: torch sees the GPUs, package versions (CPU-safe)", step_env),
    Step("lora", "LoRA on SmolLM2 in bf16 on one GPU: the loss goes down", step_lora),
    Step("qlora", "QLoRA (NF4, double quantisation, bitsandbytes) on SmolLM2 in bf16: the loss goes down", step_qlora),
    Step("compare", "peftlab compare, LoRA against BitFit on minilm + SST-2 (a short run): results.json has both",
         step_compare),
    Step("merge", "peftlab merge of the LoRA run: merged outputs equal the adapter's within merge's tolerance",
         step_merge),
    Step("serve", "peftlab serve with the LoRA run: one /v1/generate request answered", step_serve),
    Step("ddp", "DDP over every visible GPU with NCCL (--nproc N): the loss goes down", step_ddp),
    Step("fsdp", "FSDP2 full_shard over every visible GPU, LoRA: trains, saves a complete adapter", step_fsdp),
    Step("fsdp-full", "FSDP2 shard_grad_op, full fine-tuning: trains and saves the whole model", step_fsdp_full),
    Step("fsdp-qlora", "QLoRA under FSDP2 (accelerate keeps the 4-bit base out of sharding): trains", step_fsdp_qlora),
    Step("zero3", "DeepSpeed ZeRO-3 with the base built partitioned on the GPUs (zero.Init): trains", step_zero3),
]


def gpu_facts() -> tuple[int, bool]:
    """(visible CUDA GPUs, whether they run bf16); (0, False) without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return 0, False
    if not torch.cuda.is_available():
        return 0, False
    return torch.cuda.device_count(), bool(torch.cuda.is_bf16_supported())


def run_steps(ctx: Context, steps: list[Step], budget: float) -> list[dict]:
    started = time.monotonic()
    rows = []
    for step in steps:
        begin = time.monotonic()
        left = budget - (begin - started)
        if left <= 0:
            status, detail = "SKIP", "the time budget is spent (--budget)"
        else:
            ctx.timeout = max(30.0, min(ctx.timeout, left))
            try:
                status, detail = "PASS", step.run(ctx)
            except StepSkipped as skipped:
                status, detail = "SKIP", str(skipped)
            except StepFailed as failed:
                status, detail = "FAIL", str(failed)
            except Exception as error:  # a bug in a step: report it as that step's failure, go on
                status, detail = "FAIL", f"{type(error).__name__}: {error}"
        seconds = time.monotonic() - begin
        row = {"step": step.name, "status": status, "seconds": round(seconds, 1), "detail": detail,
               "proves": step.proves}
        rows.append(row)
        print(f"{status} {step.name} ({seconds:.1f} s): {detail}", flush=True)
    return rows


def parse_args(argv: list[str] | None):
    listing = "\n".join(f"  {step.name:11} {step.proves}" for step in STEPS)
    parser = argparse.ArgumentParser(
        prog="gpu-check.sh", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="peftlab's GPU check: one PASS/FAIL/SKIP line per step and a JSON summary (under 8 minutes).",
        epilog=f"steps:\n{listing}\n\nExit status: 1 if a step failed, 2 for a usage error, else 0.")
    parser.add_argument("--data-dir", default=os.environ.get("PEFTLAB_DATA_DIR"),
                        help="the datasets folder (../shared/data's layout: alpaca/, glue/SST-2/); default "
                             "$PEFTLAB_DATA_DIR")
    parser.add_argument("--output", default=None, help="where the runs go (default: runs/gpu-check-<time>)")
    parser.add_argument("--json", default=None, help="the summary file (default: OUTPUT/summary.json)")
    parser.add_argument("--only", default=None, help="comma list of steps to run")
    parser.add_argument("--skip", default=None, help="comma list of steps not to run")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help=f"seconds for all steps (default {DEFAULT_BUDGET:g}); later steps are skipped past it")
    parser.add_argument("--step-timeout", type=float, default=240, help="seconds for one step (default 240)")
    parser.add_argument("--list", action="store_true", help="print the steps and what each proves, then exit")
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.list:
        for step in STEPS:
            print(f"{step.name:11} {step.proves}")
        return 0
    names = {step.name for step in STEPS}
    chosen = [step for step in STEPS if args.only is None or step.name in args.only.split(",")]
    unknown = [name for name in ",".join(filter(None, [args.only, args.skip])).split(",") if name and name not in names]
    if unknown:
        parser.error(f"unknown step {unknown[0]!r}; the steps are: {', '.join(step.name for step in STEPS)}")
    if args.skip:
        chosen = [step for step in chosen if step.name not in args.skip.split(",")]
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        parser.error(f"--data-dir {data_dir} is not a folder")
    output = Path(args.output or f"runs/gpu-check-{time.strftime('%Y%m%d-%H%M%S')}")
    output.mkdir(parents=True, exist_ok=True)
    gpus, bf16 = gpu_facts()
    print(f"peftlab GPU check: {gpus} CUDA GPU{'s' if gpus != 1 else ''} visible"
          f"{' (bf16)' if bf16 else ''}; runs in {output}", flush=True)
    ctx = Context(output=output, data_dir=data_dir, gpus=gpus, bf16=bf16, timeout=args.step_timeout)
    rows = run_steps(ctx, chosen, args.budget)
    summary = {"gpus": gpus, "bf16": bf16, "data_dir": str(data_dir) if data_dir else None, "output": str(output),
               "passed": sum(r["status"] == "PASS" for r in rows), "failed": sum(r["status"] == "FAIL" for r in rows),
               "skipped": sum(r["status"] == "SKIP" for r in rows), "steps": rows}
    summary_path = Path(args.json) if args.json else output / "summary.json"
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2))
    print(f"{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped; summary in "
          f"{summary_path}", flush=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
