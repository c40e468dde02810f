"""Compatibility shims between peft 0.21 and transformers 5, and helpers the peft-backed methods share.

Prefix tuning / P-Tuning v2 on classification models (the reason this module exists)
------------------------------------------------------------------------------------
Prefix tuning hands every attention layer extra key/value pairs through the model's key/value cache.
transformers 5 renamed the forward argument that carries that cache from ``past_key_values`` to
``cache`` (the old name survives only as a deprecated alias, ``@deprecate_kwarg("past_key_values",
"5.40.0", new_name="cache")``, which is invisible to ``inspect.signature``). peft 0.21.2's
``PeftModelForSequenceClassification`` / ``PeftModelForTokenClassification`` /
``PeftModelForQuestionAnswering._prefix_tuning_forward``
still look for a parameter literally named ``past_key_values``: first in the task model's forward
(``BertForSequenceClassification.forward(..., **kwargs)`` has none), then in the backbone's
(``BertModel.forward`` now says ``cache``), and give up with "Model does not support past key values
which are required for prefix tuning." The causal-LM and seq2seq paths of peft pass the prefix
without that check, so only classification and extractive QA (the span head) are affected.

The model itself still supports the prefix: ``BertForSequenceClassification`` forwards ``**kwargs``
to ``BertModel``, whose self-attention concatenates ``cache`` keys/values in front of the token's own
(positions are shifted by the prefix length, exactly as transformers 4 did with
``past_key_values_length``). So the fix is only about the signature: :func:`add_prefix_compat` gives
the model *instance* a forward that names ``past_key_values`` and passes it on as ``cache``. Then
peft takes its normal path (``self.base_model(labels=labels, past_key_values=..., ...)``) and the
model's own head and loss run unchanged. Nothing on the class changes, nothing is saved with the
model, and ``load`` re-applies the shim to the fresh base before loading the prefix.
"""

from __future__ import annotations

import inspect
import types

from torch import nn

from peftlab.kinds import TaskKind
from peftlab.modelinfo import head_modules, is_linear, model_family  # noqa: F401 (is_linear re-exported)

_MARK = "_peftlab_prefix_compat"
_PREVIOUS = "_peftlab_prefix_compat_previous_forward"
_GEN_MARK = "_peftlab_generation_compat"


# ---- prefix tuning on classification models under transformers 5 ---------------------------------

def _parameters(function) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return {}


def _takes_var_keyword(parameters: dict[str, inspect.Parameter]) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def prefix_cache_reachable(model: nn.Module) -> bool:
    """Whether the model's forward can carry a key/value prefix to its attention layers.

    True when its forward names ``past_key_values`` (what peft wants), or names ``cache``, or passes
    ``**kwargs`` on to a backbone whose forward names ``cache`` (BERT family under transformers 5).
    """
    top = _parameters(model.forward)
    if "past_key_values" in top or "cache" in top:
        return True
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model or not _takes_var_keyword(top):
        return False
    inner = _parameters(backbone.forward)
    return "cache" in inner or "past_key_values" in inner


def needs_prefix_compat(model: nn.Module) -> bool:
    """peft would refuse this model for prefix tuning, although it can carry the prefix."""
    return "past_key_values" not in _parameters(model.forward) and prefix_cache_reachable(model)


def add_prefix_compat(model: nn.Module) -> nn.Module:
    """Give ``model`` (in place) a forward whose signature names ``past_key_values``; returns it.

    Idempotent. Calls the forward the instance had before (an accelerate hook, say) or the class's.
    """
    if getattr(model, _MARK, False) or not needs_prefix_compat(model):
        return model
    previous = model.__dict__.get("forward")  # instance-level forward (accelerate hooks), if any
    original = _parameters(previous if previous is not None else model.forward)

    def forward(self, *args, past_key_values=None, **kwargs):
        # transformers 5 calls the prefix/key-value cache `cache`; peft 0.21 hands it over as past_key_values.
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        if previous is not None:
            return previous(*args, **kwargs)
        return type(self).forward(self, *args, **kwargs)

    # The signature peft inspects: the original parameters plus a keyword-only past_key_values.
    params = [p for p in original.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    var_kw = [p for p in original.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    forward.__signature__ = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                               *params, extra, *var_kw])
    if previous is not None:
        model.__dict__[_PREVIOUS] = previous
    model.forward = types.MethodType(forward, model)
    setattr(model, _MARK, True)
    return model


