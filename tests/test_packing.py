"""--packing: several causal-LM examples per row, no attention across them, and exactly the padded run's loss."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from peftlab.errors import PeftlabError
from peftlab.preprocess import IGNORE_INDEX, PackingCollator, check_packing, collator


class _Tokenizer:
    pad_token_id = 0
    eos_token_id = 1
    padding_side = "right"


def features(lengths, seed=0, prompt=2):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        ids = torch.randint(2, tiny.VOCAB, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "length": length,
                     "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def test_rows_hold_at_most_the_capacity_and_positions_restart():
    packer = PackingCollator(_Tokenizer(), capacity=16)
    batch = packer(features([9, 7, 5, 4, 3]))
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"} and batch["use_cache"] is False
    assert batch["input_ids"].shape[1] <= 16 and batch["input_ids"].shape[0] == 2  # 9+7 | 5+4+3
    positions = batch["position_ids"][0].tolist()
    assert positions == list(range(9)) + list(range(7))
    # every example's first label is ignored (nothing in its own row predicts it); a padding segment learns nothing
    starts = [i for i, p in enumerate(batch["position_ids"][1].tolist()) if p == 0]
    assert all(batch["labels"][1, i] == IGNORE_INDEX for i in starts)
    assert batch["labels"][1, 12:].eq(IGNORE_INDEX).all() and batch["input_ids"][1, 12:].eq(0).all()


def padded_loss(model, batch_features):
    return model(**collator("causal-lm", _TokenizerWithPad())(batch_features)).loss


class _TokenizerWithPad:
    """What DataCollatorForSeq2Seq needs of a tokenizer: a pad id, a side and ``pad``."""

    pad_token_id = 0
    padding_side = "right"
    model_input_names = ["input_ids", "attention_mask"]

    def pad(self, encoded, return_tensors=None, **kwargs):
        width = max(len(f["input_ids"]) for f in encoded)
        return {"input_ids": torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in encoded]),
                "attention_mask": torch.tensor([f["attention_mask"] + [0] * (width - len(f["input_ids"]))
                                                for f in encoded])}


@pytest.mark.parametrize("build", [tiny.tiny_llama, tiny.tiny_gpt2], ids=["llama", "gpt2"])
def test_packed_loss_equals_the_padded_loss(build):
    model = build()
    batch = features([9, 14, 5, 11, 3, 7], seed=3)
    with torch.no_grad():
        packed = model(**PackingCollator(_Tokenizer(), capacity=24)(batch)).loss
        padded = padded_loss(model, batch)
    assert float(packed) == pytest.approx(float(padded), abs=1e-4)


def test_the_model_check_accepts_lora_and_refuses_virtual_tokens_and_other_kinds():
    from peftlab.methods import get_method

    model = get_method("lora").apply(tiny.tiny_llama(), "causal-lm")
    check_packing(model, "causal-lm")  # exact: passes
    prompt = get_method("prompt-tuning", num_virtual_tokens=4).apply(tiny.tiny_llama(), "causal-lm")
    with pytest.raises(PeftlabError, match="--packing is not exact"):
        check_packing(prompt, "causal-lm")
    with pytest.raises(PeftlabError, match="--packing is for causal LM tasks"):
        collator("seq-cls", _Tokenizer(), pack_to=64)


def write_pairs(path, n=24):
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    with path.open("w") as handle:
        for i in range(n):
            prompt = " ".join(words[(i + k) % len(words)] for k in range(1 + i % 5))
            response = " ".join(words[(i * 3 + k) % len(words)] for k in range(2 + i % 7))
            handle.write(json.dumps({"question": prompt, "answer": response}) + "\n")
    return path


def test_a_packed_run_logs_the_padded_runs_losses(tmp_path):
    """The whole training run: same examples, same order, LoRA without dropout on a tiny Llama; every step's
    loss with --packing equals the padded run's to 1e-4."""
    from peftlab import train
    from peftlab.labs.standins import smoke_llama

    data = write_pairs(tmp_path / "pairs.jsonl")
    common = dict(method="lora", task="jsonl", model=str(smoke_llama()), train_file=str(data),
                  prompt_column="question", response_column="answer", dev_fraction=0.25, epochs=1, batch_size=6,
                  max_length=48, logging_steps=1, group_by_length=False, precision="fp32", progress=False,
                  dropout=0.0, eval_each_epoch=False)
    losses = {}
    for packing in (False, True):
        output = tmp_path / f"run-{packing}"
        metrics = train(output=str(output), packing=packing, **common)
        losses[packing] = [row["loss"] for row in map(json.loads, (output / "log.jsonl").read_text().splitlines())
                           if row.get("type") == "train"]
        assert metrics["metric"] > 1
    assert len(losses[True]) == len(losses[False]) >= 3
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
