"""Prompt tuning: trainable virtual-token embeddings prepended to the input (Lester et al. 2021).

The input becomes [P; E(x)] with P (n x hidden) the only new weights; the model is frozen (the task
head of a classification model trains too). Implemented by peft (``PromptTuningConfig``).

Also home of :class:`PromptLearningMethod`, what prompt tuning, P-Tuning, prefix tuning and
P-Tuning v2 share: additive, not mergeable, classification heads trained as peft ``modules_to_save``.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.methods.base import HUGE, SMALL, BaseOptions, PeftMethod, option
from peftlab.methods.compat import add_generation_compat, describe_model, head_parameter_count, prompt_learning_dims

INPUT_PROMPT_KINDS = (TaskKind.SEQ_CLS, TaskKind.CAUSAL_LM, TaskKind.SEQ2SEQ)
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
    packing_refusal = ("its virtual tokens (or per-layer key/value prefix) are shared by every position of a row, "
                       "so the examples packed into one row would attend to the same prompt at shifted positions "
                       "and no longer train as they do alone; leave out --packing for this method.")

    def why_not_mergeable(self) -> str:
        return ("its virtual tokens are extra inputs the model attends to, not a change to any existing weight, "
                "so there is nothing to add them into.")

    def check_supported(self, model, kind):
        if kind not in self.kinds:
            n = self.options.num_virtual_tokens
            why = {TaskKind.TOKEN_CLS: _TOKEN_CLS_WHY.format(n=n), TaskKind.QA: _QA_WHY.format(n=n)}.get(
                kind, f"it supports only {', '.join(self.kinds)} tasks.")
            raise PeftlabError(f"Method '{self.name}' cannot run {kind} on {describe_model(model)}: {why}")

    # Virtual tokens prepended to the input (prompt tuning, P-Tuning); False: per-layer key/value prefixes.
    input_prompt = True

    def finish_loaded(self, peft_model, kind):
        if TaskKind(kind).is_generative:
            add_generation_compat(peft_model)  # transformers-5 generate() fix, see compat.py
        return peft_model

    def _common_config(self, kind) -> dict:
        return {"task_type": TaskKind(kind).peft_task_type, "num_virtual_tokens": int(self.options.num_virtual_tokens)}

    @property
    def saves_encoder_output(self) -> bool:
        """Whether training reparameterises the prompt through an encoder whose output alone is saved."""
        return False

    def memory_facts(self, applied):
        n = int(self.options.num_virtual_tokens)
        facts = {"virtual_tokens": n} if self.input_prompt else {
            "prefix_tokens": n,
            "prefix_projection": int(getattr(self.options, "projection_size", 0) or 0) if self.saves_encoder_output else 0,
        }
        if self.saves_encoder_output:
            facts["inference_params"] = saved_prompt_parameters(applied)
        return facts

    def inference_cost(self):
        n = self.options.num_virtual_tokens
        return f"+{n} virtual tokens per sequence (every layer attends over {n} more positions)"


@dataclass
class PromptTuningOptions(BaseOptions):
    learning_rate: float = option(
        3e-2, "Peak learning rate. Prompt embeddings need high rates: Lester et al. used 0.3 with Adafactor; "
              "3e-2 with AdamW is peft's prompt-tuning example.")
    num_virtual_tokens: int = option(20, "Number of virtual tokens prepended to every input.", min=1)
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
    # Selection guide rows (peftlab recommend): task type -> (points, reason).
    guide = {
        "classification": (0.5, "input prompts alone lag fine-tuning on classification"),
        "ner": (0.0, "prepends tokens, so outputs no longer line up with the labels"),
        "qa": (0.0, "prepends tokens, so answer positions shift"),
        "generation": (1.0, "input prompts only; weak below ~10B parameters (Lester et al. 2021)"),
        "seq2seq": (1.5, "prompt tuning was introduced on T5 and scales with it (Lester et al. 2021)"),
    }
    few_shot_guide = (2.5, "few-shot favours prompt methods: few trainable values, hard to overfit")

    peft_type = "PROMPT_TUNING"

    def guide_adjustments(self, situation):
        if situation.base_params >= HUGE:
            return [(2.0, "at ~10B+ parameters prompt tuning matches fine-tuning (Lester et al. 2021)")]
        if situation.base_params < SMALL:
            return [(-1.0, "prompt tuning only catches up with fine-tuning at ~10B parameters (Lester et al. 2021)")]
        return []

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


def saved_prompt_parameters(peft_model) -> int:
    """Parameters a saved adapter holds when peft keeps the encoder's output, not the encoder (P-Tuning, prefix MLP).

    What peft writes is ``get_prompt_embedding_to_save``: the encoder's output for the virtual tokens. That
    method copies to the CPU, which a meta tensor refuses, so its first lines are repeated here for the shape.
    """
    adapter = peft_model.active_adapter
    encoder = peft_model.prompt_encoder[adapter]
    tokens = peft_model.prompt_tokens[adapter].unsqueeze(0).to(encoder.embedding.weight.device)
    tokens = tokens[:, : peft_model.peft_config[adapter].num_virtual_tokens]
    kept = encoder(tokens)[0].numel()
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return trainable - sum(p.numel() for p in encoder.parameters()) + kept


def _name_or_path(model) -> str:
    from peftlab.methods.compat import unwrap

    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or ""
