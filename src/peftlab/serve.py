"""``peftlab serve``: the entry point the CLI calls; the implementation is the ``peftlab.serving`` package.

* :mod:`peftlab.serving.engine`: one base model in memory, adapters grouped as their methods declare
  (``Method.serving_facts()``) over its shared weights, one inference thread with micro-batching
  (mixed-adapter batches where the method allows them);
* :mod:`peftlab.serving.app`: the FastAPI application (endpoints, API keys, limits, error responses);
* :mod:`peftlab.serving.adapters`: what an adapter folder must pass before it is loaded (on top of
  :func:`peftlab.adapter_check.check_adapter`) and where run-time loads may come from.

See docs/deploy.md.
"""

from peftlab.serving import build, serve
from peftlab.serving.app import create_app
from peftlab.serving.engine import Engine

__all__ = ["serve", "build", "create_app", "Engine"]
