"""The command line: user mistakes get one clear line and exit status 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftlab.cli import main
from peftlab.training import TrainConfig, config_from_options, load_recipe


def run(args, env=None):
    return subprocess.run([sys.executable, "-m", "peftlab.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def assert_clean_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("peftlab: error:"), message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("args, needles", [
    (["train", "--method", "lorra"], ["Unknown method 'lorra'", "Did you mean 'lora'"]),
    (["train", "--task", "sst3"], ["Unknown task 'sst3'", "sst2"]),
    (["train", "--method", "lora", "--num-virtual-tokens", "5"], ["num_virtual_tokens", "lora"]),
    (["train", "--method", "lora", "--r", "eight"], ["'r'", "int"]),
    (["train", "--precision", "fp8"], ["Unknown precision 'fp8'"]),
    (["eval", "--adapter", "/nonexistent/run"], ["does not exist"]),
    (["predict", "--adapter", "/nonexistent/run"], ["not both or neither"]),
])
def test_user_mistakes_get_one_clear_line(args, needles, tmp_path):
    assert_clean_error(run(args + (["--output", tmp_path / "o"] if args[0] == "train" else [])), *needles)


def test_missing_data_directory_is_named(tmp_path):
    result = run(["train", "--task", "sst2", "--output", tmp_path / "o", "--data-dir", tmp_path / "nope"])
    assert_clean_error(result, "does not exist", "--data-dir")


def test_offline_hub_gives_one_message(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PEFTLAB_DATA_DIR"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-m", "peftlab.cli", "train", "--task", "mrpc", "--output",
                             str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300)
    assert_clean_error(result, "Hub", "--data-dir")


def test_bad_recipe_names_the_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: lora\nepochs: [1\n")
    assert_clean_error(run(["train", "--config", recipe, "--output", tmp_path / "o"]), str(recipe), "line")


def test_recipe_keys_route_to_method_and_task_and_cli_wins(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: lora\ntask: csv\nr: 4\nalpha: 8\nepochs: 2\ntrain-file: a.csv\nlabel_column: y\n")
    options = load_recipe(recipe)
    options["epochs"] = 5  # as if given on the command line after the recipe
    config = config_from_options(options)
    assert isinstance(config, TrainConfig)
    assert config.epochs == 5
    assert config.method_options == {"r": 4, "alpha": 8}
    assert config.task_options == {"train_file": "a.csv", "label_column": "y"}


def test_unknown_recipe_key_is_rejected():
    from peftlab.errors import PeftlabError

    with pytest.raises(PeftlabError, match="Unknown option 'rank'"):
        config_from_options({"method": "lora", "rank": 4})


def test_user_csv_file_errors_reach_the_cli(tmp_path, capsys):
    train = tmp_path / "train.csv"
    train.write_text("review,stars\ngreat,5\nbad,1\n")
    dev = tmp_path / "dev.csv"
    dev.write_text("review,stars\nfine,3\n")
    code = main(["train", "--task", "csv", "--train-file", str(train), "--dev-file", str(dev),
                 "--text-column", "review", "--label-column", "stars", "--output", str(tmp_path / "o")])
    assert code == 2
    error = capsys.readouterr().err
    assert "dev.csv" in error and "line 2" in error and "'3'" in error


def test_env_json_reports_devices_versions_and_data(data_dir):
    result = run(["env", "--json", "--no-models"], env={"PEFTLAB_DATA_DIR": str(data_dir)})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["devices"]["cpu_cores"] >= 1
    assert report["packages"]["transformers"].startswith("5.")
    status = {entry["task"]: entry["status"] for entry in report["data"]}
    assert status["sst2"] == status["conll2003"] == status["alpaca"] == "ok"
    assert status["cola"] == "missing"  # not in the shared data: reported, not crashed