def remove_prefix_compat(model: nn.Module) -> nn.Module:
    """Undo :func:`add_prefix_compat` (restores the forward the instance had before)."""
    if getattr(model, _MARK, False):
        model.__dict__.pop("forward", None)
        previous = model.__dict__.pop(_PREVIOUS, None)
        if previous is not None:
            model.forward = previous
        delattr(model, _MARK)
    return model


# ---- token_type_ids on extractive QA -----------------------------------------------------------------
#
# peft 0.21.2's PeftModelForQuestionAnswering.forward names `token_type_ids` as a parameter and then never
# passes it on (neither to the tuned model nor on the prompt-learning paths), so a BERT span model under
# LoRA, (IA)3 or a prefix silently runs with every segment id 0 while run_qa.py, peftlab's own methods
# and the merged model give the question segment 0 and the context segment 1. Measured on a trained
# MiniLM LoRA: merged and unmerged span logits differed by 0.33. add_qa_token_type_compat hands the ids
# the caller gave to the underlying transformers model (a forward pre-hook that fills in
# `token_type_ids` when the wrapped call did not pass any and the shapes match the input ids).

_QA_MARK = "_peftlab_qa_token_type_compat"
_QA_HOOK = "_peftlab_qa_token_type_hook"


def add_qa_token_type_compat(peft_model: nn.Module) -> nn.Module:
    """Make a peft QA model pass ``token_type_ids`` on to its base model (in place; idempotent)."""
    if getattr(peft_model, _QA_MARK, False) or type(peft_model).__name__ != "PeftModelForQuestionAnswering":
        return peft_model
    base = peft_model.get_base_model()
    pending: dict = {}

    def pre_hook(module, args, kwargs):
        token_type_ids = pending.get("token_type_ids")
        if token_type_ids is None or kwargs.get("token_type_ids") is not None:
            return None
        reference = kwargs.get("input_ids")
        if reference is None:
            reference = kwargs.get("inputs_embeds")
        if reference is None or tuple(reference.shape[:2]) != tuple(token_type_ids.shape):
            return None  # virtual tokens were prepended: the ids no longer line up (prompt tuning refuses qa)
        return args, {**kwargs, "token_type_ids": token_type_ids}

    original = peft_model.forward

    def forward(self, *args, **kwargs):
        pending["token_type_ids"] = kwargs.get("token_type_ids")  # the Trainer and peftlab pass keywords
        try:
            return original(*args, **kwargs)
        finally:
            pending.clear()

    forward.__signature__ = inspect.signature(original)
    base.__dict__[_QA_HOOK] = base.register_forward_pre_hook(pre_hook, with_kwargs=True)
    peft_model.forward = types.MethodType(forward, peft_model)
    setattr(peft_model, _QA_MARK, True)
    return peft_model


def remove_qa_token_type_compat(model: nn.Module) -> nn.Module:
    """Drop the hook :func:`add_qa_token_type_compat` left on a base model (after merging, say)."""
    handle = model.__dict__.pop(_QA_HOOK, None)
    if handle is not None:
        handle.remove()
    return model


# ---- generate() with prompt-learning methods under transformers 5 -------------------------------
#
# transformers 5's generation loop keeps the key/value cache under the name `cache` (in the kwargs it
# hands to prepare_inputs_for_generation, in the dict that returns, and in the model outputs). peft
# 0.21.2's PeftModelForCausalLM / PeftModelForSeq2SeqLM.prepare_inputs_for_generation still read and
# write `past_key_values`. Effects, measured against greedy decoding by full forward passes:
#   * prompt tuning / P-Tuning: peft never sees the cache, so it prepends the virtual tokens again at
#     every step (wrong tokens; GPT-2 runs past its position table: "index out of range in self");
#   * prefix tuning / P-Tuning v2: peft puts the prefix in `past_key_values` while the model also gets
#     the (empty) `cache` from generate, which wins: the prefix is silently ignored.
# add_generation_compat renames `cache` to `past_key_values` for peft's code and back for the model.

def _peft_reads_past_key_values() -> bool:
    import peft
    from packaging.version import Version

    return Version(peft.__version__) < Version("0.22")  # peftlab pins peft <0.22; re-check on upgrade


