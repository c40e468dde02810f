"""A small world for fast comparison tests: a tiny random BERT (MiniLM's real tokenizer) and a GLUE folder with
the first rows of the real SST-2 and MRPC files (no CoLA: a task whose data is missing)."""

from __future__ import annotations

from pathlib import Path

TINY_OPTIONS = {"max_train_samples": 48, "max_eval_samples": 32, "epochs": 1, "max_length": 48, "batch_size": 16}
FAST_LATENCY = {"bs1_warmup": 1, "bs1_runs": 3, "bs32_warmup": 0, "bs32_runs": 3, "budget_s": 0.2}


def make_world(top: Path, data_dir: Path) -> tuple[Path, Path]:
    """(tiny base model folder, GLUE data folder) under ``top``."""
    import torch
    import transformers

    from peftlab.models import load_tokenizer

    base = top / "base"
    tokenizer = load_tokenizer("minilm")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    data = top / "data"
    for name, train_rows, dev_rows in (("SST-2", 80, 40), ("MRPC", 80, 40)):
        folder = data / "glue" / name
        folder.mkdir(parents=True)
        for split, rows in (("train", train_rows), ("dev", dev_rows)):
            lines = (data_dir / "glue" / name / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
            (folder / f"{split}.tsv").write_text("\n".join(lines[:rows + 1]) + "\n", encoding="utf-8")
    return base, data
