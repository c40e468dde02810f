"""Third-party start-up lines that read like install problems, dropped (kept with ``PEFTLAB_DEBUG=1``).

Both are printed on every import on a CPU machine and need no action:

* bitsandbytes 0.50: "Failed to load CPU gemm_4bit_forward from kernels-community ..." — an optional
  kernel fetched from the Hub; bitsandbytes falls back to its own CPU path (see ../shared/STACK.md).
* DeepSpeed: "Setting accelerator to CPU ..." — on a machine without a GPU, CPU is the right answer.

Only these two messages are filtered (a ``logging.Filter`` on the two loggers, installed before the
libraries are imported, survives their own logger set-up); every other warning still shows.
"""

from __future__ import annotations

import logging
import os

DEBUG_ENV = "PEFTLAB_DEBUG"
_NOISE = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "DeepSpeed": ("Setting accelerator to CPU",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def silence_startup_noise() -> None:
    """Install the filters once (idempotent); a no-op when ``$PEFTLAB_DEBUG`` is set."""
    if os.environ.get(DEBUG_ENV):
        return
    for name, fragments in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropMessages) for existing in logger.filters):
            logger.addFilter(_DropMessages(fragments))


def quiet_libraries() -> None:
    """Library chatter that a command-line user cannot act on: FutureWarnings, transformers/datasets info
    logs and progress bars (peftlab prints its own progress). Kept with ``$PEFTLAB_DEBUG``."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get(DEBUG_ENV):
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on every eval/predict
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
