"""``peftlab compare``: every chosen method trained on the same data, budget and seed, measured side by side.

What one comparison does
------------------------
1. Checks the names (methods, task, options) and which methods can run on the model at all, before
   any training: a method the model cannot take (BitFit on Llama, prompt tuning on token
   classification) is listed as ``unsupported`` with ``check_supported``'s reason, not dropped.
2. Trains each method (and each seed, with ``--repeats``) with its own default hyperparameters, in
   its own process by default (``python -m peftlab.compare worker SPEC``), so peak memory (process
   RSS on CPU, CUDA max allocated on GPU) is the method's own, and a crash, an out-of-memory kill or
   a diverged (NaN) run is recorded as ``failed`` with its error while the others go on.
3. In the same process, after training: reloads the run folder (``peftlab.inference.load_trained``),
   checks the weights are finite, times inference at batch 1 and batch 32 on dev inputs (median of
   repeated runs after warm-up), unmerged and, for mergeable methods, merged (``method.merge`` on a
   freshly loaded copy), and for language models generates from three dev prompts.
4. Persists each finished run as ``DIR/runs/<method>[-seed<k>]/result.json`` (atomically), so a
   killed comparison continues with ``--resume`` at the first unfinished run.
5. Writes ``results.json``, ``results.csv``, ``report.md``, ``report.html`` and the plots
   (``peftlab.report``).

The default budget (when neither ``--max-train-samples`` nor ``--epochs`` is given) is sized so that
``make demo`` (all ten methods on SST-2 with MiniLM) finishes in about a quarter of an hour on a
2-core CPU and still ranks the methods meaningfully; see docs/compare.md for the measured numbers.

The package, by responsibility:

* :mod:`~peftlab.compare.orchestrate`: the grid of runs, resuming, process isolation, ``compare(...)``;
* :mod:`~peftlab.compare.worker`: one run (in a child process by default): train, check, measure;
* :mod:`~peftlab.compare.measure`: divergence, size on disk, latency (:mod:`peftlab.latency`), samples;
* :mod:`~peftlab.compare.rows`: what a row of ``results.json`` holds, seeds -> one row, console lines;
* :mod:`~peftlab.compare.environment`: versions, hardware and the command, as ``results.json`` records them.

The report (tables, plots, HTML) is :mod:`peftlab.report`.
"""

from peftlab.compare.environment import cpu_name, environment, invocation, resolved_command, threads_text
from peftlab.compare.measure import (LATENCY_ROWS, LATENCY_SETTINGS, SAMPLE_NEW_TOKENS, SAMPLE_PROMPTS,
                                     TrainingDiverged, divergence, folder_bytes, is_peft_model, latency_inputs,
                                     measure_inference, non_finite_parameters, sample_generations, time_model)
from peftlab.compare.orchestrate import (COMPARE_DEFAULTS, DEFAULT_BUDGETS, compare, finished_run, flat_options,
                                         options_for, preflight, prepare_run_dir, resolve_methods, run_in_process,
                                         run_isolated, skeleton, unsupported_reason_kind_only, worker_threads,
                                         write_results)
from peftlab.compare.rows import (AVERAGED, COMPARE_KEYS, METRIC_KEYS, WITH_STD, aggregate, compare_rows, empty_row,
                                  method_facts)
from peftlab.compare.worker import (LOG_FILE, PARENT_PID_ENV, RESULT_FILE, SPEC_FILE, WORKER_ERROR, WORKER_RESULT,
                                    failed_result, method_source, register_from_source, run_method, training_identity,
                                    worker_main)

__all__ = [
    "compare", "resolve_methods", "options_for", "worker_threads", "preflight", "unsupported_reason_kind_only",
    "skeleton", "run_isolated", "run_in_process", "prepare_run_dir", "finished_run", "flat_options", "write_results",
    "DEFAULT_BUDGETS", "COMPARE_DEFAULTS",
    "worker_main", "run_method", "failed_result", "training_identity", "method_source", "register_from_source",
    "RESULT_FILE", "WORKER_RESULT", "WORKER_ERROR", "LOG_FILE", "SPEC_FILE", "PARENT_PID_ENV",
    "measure_inference", "latency_inputs", "time_model", "sample_generations", "divergence", "non_finite_parameters",
    "folder_bytes", "is_peft_model", "TrainingDiverged", "LATENCY_ROWS", "LATENCY_SETTINGS", "SAMPLE_PROMPTS",
    "SAMPLE_NEW_TOKENS",
    "METRIC_KEYS", "COMPARE_KEYS", "AVERAGED", "WITH_STD", "empty_row", "method_facts", "aggregate", "compare_rows",
    "environment", "cpu_name", "invocation", "resolved_command", "threads_text",
]
