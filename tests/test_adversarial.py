"""Issue 13's probes of the CLI and training side, each a case: a user's mistake ends in exit status 2 and one
sentence on stderr (no traceback) with no file changed that the user did not ask to change; what is not a
mistake (resuming, retrying, evaluating from elsewhere) does what it says.

Most cases run ``peftlab.cli.main`` in this process on a tiny random BERT (seconds); a few run the real
command in a fresh process (exit status, stderr, and that argument errors come before transformers is
imported); one resumes a real minilm run past a damaged checkpoint (slow).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.errors import PeftlabError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "configs"


# ---- helpers ---------------------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` with its content hash (folders as 'dir'): compared before and after."""
    found = {}
    for path in sorted(Path(root).rglob("*")):
        found[str(path.relative_to(root))] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def refused(capsys, args, *needles) -> str:
    """``peftlab ARGS`` in this process: exit 2, exactly one line on stderr, naming each of ``needles``."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 2, (code, captured.out[-2000:], captured.err[-2000:])
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("peftlab: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def succeeded(capsys, args) -> str:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random BERT (128 positions) with the bundled minilm's tokenizer."""
    import torch
    import transformers

    import tiny
    from peftlab.models import resolve_model

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(0)
    config = tiny.bert_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    transformers.BertForSequenceClassification(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def tiny_args(model: str, data_dir, output, *extra) -> list:
    """A run of 24 SST-2 examples in batches of 8 (3 steps), one checkpoint per step kept."""
    return ["train", "--method", "lora", "--task", "sst2", "--model", model, "--data-dir", data_dir,
            "--output", output, "--max-train-samples", 24, "--max-eval-samples", 8, "--epochs", 1,
            "--batch-size", 8, "--max-length", 32, "--precision", "fp32", "--no-progress", "--logging-steps", 1,
            "--save-steps", 1, "--keep-checkpoints", *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_model, data_dir, tmp_path_factory) -> Path:
    """A finished tiny run with its checkpoints kept (copy it before changing it)."""
    output = tmp_path_factory.mktemp("finished") / "run"
    assert main([str(a) for a in tiny_args(tiny_model, data_dir, output)]) == 0
    return output


def unfinished_copy(finished: Path, where: Path) -> Path:
    """A copy of a finished run as a kill after its last checkpoint leaves it: no metrics, no adapter."""
    run = where / "run"
    shutil.copytree(finished, run)
    (run / "metrics.json").unlink()
    shutil.rmtree(run / "adapter")
    (run / "peftlab.json").unlink()
    return run


# ---- 1. options checked before any work -------------------------------------------------------------------

RANGE_PROBES = [
    (["--batch-size", "0"], "--batch-size must be a whole number of at least 1; got 0"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--epochs", "0"], "--epochs must be a finite number above 0"),
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "nan"], "got nan"),
    (["--lr", "0"], "--lr must be a finite number above 0"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "-0.1"], "--lr"),
    (["--r", "0"], "Option 'r' of method 'lora' must be a whole number of at least 1"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be a finite number at least 0 and below 1"),
    (["--save-steps", "0"], "--save-steps"),
    (["--logging-steps", "0"], "--logging-steps"),
    (["--eval-batch-size", "0"], "--eval-batch-size"),
    (["--max-train-samples", "0"], "--max-train-samples"),
    (["--max-length", "4"], "--max-length"),
    (["--seed", "-1"], "--seed"),
    (["--weight-decay", "-0.5"], "--weight-decay"),
    (["--dropout", "1.5"], "Option 'dropout' of method 'lora'"),
    (["--method", "prompt-tuning", "--num-virtual-tokens", "0"], "Option 'num_virtual_tokens'"),
    (["--precision", "fp8"], "Unknown precision 'fp8'"),
]


