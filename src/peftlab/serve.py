"""``peftlab serve``: the entry point the CLI calls; the implementation is the ``peftlab.serving`` package.

* :mod:`peftlab.serving.engine`: one base model in memory, adapters grouped by compatibility over its
  shared weights, one inference thread with micro-batching (mixed-adapter batches for LoRA);
* :mod:`peftlab.serving.app`: the FastAPI application (endpoints, limits, error responses);
* :mod:`peftlab.serving.adapters`: the checks an adapter folder passes before it is loaded.

See docs/deploy.md.
"""

from peftlab.serving import build, serve
from peftlab.serving.app import create_app
from peftlab.serving.engine import Engine

__all__ = ["serve", "build", "create_app", "Engine"]
