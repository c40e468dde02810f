"""``python -m peftlab.compare worker SPEC.json``: one run of a comparison in its own process."""

import sys

from peftlab.compare.worker import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