def add_generation_compat(peft_model: nn.Module) -> nn.Module:
    """Make peft's prompt-learning ``generate()`` use transformers 5's ``cache`` (in place; idempotent)."""
    if getattr(peft_model, _GEN_MARK, False) or not _peft_reads_past_key_values():
        return peft_model
    if not hasattr(peft_model, "base_model_prepare_inputs_for_generation"):
        return peft_model  # not a generative peft model
    base_prepare = peft_model.base_model_prepare_inputs_for_generation
    peft_prepare = peft_model.prepare_inputs_for_generation
    inside = {"peft": False}

    def base_prepare_for_peft(*args, **kwargs):
        inputs = base_prepare(*args, **kwargs)
        if inside["peft"] and "cache" in inputs:  # what peft's code looks for
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    def prepare(*args, **kwargs):
        inside["peft"] = True
        try:
            inputs = peft_prepare(*args, **kwargs)
        finally:
            inside["peft"] = False
        if "past_key_values" in inputs:  # what the transformers 5 model takes
            cache = inputs.pop("past_key_values")
            if inputs.get("cache") is None:
                inputs["cache"] = cache
        return inputs

    peft_model.base_model_prepare_inputs_for_generation = base_prepare_for_peft
    peft_model.prepare_inputs_for_generation = prepare
    setattr(peft_model, _GEN_MARK, True)
    return peft_model


# ---- helpers shared by the peft-backed methods (candidates for base.py) ---------------------------

def describe_model(model: nn.Module) -> str:
    """'BertForTokenClassification (bert)': what an error message calls the model."""
    base = unwrap(model)
    family = model_family(base)
    name = type(base).__name__
    return f"{name} ({family})" if family and family != name else name


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def head_parameter_count(model: nn.Module, kind: str) -> int:
    """Parameters of the task head that peft trains as a copy (``modules_to_save``) for classification and QA."""
    if not TaskKind(kind).has_new_head:
        return 0
    total = 0
    for module in head_modules(unwrap(model)).values():
        module = getattr(module, "original_module", module)  # peft's ModulesToSaveWrapper
        total += sum(p.numel() for p in module.parameters())
    return total


def prompt_learning_dims(model: nn.Module, kind: str, *, prefix: bool) -> dict[str, int]:
    """The sizes peft derives from the model config for prompt-learning methods.

    Mirrors ``peft.utils.other._prepare_prompt_learning_config`` (peft 0.21.2): ``token_dim`` is the
    hidden size, except that prefix tuning on grouped-query-attention models sizes the prefix to the
    key/value width (``head_dim · num_key_value_heads``); ``submodules`` is 2 for seq2seq (the virtual
    tokens are provisioned for encoder and decoder).
    """
    config = unwrap(model).config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = next(getattr(config, a) for a in ("num_hidden_layers", "num_layers", "n_layer") if hasattr(config, a))
    hidden = next(getattr(config, a) for a in ("hidden_size", "n_embd", "d_model") if hasattr(config, a))
    heads = next(getattr(config, a) for a in ("num_attention_heads", "n_head", "num_heads") if hasattr(config, a))
    token_dim = hidden
    kv_heads = getattr(config, "num_key_value_heads", None)
    if prefix and kv_heads is not None:
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        token_dim = head_dim * kv_heads
    return {"layers": int(layers), "hidden": int(hidden), "token_dim": int(token_dim),
            "submodules": 2 if kind == TaskKind.SEQ2SEQ else 1}


def iter_layers(model: nn.Module):
    """(name, module) for every submodule under its original name, peft wrappers seen through.

    A peft tuner layer (lora.Linear, ia3.Linear, ...) is reported as its base layer and not descended
    into; peft's modules_to_save wrappers (trained copies of task heads) are skipped.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, ModulesToSaveWrapper):
                continue
            if isinstance(child, BaseTunerLayer):
                yield name, child.get_base_layer()
                continue
            yield name, child
            stack.append((name, child))



def target_matches(name: str, targets: list[str]) -> bool:
    """Whether module ``name`` is one of ``targets`` as peft matches a list: the full name or a ``.name`` suffix."""
    return name in targets or any(name.endswith("." + target) for target in targets)


def targeted_layers(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, base layer) of every layer peft wraps for ``targets`` (peft wrappers seen through)."""
    return [(name, layer) for name, layer in iter_layers(unwrap(model)) if target_matches(name, targets)]
