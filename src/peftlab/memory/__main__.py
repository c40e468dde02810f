"""``python -m peftlab.memory validate RUN...`` / ``saved METHODS``: see ``peftlab.memory.measure.main``."""

import sys

from peftlab.memory.measure import main

sys.exit(main())