@pytest.mark.parametrize("flags, needle", RANGE_PROBES, ids=[" ".join(flags) for flags, _ in RANGE_PROBES])
def test_option_out_of_range_is_one_sentence_and_writes_nothing(flags, needle, capsys, tmp_path, data_dir):
    before = snapshot(tmp_path)
    refused(capsys, ["train", "--output", tmp_path / "run", "--data-dir", data_dir, *flags], needle)
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_argument_errors_come_before_transformers_is_imported(tmp_path):
    """In a fresh process: the refusals above answer before transformers, datasets or peft are imported."""
    script = textwrap.dedent(f"""
        import sys
        from peftlab.cli import main
        codes = [main(["train", "--output", {str(tmp_path / 'run')!r}] + flags)
                 for flags in (["--batch-size", "0"], ["--epochs", "nan"], ["--lr", "-0.1"], ["--r", "0"],
                               ["--max-length", "600"])]
        codes.append(main(["compare", "--methods", "lora", "--epochs", "0", "--output", {str(tmp_path / 'c')!r}]))
        print(codes, sorted(m for m in ("transformers", "datasets", "peft") if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[2, 2, 2, 2, 2, 2] []"
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 6
    assert "--max-length 600 is more than model 'minilm' can take" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_real_command_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "peftlab.cli", "train", "--epochs", "-1", "--output",
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["peftlab: error: --epochs must be a finite number above 0; got -1.0."]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe, needles", [
    ('epochs: "one"\n', ["key 'epochs' must be a number (float); got 'one'"]),
    ("batch_size: [1, 2]\n", ["key 'batch_size' must be a whole number (int); got [1, 2]"]),
    ("max_train_samples: 200.7\n", ["key 'max_train_samples' must be a whole number (int); got 200.7"]),
    ("precision: fp8\n", ["unknown precision 'fp8' (key 'precision')"]),
    ("r: 0\n", ["option 'r' of method 'lora' must be a whole number of at least 1"]),
    ("method: lora\ndropout: high\n", ["option 'dropout' of method 'lora' must be a number (float); got 'high'"]),
    ("learning_rate: 0\n", ["option 'learning_rate' of method 'lora' must be a finite number above 0"]),
])
def test_recipe_values_of_the_wrong_type_name_file_key_and_type(recipe, needles, capsys, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    before = snapshot(tmp_path)
    refused(capsys, ["train", "--config", path, "--output", tmp_path / "run"], f"Recipe '{path}': ", *needles)
    refused(capsys, ["compare", "--methods", "lora", "--config", path, "--output", tmp_path / "c"], f"Recipe '{path}'")
    assert snapshot(tmp_path) == before


def test_a_flag_overrides_the_recipe_value_it_replaces(tmp_path):
    """YAML reads 1e-4 as text: it is a number all the same; a flag given over a bad recipe value wins."""
    from peftlab.training import config_from_options
    from peftlab.validation import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text("lr: 1e-4\nepochs: 2\nmax_train_samples: 200.0\n")
    config = config_from_options(load_recipe(path), sources={"lr": str(path)})
    assert config.lr == 1e-4 and config.epochs == 2.0 and config.max_train_samples == 200
    assert config_from_options({"batch_size": 4}, sources={}).batch_size == 4


def test_the_python_api_checks_the_same_limits(tmp_path):
    import peftlab

    for options in ({"epochs": 0}, {"lr": float("nan")}, {"batch_size": 0}, {"method_options": {"r": 0}}):
        with pytest.raises(PeftlabError, match="must be"):
            peftlab.train(peftlab.TrainConfig(output=str(tmp_path / "run"), **options))
    assert not (tmp_path / "run").exists()


def test_max_length_above_the_models_positions_is_refused(capsys, tmp_path, tiny_model, data_dir):
    before = snapshot(tmp_path)
    refused(capsys, ["train", "--model", tiny_model, "--max-length", 200, "--output", tmp_path / "run",
                     "--data-dir", data_dir], "--max-length 200", "128 tokens", "--max-length 128 or less")
    refused(capsys, ["train", "--max-length", 600, "--output", tmp_path / "run"], "512 tokens")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name, limit", [("bert-base-uncased", 512), ("roberta-base", 512), ("gpt2", 1024),
                                         ("llama-2-7b", 4096), ("t5-small", None), ("flan-t5-large", None)])
def test_position_limits_read_off_stored_configs(name, limit):
    from peftlab.validation import position_limit

    # RoBERTa counts positions after its padding index (514 embeddings, 512 tokens); T5's are relative
    assert position_limit(json.loads((CONFIGS / name / "config.json").read_text())) == limit


# ---- 2. nothing overwritten -------------------------------------------------------------------------------

def test_output_that_is_a_file_is_refused(capsys, tmp_path, tiny_model, data_dir):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    before = snapshot(tmp_path)
    refused(capsys, tiny_args(tiny_model, data_dir, target), "is a file")
    refused(capsys, ["compare", "--methods", "lora", "--output", target], "is a file")
    assert snapshot(tmp_path) == before


def test_a_folder_that_is_not_a_run_is_refused_even_with_overwrite_when_its_files_would_be_replaced(
        capsys, tmp_path, tiny_model, data_dir):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("log.jsonl", "loss.png", "peftlab.json"):
        (folder / name).write_text(f"the user's {name}")
    before = snapshot(tmp_path)
    refused(capsys, tiny_args(tiny_model, data_dir, folder), "is not empty and is not a peftlab run", "--overwrite")
    refused(capsys, tiny_args(tiny_model, data_dir, folder, "--resume"), "is not a peftlab run")
    refused(capsys, tiny_args(tiny_model, data_dir, folder, "--overwrite"), "peftlab.json, log.jsonl, loss.png",
            "never replaces files peftlab did not write")
    assert snapshot(tmp_path) == before


def test_overwrite_trains_beside_the_users_files_and_leaves_them(capsys, tmp_path, tiny_model, data_dir):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    refused(capsys, tiny_args(tiny_model, data_dir, folder), "notes.txt")
    out = succeeded(capsys, tiny_args(tiny_model, data_dir, folder, "--overwrite"))
    assert "--overwrite: training into" in out and "leaves as they are" in out
    assert (folder / "notes.txt").read_text() == "keep me"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["train_samples_per_second"] > 0 and metrics["train_tokens_per_second"] > 0


def test_a_finished_run_is_refused_and_overwrite_replaces_only_its_own_files(capsys, tmp_path, finished_run,
                                                                             tiny_model, data_dir):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    refused(capsys, tiny_args(tiny_model, data_dir, run), "already holds a finished run", "--overwrite")
    assert snapshot(tmp_path) == before
    out = succeeded(capsys, tiny_args(tiny_model, data_dir, run, "--overwrite", "--seed", 7))
    assert "--overwrite: replacing the finished run" in out
    assert (run / "notes.txt").read_text() == "keep me"
    assert json.loads((run / "metrics.json").read_text())["seed"] == 7


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing_behind(capsys, tmp_path, tiny_model):
    train_file = tmp_path / "train.csv"
    train_file.write_text("text,label\n" + "".join(f"review {i},{['good', 'bad'][i % 2]}\n" for i in range(16)))
    output = tmp_path / "run"
    args = ["train", "--task", "csv", "--train-file", train_file, "--text-column", "text", "--label-column", "label",
            "--model", tiny_model, "--output", output, "--epochs", 1, "--batch-size", 8, "--max-length", 16,
            "--precision", "fp32", "--no-progress"]
    refused(capsys, [*args, "--dev-file", tmp_path / "missing.csv"], "missing.csv")
    assert not output.exists()  # the folder it had marked is gone again: the retry is not "an unfinished run"
    (tmp_path / "dev.csv").write_text("text,label\nfine,good\nawful,bad\n")
    succeeded(capsys, [*args, "--dev-file", tmp_path / "dev.csv"])
    assert (output / "metrics.json").is_file()


@pytest.mark.parametrize("leftovers", [("peftlab-run.json", "log.jsonl", "checkpoints/"), ("checkpoints/", "log.jsonl")],
                         ids=["killed-before-first-checkpoint", "earlier-peftlab-left-empty-checkpoints"])
def test_a_killed_start_is_recognised_and_started_again(leftovers, capsys, tmp_path, tiny_model, data_dir):
    run = tmp_path / "run"
    run.mkdir()
    for name in leftovers:
        (run / name).mkdir() if name.endswith("/") else (run / name).write_text("{}\n")
    out = succeeded(capsys, tiny_args(tiny_model, data_dir, run))
    assert "stopped before its first checkpoint: starting it again" in out
    assert (run / "metrics.json").is_file()


def test_compare_output_that_is_not_a_comparison_is_refused(capsys, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "report.html").write_text("the user's report")
    before = snapshot(tmp_path)
    refused(capsys, ["compare", "--methods", "lora", "--output", folder], "is not a comparison", "--overwrite")
    refused(capsys, ["compare", "--methods", "lora", "--output", folder, "--overwrite"], "report.html",
            "never replaces files peftlab did not write")
    assert snapshot(tmp_path) == before


# ---- 3. resume that tells the truth -------------------------------------------------------------------------

def test_resume_of_a_finished_run_prints_its_result_and_changes_nothing(capsys, tmp_path, finished_run, tiny_model,
                                                                        data_dir):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(tmp_path)
    out = succeeded(capsys, tiny_args(tiny_model, data_dir, run, "--resume"))
    metric = json.loads((run / "metrics.json").read_text())["metric"]
    assert f"holds a finished run: dev accuracy = {metric:.4f}; nothing to resume" in out
    assert snapshot(tmp_path) == before


def test_resume_with_nothing_to_resume_says_so_and_starts_fresh(capsys, tmp_path, tiny_model, data_dir):
    out = succeeded(capsys, tiny_args(tiny_model, data_dir, tmp_path / "run", "--resume"))
    assert "--resume: nothing to resume in" in out and "starting a fresh run" in out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["resumed"] is False


@pytest.mark.parametrize("flags, needles", [
    (["--lr", "0.01"], ["learning_rate 0.002 -> 0.01"]),
    (["--batch-size", "4"], ["batch_size 8 -> 4"]),
    (["--grad-accum", "2"], ["grad_accum 1 -> 2"]),
    (["--seed", "1"], ["seed 42 -> 1"]),
    (["--max-train-samples", "16"], ["max_train_samples 24 -> 16"]),
    (["--epochs", "2"], ["epochs 1.0 -> 2.0"]),
    (["--r", "4"], ["r 8 -> 4"]),
    (["--method", "ia3"], ["method 'lora' -> 'ia3'"]),
])
def test_resume_refuses_options_that_changed_since_the_start(flags, needles, capsys, tmp_path, finished_run,
                                                             tiny_model, data_dir):
    run = unfinished_copy(finished_run, tmp_path)
    before = snapshot(tmp_path)
    args = tiny_args(tiny_model, data_dir, run, "--resume")
    for flag, value in zip(flags[::2], flags[1::2]):  # the later flag wins in argparse
        args += [flag, value]
    message = refused(capsys, args, "--resume:", "was started with other options", *needles)
    if "--method" in flags:
        assert "r 8" not in message  # another method: the method is named, not each of its options
    assert snapshot(tmp_path) == before


def test_resume_skips_a_damaged_checkpoint_and_says_which(capsys, tmp_path, finished_run, tiny_model, data_dir):
    run = unfinished_copy(finished_run, tmp_path)
    newest = run / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    out = succeeded(capsys, tiny_args(tiny_model, data_dir, run, "--resume"))
    assert "--resume: checkpoint-3 (adapter_model.safetensors: it is truncated" in out
    assert "--resume: resuming from checkpoint-2 (step 2)" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed"] is True and metrics["steps"] == 3 and metrics["train_samples_per_second"] > 0


def test_checkpoint_checks_find_truncated_and_garbled_files(tmp_path, finished_run):
    from peftlab.artifacts import checkpoint_problem, intact_checkpoint

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert intact_checkpoint(run) == (run / "checkpoints" / "checkpoint-3", [])
    newest = run / "checkpoints" / "checkpoint-3"
    optimizer = newest / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the zip's data: its CRC no longer matches
    optimizer.write_bytes(bytes(data))
    assert "optimizer.pt" in checkpoint_problem(newest)
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": ')
    assert intact_checkpoint(run)[0] is None and len(intact_checkpoint(run)[1]) == 2


# ---- 4. paths and the data folder in manifests -------------------------------------------------------------

def test_a_custom_file_run_evaluates_from_another_folder(capsys, tmp_path, tiny_model, monkeypatch):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    (data / "train.csv").write_text("text,label\n" + "".join(f"review {i},{['good', 'bad'][i % 2]}\n" for i in range(16)))
    (data / "dev.csv").write_text("text,label\nfine,good\nawful,bad\nnice,good\n")
    monkeypatch.chdir(data)
    succeeded(capsys, ["train", "--task", "csv", "--train-file", "train.csv", "--dev-file", "dev.csv", "--text-column",
                       "text", "--label-column", "label", "--model", tiny_model, "--output", tmp_path / "run",
                       "--epochs", 1, "--batch-size", 8, "--max-length", 16, "--precision", "fp32", "--no-progress"])
    manifest = json.loads((tmp_path / "run" / "peftlab.json").read_text())
    assert manifest["task_options"]["dev_file"] == str(data / "dev.csv")  # absolute
    monkeypatch.chdir(elsewhere)
    result = json.loads(succeeded(capsys, ["eval", "--adapter", tmp_path / "run"]))
    assert result["eval_examples"] == 3

    # a manifest of an earlier peftlab with paths relative to the run folder: read from there
    shutil.copy(data / "dev.csv", tmp_path / "run" / "dev.csv")
    manifest["task_options"].update(train_file="train.csv", dev_file="dev.csv")
    (tmp_path / "run" / "peftlab.json").write_text(json.dumps(manifest))
    assert json.loads(succeeded(capsys, ["eval", "--adapter", tmp_path / "run"]))["eval_examples"] == 3

    # the recorded dev file is gone: the manifest is named, not a flag the user never gave
    (tmp_path / "run" / "dev.csv").unlink()
    before = snapshot(tmp_path)
    refused(capsys, ["eval", "--adapter", tmp_path / "run"], "The dev file this run was trained with",
            "peftlab.json", "no longer exists: pass --dev-file")
    assert snapshot(tmp_path) == before


def test_eval_reads_the_data_folder_the_run_was_trained_from(capsys, tmp_path, finished_run, data_dir, monkeypatch):
    manifest = json.loads((finished_run / "peftlab.json").read_text())
    assert manifest["data_dir"] == str(Path(data_dir).resolve())
    monkeypatch.delenv("PEFTLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the Hub would fail: the remembered folder must be used
    result = json.loads(succeeded(capsys, ["eval", "--adapter", finished_run, "--max-eval-samples", 8]))
    assert result["eval_examples"] == 8 and result["task"] == "sst2"


def test_a_manifest_without_the_new_fields_still_loads(tmp_path):
    from peftlab.artifacts import RunManifest

    legacy = {"method": "lora", "model": "minilm", "kind": "seq-cls", "task": "sst2", "label_names": ["0", "1"]}
    manifest = RunManifest(**legacy)
    assert manifest.data_dir is None and manifest.adapter_dir == "adapter"


# ---- 5. a real model: resume past a damaged checkpoint ends where an uninterrupted run ends -----------------

@pytest.mark.slow
@pytest.mark.real
def test_minilm_resume_past_a_damaged_checkpoint_matches_an_uninterrupted_run(tmp_path, data_dir):
    import torch
    from safetensors.torch import load_file

    common = ["train", "--method", "lora", "--task", "sst2", "--model", "minilm", "--max-train-samples", 96,
              "--max-eval-samples", 32, "--epochs", 1, "--batch-size", 16, "--save-steps", 2, "--keep-checkpoints",
              "--precision", "fp32", "--no-progress", "--data-dir", str(data_dir)]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "peftlab.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})

    reference = tmp_path / "reference"
    assert cli(*common, "--output", reference).returncode == 0
    run = unfinished_copy(reference, tmp_path)  # as if killed after checkpoint-6 was written...
    damaged = run / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # ...and its weights were cut short
    changed = cli(*common, "--output", run, "--resume", "--lr", "1e-3")
    assert changed.returncode == 2 and "learning_rate 0.002 -> 0.001" in changed.stderr
    resumed = cli(*common, "--output", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-6 (adapter_model.safetensors: it is truncated" in resumed.stdout
    assert "resuming from checkpoint-4 (step 4)" in resumed.stdout
    expected = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    actual = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert json.loads((run / "metrics.json").read_text())["resumed"] is True
