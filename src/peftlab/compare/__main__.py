"""``python -m peftlab.compare worker SPEC.json``: one job of a comparison in its own process;
``python -m peftlab.compare serve-memory SPEC.json``: the multi-task serving measurement."""

import sys

from peftlab.compare.multitask import SERVE_MEMORY, serve_memory_main
from peftlab.compare.worker import worker_main

if __name__ == "__main__":
    if sys.argv[1:2] == [SERVE_MEMORY] and len(sys.argv) == 3:
        sys.exit(serve_memory_main(sys.argv[2:]))
    sys.exit(worker_main(sys.argv[1:]))
