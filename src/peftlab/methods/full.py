"""Full fine-tuning: every parameter trains (the baseline every PEFT method is measured against).

The result is a plain transformers model, so "merging" returns it as is. Saving writes the whole model
with ``save_pretrained`` (safetensors); loading reads it back into the base model's class and ignores
the base weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.methods.adapter import CONFIG_NAME
from peftlab.methods.base import VERY_LARGE, BaseOptions, Method, option, write_json
from peftlab.version import __version__


@dataclass
class FullOptions(BaseOptions):
    # The top of BERT's grid: with peftlab's short default budgets 2e-5 under-trains (minilm + SST-2,
    # 2,000 examples x 3 epochs: 0.782 dev accuracy against LoRA's 0.814).
    learning_rate: float = option(
        5e-5, "Peak learning rate. Devlin et al. (BERT) fine-tuned with 2e-5..5e-5; all weights move, so keep it small.")


class FullFineTuning(Method):
    name = "full"
    category = "full"
    mergeable = True
    paper = ("Devlin et al. 2019, BERT: Pre-training of Deep Bidirectional Transformers for Language "
             "Understanding (arXiv:1810.04805), the fine-tuning baseline")
    summary = "every parameter trains (baseline)"
    Options = FullOptions
    trains_all_weights = True
    # Selection guide rows (peftlab recommend): task type -> (points, reason).
    guide = {
        "classification": (2.0, "the accuracy reference, at full cost"),
        "ner": (2.0, "the accuracy reference, at full cost"),
        "qa": (2.0, "the accuracy reference, at full cost"),
        "generation": (2.0, "the quality reference, at full cost"),
        "seq2seq": (2.0, "the quality reference, at full cost"),
    }
    few_shot_guide = (-1.5, "full fine-tuning overfits a few dozen examples")

    def apply(self, model, kind):
        self.check_supported(model, kind)
        model.requires_grad_(True)
        return model

    def save(self, model, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(directory))
        config = getattr(model, "config", None)
        write_json(directory / CONFIG_NAME, {
            "method": self.name,
            "options": self.options_dict(),
            "base_model": {
                "model_type": getattr(config, "model_type", None),
                "name_or_path": getattr(config, "_name_or_path", None),
                "class": type(model).__name__,
            },
            "peftlab_version": __version__,
            "injected_modules": [],
            "weights": "the whole model (save_pretrained: config.json + model.safetensors)",
        })

    def load(self, base_model, directory, kind):
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise PeftlabError(f"'{directory}' has no config.json: it is not a fully fine-tuned model folder.")
        dtype = next(base_model.parameters()).dtype
        try:
            model, info = type(base_model).from_pretrained(
                str(directory), dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise PeftlabError(
                f"Could not load the fully fine-tuned model from '{directory}' as a {type(base_model).__name__} "
                f"({str(error).splitlines()[0][:200]})."
            ) from None
        def describe(entry) -> str:
            if isinstance(entry, tuple) and len(entry) == 3:  # (name, shape in the file, shape in the model)
                return f"{entry[0]} (file {tuple(entry[1])}, model {tuple(entry[2])})"
            return str(entry)

        problems = [f"{len(names)} {what} tensor(s): {', '.join(describe(n) for n in sorted(names, key=str)[:4])}"
                    for what, names in (("missing", info.get("missing_keys") or ()),
                                        ("unexpected", info.get("unexpected_keys") or ()),
                                        ("wrong-shape", info.get("mismatched_keys") or ())) if names]
        if problems:
            raise PeftlabError(
                f"Refusing '{directory}': its weights do not match a {type(base_model).__name__} "
                f"({'; '.join(problems)}). The file is damaged or belongs to another model."
            )
        model.eval()
        return model

    def merge(self, model):
        return model

    def trainable_parameters_formula(self, model, kind):
        """Every parameter of the model (tied weights counted once)."""
        return sum(p.numel() for p in model.parameters())

    def guide_adjustments(self, situation):
        if situation.base_params >= VERY_LARGE:
            return [(-1.0, "very large model: full fine-tuning is rarely worth its cost")]
        return []

    def inference_cost(self):
        return "none (but a full copy of the model per task)"
