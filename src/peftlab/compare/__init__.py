"""``peftlab compare``: every chosen method trained on the same data, budget and seeds, on one task or a suite,
measured side by side and against the task's trivial baseline.

What one comparison does
------------------------
1. Checks the names (methods, tasks, options) and which methods can run on the model at all, before
   any training: a method the model cannot take (BitFit on Llama, prompt tuning on token
   classification) is listed as ``unsupported`` with ``check_supported``'s reason, not dropped. Each
   task's data is loaded once here: a task whose data is missing and unreachable is left out with one
   sentence, and its trivial baseline (majority class, training mean) is scored on the dev set.
2. With ``--tune lr``: searches each method's learning rate per task (Optuna TPE, pruned per epoch) on a
   validation split carved from the training examples (:mod:`~peftlab.compare.tuning`).
3. Trains each method on each task and seed with its default (or tuned) learning rate, in its own
   process by default (``python -m peftlab.compare worker SPEC``), so peak memory (process RSS on CPU,
   CUDA max allocated on GPU) is the method's own, and a crash, an out-of-memory kill or a diverged
   (NaN) run is recorded as ``failed`` with its error while the others go on (a killed or crashed run is
   retried once first). The jobs run one after another, ``--workers N`` at once, or on Ray (``--ray``).
4. In the same process, after training: reloads the run folder (``peftlab.inference.load_trained``),
   checks the weights are finite, times inference at batch 1 and batch 32 on dev inputs (median of
   repeated runs after warm-up), unmerged and, for mergeable methods, merged, and for language models
   generates from three dev prompts.
5. Persists each finished job as ``result.json`` (``tune.json``) in its folder (atomically), so a killed
   comparison continues with ``--resume`` at the first unfinished job, whatever ran it.
6. Writes ``results.json`` (one object per method x task x seed, aggregates with 95% intervals, the
   baselines, the suite average), ``results.csv``, ``report.md``, ``report.html`` and the plots
   (``peftlab.report``); for a suite also the measured cost of serving every task.

The default budget (when neither ``--max-train-samples`` nor ``--epochs`` is given) is sized so that
``make demo`` (the ten classic methods on SST-2 with MiniLM) finishes in well under ten minutes on a
2-core CPU and still ranks the methods meaningfully; see docs/compare.md for the measured numbers.

The package, by responsibility:

* :mod:`~peftlab.compare.orchestrate`: ``compare(...)``: the phases, resuming, results.json;
* :mod:`~peftlab.compare.plan`: tasks, budgets, data and baselines, support checks, the grid of jobs;
* :mod:`~peftlab.compare.runner`: one job in a worker process (or this one), retried once if killed;
* :mod:`~peftlab.compare.parallel` / :mod:`~peftlab.compare.ray_backend`: where the jobs run;
* :mod:`~peftlab.compare.worker`: the worker process: train, check, measure (or tune);
* :mod:`~peftlab.compare.tuning`: ``--tune lr`` with Optuna;
* :mod:`~peftlab.compare.measure`: divergence, size on disk, latency (:mod:`peftlab.latency`), samples;
* :mod:`~peftlab.compare.rows`: what a row of ``results.json`` holds, seeds -> one row with intervals;
* :mod:`~peftlab.compare.stats` / :mod:`~peftlab.compare.baseline`: intervals, the trivial baseline and the
  "no better than the baseline" check (shared with ``peftlab train``);
* :mod:`~peftlab.compare.suite`: several tasks, each task's score, the suite average;
* :mod:`~peftlab.compare.multitask`: the memory of serving every task from one process;
* :mod:`~peftlab.compare.progress`: the live display (rich) or plain lines;
* :mod:`~peftlab.compare.environment`: versions, hardware and the command, as ``results.json`` records them.

The report (tables, plots, HTML) is :mod:`peftlab.report`.
"""

from peftlab.compare.baseline import task_splits, trivial_baseline
from peftlab.compare.environment import cpu_name, environment, invocation, resolved_command, threads_text
from peftlab.compare.measure import (LATENCY_ROWS, LATENCY_SETTINGS, SAMPLE_NEW_TOKENS, SAMPLE_PROMPTS,
                                     TrainingDiverged, divergence, folder_bytes, is_peft_model, latency_inputs,
                                     measure_inference, non_finite_parameters, sample_generations, time_model)
from peftlab.compare.orchestrate import compare, write_results
from peftlab.compare.parallel import Job, Workers, plan_workers, run_jobs, worker_threads
from peftlab.compare.plan import (COMPARE_DEFAULTS, DEFAULT_BUDGETS, options_for, preflight, resolve_methods, skeleton,
                                  unsupported_reason_kind_only)
from peftlab.compare.rows import (AVERAGED, COMPARE_KEYS, METRIC_KEYS, WITH_STD, aggregate, compare_rows, empty_row,
                                  method_facts)
from peftlab.compare.runner import finished_run, flat_options, prepare_run_dir, run_in_process, run_isolated, run_job
from peftlab.compare.stats import Verdict, baseline_warning, intervals_overlap, no_better_than_baseline, seed_interval
from peftlab.compare.suite import SUITES, parse_tasks, score_metrics, suite_rows, task_score
from peftlab.compare.worker import (LOG_FILE, PARENT_PID_ENV, RESULT_FILE, SPEC_FILE, WORKER_ERROR, WORKER_RESULT,
                                    failed_result, method_source, register_from_source, run_method, training_identity,
                                    worker_main)

__all__ = [
    "compare", "resolve_methods", "options_for", "worker_threads", "preflight", "unsupported_reason_kind_only",
    "skeleton", "run_isolated", "run_in_process", "run_job", "prepare_run_dir", "finished_run", "flat_options",
    "write_results", "DEFAULT_BUDGETS", "COMPARE_DEFAULTS", "Job", "Workers", "plan_workers", "run_jobs",
    "worker_main", "run_method", "failed_result", "training_identity", "method_source", "register_from_source",
    "RESULT_FILE", "WORKER_RESULT", "WORKER_ERROR", "LOG_FILE", "SPEC_FILE", "PARENT_PID_ENV",
    "measure_inference", "latency_inputs", "time_model", "sample_generations", "divergence", "non_finite_parameters",
    "folder_bytes", "is_peft_model", "TrainingDiverged", "LATENCY_ROWS", "LATENCY_SETTINGS", "SAMPLE_PROMPTS",
    "SAMPLE_NEW_TOKENS",
    "METRIC_KEYS", "COMPARE_KEYS", "AVERAGED", "WITH_STD", "empty_row", "method_facts", "aggregate", "compare_rows",
    "environment", "cpu_name", "invocation", "resolved_command", "threads_text",
    "trivial_baseline", "task_splits", "Verdict", "seed_interval", "intervals_overlap", "no_better_than_baseline",
    "baseline_warning", "SUITES", "parse_tasks", "score_metrics", "task_score", "suite_rows",
]
