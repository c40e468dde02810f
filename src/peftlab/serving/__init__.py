"""Serving many adapters over one base model: ``peftlab serve`` (see ``engine.py`` for the design)."""

from __future__ import annotations

import os
import sys

from peftlab.errors import PeftlabError


def build(base: str, adapters: dict[str, str] | None = None, **engine_options):
    """An :class:`Engine` with ``adapters`` loaded; any refused adapter stops it with the reason."""
    from peftlab.serving.engine import Engine

    engine = Engine(base, **engine_options)
    try:
        for name, path in (adapters or {}).items():
            info = engine.add_adapter(name, path)
            print(f"loaded adapter '{name}': {info['method']} · {info['kind']} · task {info['task']} · "
                  f"group {info['group']}", flush=True)
    except BaseException:
        engine.stop()
        raise
    return engine


def serve(base: str, adapters: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 8000, *,
          max_batch_rows: int = 64, threads: int | None = None, log_level: str = "info") -> None:
    """Load ``base`` once with every adapter and serve the HTTP API until interrupted.

    ``threads``: torch intra-op threads for inference (default: $PEFTLAB_SERVE_THREADS, else torch's
    default, which honours $OMP_NUM_THREADS).
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise PeftlabError("peftlab serve needs FastAPI and uvicorn: pip install 'peftlab[serve]'.") from None
    from peftlab.serving.app import create_app

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads is None and os.environ.get("PEFTLAB_SERVE_THREADS"):
        try:
            threads = int(os.environ["PEFTLAB_SERVE_THREADS"])
        except ValueError:
            raise PeftlabError("$PEFTLAB_SERVE_THREADS must be a whole number of threads.") from None
    engine = build(base, adapters, max_batch_rows=max_batch_rows, threads=threads)
    app = create_app(engine, stop_engine_on_shutdown=True)
    print(f"peftlab serve: base '{base}', {len(engine.names())} adapter(s), http://{host}:{port} "
          "(POST /v1/predict, /v1/generate; GET /v1/adapters, /health, /metrics)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["build", "serve"]
