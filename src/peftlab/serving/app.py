"""The HTTP API (FastAPI) over an :class:`~peftlab.serving.engine.Engine`.

=========================  ===========================================================================
``POST /v1/predict``       ``{"adapter": "sst2", "inputs": ["text", {"text": .., "text_pair": ..},
                           {"tokens": [..]}]}`` -> ``{"adapter", "outputs": [...]}`` (classification,
                           regression, tagging; the same objects as ``peftlab predict``)
``POST /v1/generate``      ``{"adapter": .., "inputs": [..], "max_new_tokens": 32}`` (causal LMs)
``GET /v1/adapters``       the loaded adapters (name, method, task, kind, labels, group, ...)
``POST /v1/adapters``      ``{"name": .., "path": ..}`` loads one at run time (201; 409 name taken;
                           422 refused, with the reason)
``DELETE /v1/adapters/X``  unloads X (requests already accepted for X still complete)
``GET /health``            liveness (503 when the inference worker is not running)
``GET /metrics``           requests, errors, inputs and latency p50/p95/p99 (ms) per adapter, batching
=========================  ===========================================================================

Every error is JSON ``{"error": "<one sentence>", ...}``: 400 malformed JSON, 404 unknown adapter (with
the loaded names), 409 name taken, 413 too many / too long inputs or body, 422 invalid fields or input
shapes or a refused adapter folder, 503 queue full, 500 unexpected (the server keeps serving).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.serving.engine import AdapterConflict, AdapterGone, Engine, Job, Overloaded, UnknownAdapter

MAX_INPUTS = 64
MAX_CHARS = 4000  # per input text (tokens beyond the adapter's max_length are truncated, as in training)
MAX_BODY_BYTES = 1_000_000
MAX_NEW_TOKENS = 256


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


def create_app(engine: Engine, *, max_inputs: int = MAX_INPUTS, max_chars: int = MAX_CHARS,
               max_body_bytes: int = MAX_BODY_BYTES, admin: bool = True, stop_engine_on_shutdown: bool = False):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    import peftlab

    @asynccontextmanager
    async def lifespan(_app):
        yield
        if stop_engine_on_shutdown:
            engine.stop()

    app = FastAPI(title="peftlab serve", version=peftlab.__version__, lifespan=lifespan)
    app.state.engine = engine

    def error_response(status: int, message: str, **extra) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(_request, error: ApiError):
        return error_response(error.status, error.message, **error.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, error: RequestValidationError):
        problems = error.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            where = next((p.get("ctx", {}).get("error") for p in problems if p.get("type") == "json_invalid"), "")
            return error_response(400, f"Malformed JSON body{': ' + str(where) if where else ''}.")
        described = []
        for problem in problems:
            location = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
            described.append(f"{location or 'body'}: {problem.get('msg')}")
        return error_response(422, "Invalid request: " + "; ".join(described[:5]) + ".")

    @app.exception_handler(Exception)
    async def _unexpected(_request, error: Exception):  # pragma: no cover - the last line of defence
        return error_response(500, f"Internal error: {type(error).__name__}: {str(error)[:300]}")

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > max_body_bytes
            except ValueError:
                return error_response(400, "Invalid Content-Length header.")
            if too_big:
                return error_response(413, f"Request body of {length} bytes is over the limit of {max_body_bytes}.")
        return await call_next(request)

    def check_inputs(inputs: list[Any]) -> None:
        if len(inputs) > max_inputs:
            raise ApiError(413, f"Too many inputs: {len(inputs)} in one request; the limit is {max_inputs}. "
                                "Split the request.")
        for number, item in enumerate(inputs, start=1):
            size = _text_size(item)
            if size > max_chars:
                raise ApiError(413, f"Input {number} is {size} characters long; the limit is {max_chars} per input.")

    async def run(op: str, body: PredictRequest, max_new_tokens: int = 32) -> dict[str, Any]:

        started = time.perf_counter()
        name = body.adapter
        failed = True
        try:
            try:
                entry = engine.entry(name)
            except UnknownAdapter as error:
                raise ApiError(404, str(error), adapters=error.known) from None
            generative = entry.kind in ("causal-lm", "seq2seq")
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
            failed = False
            return {"adapter": name, "outputs": outputs}
        finally:
            engine.record(name, (time.perf_counter() - started) * 1000.0, len(body.inputs), failed)

    @app.post("/v1/predict")
    async def predict(body: PredictRequest):
        return await run("predict", body)

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest):
        return await run("generate", body, body.max_new_tokens)

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"base": engine.base_name, "adapters": engine.adapters()}

    if admin:
        @app.post("/v1/adapters", status_code=201)
        def load_adapter(body: LoadRequest):  # sync: runs in the thread pool, inference goes on meanwhile
            try:
                return engine.add_adapter(body.name, body.path)
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

    @app.get("/health")
    async def health():
        info = engine.health()
        if not engine.alive:
            raise ApiError(503, "The inference worker is not running.", **info)
        return info

    @app.get("/metrics")
    async def metrics():
        return engine.metrics()

    return app


def _text_size(item: Any) -> int:
    """Characters in an input (strings, or the text-like fields of an object)."""
    if isinstance(item, str):
        return len(item)
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
