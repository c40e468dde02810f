"""The HTTP API (FastAPI) over an :class:`~peftlab.serving.engine.Engine`.

=========================  ===========================================================================
``POST /v1/predict``       ``{"adapter": "sst2", "inputs": ["text", {"text": .., "text_pair": ..},
                           {"tokens": [..]}]}`` -> ``{"adapter", "outputs": [...]}`` (classification,
                           regression, tagging; the same objects as ``peftlab predict``)
``POST /v1/generate``      ``{"adapter": .., "inputs": [..], "max_new_tokens": 32}`` (causal LMs; an input
                           may be a conversation, ``{"messages": [{"role", "content"}, ..]}``, which a
                           chat adapter renders with the chat template it was trained with)
``GET /v1/adapters``       the loaded adapters (name, method, task, kind, labels, group, ...; no paths)
``POST /v1/adapters``      ``{"name": .., "path": ..}`` loads one at run time (only with ``admin``; 201;
                           409 name taken; 422 refused, with the reason)
``DELETE /v1/adapters/X``  unloads X (only with ``admin``; requests already accepted for X still complete)
``GET /health``            liveness (503 when the inference worker is not running)
``GET /metrics``           Prometheus text format: requests by adapter and status, latency histograms,
                           queue depth, batch sizes, loaded adapters (``serving/metrics.py``)
``GET /v1/stats``          JSON: requests, errors, inputs and latency p50/p95/p99 (ms) per adapter, batching
``GET /v1/models``         OpenAI-compatible (``serving/openai.py``): the base (if generative) and the
``POST /v1/completions``   generative adapters as models; completions and chat completions with an
``POST /v1/chat/...``      adapter named as the ``model``, streamed as server-sent events on request
=========================  ===========================================================================

Access: with ``api_keys``, every request but ``GET /health`` needs ``Authorization: Bearer <key>`` (401
otherwise, with ``WWW-Authenticate: Bearer``; keys compared in constant time). Loading and unloading
exist only with ``admin`` (404 otherwise); a load reads only folders inside ``adapter_root`` (resolved:
symlinks and ``..`` that leave it do not count) and Hub ids only with ``allow_hub``, and a folder that is
missing gets the very answer a forbidden one gets. ``/docs``, ``/redoc`` and ``/openapi.json`` exist only
with ``docs``. No answer contains a server path. ``peftlab serve`` refuses ``--admin`` without a key;
``create_app(admin=True)`` without keys is for in-process use (tests, notebooks).

Every error is JSON ``{"error": "<one sentence>", ...}`` (on the OpenAI routes, OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``), framework-level ones included: 400 malformed
JSON or body, 401 no or wrong key, 404 unknown adapter (with the loaded names) or route, 405 wrong
method, 409 name taken, 413 too many / too long inputs or body, 422 invalid fields or input shapes
(including text that is not valid Unicode) or a refused adapter folder, 503 queue full, 500 unexpected
(the server keeps serving).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import time
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.serving.adapters import NotFoundOrNotAllowed, locate
from peftlab.serving.engine import AdapterConflict, AdapterGone, Engine, Job, Overloaded, UnknownAdapter
from peftlab.serving.openai import OpenAIError, add_routes, error_body, is_openai_path

MAX_INPUTS = 64
MAX_CHARS = 4000  # per input text (tokens beyond the adapter's max_length are truncated, as in training)
MAX_BODY_BYTES = 1_000_000
MAX_NEW_TOKENS = 256
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
# Absolute paths of two or more parts (not the API's own routes): removed from any error text as a last
# line of defence; the messages themselves are written without server paths.
_PATH = re.compile(r"(?<![\w.:/~-])/(?!v1/)[\w.@+~-]+(?:/[\w.@+~-]+)+/?")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str
    inputs: list[Any] = Field(min_length=1)


class GenerateRequest(PredictRequest):
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def create_app(engine: Engine, *, api_keys: list[str] | tuple[str, ...] = (), admin: bool = False,
               adapter_root: str | os.PathLike | None = None, allow_hub: bool = False, docs: bool = False,
               max_inputs: int = MAX_INPUTS, max_chars: int = MAX_CHARS, max_body_bytes: int = MAX_BODY_BYTES,
               stop_engine_on_shutdown: bool = False):
    """The FastAPI application. ``api_keys``: accepted Bearer tokens (none: no authentication);
    ``admin``: the load/unload endpoints; ``adapter_root``: the only folder run-time loads may read
    (None: no folder); ``allow_hub``: run-time loads of Hub ids; ``docs``: /docs, /redoc, /openapi.json."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from peftlab.version import __version__

    digests = [_digest(key) for key in api_keys]
    public_paths = {"/health", *(DOCS_PATHS if docs else ())}

    @asynccontextmanager
    async def lifespan(_app):
        yield
        if stop_engine_on_shutdown:
            engine.stop()

    app = FastAPI(title="peftlab serve", version=__version__, lifespan=lifespan, max_body_size=max_body_bytes,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.engine = engine

    def answer(request, status: int, message: str, headers=None, *, param=None, code=None, **extra):
        """The error in the shape the route's clients expect: OpenAI's on the OpenAI routes, ours elsewhere."""
        if is_openai_path(request.url.path):
            return error_response(status, message, headers=headers, openai=(param, code))
        return error_response(status, message, headers=headers, **extra)

    @app.exception_handler(ApiError)
    async def _api_error(request, error: ApiError):
        return answer(request, error.status, error.message, **error.extra)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, error: OpenAIError):
        return answer(request, error.status, error.message, param=error.param, code=error.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error: StarletteHTTPException):
        return answer(request, error.status_code, _http_message(error.status_code, request), headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, error: RequestValidationError):
        problems = error.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            where = next((p.get("ctx", {}).get("error") for p in problems if p.get("type") == "json_invalid"), "")
            return answer(request, 400, f"Malformed JSON body{': ' + str(where) if where else ''}.")
        described = []
        for problem in problems:
            location = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
            described.append(f"{location or 'body'}: {problem.get('msg')}")
        first = ".".join(str(part) for part in problems[0].get("loc", ()) if part != "body") if problems else None
        # OpenAI answers an invalid parameter with 400 naming it; peftlab's own routes with 422
        return answer(request, 400 if is_openai_path(request.url.path) else 422,
                      "Invalid request: " + "; ".join(described[:5]) + ".", param=first or None, code="invalid_value")

    @app.exception_handler(Exception)
    async def _unexpected(request, error: Exception):  # pragma: no cover - the last line of defence
        return answer(request, 500, f"Internal error: {type(error).__name__}: {str(error)[:300]}")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        request.state.authenticated = not digests or _authorized(request.headers.get("authorization"), digests)
        if not request.state.authenticated and request.url.path not in public_paths:
            wrong = bool(request.headers.get("authorization"))
            return answer(request, 401, "A valid API key is required: send the header 'Authorization: Bearer <key>'.",
                          headers={"WWW-Authenticate": 'Bearer realm="peftlab"' +
                                   (', error="invalid_token"' if wrong else "")}, code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > max_body_bytes
            except ValueError:
                return answer(request, 400, "Invalid Content-Length header.")
            if too_big:
                return answer(request, 413, f"Request body of {length} bytes is over the limit of {max_body_bytes}.")
        return await call_next(request)

    def check_inputs(inputs: list[Any]) -> None:
        if len(inputs) > max_inputs:
            raise ApiError(413, f"Too many inputs: {len(inputs)} in one request; the limit is {max_inputs}. "
                                "Split the request.")
        for number, item in enumerate(inputs, start=1):
            if not _valid_unicode(item):
                raise ApiError(422, f"Input {number} holds text that is not valid Unicode (a lone surrogate such "
                                    "as \\ud800): send UTF-8 text.")
            size = _text_size(item)
            if size > max_chars:
                raise ApiError(413, f"Input {number} is {size} characters long; the limit is {max_chars} per input.")

    async def run(op: str, body: PredictRequest, max_new_tokens: int = 32) -> dict[str, Any]:
        if not _valid_unicode(body.adapter):
            raise ApiError(422, "The adapter name is not valid Unicode (a lone surrogate): send UTF-8 text.")
        started = time.perf_counter()
        name = body.adapter
        failed, status = True, 500
        try:
            try:
                entry = engine.entry(name)
            except UnknownAdapter as error:
                raise ApiError(404, str(error), adapters=error.known) from None
            generative = TaskKind(entry.kind).is_generative
            if op == "predict" and generative:
                raise ApiError(422, f"Adapter '{name}' is a {entry.kind} adapter: use POST /v1/generate.")
            if op == "generate" and not generative:
                raise ApiError(422, f"Adapter '{name}' is a {entry.kind} adapter: use POST /v1/predict.")
            check_inputs(body.inputs)
            try:
                records = [TaskKind(entry.kind).record_from_input(item, f"input {i + 1}")
                           for i, item in enumerate(body.inputs)]
            except PeftlabError as error:
                raise ApiError(422, str(error)) from None
            job = Job(entry=entry, op=op, records=records, raw=list(body.inputs), max_new_tokens=max_new_tokens)
            try:
                future = engine.submit(job)
            except Overloaded as error:
                raise ApiError(503, str(error)) from None
            try:
                outputs = await asyncio.wrap_future(future)
            except AdapterGone as error:
                raise ApiError(404, str(error), adapters=engine.names()) from None
            except Exception as error:  # noqa: BLE001
                raise ApiError(500, f"Inference failed for adapter '{name}': {type(error).__name__}: "
                                    f"{str(error)[:300]}") from None
            failed, status = False, 200
            return dict(adapter=name, outputs=outputs)  # the API's field, not the method of that name
        except ApiError as error:
            status = error.status
            raise
        finally:
            engine.record(name, (time.perf_counter() - started) * 1000.0, len(body.inputs), failed, endpoint=op,
                          status=status)

    @app.post("/v1/predict")
    async def predict(body: PredictRequest):
        return await run("predict", body)

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest):
        return await run("generate", body, body.max_new_tokens)

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"base": engine.base_display, "adapters": engine.adapters()}

    if admin:
        @app.post("/v1/adapters", status_code=201)
        def load_adapter(body: LoadRequest):  # sync: runs in the thread pool, inference goes on meanwhile
            if not (_valid_unicode(body.name) and _valid_unicode(body.path)):
                raise ApiError(422, "The name and path must be valid Unicode text.")
            try:
                folder = locate(body.path, root=adapter_root, allow_hub=allow_hub)
            except NotFoundOrNotAllowed as error:
                raise ApiError(422, f"Refusing adapter '{body.name}': {error}") from None
            try:
                return engine.add_adapter(body.name, folder)
            except AdapterConflict as error:
                raise ApiError(409, str(error)) from None
            except PeftlabError as error:
                raise ApiError(422, str(error)) from None

        @app.delete("/v1/adapters/{name}")
        def unload_adapter(name: str):
            try:
                return engine.remove_adapter(name)
            except UnknownAdapter as error:
                raise ApiError(404, str(error), adapters=error.known) from None
    else:
        @app.api_route("/v1/adapters", methods=["POST"], include_in_schema=False)
        @app.api_route("/v1/adapters/{name}", methods=["DELETE"], include_in_schema=False)
        async def admin_off(request: Request):
            raise ApiError(404, _http_message(404, request))

    @app.get("/health")
    async def health(request: Request):
        info = engine.health() if request.state.authenticated else {"status": "ok" if engine.alive else
                                                                               "worker stopped"}
        if not engine.alive:
            raise ApiError(503, "The inference worker is not running.", **info)
        return info

    @app.get("/v1/stats")
    async def stats():
        return engine.metrics()

    @app.get("/metrics")
    async def metrics():
        from starlette.responses import Response

        if engine.prometheus is None:
            raise ApiError(503, "GET /metrics needs prometheus-client: pip install 'peftlab[serve]' (the JSON "
                                "summary is at GET /v1/stats).")
        body, content_type = engine.prometheus.exposition()
        return Response(body, media_type=content_type)

    add_routes(app, engine, max_chars=max_chars, max_new_tokens=MAX_NEW_TOKENS, valid_text=_valid_unicode)
    return app


