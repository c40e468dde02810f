"""OpenAI-compatible endpoints: any OpenAI client calls an adapter by naming it as the ``model``.

=============================  ===================================================================================
``GET /v1/models``             the base model (when it is a generative model) and every generative adapter
``POST /v1/completions``       ``{"model": "<adapter or base>", "prompt": "...", "max_tokens", "temperature",
                               "top_p", "stop", "stream"}`` -> a ``text_completion`` (the prompt is used as given)
``POST /v1/chat/completions``  ``{"model", "messages": [{"role", "content"}], ...}`` -> a ``chat.completion``;
                               the messages go through the tokenizer's chat template
=============================  ===================================================================================

This is the convention of vLLM and LoRAX: an adapter is a model name. ``n`` must be 1; ``logprobs``,
``echo``, ``best_of``, ``suffix``, tools and ``logit_bias`` are refused with a 400 that names the parameter;
other OpenAI fields (``user``, ``presence_penalty``...) are accepted and ignored. ``stream: true`` answers
with server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``). Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 404 ``model_not_found`` for an unknown model, 400 for a
parameter it cannot honour. Access is the server's (``Authorization: Bearer <key>``, which is how the
``openai`` client sends its ``api_key``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind

PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_STOPS = 4
# parameters the server cannot honour, and the value each may still take (OpenAI's default)
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "logit_bias": (None, {})}
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}}


def is_openai_path(path: str) -> bool:
    return path in PATHS


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)


def add_routes(app, engine, *, max_chars: int, max_new_tokens: int, valid_text) -> None:
    """The three OpenAI routes on ``app`` (errors raised as :class:`OpenAIError`, shaped by the app);
    ``valid_text(value)``: False for text that is not valid Unicode anywhere in a value."""
    from starlette.responses import StreamingResponse

    @app.get("/v1/models")
    async def list_models():
        created = int(engine.started_at)
        models = []
        if engine.base_kind is not None:
            models.append({"id": engine.base_display, "object": "model", "created": created, "owned_by": "peftlab",
                           "root": engine.base_display, "parent": None})
        for adapter in engine.adapters():
            if TaskKind(adapter["kind"]).is_generative:
                models.append({"id": adapter["name"], "object": "model", "created": int(adapter["loaded_at"]),
                               "owned_by": "peftlab", "root": engine.base_display, "parent": engine.base_display})
        return {"object": "list", "data": models}

    async def run(body: SamplingRequest, build_prompt, *, chat: bool, endpoint: str):
        """One request: the model it names, its prompt (``build_prompt(entry)``), a job for the worker, the reply."""
        from peftlab.serving.generation import Sampling
        from peftlab.serving.records import Job, Overloaded

        started = time.perf_counter()
        status, name = 500, body.model
        try:
            check_supported(body)
            if not valid_text(body.model_dump()):
                raise OpenAIError(400, "The request holds text that is not valid Unicode (a lone surrogate such as "
                                       "\\ud800): send UTF-8 text.", None, "invalid_value")
            # the base model loads on its first request, and templates run Jinja: off the event loop
            entry = await asyncio.to_thread(target, engine, body.model)
            prompt = await asyncio.to_thread(build_prompt, entry)
            sampling = Sampling(max_tokens=max_tokens(body, max_new_tokens), temperature=body.temperature,
                                top_p=body.top_p, stop=stops(body.stop), seed=body.seed)
            if len(prompt) > max_chars * 4:
                raise OpenAIError(413, f"The prompt has {len(prompt)} characters; the limit is {max_chars * 4}.",
                                  "messages" if chat else "prompt")
            kind = "chat.completion" if chat else "text_completion"
            reply = Reply(kind, body.model, chat)
            job = Job(entry=entry, op="complete", records=[{"prompt": prompt}], raw=[prompt], sampling=sampling)
            if body.stream:
                loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
                sampling.sink = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
            try:
                future = engine.submit(job)
            except Overloaded as error:
                raise OpenAIError(503, str(error)) from None
            if body.stream:
                status = 200
                return StreamingResponse(stream_events(reply, future, pieces, engine, name, started, endpoint),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            try:
                result = await asyncio.wrap_future(future)
            except PeftlabError as error:
                raise OpenAIError(404, str(error), "model", "model_not_found") from None
            except Exception as error:  # noqa: BLE001
                raise OpenAIError(500, f"Generation failed for model '{name}': {type(error).__name__}: "
                                       f"{str(error)[:300]}") from None
            status = 200
            return reply.whole(result)
        except OpenAIError as error:
            status = error.status
            raise
        finally:
            if not (body.stream and status == 200):  # a stream counts itself when it ends
                engine.record(name, (time.perf_counter() - started) * 1000.0, 1, status >= 400, endpoint=endpoint,
                              status=status)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        def prompt(_entry) -> str:
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if len(prompts) != 1:
                raise OpenAIError(400, f"This server completes one prompt per request; got {len(prompts)}.",
                                  "prompt", "unsupported_value")
            return prompts[0]

        return await run(body, prompt, chat=False, endpoint="completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        return await run(body, lambda entry: chat_prompt(entry.generation_tokenizer, body), chat=True,
                         endpoint="chat.completions")


def target(engine, name: str):
    """The adapter entry (or the base) a request names; OpenAI's 404 otherwise."""
    from peftlab.serving.records import UnknownAdapter

    if name == engine.base_display and engine.base_kind is not None:
        return engine.base_entry()
    try:
        entry = engine.entry(name)
    except UnknownAdapter as error:
        models = ([engine.base_display] if engine.base_kind is not None else []) + [
            a["name"] for a in engine.adapters() if TaskKind(a["kind"]).is_generative]
        raise OpenAIError(404, f"The model '{name}' does not exist on this server; models: "
                               f"{', '.join(models) or 'none'} (GET /v1/models).", "model", "model_not_found") from error
    if not TaskKind(entry.kind).is_generative:
        raise OpenAIError(400, f"The model '{name}' is a {entry.kind} adapter, which does not generate text: use "
                               "POST /v1/predict for it.", "model", "model_not_supported")
    return entry


