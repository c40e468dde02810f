"""Serving many adapters over one base model: ``peftlab serve``.

* ``engine.py``: the facade (adapters, slots, metrics); ``loading.py``: skeletons of the base and the
  adapters built over them, as each method's ``serving_facts()`` declares; ``sharing.py``: module trees
  that share one copy of the base tensors; ``worker.py``: the inference thread and its micro-batches;
  ``records.py``: what the engine keeps;
* ``adapters.py``: what the server asks of an adapter folder (on top of ``peftlab.adapter_check``) and
  where a run-time load may come from;
* ``app.py``: the HTTP API, its access rules and error answers.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from peftlab.errors import PeftlabError

API_KEY_ENV = "PEFTLAB_API_KEY"


def build(base: str, adapters: dict[str, str] | None = None, **engine_options):
    """An :class:`Engine` with ``adapters`` loaded (folders, or Hub ids ``org/name``); any refused adapter stops
    it with the reason."""
    from peftlab.serving.adapters import startup_folder
    from peftlab.serving.engine import Engine

    engine = Engine(base, **engine_options)
    try:
        for name, path in (adapters or {}).items():
            info = engine.add_adapter(name, startup_folder(name, str(path)))
            print(f"loaded adapter '{name}': {info['method']} · {info['kind']} · task {info['task']} · "
                  f"group {info['group']}", flush=True)
    except BaseException:
        engine.stop()
        raise
    return engine


def api_keys_from(keys: list[str] | None, environment: dict[str, str] | None = None) -> list[str]:
    """The accepted API keys: ``keys`` (``--api-key``, repeatable) or else $PEFTLAB_API_KEY (comma-separated)."""
    environment = os.environ if environment is None else environment
    where = "--api-key"
    if not keys:
        value = environment.get(API_KEY_ENV)
        if value is None:
            return []
        keys, where = value.split(","), f"${API_KEY_ENV}"
    cleaned = [key.strip() for key in keys]
    if not all(cleaned) or any(any(ch.isspace() for ch in key) for key in cleaned):
        raise PeftlabError(f"{where} holds an empty key or one with spaces: give each key as one word "
                           f"(several keys: repeat --api-key, or separate them with commas in ${API_KEY_ENV}).")
    return cleaned


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_options(*, port, host: str, api_keys: list[str], admin: bool, adapter_root, allow_hub: bool) -> Path | None:
    """Refuse contradictory or unsafe server options in one sentence; the adapter root, resolved."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise PeftlabError(f"--port {port} is not a TCP port: use a number from 1 to 65535.")
    if admin and not api_keys:
        raise PeftlabError("--admin lets clients load and unload adapters, so it needs an API key: add --api-key KEY "
                           f"or set ${API_KEY_ENV}.")
    if admin and adapter_root is None and not allow_hub:
        raise PeftlabError("--admin needs --adapter-root DIR (the only folder run-time loads may read) or "
                           "--allow-hub (Hub ids).")
    if not admin and (adapter_root is not None or allow_hub):
        raise PeftlabError("--adapter-root and --allow-hub say where run-time loads may come from, and only --admin "
                           "turns run-time loading on: add --admin (with --api-key) or drop them.")
    root = None
    if adapter_root is not None:
        root = Path(os.path.expanduser(str(adapter_root)))
        if not root.is_dir():
            raise PeftlabError(f"--adapter-root '{adapter_root}' is not a folder.")
        root = Path(os.path.realpath(root))
    if not api_keys and not is_loopback(host):
        print(f"peftlab serve: warning: listening on {host} without an API key: anyone who can reach this port can "
              f"use the adapters. Set --api-key KEY or ${API_KEY_ENV}.", file=sys.stderr, flush=True)
    return root


def serve(base: str, adapters: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 8000, *,
          max_batch_rows: int = 64, threads: int | None = None, log_level: str = "info",
          api_keys: list[str] | None = None, admin: bool = False, adapter_root: str | os.PathLike | None = None,
          allow_hub: bool = False, docs: bool = False) -> None:
    """Load ``base`` once with every adapter and serve the HTTP API until interrupted.

    ``threads``: torch intra-op threads for inference (default: $PEFTLAB_SERVE_THREADS, else torch's
    default, which honours $OMP_NUM_THREADS). ``api_keys``: Bearer tokens (default: $PEFTLAB_API_KEY,
    comma-separated); with keys every endpoint but /health needs one. ``admin``: the load/unload
    endpoints (needs a key, and ``adapter_root`` or ``allow_hub``). ``docs``: /docs and the OpenAPI schema.
    """
    keys = api_keys_from(api_keys)
    root = check_options(port=port, host=host, api_keys=keys, admin=admin, adapter_root=adapter_root,
                         allow_hub=allow_hub)
    if threads is None and os.environ.get("PEFTLAB_SERVE_THREADS"):
        try:
            threads = int(os.environ["PEFTLAB_SERVE_THREADS"])
        except ValueError:
            raise PeftlabError("$PEFTLAB_SERVE_THREADS must be a whole number of threads.") from None
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise PeftlabError("peftlab serve needs FastAPI and uvicorn: pip install 'peftlab[serve]'.") from None
    from peftlab.serving.app import create_app

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from peftlab.serving.allocator import steady_allocator

    steady_allocator()  # before the model and the threads: resident memory that levels off under load
    engine = build(base, adapters, max_batch_rows=max_batch_rows, threads=threads)
    app = create_app(engine, api_keys=keys, admin=admin, adapter_root=root, allow_hub=allow_hub, docs=docs,
                     stop_engine_on_shutdown=True)
    access = "API key required" if keys else "no API key"
    print(f"peftlab serve: base '{base}', {len(engine.names())} adapter(s), http://{host}:{port} "
          f"(POST /v1/predict, /v1/generate, OpenAI's /v1/completions and /v1/chat/completions; GET /v1/adapters, "
          f"/v1/models, /v1/stats, /health, /metrics (Prometheus); {access}"
          f"{'; admin: POST/DELETE /v1/adapters' if admin else ''}{'; /docs' if docs else ''})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["build", "serve", "api_keys_from", "check_options", "is_loopback", "API_KEY_ENV"]
