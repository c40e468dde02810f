"""The model the estimate is about: its architecture numbers, read from a config, and a shapes-only copy of it.

Architecture numbers come from the model's ``config.json`` (``transformers.AutoConfig``): a bundled alias, a
local folder (a ``config.json`` alone is enough) or a Hub id. A few well-known Hub models are built in
(``BUILTIN_CONFIGS``) so that ``recommend`` and ``estimate`` work offline for them. ``meta_model`` builds the
model on PyTorch's ``meta`` device (shapes only, no memory), which is what every parameter count here is
taken from.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.modelinfo import config_value, hidden_size, num_heads, num_layers

# Well-known models, so that ``recommend``/``estimate`` work offline for them. The numbers are those
# models' config.json values; the parameter counts (checked by the tests against the meta-device model)
# are for the bare language model.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        _params=6_738_415_616),
    "bert-base-uncased": dict(
        model_type="bert", architectures=["BertForMaskedLM"], hidden_size=768, intermediate_size=3072,
        num_hidden_layers=12, num_attention_heads=12, vocab_size=30522, max_position_embeddings=512,
        type_vocab_size=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        _params=109_482_240),
    "t5-small": dict(
        model_type="t5", architectures=["T5ForConditionalGeneration"], d_model=512, d_ff=2048, d_kv=64,
        num_layers=6, num_decoder_layers=6, num_heads=8, vocab_size=32128, feed_forward_proj="relu",
        dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=True,
        _params=60_506_624),
    "gpt2": dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=768, n_layer=12, n_head=12,
        vocab_size=50257, n_positions=1024, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
        bos_token_id=50256, eos_token_id=50256, _params=124_439_808),
}
BUILTIN_ALIASES = {"llama-2-7b": "meta-llama/Llama-2-7b-hf", "meta-llama/llama-2-7b-hf": "meta-llama/Llama-2-7b-hf",
                   "google-bert/bert-base-uncased": "bert-base-uncased", "google-t5/t5-small": "t5-small",
                   "openai-community/gpt2": "gpt2"}


@dataclass
class ModelSpec:
    """The architecture numbers the estimate needs, read from a transformers config."""

    name: str
    source: str  # "built in" | the folder or Hub id the config came from
    model_type: str
    architecture: str  # "encoder" | "decoder" | "encoder-decoder"
    hidden: int
    layers: int
    decoder_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    hidden_dropout: float
    attention_dropout: float
    config: Any = field(repr=False, default=None)

    @property
    def query_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def total_layers(self) -> int:
        return self.layers + self.decoder_layers


def architecture(config) -> str:
    """"encoder", "decoder" or "encoder-decoder", from what the config says about the model."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    architectures = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in architectures or "LMHeadModel" in architectures:
        return "decoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "decoder"
    return "encoder"


def builtin_name(name: str) -> str | None:
    """The built-in table's key for ``name`` (case-insensitive, a few aliases), or None."""
    if name in BUILTIN_CONFIGS:
        return name
    lowered = name.lower()
    for key in BUILTIN_CONFIGS:
        if key.lower() == lowered:
            return key
    return BUILTIN_ALIASES.get(lowered)


@functools.lru_cache(maxsize=32)
def load_config(name: str):
    """(transformers config, source) for a bundled alias, folder, built-in name or Hub id."""
    import transformers

    key = builtin_name(name)
    if key is not None:
        values = {k: v for k, v in BUILTIN_CONFIGS[key].items() if not k.startswith("_")}
        model_type = values.pop("model_type")
        return transformers.AutoConfig.for_model(model_type, **values), "built in"
    from peftlab.models import BUNDLED, resolve_model

    path = resolve_model(name)
    try:
        return transformers.AutoConfig.from_pretrained(path), path
    except (OSError, ValueError) as error:
        known = ", ".join([*BUNDLED, *BUILTIN_CONFIGS])
        first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise PeftlabError(
            f"Could not read the configuration of model '{name}' ({first_line}). It is not a local folder, and the "
            "Hugging Face Hub did not answer for it (no network, or no such model). Use a local model folder, or "
            f"one of the models that work offline: {known}."
        ) from None


@functools.lru_cache(maxsize=32)
def declares_separate_output_embeddings(name: str) -> bool:
    """Whether the model's own config.json says ``"tie_word_embeddings": false``.

    transformers 5 forces some configs to tie (MT5Config: "official weights have False serialized, but we
    have to tie always") and unties at load time when the checkpoint holds a separate LM head. A model built
    from the config alone would tie it, so the meta-device copy needs to be told."""
    key = builtin_name(name)
    if key is not None:
        return BUILTIN_CONFIGS[key].get("tie_word_embeddings") is False
    from peftlab.models import resolve_model

    config_file = Path(resolve_model(name)) / "config.json"
    if not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text()).get("tie_word_embeddings") is False
    except (OSError, ValueError):
        return False


def model_spec(name: str) -> ModelSpec:
    config, source = load_config(name)
    hidden = hidden_size(config)
    heads = num_heads(config)
    layers = num_layers(config)
    kind_of_model = architecture(config)
    decoder_layers = (int(config_value(config, "num_decoder_layers", default=layers))
                      if kind_of_model == "encoder-decoder" else 0)
    head_dim = int(config_value(config, "head_dim", "d_kv", default=hidden // heads))
    intermediate = int(config_value(config, "intermediate_size", "d_ff", "n_inner", "ffn_dim", default=4 * hidden))
    return ModelSpec(
        name=name, source=source, model_type=str(getattr(config, "model_type", "")), architecture=kind_of_model,
        hidden=hidden, layers=layers, decoder_layers=decoder_layers, heads=heads,
        kv_heads=int(config_value(config, "num_key_value_heads", default=heads)), head_dim=head_dim,
        intermediate=intermediate, vocab=int(config_value(config, "vocab_size", default=0)),
        hidden_dropout=float(config_value(config, "hidden_dropout_prob", "resid_pdrop", "dropout_rate",
                                          "hidden_dropout", "dropout", default=0.0)),
        attention_dropout=float(config_value(config, "attention_probs_dropout_prob", "attn_pdrop", "attention_dropout",
                                             "dropout_rate", default=0.0)),
        config=config,
    )


def meta_model(config, kind: str, num_labels: int = 2, *, separate_output_embeddings: bool = False):
    """The model with ``kind``'s head on the ``meta`` device: every parameter's shape, no memory.

    ``separate_output_embeddings``: give the LM head its own weight even where transformers ties it to the
    input embeddings (see :func:`declares_separate_output_embeddings`)."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    kind = TaskKind.parse(kind)
    config = copy.deepcopy(config)
    if kind.is_classification:
        config.num_labels = num_labels
        if getattr(config, "pad_token_id", None) is None:  # decoder classification needs a pad token
            eos = getattr(config, "eos_token_id", None)
            config.pad_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    auto_class = getattr(transformers, kind.auto_class)
    try:
        with init_empty_weights():
            model = auto_class.from_config(config)
    except ValueError as error:
        raise PeftlabError(
            f"A {getattr(config, 'model_type', '?')} model has no {kind} form in transformers "
            f"({str(error).splitlines()[0][:160]})."
        ) from None
    model.tie_weights()  # transformers 5 skips tying on empty weights; a tied LM head is one tensor
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if separate_output_embeddings and output is not None and inputs is not None and output.weight is inputs.weight:
        output.weight = torch.nn.Parameter(torch.empty_like(output.weight))
    return model
