"""P-Tuning: virtual-token embeddings produced by a small trainable prompt encoder (Liu et al. 2021).

Like prompt tuning, n virtual tokens are prepended to the input, but each is the output of a prompt
encoder (an MLP, or a bidirectional LSTM followed by an MLP as in the paper) over n trainable
embeddings; the reparameterisation makes optimisation more stable. Only the encoder's *output* is
needed at inference: peft saves that (n x hidden), so a reloaded model carries no encoder at all.
Implemented by peft (``PromptEncoderConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.errors import PeftlabError
from peftlab.methods.base import BaseOptions, option
from peftlab.methods.compat import head_parameter_count, prompt_learning_dims
from peftlab.methods.prompt_tuning import INPUT_PROMPT_KINDS, PromptLearningMethod


@dataclass
class PTuningOptions(BaseOptions):
    learning_rate: float = option(
        3e-2, "Peak learning rate. Measured (minilm + SST-2, 2,000 examples x 3 epochs, seed 42): 1e-3 (peft's "
              "P-tuning guide, written for 20 epochs) stays at the majority class, 5e-3 0.536, 1e-2 0.593-0.742 "
              "over seeds, 3e-2 (with 10% warm-up) 0.661-0.767 over seeds and thread counts.")
    num_virtual_tokens: int = option(20, "Number of virtual tokens prepended to every input (peft's P-tuning guide).", min=1)
    encoder: str = option(
        "MLP", "Prompt encoder: 'MLP' (three linear layers with ReLU; peft's default and recommendation) or "
               "'LSTM' (bidirectional LSTM then a two-layer MLP, the paper's encoder).",
        choices=("MLP", "LSTM"))
    encoder_hidden_size: int = option(128, "Hidden size of the prompt encoder (peft's P-tuning guide uses 128).", min=1)
    encoder_num_layers: int = option(2, "LSTM layers (LSTM encoder only; the MLP always has three layers).", min=1)
    encoder_dropout: float = option(0.0, "Dropout between LSTM layers (LSTM encoder only).", min=0, below=1)


class PTuning(PromptLearningMethod):
    name = "p-tuning"
    paper = "Liu et al. 2021, GPT Understands, Too (arXiv:2103.10385)"
    summary = "virtual tokens produced by a trainable MLP/LSTM prompt encoder"
    kinds = INPUT_PROMPT_KINDS
    Options = PTuningOptions
    # Selection guide rows (peftlab recommend): task type -> (points, reason).
    guide = {
        "classification": (1.0, "input-level prompts lag fine-tuning on small and medium models (Liu et al. 2022)"),
        "ner": (0.0, "prepends tokens, so outputs no longer line up with the labels"),
        "qa": (0.0, "prepends tokens, so answer positions shift"),
        "generation": (1.0, "input prompts from an encoder; weak for open-ended generation"),
        "seq2seq": (1.0, "input prompts from an encoder; weak for seq2seq"),
    }
    few_shot_guide = (2.0, "few-shot favours prompt methods (P-Tuning was built for few-shot)")
    # 10% warm-up: the MLP prompt encoder at lr 3e-2 is unstable early; on minilm + SST-2 four runs (seeds 42/1,
    # 1 thread; 42/2, 2 threads) gave 0.718/0.767/0.661/0.670 with it, 0.744/-/0.622/- with the default 6%.
    warmup_ratio = 0.1
    peft_type = "P_TUNING"
    saves_encoder_output = True  # peft saves the MLP/LSTM's output for the n tokens, not the encoder

    def _encoder(self) -> str:
        encoder = str(self.options.encoder).upper()
        if encoder not in ("MLP", "LSTM"):
            raise PeftlabError(f"Option 'encoder' of method '{self.name}' must be MLP or LSTM; got {self.options.encoder!r}.")
        return encoder

    def peft_config(self, model, kind):
        from peft import PromptEncoderConfig

        encoder = self._encoder()
        extra = {}
        if encoder == "LSTM":  # peft warns when encoder_num_layers is set for the MLP, which ignores it
            extra = {"encoder_num_layers": int(self.options.encoder_num_layers),
                     "encoder_dropout": float(self.options.encoder_dropout)}
        return PromptEncoderConfig(
            encoder_reparameterization_type=encoder,
            encoder_hidden_size=int(self.options.encoder_hidden_size),
            **extra,
            **self._common_config(kind),
        )

    def trainable_parameters_formula(self, model, kind):
        """Per peft's PromptEncoder, with n virtual tokens (x2 on seq2seq), hidden h, encoder size e:

        embedding n·h; MLP: (h·e + e) + (e·e + e) + (e·h + h);
        LSTM (bidirectional, L layers): 2·[4e·h + 4e·e + 8e] + (L-1)·2·[4e·2e + 4e·e + 8e],
        then its MLP (2e·2e + 2e) + (2e·h + h). Plus the task head.
        """
        dims = prompt_learning_dims(model, kind, prefix=False)
        n = self.options.num_virtual_tokens * dims["submodules"]
        h, e = dims["hidden"], int(self.options.encoder_hidden_size)
        total = n * h
        if self._encoder() == "MLP":
            total += (h * e + e) + (e * e + e) + (e * h + h)
        else:
            layers = int(self.options.encoder_num_layers)
            total += 2 * (4 * e * h + 4 * e * e + 8 * e)
            total += (layers - 1) * 2 * (4 * e * 2 * e + 4 * e * e + 8 * e)
            total += (2 * e * 2 * e + 2 * e) + (2 * e * h + h)
        return total + head_parameter_count(model, kind)

    def inference_cost(self):
        n = self.options.num_virtual_tokens
        return (f"+{n} virtual tokens per sequence (every layer attends over {n} more positions); "
                "the prompt encoder is not run at inference")
