"""Helpers the lab notebooks (``labs/<lab>/0N-*.ipynb``) share: settings, plots, latency, small builders.

Every lab is a folder ``labs/<lab>/`` with ``recipe.yaml`` (the Hub default: the paper's model and data,
for a GPU) and ``recipe.offline.yaml`` (the same recipe on the bundled models and ``$PEFTLAB_DATA_DIR``,
runnable on a CPU). The notebooks read three environment variables:

* ``PEFTLAB_LAB_RECIPE``: ``offline`` (default) or ``hub``: which recipe to run;
* ``PEFTLAB_LAB_OUTPUT``: where runs go (default ``<repo>/runs/labs/<lab>``); stage 02 writes the runs
  that stages 03 and 04 read;
* ``PEFTLAB_SMOKE``: ``1`` for the smallest budgets (:data:`SMOKE_BUDGET`) that still exercise every
  cell: the test suite runs every notebook this way. In smoke mode the 135M-parameter ``smollm2`` is
  replaced by a 2-layer random Llama with SmolLM2's tokenizer (:func:`smoke_llama`): the code path is
  the same, the numbers mean nothing.

The distributed-training labs (1.2 DDP, 1.3 DeepSpeed) train in N processes started by a launcher
(:func:`launch`, ``torchrun`` underneath); ``PEFTLAB_LAB_NPROC`` sets N (default: the lab's, 2).

The notebooks use everything through ``from peftlab import labs``; by responsibility it lives in:

* :mod:`~peftlab.labs.lab`: the lab's folders, recipe, budgets and run folders;
* :mod:`~peftlab.labs.notebook`: tables and plots of each stage, dev inputs, latency of ``predict``;
* :mod:`~peftlab.labs.judge`: the imdb-gen labs' sentiment judge;
* :mod:`~peftlab.labs.launcher`: multi-process training from a notebook, and its comparison tables;
* :mod:`~peftlab.labs.standins`: tiny models and data standing in for what cannot be downloaded here.

Nothing here is needed to use peftlab; it keeps the notebooks short.
"""

from peftlab.labs.judge import generate_reviews, sentiment_agreement, train_sentiment_judge
from peftlab.labs.lab import (NPROC_ENV, OUTPUT_ENV, PATH_OPTIONS, RECIPE_ENV, SMOKE_BUDGET, SMOKE_ENV,
                              SMOKE_GENERATIVE_MAX_LENGTH, SMOKE_MODELS, VARIANTS, Lab, fresh_run, load_metrics,
                              read_log, smoke)
from peftlab.labs.launcher import (LAUNCHER_ENV_DROP, compare_runs, distributed_report, launch, plot_comparison,
                                   plot_zero_memory, write_recipe, zero_memory)
from peftlab.labs.notebook import (adapter_tensors, base_of, dev_inputs, device_check, folder_size_mb,
                                   generation_scores, loaded_from_folder, measure_latency, optional, parameter_count,
                                   plot_latency, plot_loss, plot_token_lengths, served, show_examples, summary,
                                   token_lengths)
from peftlab.labs.standins import build_tiny_t5, lead_sentence, smoke_llama, write_billsum_standin

__all__ = [
    "Lab", "smoke", "SMOKE_BUDGET", "fresh_run", "load_metrics", "device_check", "show_examples", "token_lengths",
    "plot_token_lengths", "read_log", "plot_loss", "summary", "dev_inputs", "base_of", "measure_latency",
    "plot_latency", "generation_scores", "train_sentiment_judge", "generate_reviews", "sentiment_agreement",
    "loaded_from_folder", "optional", "served", "folder_size_mb", "smoke_llama", "build_tiny_t5", "write_billsum_standin",
    "lead_sentence", "parameter_count", "distributed_report", "write_recipe", "launch", "compare_runs",
    "plot_comparison", "zero_memory", "plot_zero_memory", "adapter_tensors",
    "SMOKE_ENV", "OUTPUT_ENV", "RECIPE_ENV", "NPROC_ENV", "VARIANTS", "SMOKE_GENERATIVE_MAX_LENGTH", "SMOKE_MODELS",
    "PATH_OPTIONS", "LAUNCHER_ENV_DROP",
]
