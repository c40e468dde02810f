"""``peftlab train --dry-run``: every lab's Hub recipe checked against a stored config.json of its model.

The configs under tests/data/configs/<name>/config.json are the models' own config.json files on the
Hugging Face Hub (the weights are not needed: the dry run builds the model on the meta device):

* ``t5-small``: https://huggingface.co/google-t5/t5-small/blob/main/config.json
* ``gpt2``: https://huggingface.co/openai-community/gpt2/blob/main/config.json (the same file is quoted
  verbatim in many public repositories)
* ``tinyllama-1.1b``: https://huggingface.co/TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T/blob/main/config.json;
  its shape is the model card's "Layers: 22, Heads: 32, Query Groups: 4, Embedding Size: 2048, Intermediate
  Size (Swiglu): 5632" and TinyLlama's own lit_gpt config ``tiny_LLaMA_1b`` (github.com/jzhang38/TinyLlama,
  lit_gpt/config.py: block_size 2048, vocab_size 32000, norm_eps 1e-5)
* ``llama-2-7b``: https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json and ``bert-base-uncased``:
  https://huggingface.co/google-bert/bert-base-uncased/blob/main/config.json (shared with the parameter-count
  tests of ``peftlab methods --model DIR``)

Each test also checks the base model's parameter count against the number the model is published with,
so a wrong config cannot pass unnoticed, and the recipe's trainable count against the method's formula.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.errors import PeftlabError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "configs"
LABS = ROOT / "labs"

# The Hub model of each lab recipe -> its stored config folder, and the published parameter count of the
# base model with the head the recipe's task kind gives it (the LM head tied where the model ties it).
MODELS = {
    "meta-llama/Llama-2-7b-hf": ("llama-2-7b", 6_738_415_616),  # Llama 2 paper / model card: "7B" = 6.74B
    "bert-base-uncased": ("bert-base-uncased", 109_482_240 + 768 * 2 + 2),  # BertModel 109.48M + 2-label classifier
    "google-t5/t5-small": ("t5-small", 60_506_624),  # T5ForConditionalGeneration, tied LM head
    "openai-community/gpt2": ("gpt2", 124_439_808),  # GPT-2 small ("124M"), tied LM head
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": ("tinyllama-1.1b", 1_100_048_384),
}


def lora_params(rank: int, shapes: list[tuple[int, int]]) -> int:
    """LoRA's trainable parameters: r x (in + out) per adapted matrix (Hu et al. 2021)."""
    return sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes)


LLAMA_7B_LINEARS = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]  # q k v o, gate up, down
TINYLLAMA_LINEARS = [(2048, 2048), (2048, 256), (2048, 256), (2048, 2048)] + [(2048, 5632)] * 2 + [(5632, 2048)]
BERT_CLASSIFIER = 768 * 2 + 2