def error_response(status: int, message: str, headers: dict[str, str] | None = None,
                   openai: tuple[str | None, str | None] | None = None, **extra):
    """``{"error": message, **extra}`` with any server path removed; ASCII JSON, so text that is not valid
    Unicode (a lone surrogate echoed from a request) can never break the response. ``openai``: (param, code)
    for OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``."""
    from starlette.responses import Response

    cleaned = _PATH.sub("<path>", message)
    payload = error_body(status, cleaned, *openai) if openai is not None else {"error": cleaned, **extra}
    body = json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _http_message(status: int, request) -> str:
    """The sentence for a framework-level error (unknown route, wrong method, unreadable body)."""
    if status == 404:
        return f"Not found: {request.method} {request.url.path} is not an endpoint of this server."
    if status == 405:
        return f"Method not allowed: {request.url.path} does not take {request.method}."
    if status == 413:
        return "The request body is over the size limit."
    if status == 400:
        return "The request body could not be read as JSON (invalid UTF-8, or nested too deeply)."
    return f"HTTP error {status}."


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _authorized(header: str | None, digests: list[bytes]) -> bool:
    """Whether ``Authorization: Bearer <token>`` carries one of the keys (compared in constant time)."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    offered = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
    matched = False
    for digest in digests:  # every key is compared: the time does not depend on which one matched
        matched |= hmac.compare_digest(offered, digest)
    return matched


def _valid_unicode(value: Any) -> bool:
    """False when a string anywhere in ``value`` (keys included) cannot be encoded as UTF-8 (a lone surrogate)."""
    pending = [value]
    while pending:  # a loop, not recursion: nesting as deep as the JSON parser allows is fine
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def _text_size(item: Any) -> int:
    """Characters in an input (strings, the text-like fields of an object, or a conversation's messages)."""
    if isinstance(item, str):
        return len(item)
    messages = item if isinstance(item, list) else item.get("messages") if isinstance(item, dict) else None
    if isinstance(messages, list):  # a conversation: all of its text counts
        return sum(len(str(m.get("content", m.get("value", "")))) for m in messages if isinstance(m, dict))
    if isinstance(item, dict):
        total = 0
        for key in ("text", "text_pair", "prompt", "instruction", "input", "source"):
            value = item.get(key)
            if isinstance(value, str):
                total = max(total, len(value))
        tokens = item.get("tokens")
        if isinstance(tokens, list):
            total = max(total, sum(len(str(t)) + 1 for t in tokens))
        return total
    return 0