def check_supported(body: SamplingRequest) -> None:
    if body.n != 1:
        raise OpenAIError(400, f"n={body.n} is not supported: this server returns one choice per request (n=1).",
                          "n", "unsupported_parameter")
    for name, allowed in UNSUPPORTED.items():
        value = (body.model_extra or {}).get(name)
        if value not in allowed:
            raise OpenAIError(400, f"The parameter '{name}' is not supported by this server; leave it out.", name,
                              "unsupported_parameter")


def max_tokens(body: SamplingRequest, limit: int) -> int:
    wanted = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
    if wanted > limit:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise OpenAIError(400, f"{param}={wanted} is over this server's limit of {limit} tokens.", param,
                          "unsupported_value")
    return wanted


def stops(value: str | list[str] | None) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    if len(items) > MAX_STOPS or not all(isinstance(s, str) and s for s in items):
        raise OpenAIError(400, f"stop takes up to {MAX_STOPS} non-empty strings.", "stop", "invalid_value")
    return items


def chat_prompt(tokenizer, body: ChatRequest) -> str:
    """The messages through the tokenizer's chat template, ending where the assistant's answer starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(400, f"The model '{body.model}' has no chat template (its tokenizer defines none): use "
                               "POST /v1/completions with a prompt instead.", "messages", "chat_template_missing")
    messages = []
    for number, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):  # OpenAI's content parts: only text parts are supported
            if any(part.get("type") != "text" for part in content):
                raise OpenAIError(400, f"messages[{number}]: only text content parts are supported.",
                                  f"messages.{number}.content", "unsupported_value")
            content = "".join(str(part.get("text", "")) for part in content)
        messages.append({"role": message.role, "content": content or ""})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # noqa: BLE001 - jinja raises for roles a template does not know
        raise OpenAIError(400, f"The chat template refused the messages: {str(error).splitlines()[0][:200]}.",
                          "messages", "invalid_value") from None


class Reply:
    """OpenAI's response objects for one request."""

    def __init__(self, kind: str, model: str, chat: bool):
        self.kind, self.model, self.chat = kind, model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def whole(self, result) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model, "choices": [choice],
                "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                          "total_tokens": result.prompt_tokens + result.completion_tokens}}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}


def event(payload: Any) -> bytes:
    return ("data: " + (payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=True)) + "\n\n").encode()


async def stream_events(reply: Reply, future, pieces: asyncio.Queue, engine, name: str, started: float, endpoint: str):
    """Server-sent events: a chunk per piece of text as the worker produces it, the finish reason, [DONE]."""
    status = 200
    try:
        if reply.chat:
            yield event(reply.chunk("", first=True))
        done = asyncio.wrap_future(future)
        while True:
            getter = asyncio.ensure_future(pieces.get())
            finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            if getter in finished:
                yield event(reply.chunk(getter.result()))
                continue
            getter.cancel()
            break
        while not pieces.empty():  # pieces handed over just before the end
            yield event(reply.chunk(pieces.get_nowait()))
        try:
            result = done.result()
        except Exception as error:  # noqa: BLE001 - the stream has begun: the error is an event
            status = 500
            yield event(error_body(500, f"Generation failed for model '{name}': {type(error).__name__}: "
                                        f"{str(error)[:300]}"))
        else:
            yield event(reply.chunk(None if reply.chat else "", result.finish_reason))
        yield event("[DONE]")
    finally:
        engine.record(name, (time.perf_counter() - started) * 1000.0, 1, status >= 400, endpoint=endpoint,
                      status=status)


__all__ = ["add_routes", "OpenAIError", "error_body", "is_openai_path", "PATHS"]