# Trainable parameters each Hub recipe must give, from the method's formula (None: not checked here).
EXPECTED_TRAINABLE = {
    # QLoRA paper's recipe: r 64 on all seven projections of 32 layers = 159.9M (as peft prints it)
    "01-lora-qlora": 32 * lora_params(64, LLAMA_7B_LINEARS),
    # LoRA r 8 on query and value of 12 layers, plus the new classifier
    "1.1-hf-basics": 12 * lora_params(8, [(768, 768)] * 2) + BERT_CLASSIFIER,
    "1.2-ddp": 12 * lora_params(8, [(768, 768)] * 2) + BERT_CLASSIFIER,
    # LoRA r 16 on all seven projections of TinyLlama's 22 layers (grouped-query k/v are 256 wide)
    "1.3-alpaca-deepspeed": 22 * lora_params(16, TINYLLAMA_LINEARS),
    # prefix tuning with the reparameterisation MLP: 20 x 768 embedding, 768 -> 512 -> 2 x 12 layers x 768
    "04-prefix-tuning": 20 * 768 + (768 * 512 + 512) + (512 * 2 * 12 * 768 + 2 * 12 * 768),
    # prompt tuning: 20 virtual tokens x d_model 512, for each of an encoder-decoder's two transformer
    # stacks (peft's num_transformer_submodules = 2 for SEQ_2_SEQ_LM)
    "03-prompt-tuning": 2 * 20 * 512,
    # Houlsby bottleneck adapters (reduction 16: 768 -> 48 -> 768) after attention and FFN of 12 layers
    "02-adapter": 12 * 2 * (768 * 48 + 48 + 48 * 768 + 768) + BERT_CLASSIFIER,
    # BitFit: every bias of BERT-base (embedding LayerNorm, 12 x (q k v o, LayerNorm, FFN in/out, LayerNorm),
    # pooler) plus the classifier
    "06-bitfit": 768 + 12 * (4 * 768 + 768 + 3072 + 768 + 768) + 768 + BERT_CLASSIFIER,
    # P-Tuning: 20 x 768 virtual-token embedding and the MLP encoder 768 -> 128 -> 128 -> 768
    "07-p-tuning": 20 * 768 + (768 * 128 + 128) + (128 * 128 + 128) + (128 * 768 + 768) + BERT_CLASSIFIER,
    # P-Tuning v2: a key and a value prefix of 20 x 768 in each of 12 layers, no reparameterisation
    "08-p-tuning-v2": 20 * 2 * 12 * 768 + BERT_CLASSIFIER,
    # (IA)3 on GPT-2: a 2304-wide vector on c_attn (keys/values) and a 3072-wide one on mlp.c_proj, 12 layers
    "05-ia3": 12 * (2304 + 3072),
}


def hub_recipes() -> list[str]:
    return sorted(path.parent.name for path in LABS.glob("*/recipe.yaml"))


def config_folder(model: str) -> Path:
    folder = CONFIGS / MODELS[model][0]
    assert (folder / "config.json").is_file(), f"no stored config.json for {model} in {folder}"
    return folder


def recipe_config(lab: str, **overrides):
    from peftlab.training import config_from_options, load_recipe

    options = load_recipe(LABS / lab / "recipe.yaml")
    options.update(overrides)
    return config_from_options(options)


@pytest.fixture
def offline(monkeypatch):
    """No data folder: tasks load from the Hub, which the dry run never touches."""
    monkeypatch.delenv("PEFTLAB_DATA_DIR", raising=False)


def test_every_hub_recipe_has_a_stored_config():
    from peftlab.training import load_recipe

    models = {load_recipe(LABS / lab / "recipe.yaml")["model"] for lab in hub_recipes()}
    assert models <= set(MODELS), f"add a stored config.json for {sorted(models - set(MODELS))}"
    assert len(hub_recipes()) >= 11


@pytest.mark.parametrize("lab", hub_recipes())
def test_hub_recipe_passes_a_dry_run(lab, offline):
    from peftlab.dryrun import dry_run

    model = recipe_config(lab).model
    nproc = 2 if lab.startswith(("1.2", "1.3")) else 1  # the data-parallel labs are meant for N GPUs
    result = dry_run(recipe_config(lab, model=str(config_folder(model))), world_size=nproc)
    text = result.render()

    assert result.base_total == MODELS[model][1], (lab, result.base_total)
    assert 0 < result.trainable < result.total
    if lab in EXPECTED_TRAINABLE:
        assert result.trainable == EXPECTED_TRAINABLE[lab], (lab, result.trainable, EXPECTED_TRAINABLE[lab])
    assert not result.data.local and "not checked offline" in text
    assert result.effective_batch == result.config.batch_size * result.config.grad_accum * nproc
    for row in result.memory:
        assert row.estimate is not None, (lab, row.device, row.problem)
        assert row.estimate.required_bytes > result.total  # more than a byte per parameter
    assert text.endswith("nothing was downloaded or trained.")
    if result.config.deepspeed:
        assert "DeepSpeed ZeRO-2" in text


