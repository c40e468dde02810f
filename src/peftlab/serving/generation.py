"""Sampled generation for the OpenAI-compatible endpoints (on the inference thread).

One prompt per call (the OpenAI API's ``n=1``): ``generate`` with the request's ``max_tokens``,
``temperature`` (0: greedy), ``top_p`` and ``stop`` strings, and, for ``stream: true``, every new piece of
text handed to a sink as soon as it is decoded. transformers decides the tokens (``generate`` with a
streamer and stopping criteria); what is written here is only what the OpenAI API promises on top: the
text stops *before* a stop string (which is never sent, even in part, while streaming) and the finish
reason says whether a stop (or the end-of-sequence token) or ``max_tokens`` ended it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    sink: Callable[[str], None] | None = None  # called on the inference thread with each new piece of text


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in ``text`` (None: no stop string in it)."""
    found = [index for index in (text.find(stop) for stop in stops if stop) if index >= 0]
    return min(found) if found else None


def safe_length(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be sent now: all of it but a tail that could still grow into a stop string."""
    keep = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                keep = max(keep, size)
                break
    return len(text) - keep


class TextStream:
    """A transformers streamer: decodes the new tokens as they come, hands the sink the text that can no longer
    turn into a stop string, and remembers whether a stop string ended the text."""

    def __init__(self, tokenizer, stops: list[str], sink: Callable[[str], None] | None):
        self.tokenizer, self.stops, self.sink = tokenizer, stops, sink
        self.skip_first = True  # generate() first puts the prompt (decoder-only) or the decoder start token
        self.tokens: list[int] = []
        self.sent = 0
        self.stopped = False

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def put(self, value) -> None:
        if self.skip_first:
            self.skip_first = False
            return
        self.tokens.extend(int(token) for token in value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.text()
        cut = first_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            text = text[:cut]
        elif not final:
            text = text[:safe_length(text, self.stops)]
        if text.endswith("\ufffd") and not final and cut is None:  # half of a multi-byte character
            text = text[:-1]
        if len(text) > self.sent and self.sink is not None:
            self.sink(text[self.sent:])
        self.sent = max(self.sent, len(text))


def stop_criteria(stream: TextStream):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), stream.stopped, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopStrings()])


def complete(model, tokenizer, prompt: str, sampling: Sampling, *, device: str, decoder_only: bool,
             max_length: int | None = None) -> Completion:
    """Generate a completion of ``prompt`` (the caller holds the model lock and has activated the adapter)."""
    import torch

    encoded = tokenizer(prompt, return_tensors="pt", truncation=max_length is not None, max_length=max_length)
    inputs = {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
    stream = TextStream(tokenizer, sampling.stop, sampling.sink)
    options: dict[str, Any] = dict(max_new_tokens=sampling.max_tokens, streamer=stream,
                                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                   else tokenizer.eos_token_id)
    if sampling.stop:
        options["stopping_criteria"] = stop_criteria(stream)
    if sampling.temperature > 0:
        options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    else:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    with torch.no_grad():
        output = model.generate(**inputs, **options)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    # a decoder-only output starts with the prompt; an encoder-decoder's with the decoder start token
    new_tokens = [int(t) for t in (output[0, prompt_tokens:] if decoder_only else output[0, 1:]).tolist()]
    text = stream.text()
    cut = first_stop(text, sampling.stop)
    if cut is not None:
        text = text[:cut]
    ended_by_eos = bool(new_tokens) and new_tokens[-1] == tokenizer.eos_token_id
    finish = "stop" if cut is not None or ended_by_eos or len(new_tokens) < sampling.max_tokens else "length"
    return Completion(text=text, finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=len(new_tokens))


__all__ = ["Sampling", "Completion", "complete", "first_stop", "safe_length", "TextStream"]
