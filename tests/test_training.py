"""LoRA end to end on the real bundled model and real data: train, reload, eval, predict, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

PEFTLAB = [sys.executable, "-m", "peftlab.cli"]


def run_cli(args, env=None, timeout=900, check=True):
    environment = {**os.environ, **(env or {})}
    result = subprocess.run(PEFTLAB + [str(a) for a in args], capture_output=True, text=True, env=environment,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"peftlab {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data_dir):
    """The issue's bar: LoRA, 2,000 SST-2 training examples, the full 872-example dev set."""
    output = tmp_path_factory.mktemp("lora") / "run"
    run_cli(["train", "--method", "lora", "--task", "sst2", "--model", "minilm", "--output", output,
             "--max-train-samples", 2000, "--epochs", 3, "--no-progress"],
            env={"PEFTLAB_DATA_DIR": str(data_dir)})
    return output


@pytest.mark.slow
@pytest.mark.real
def test_lora_sst2_reaches_80_percent_on_the_full_dev_set(lora_run):
    metrics = json.loads((lora_run / "metrics.json").read_text())
    assert metrics["eval_examples"] == 872
    assert metrics["train_examples"] == 2000
    assert metrics["metric_name"] == "accuracy"
    assert metrics["metric"] >= 0.80, metrics["metrics"]
    assert metrics["warmup_ratio"] == 0.06 and metrics["learning_rate"] == 2e-3  # LoRA's own defaults
    for key in ("method", "task", "model", "metric_name", "metric", "metrics", "trainable_params", "total_params",
                "trainable_fraction", "train_seconds", "train_samples_per_second", "train_tokens_per_second",
                "peak_memory_mb"):
        assert key in metrics, key
    assert 0 < metrics["trainable_fraction"] < 0.01
    assert metrics["trainable_params"] < metrics["total_params"]
    assert metrics["train_tokens_per_second"] > metrics["train_samples_per_second"] > 0
    assert metrics["peak_memory_mb"] > 100
    log = [json.loads(line) for line in (lora_run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["type"] == "eval"] == [1.0, 2.0, 3.0]
    assert sum(r["type"] == "train" for r in log) >= 10
    assert (lora_run / "loss.png").stat().st_size > 5000
    assert not (lora_run / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.real
def test_adapter_loads_with_plain_peft_and_eval_reproduces_the_metric(lora_run, data_dir):
    # plain peft + transformers, in a fresh process, no peftlab involved in loading
    script = f"""
import json, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft import PeftModel
from peftlab.models import resolve_model
base_path = resolve_model("minilm")
base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
model = PeftModel.from_pretrained(base, {str(lora_run / 'adapter')!r}).eval()
tok = AutoTokenizer.from_pretrained(base_path)
with torch.no_grad():
    logits = model(**tok(["a gripping, beautifully acted film", "dull, tedious and lifeless"], return_tensors="pt", padding=True)).logits
print(json.dumps(logits.argmax(-1).tolist()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1, 0]

    result = run_cli(["eval", "--adapter", lora_run], env={"PEFTLAB_DATA_DIR": str(data_dir)})
    evaluated = json.loads(result.stdout)
    trained = json.loads((lora_run / "metrics.json").read_text())
    # same weights, same dev set: the reloaded adapter scores what training reported
    assert evaluated["eval_examples"] == 872
    assert abs(evaluated["metric"] - trained["metric"]) <= 2 / 872


@pytest.mark.slow
@pytest.mark.real
def test_predict_text_and_jsonl(lora_run, tmp_path):
    result = run_cli(["predict", "--adapter", lora_run, "--text", "an utterly delightful film",
                      "--text", "a boring, pointless mess"])
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [line["label"] for line in lines] == ["positive", "negative"]  # GLUE SST-2 label names (issue 13)
    assert all(0.5 <= line["score"] <= 1 for line in lines)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "wonderful"}\n\n"terrible and dull"\n')
    result = run_cli(["predict", "--adapter", lora_run, "--input", inputs])
    assert len(result.stdout.strip().splitlines()) == 2


def _adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.real
def test_resume_after_sigkill_ends_with_the_same_adapter(tmp_path, data_dir):
    common = ["train", "--method", "lora", "--task", "sst2", "--model", "minilm", "--max-train-samples", 640,
              "--max-eval-samples", 100, "--epochs", 2, "--save-steps", 5, "--precision", "fp32", "--no-progress"]
    env = {"PEFTLAB_DATA_DIR": str(data_dir)}
    reference = tmp_path / "reference"
    run_cli(common + ["--output", reference], env=env)

    killed = tmp_path / "killed"
    process = subprocess.Popen(PEFTLAB + [str(a) for a in common + ["--output", killed]],
                               env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = killed / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline:
        done = [p for p in checkpoints.glob("checkpoint-*") if int(p.name.split("-")[1]) >= 15] if checkpoints.exists() else []
        if done or process.poll() is not None:
            break
        time.sleep(0.2)
    assert process.poll() is None, "training finished before it could be killed; raise the budget"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists()

    # without --resume, the unfinished run is protected
    refused = run_cli(common + ["--output", killed], env=env, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    run_cli(common + ["--output", killed, "--resume"], env=env)
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["resumed"] is True
    expected, actual = _adapter_tensors(reference), _adapter_tensors(killed)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert metrics["metric"] == json.loads((reference / "metrics.json").read_text())["metric"]


# ---- the phases and the parts a caller replaces (tiny BERT, 32 SST-2 examples: seconds) -------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT with the bundled minilm's tokenizer, saved as a model folder."""
    import transformers

    import tiny
    from peftlab.models import resolve_model

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model("minilm"))
    config = tiny.bert_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def tiny_config(model_dir, data_dir, output, **overrides):
    from peftlab.training import TrainConfig

    values = dict(method="lora", task="sst2", model=model_dir, output=str(output), data_dir=str(data_dir),
                  max_train_samples=40, max_eval_samples=16, epochs=1, batch_size=8, max_length=32,
                  precision="fp32", progress=False, logging_steps=1)
    values.update(overrides)
    return TrainConfig(**values)


def step_aware_lora():
    """A LoRA that reads the step count in apply, wants its own parameter groups and a callback."""
    from transformers import TrainerCallback

    from peftlab.methods import get_method_class

    class Recorder(TrainerCallback):
        def __init__(self):
            self.learning_rates = None
            self.steps = 0

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            # the schedule's peak per group (warm-up starts every group at 0)
            self.learning_rates = sorted({group["initial_lr"] for group in optimizer.param_groups})

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    class StepAwareLoRA(get_method_class("lora")):
        name = "step-aware-lora"
        seen_total_steps: list = []

        def apply(self, model, kind):
            type(self).seen_total_steps.append(self.total_steps)
            return super().apply(model, kind)

        def optimizer_parameter_groups(self, model, learning_rate, weight_decay):
            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            return [{"params": [p for n, p in trainable if "lora_B" not in n], "lr": learning_rate},
                    {"params": [p for n, p in trainable if "lora_B" in n], "lr": learning_rate * 16}]  # LoRA+

        def training_callbacks(self, model):
            self.recorder = Recorder()
            return [self.recorder]

    return StepAwareLoRA


def test_prepare_returns_a_dataclass_and_the_method_sees_the_step_count_before_apply(tiny_model_dir, data_dir,
                                                                                     tmp_path):
    import dataclasses

    from peftlab.methods import register_method, unregister_method
    from peftlab.training import Prepared, optimizer_steps, prepare

    method_class = register_method(step_aware_lora())
    try:
        config = tiny_config(tiny_model_dir, data_dir, tmp_path / "run", method=method_class.name, grad_accum=2,
                             epochs=2)
        prepared = prepare(config, world_size=2)
    finally:
        unregister_method(method_class.name)
    assert isinstance(prepared, Prepared) and dataclasses.is_dataclass(prepared)
    # 40 examples, batches of 8 shared by 2 processes: 3 batches each; a step per 2 batches: 2 per epoch
    assert prepared.total_steps == optimizer_steps(40, 8, 2, 2, 2) == 4
    assert method_class.seen_total_steps == [4]
    assert prepared.effective_batch == 32 and prepared.world_size == 2
    assert len(prepared.train_data) == 40 and prepared.label_names == ["negative", "positive"]
    assert not prepared.labels_from_data


def test_train_uses_the_methods_parameter_groups_and_callbacks(tiny_model_dir, data_dir, tmp_path):
    from peftlab.methods import register_method, unregister_method
    from peftlab.training import prepare, train

    method_class = register_method(step_aware_lora())
    try:
        config = tiny_config(tiny_model_dir, data_dir, tmp_path / "run", method=method_class.name, lr=1e-3)
        prepared = prepare(config)
        from peftlab.training import TrainingParts

        metrics = train(config, parts=TrainingParts(prepared=prepared))
    finally:
        unregister_method(method_class.name)
    recorder = prepared.method.recorder
    assert recorder.learning_rates == [1e-3, 1.6e-2]  # the method's groups, each with its own rate
    assert recorder.steps == metrics["steps"] == prepared.total_steps == 5
    assert metrics["train_cpu_seconds"] > 0


def test_train_takes_a_collator_an_optimizer_and_callbacks_without_patching(tiny_model_dir, data_dir, tmp_path):
    from transformers import TrainerCallback

    from peftlab.preprocess import collator
    from peftlab.training import TrainingParts, prepare, train

    config = tiny_config(tiny_model_dir, data_dir, tmp_path / "run")
    prepared = prepare(config)
    calls = {"collate": 0, "optimizer": 0, "steps": 0, "optimizer_class": None}
    default = collator(prepared.task.kind, prepared.tokenizer, pad_to_multiple_of=16)

    def counting_collator(features):
        calls["collate"] += 1
        batch = default(features)
        assert batch["input_ids"].shape[1] % 16 == 0
        return batch

    def sgd(model):
        calls["optimizer"] += 1
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            calls["steps"] += 1
            calls["optimizer_class"] = type(getattr(optimizer, "optimizer", optimizer)).__name__

    metrics = train(config, parts=TrainingParts(prepared=prepared, collator=counting_collator, optimizer=sgd,
                                                callbacks=[Steps()]))
    assert calls["optimizer"] == 1 and calls["optimizer_class"] == "SGD"
    assert calls["steps"] == metrics["steps"] == 5 and calls["collate"] >= 5
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    from peftlab.errors import PeftlabError

    with pytest.raises(PeftlabError, match="prepared from another configuration"):
        train(tiny_config(tiny_model_dir, data_dir, tmp_path / "other", epochs=2), parts=TrainingParts(prepared=prepared))

    named = tiny_config(tiny_model_dir, data_dir, tmp_path / "named")
    seen = {}

    class Optimizer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["optim"], seen["max_grad_norm"] = getattr(args.optim, "value", args.optim), args.max_grad_norm

    train(named, parts=TrainingParts(optimizer="adamw_torch_fused", callbacks=[Optimizer()],
                                     training_arguments={"max_grad_norm": 0.5}))
    assert seen == {"optim": "adamw_torch_fused", "max_grad_norm": 0.5}


def test_user_file_labels_are_saved_with_the_run(tiny_model_dir, tmp_path):
    train_file, dev_file = tmp_path / "train.csv", tmp_path / "dev.csv"
    train_file.write_text("text,label\n" + "".join(f"review {i},{['good', 'bad'][i % 2]}\n" for i in range(12)))
    dev_file.write_text("text,label\nfine,good\nawful,bad\n")
    from peftlab.training import config_from_options, train

    config = config_from_options(dict(task="csv", train_file=str(train_file), dev_file=str(dev_file),
                                      text_column="text", label_column="label", model=tiny_model_dir,
                                      output=str(tmp_path / "run"), epochs=1, batch_size=4, max_length=16,
                                      precision="fp32", progress=False))
    train(config)
    manifest = json.loads((tmp_path / "run" / "peftlab.json").read_text())
    assert manifest["task_options"]["label_names"] == ["bad", "good"]  # read off the file: saved to reload without it
    assert manifest["label_names"] == ["bad", "good"]
