"""Prompt tuning: trainable virtual-token embeddings prepended to the input (Lester et al. 2021).

The input becomes [P; E(x)] with P (n x hidden) the only new weights; the model is frozen (the task
head of a classification model trains too). Implemented by peft (``PromptTuningConfig``).

Also home of :class:`PromptLearningMethod`, what prompt tuning, P-Tuning, prefix tuning and
P-Tuning v2 share: additive, not mergeable, classification heads trained as peft ``modules_to_save``.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.errors import PeftlabError
from peftlab.methods.base import PEFT_TASK_TYPES, BaseOptions, PeftMethod, option
from peftlab.methods.compat import add_generation_compat, describe_model, head_parameter_count, prompt_learning_dims

INPUT_PROMPT_KINDS = ("seq-cls", "causal-lm", "seq2seq")
_TOKEN_CLS_WHY = (
    "its virtual tokens are prepended to the input, so the model emits {n} extra token positions and "
    "per-token labels no longer line up; use p-tuning-v2 (a per-layer prefix that keeps the sequence length) "
    "for token classification."
)
_QA_WHY = (
    "its virtual tokens are prepended to the input, which shifts every token by {n} positions, so the answer's "
    "start/end positions no longer point at the context tokens; use p-tuning-v2 (a per-layer prefix that keeps "
    "the sequence length) for question answering."
)


class PromptLearningMethod(PeftMethod):
    """peft prompt-learning methods: virtual tokens or per-layer prefixes, trained while the model is frozen."""

    category = "additive"
    mergeable = False

    def why_not_mergeable(self) -> str:
        return ("its virtual tokens are extra inputs the model attends to, not a change to any existing weight, "
                "so there is nothing to add them into.")

    def check_supported(self, model, kind):
        if kind not in self.kinds:
            n = self.options.num_virtual_tokens
            why = {"token-cls": _TOKEN_CLS_WHY.format(n=n), "qa": _QA_WHY.format(n=n)}.get(
                kind, f"it supports only {', '.join(self.kinds)} tasks.")
            raise PeftlabError(f"Method '{self.name}' cannot run {kind} on {describe_model(model)}: {why}")

    def apply(self, model, kind):
        return self._finish(super().apply(model, kind), kind)

    def load(self, base_model, directory, kind):
        self.check_supported(base_model, kind)
        return self._finish(super().load(base_model, directory, kind), kind)

    @staticmethod
    def _finish(peft_model, kind):
        if kind in ("causal-lm", "seq2seq"):
            add_generation_compat(peft_model)  # transformers-5 generate() fix, see compat.py
        return peft_model

    def _common_config(self, kind) -> dict:
        return {"task_type": PEFT_TASK_TYPES[kind], "num_virtual_tokens": int(self.options.num_virtual_tokens)}

    def inference_cost(self):
        n = self.options.num_virtual_tokens
        return f"+{n} virtual tokens per sequence (every layer attends over {n} more positions)"


@dataclass
class PromptTuningOptions(BaseOptions):
    learning_rate: float = option(
        3e-2, "Peak learning rate. Prompt embeddings need high rates: Lester et al. used 0.3 with Adafactor; "
              "3e-2 with AdamW is peft's prompt-tuning example.")
    num_virtual_tokens: int = option(20, "Number of virtual tokens prepended to every input.")
    init: str = option(
        "vocab", "How to initialise the virtual tokens: 'random' (peft's default), 'vocab' (embeddings of "
                 "randomly sampled vocabulary tokens; Lester et al. found it beats random init) or 'text' "
                 "(embeddings of init_text's tokens, repeated or cut to num_virtual_tokens).",
        choices=("random", "vocab", "text"))
    init_text: str = option("", "Text whose token embeddings initialise the prompt (init='text' only), "
                                "for example 'Classify the sentiment of this review:'.")
    init_tokenizer: str = option("", "Tokenizer (name or folder) for init='text'. Empty: the base model's own.")


_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


class PromptTuning(PromptLearningMethod):
    name = "prompt-tuning"
    paper = ("Lester, Al-Rfou & Constant 2021, The Power of Scale for Parameter-Efficient Prompt Tuning "
             "(EMNLP 2021, arXiv:2104.08691)")
    summary = "trainable virtual-token embeddings prepended to the input"
    kinds = INPUT_PROMPT_KINDS
    Options = PromptTuningOptions

    def peft_config(self, model, kind):
        from peft import PromptTuningConfig

        init = str(self.options.init).lower()
        if init not in _PEFT_INIT:
            raise PeftlabError(f"Option 'init' of method '{self.name}' must be random, vocab or text; got {init!r}.")
        extra = {}
        if init == "text":
            if not self.options.init_text:
                raise PeftlabError(f"Method '{self.name}' with init=text needs init_text (the words to start from).")
            tokenizer = self.options.init_tokenizer or _name_or_path(model)
            if not tokenizer:
                raise PeftlabError(
                    f"Method '{self.name}' with init=text needs a tokenizer, and {describe_model(model)} has no "
                    "name or folder to take it from: set init_tokenizer.")
            from peftlab.models import BUNDLED, resolve_model

            if tokenizer in BUNDLED:  # 'minilm' / 'smollm2' -> their folders
                tokenizer = resolve_model(tokenizer)
            extra = {"prompt_tuning_init_text": self.options.init_text, "tokenizer_name_or_path": tokenizer}
        return PromptTuningConfig(prompt_tuning_init=_PEFT_INIT[init], **self._common_config(kind), **extra)

    def trainable_parameters_formula(self, model, kind):
        """n · hidden virtual-token embeddings (x2 on seq2seq: peft provisions encoder and decoder), plus the head."""
        dims = prompt_learning_dims(model, kind, prefix=False)
        n = self.options.num_virtual_tokens * dims["submodules"]
        return n * dims["hidden"] + head_parameter_count(model, kind)


def _name_or_path(model) -> str:
    from peftlab.methods.compat import unwrap

    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or ""