def test_qlora_recipe_reports_the_quantised_base_and_a_gpu_sized_estimate(offline):
    from peftlab.dryrun import dry_run

    result = dry_run(recipe_config("01-lora-qlora", model=str(config_folder("meta-llama/Llama-2-7b-hf"))))
    cuda = next(row.estimate for row in result.memory if row.device == "cuda")
    assert cuda.gradient_checkpointing  # QLoRA's own default
    # a 4-bit 7B base with LoRA r 64 fits the recipe's "about 10 GB" GPU, far below the 27 GB fp32 weights
    assert 4 * 2**30 < cuda.required_bytes < 16 * 2**30
    assert result.steps is None and "steps unknown" in result.render()


def test_local_data_counts_examples_steps_and_tokens(data_dir, monkeypatch):
    """Lab 1.1's recipe on the local SST-2, once with a config-only folder (no tokenizer: tokens not counted),
    once with the bundled minilm (tokenized exactly as training tokenizes)."""
    from peftlab.dryrun import dry_run
    from peftlab.training import optimizer_steps

    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(data_dir))
    result = dry_run(recipe_config("1.1-hf-basics", model=str(config_folder("bert-base-uncased"))))
    assert result.data.local and result.data.train_examples == 67_349 and result.data.dev_examples == 872
    assert result.data.label_names == ["negative", "positive"]
    assert result.steps == 3 * math.ceil(67_349 / 32) == optimizer_steps(67_349, 32, 1, 1, 3)
    assert result.data.tokens_per_epoch is None and "no tokenizer" in result.render()

    small = dry_run(recipe_config("1.1-hf-basics", model="minilm", max_train_samples=200, epochs=2,
                                  batch_size=16, grad_accum=2), world_size=2)
    assert small.data.train_examples == small.data.train_features == 200
    # 13 batches of 16 shared by 2 processes: 7 each; one step per 2 batches: 4 steps per epoch
    assert small.effective_batch == 64 and small.steps == 2 * 4
    assert 200 * 3 < small.data.tokens_per_epoch < 200 * 128
    assert "training tokens" in small.render()


def test_user_files_columns_are_listed_and_a_missing_one_is_one_sentence(tmp_path, offline):
    from peftlab.dryrun import dry_run
    from peftlab.training import config_from_options

    train = tmp_path / "train.csv"
    train.write_text("review,stars,id\ngood film,5,1\nbad film,1,2\nfine,3,3\n")
    dev = tmp_path / "dev.jsonl"
    dev.write_text('{"review": "nice", "stars": 5}\n')
    options = dict(task="csv", train_file=str(train), dev_file=str(dev), text_column="review",
                   model=str(config_folder("bert-base-uncased")), epochs=1, batch_size=2)
    result = dry_run(config_from_options({**options, "label_column": "stars"}))
    assert result.data.columns == {"train.csv": ["review", "stars", "id"], "dev.jsonl": ["review", "stars"]}
    assert result.data.label_names == ["1", "3", "5"] and result.num_labels == 3
    assert result.trainable == 12 * lora_params(8, [(768, 768)] * 2) + 768 * 3 + 3
    assert result.steps == 2

    with pytest.raises(PeftlabError) as error:
        dry_run(config_from_options({**options, "label_column": "rating"}))
    message = str(error.value)
    assert "'rating'" in message and "'review', 'stars', 'id'" in message and "\n" not in message


def test_cli_dry_run_prints_a_summary_and_exits_0_or_one_sentence_and_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PEFTLAB_DATA_DIR", None)
    command = [sys.executable, "-m", "peftlab.cli", "train", "--config", str(LABS / "07-p-tuning" / "recipe.yaml"),
               "--dry-run", "--output", str(tmp_path / "never-written")]
    ok = subprocess.run(command + ["--model", str(config_folder("bert-base-uncased"))], capture_output=True,
                        text=True, env=env, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "p-tuning" in ok.stdout and "trainable" in ok.stdout and "cuda bf16" in ok.stdout
    assert not (tmp_path / "never-written").exists()

    missing = subprocess.run(command + ["--model", str(tmp_path / "no-such-model")], capture_output=True, text=True,
                             env=env, timeout=600)
    assert missing.returncode == 2
    assert missing.stderr.startswith("peftlab: error:") and len(missing.stderr.strip().splitlines()) == 1
    assert "Traceback" not in missing.stderr
