"""scripts/gpu-check.sh: the part CI can run without a GPU (arguments, the step list, skip logic, the summary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402

STEP_NAMES = [step.name for step in gpu_check.STEPS]


def run_script(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PEFTLAB_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_step_and_what_it_proves():
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for step in gpu_check.STEPS:
        assert step.name in result.stdout
    assert "--data-dir" in result.stdout and "Exit status" in result.stdout
    assert set(STEP_NAMES) >= {"env", "lora", "qlora", "compare", "merge", "serve", "ddp", "fsdp"}


def test_without_a_gpu_every_gpu_step_is_skipped_and_summarised(tmp_path, data_dir):
    summary = tmp_path / "summary.json"
    result = run_script("--data-dir", str(data_dir), "--output", str(tmp_path / "runs"), "--json", str(summary))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert [line.split()[1] for line in lines] == STEP_NAMES  # one line per step, in order
    assert lines[0].startswith("PASS env") and "CUDA False" in lines[0]
    assert all(line.startswith("SKIP") and line.endswith("no CUDA GPU visible") for line in lines[1:])
    payload = json.loads(summary.read_text())
    assert (payload["gpus"], payload["passed"], payload["failed"], payload["skipped"]) == (0, 1, 0, len(STEP_NAMES) - 1)
    assert [row["step"] for row in payload["steps"]] == STEP_NAMES and all(row["proves"] for row in payload["steps"])


def test_multi_gpu_steps_need_two_gpus_and_data(tmp_path):
    one_gpu = gpu_check.Context(output=tmp_path, data_dir=None, gpus=1, bf16=True, timeout=60)
    rows = gpu_check.run_steps(one_gpu, [s for s in gpu_check.STEPS if s.name in ("ddp", "fsdp", "zero3")], budget=60)
    assert [(row["status"], row["detail"]) for row in rows] == [("SKIP", "needs 2 GPUs, 1 visible")] * 3
    no_bf16 = gpu_check.Context(output=tmp_path, data_dir=tmp_path, gpus=2, bf16=False, timeout=60)
    with pytest.raises(gpu_check.StepSkipped, match="no bf16"):
        gpu_check.need(no_bf16, gpus=2, bf16=True)
    no_data = gpu_check.Context(output=tmp_path, data_dir=tmp_path, gpus=2, bf16=True, timeout=60)
    with pytest.raises(gpu_check.StepSkipped, match="no alpaca/ in --data-dir"):
        gpu_check.need(no_data, data="alpaca")
    spent = gpu_check.run_steps(no_data, gpu_check.STEPS[:2], budget=0)
    assert {row["status"] for row in spent} == {"SKIP"} and "budget" in spent[0]["detail"]


def test_loss_check(tmp_path):
    def log(values):
        (tmp_path / "log.jsonl").write_text("\n".join(json.dumps({"type": "train", "step": i, "loss": v})
                                                      for i, v in enumerate(values)))
    log([2.0, 1.9, 1.7, 1.6, 1.4, 1.3, 1.2, 1.1])
    assert gpu_check.loss_goes_down(tmp_path).startswith("loss 1.950 -> 1.150 over 8 steps")
    log([1.0, 1.0, 1.1, 1.2, 1.2, 1.3, 1.3, 1.4])
    with pytest.raises(gpu_check.StepFailed, match="loss did not go down"):
        gpu_check.loss_goes_down(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--only", "lora,tpu"], "unknown step 'tpu'"),
    (["--data-dir", "/no/such/folder"], "is not a folder"),
])
def test_usage_errors(args, message):
    result = run_script(*args)
    assert result.returncode == 2 and message in result.stderr
