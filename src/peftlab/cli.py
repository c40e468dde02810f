"""The ``peftlab`` command: argument parsing only; every command calls the Python API.

Flags of ``train`` and ``compare`` are generated from ``TrainConfig`` and from every method's
``Options`` dataclass, so a new option appears on the command line without editing this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from typing import Any

from peftlab import __version__
from peftlab.errors import PeftlabError
from peftlab.quiet import quiet_libraries

# Flags that read better than their field names.
_FLAG_NAMES = {"lr": "--lr", "output": "--output"}
_HELP = {
    "method": "PEFT method (see `peftlab methods`)",
    "task": "task name: sst2, mrpc, cola, rte, qnli, qqp, mnli, stsb, wnli, conll2003, imdb, alpaca, squad, or "
            "csv/tsv/jsonl/json for your own files (any kind: see the column options), hub with --dataset",
    "model": "Hub id, local folder, or a bundled offline model: minilm, smollm2",
    "report_to": "experiment tracking: none (default), tensorboard, trackio, mlflow, wandb; several comma-separated",
    "run_name": "the run's name in the trackers (default: the --output folder's name)",
    "output": "run folder (default runs/<method>-<task>)",
    "epochs": "training epochs (fractions allowed)",
    "lr": "peak learning rate (default: the method's own, see `peftlab methods`)",
    "batch_size": "examples per device per step",
    "eval_batch_size": "examples per evaluation batch",
    "max_length": "truncate sequences to this many tokens",
    "max_train_samples": "use a seeded random subset of this many training examples",
    "max_eval_samples": "use a seeded random subset of this many dev examples",
    "seed": "random seed (data order, initialisation, dropout)",
    "precision": "auto (bf16 where the hardware runs it natively, else fp32), fp32, bf16 or fp16 (CUDA)",
    "grad_accum": "gradient accumulation steps",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "group_by_length": "batch examples of similar length together (less padding)",
    "packing": "causal LM: pack several examples into each row of --max-length tokens, without attention across "
               "examples (same loss as padded batches, fewer padding tokens; length grouping is then off)",
    "warmup_ratio": "fraction of steps with linear learning-rate warm-up (default: the method's own: 0.06, BitFit and P-tuning 0.1)",
    "weight_decay": "AdamW weight decay",
    "logging_steps": "log every N optimizer steps",
    "save_steps": "write a checkpoint every N optimizer steps (for --resume)",
    "eval_each_epoch": "score the dev set after every epoch",
    "resume": "continue an interrupted run from its newest intact checkpoint (refused if its options changed)",
    "overwrite": "train into a non-empty --output: replaces an earlier run there; files peftlab did not write are "
                 "never deleted or replaced",
    "keep_checkpoints": "keep the step checkpoints after a successful run",
    "data_dir": "folder with the raw datasets (default: $PEFTLAB_DATA_DIR, else the Hugging Face Hub)",
    "deepspeed": "DeepSpeed ZeRO: zero2, zero3 or a config.json",
    "offload": "with --deepspeed: offload optimizer (and zero3 parameters) to 'cpu'",
    "fsdp": "FSDP sharding across the ranks: full_shard, shard_grad_op or hybrid_shard (with --nproc/--nnodes)",
    "fsdp_offload": "with --fsdp: parameters and optimizer state in host memory (CUDA only)",
    "progress": "show the progress bar",
}


def _task_flags():
    """The flags of your own data (files or a Hub dataset): peftlab.tasks.own.OPTIONS, with their help."""
    from peftlab.tasks.own import FLAG_OPTIONS, OPTIONS

    return OPTIONS, FLAG_OPTIONS


def _add_task_flags(group) -> None:
    options, switches = _task_flags()
    for name, help_text in options.items():
        if name in switches:
            group.add_argument("--" + name.replace("_", "-"), dest=name, action="store_const", const=True,
                               default=None, help=help_text)
        else:
            group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=help_text)


def _add_train_flags(parser: argparse.ArgumentParser, *, skip: set[str] = frozenset()) -> None:
    from peftlab.methods import get_method_class, method_names
    from peftlab.training import TrainConfig

    general = parser.add_argument_group("training")
    general.add_argument("--config", help="recipe YAML whose keys are these flag names (flags given here win)")
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("method_options", "task_options") or field.name in skip:
            continue
        flag = _FLAG_NAMES.get(field.name, "--" + field.name.replace("_", "-"))
        default = field.default
        help_text = _HELP.get(field.name, "")
        if isinstance(default, bool):
            general.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                 help=f"{help_text} (default: {default})")
        else:
            kind = {"epochs": float, "lr": float, "warmup_ratio": float, "weight_decay": float}.get(field.name)
            if kind is None:
                kind = int if isinstance(default, int) or field.name.startswith("max_") else str
            general.add_argument(flag, dest=field.name, type=kind, default=None,
                                 help=f"{help_text} (default: {default})")
    _add_task_flags(parser.add_argument_group("your own data (--task csv|tsv|jsonl|json, or --dataset ORG/NAME)"))

    methods = parser.add_argument_group("method options (each applies to the methods that have it)")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    seen: dict[str, list[str]] = {}
    fields: dict[str, dataclasses.Field] = {}
    for name in method_names():
        try:
            method_class = get_method_class(name)
        except (ImportError, AttributeError):  # a method module that is not installed
            continue
        for field in method_class.option_fields():
            if field.name == "learning_rate" or field.name in train_fields:
                continue  # --lr, or a training flag of the same name
            seen.setdefault(field.name, []).append(name)
            fields.setdefault(field.name, field)
    for option_name, owners in sorted(seen.items()):
        field = fields[option_name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata.get("help", "")
        methods.add_argument("--" + option_name.replace("_", "-"), dest=option_name, default=None,
                             metavar=type(default).__name__.upper(),
                             help=f"{help_text} [{', '.join(owners)}]")


def _collect(args: argparse.Namespace, parser_defaults: set[str],
             sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Recipe values first, then every flag the user actually gave. ``sources`` gets, for each value that
    came from the recipe, the recipe's path (validation names the file and key)."""
    from peftlab.validation import load_recipe

    options: dict[str, Any] = {}
    if getattr(args, "config", None):
        options.update(load_recipe(args.config))
        if sources is not None:
            sources.update({key: str(args.config) for key in options})
    for key, value in vars(args).items():
        if key in parser_defaults or value is None:
            continue
        options[key] = value
        if sources is not None:
            sources.pop(key, None)
    return options


# ---- commands -------------------------------------------------------------------------------------

def cmd_train(args, extra):
    from peftlab.training import config_from_options, train
    from peftlab.validation import check_model_limits

    sources: dict[str, str] = {}
    options = _collect(args, extra, sources)
    config = config_from_options(options, sources=sources)  # every value checked before any work
    check_model_limits(config)
    quiet_libraries()  # imports transformers and datasets: after the checks, so that mistakes answer at once
    nproc = getattr(args, "nproc", None)
    if getattr(args, "dry_run", False):
        from peftlab.dryrun import dry_run

        print(dry_run(config, world_size=1 if nproc is None else nproc).render(), flush=True)
        return 0
    from peftlab import distributed

    launch = distributed.LaunchOptions.from_namespace(args).check()
    distributed.check_plan(config, launch.nproc * launch.nnodes if launch.needs_launcher else None)
    if launch.needs_launcher and "LOCAL_RANK" not in os.environ:
        return distributed.relaunch(launch, args.argv)  # the ranks re-run this same command under torchrun
    train(config)
    return 0


def cmd_eval(args, extra):
    from peftlab.inference import evaluate

    task_options = {k: getattr(args, k) for k in _task_flags()[0] if getattr(args, k, None) is not None}
    result = evaluate(args.adapter, task=args.task, data_dir=args.data_dir, max_eval_samples=args.max_eval_samples,
                      batch_size=args.batch_size, precision=args.precision, task_options=task_options,
                      generate=args.generate, max_new_tokens=args.max_new_tokens)
    print(json.dumps(result, indent=2))
    return 0


def cmd_predict(args, extra):
    from peftlab.inference import load_trained, predict, read_inputs

    given = [flag for flag, value in (("--text", args.text), ("--input", args.input),
                                      ("--question/--context", args.question or args.context)) if value]
    if len(given) != 1:
        raise PeftlabError("Give one kind of input, not both or neither: --text \"...\" (repeatable), --input "
                           "file.jsonl, or --question \"...\" (repeatable) with --context \"...\" (question "
                           f"answering); got {' and '.join(given) if given else 'none'}.")
    if args.question or args.context:
        if not (args.question and args.context):
            raise PeftlabError("--question and --context go together: give the question(s) with --question and the "
                               "passage that contains the answer with --context.")
        inputs = [{"question": question, "context": args.context} for question in args.question]
    else:
        inputs = args.text if args.text else read_inputs(args.input)
    loaded = load_trained(args.adapter)
    for result in predict(loaded, inputs, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens):
        print(json.dumps(result, ensure_ascii=False))
    return 0


def cmd_env(args, extra):
    from peftlab.env import environment_report

    report = environment_report(data_dir=args.data_dir, check_models=not args.no_models)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from peftlab.env import render

        render(report)
    return 0


def cmd_methods(args, extra):
    from peftlab.catalog import methods_table, render_methods

    rows = methods_table(model=args.model, task=args.task)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        render_methods(rows, model=args.model, task=args.task)
    return 0


def cmd_compare(args, extra):
    from peftlab.artifacts import check_comparison_folder
    from peftlab.compare.orchestrate import COMPARE_FOLDERS, default_output
    from peftlab.compare.suite import parse_tasks
    from peftlab.methods import get_method_class, parse_methods
    from peftlab.report import PLOTS, SUITE_PLOT
    from peftlab.validation import check_method_values, check_train_values

    sources: dict[str, str] = {}
    own = {"methods", "repeats", "output", "resume", "isolate", "overwrite", "tasks", "suite", "tune", "trials",
           "workers", "ray", "multitask", "generate", "max_new_tokens"}
    options = _collect(args, extra | own, sources)
    options = check_train_values(options, sources)  # the recipe's file and key named, before any work
    chosen = options.get("methods") if args.methods == "all" and options.get("methods") else args.methods
    for name in parse_methods(chosen if isinstance(chosen, list) else str(chosen)):
        check_method_values(get_method_class(name), options, sources)  # each compared method's own options
    tasks = parse_tasks(args.tasks if args.tasks or args.suite else options.get("tasks"),
                        args.suite if args.tasks or args.suite else options.get("suite"), options.get("task"))
    output = args.output or default_output(tasks, args.suite or options.get("suite"))
    check_comparison_folder(output, overwrite=bool(args.overwrite),
                            plots=[name for name, _ in PLOTS.values()] + [SUITE_PLOT[0], *COMPARE_FOLDERS])
    quiet_libraries()
    from peftlab.compare import compare

    compare(methods=args.methods, output=output, repeats=args.repeats, resume=bool(args.resume),
            train_options=options, isolate=args.isolate, tasks=args.tasks, suite=args.suite, tune=args.tune,
            trials=args.trials, workers=args.workers, ray=args.ray, multitask=args.multitask,
            generate=args.generate, max_new_tokens=args.max_new_tokens)
    return 0


def cmd_merge(args, extra):
    from peftlab.merge import merge

    merge(args.adapter, args.output, samples=args.samples, tolerance=args.tolerance, overwrite=args.overwrite,
          push=args.push, private=args.private)
    return 0


def cmd_push(args, extra):
    from peftlab.hub import push

    push(args.adapter, args.repo, private=args.private)
    return 0


def cmd_export(args, extra):
    from peftlab.export import export

    export(adapter=args.adapter, model=args.model, output=args.output, fmt=args.format, quantize=args.quantize,
           data_dir=args.data_dir, overwrite=args.overwrite)
    return 0


def cmd_serve(args, extra):
    from peftlab.serving import serve  # checks the options (and that FastAPI is installed) before heavy imports

    adapters = {}
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise PeftlabError(f"--adapter '{spec}' must look like NAME=DIR (for example sst2=runs/lora-sst2).")
        adapters[name] = path
    serve(base=args.base, adapters=adapters, host=args.host, port=args.port, threads=args.threads,
          api_keys=args.api_key, admin=args.admin, adapter_root=args.adapter_root, allow_hub=args.allow_hub,
          docs=args.docs)
    return 0


def cmd_recommend(args, extra):
    from peftlab.recommend import recommend, render

    ranking = recommend(model=args.model, task_type=args.task_type, memory=args.memory, tasks=args.tasks,
                        latency_critical=args.latency_critical, few_shot=args.few_shot,
                        batch_size=args.batch_size, max_length=args.max_length,
                        domain_specific=args.domain_specific, device=args.device, task=args.task,
                        nproc=args.nproc, deepspeed=args.deepspeed, fsdp=args.fsdp, offload=args.offload)
    if args.json:
        print(json.dumps(ranking, indent=2))
    else:
        render(ranking)
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, set[str]]]:
    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Parameter-efficient fine-tuning: train, compare, merge and serve every classic PEFT method.",
    )
    parser.add_argument("--version", action="version", version=f"peftlab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    structural: dict[str, set[str]] = {}

    sub = commands.add_parser("env", help="check the environment: Python, torch, devices, versions, data")
    sub.add_argument("--data-dir", default=None, help="data folder to check (default $PEFTLAB_DATA_DIR)")
    sub.add_argument("--no-models", action="store_true", help="skip checking the bundled models")
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.set_defaults(handler=cmd_env)
    structural["env"] = {"command", "handler", "data_dir", "no_models", "json"}

    sub = commands.add_parser("train", help="train one method on one task")
    _add_train_flags(sub)
    sub.add_argument("--nproc", type=int, default=None, help="data-parallel processes on this machine (DDP)")
    from peftlab.distributed import LAUNCH_HELP

    for name, help_text in LAUNCH_HELP.items():  # multi-node: passed through to torchrun
        kind = {"nnodes": int, "node_rank": int, "master_port": int, "rdzv_timeout": float}.get(name, str)
        sub.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=help_text)
    sub.add_argument("--dry-run", action="store_true",
                     help="check the recipe without weights or a GPU: the method applies, trainable parameters, "
                          "memory per device, steps and tokens, the data's columns (--model may be a folder "
                          "holding only a config.json)")
    sub.set_defaults(handler=cmd_train)
    structural["train"] = {"command", "handler", "config", "nproc", "dry_run", *LAUNCH_HELP}

    sub = commands.add_parser("eval", help="score a trained adapter on its task's dev set")
    sub.add_argument("--adapter", required=True, help="a train --output folder or a peft adapter folder")
    sub.add_argument("--task", default=None, help="task (default: the one it was trained on)")
    sub.add_argument("--data-dir", default=None)
    sub.add_argument("--max-eval-samples", type=int, default=None)
    sub.add_argument("--batch-size", type=int, default=64)
    sub.add_argument("--precision", default="auto")
    sub.add_argument("--generate", type=int, default=0, metavar="N",
                     help="also generate for N dev examples and score the texts with the task's generation metric "
                          "(billsum: ROUGE-L; alpaca, guanaco and your own generative data: ROUGE-L, exact match, "
                          "chrF); the samples go into the run's metrics.json")
    sub.add_argument("--max-new-tokens", type=int, default=64, help="with --generate: tokens generated per example")
    _add_task_flags(sub)
    sub.set_defaults(handler=cmd_eval)

    sub = commands.add_parser("predict", help="predict with a trained adapter")
    sub.add_argument("--adapter", required=True, help="a train --output folder or a peft adapter folder")
    sub.add_argument("--text", action="append", help="an input text (repeatable)")
    sub.add_argument("--input", help="a JSON Lines file: one {\"text\": ...} (or tokens / instruction, a "
                                     "messages list for chat adapters, or question and context) per line")
    sub.add_argument("--question", action="append",
                     help="question answering: a question about --context (repeatable)")
    sub.add_argument("--context", help="question answering: the passage the answers are taken from")
    sub.add_argument("--batch-size", type=int, default=32)
    sub.add_argument("--max-new-tokens", type=int, default=64, help="for generative models")
    sub.set_defaults(handler=cmd_predict)

    sub = commands.add_parser("methods", help="the methods, their categories and cost on a model")
    sub.add_argument("--model", default=None, help="count trainable parameters on this model (a folder with only a "
                                                    "config.json is counted on the meta device, without weights)")
    sub.add_argument("--task", default=None,
                     help="task to size the head for (default by model: sst2, alpaca for decoders, billsum for "
                          "encoder-decoders)")
    sub.add_argument("--json", action="store_true")
    sub.set_defaults(handler=cmd_methods)

    sub = commands.add_parser("compare", help="train and measure every method side by side")
    sub.add_argument("--methods", default="all", help="'all' or a comma list, e.g. lora,bitfit,full")
    sub.add_argument("--tasks", default=None, help="several tasks, a comma list (e.g. sst2,mrpc,cola): per-task "
                                                   "tables and a suite average per method")
    sub.add_argument("--suite", default=None, choices=["glue"],
                     help="a fixed task list: glue = cola,sst2,mrpc,qqp,stsb,mnli,qnli,rte")
    sub.add_argument("--repeats", type=int, default=1,
                     help="seeds per method (mean, std and 95%% t-interval reported)")
    sub.add_argument("--tune", default=None, metavar="lr",
                     help="search each method's learning rate per task first (Optuna TPE on a validation split "
                          "carved from the training data; needs peftlab[tune])")
    sub.add_argument("--trials", type=int, default=None, help="with --tune: trials per method and task (default 8)")
    sub.add_argument("--workers", type=int, default=None,
                     help="runs at once: one GPU each on a GPU machine, the CPU cores split between them otherwise")
    sub.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="schedule the runs on Ray (needs peftlab[ray]): a local instance without ADDRESS, else the "
                          "cluster at HOST:PORT")
    sub.add_argument("--multitask", action=argparse.BooleanOptionalAction, default=True,
                     help="with several tasks: measure one serve process holding every task's adapter (default on)")
    sub.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                     help="run each method in its own process (honest peak memory; default on)")
    sub.add_argument("--generate", type=int, default=None, metavar="N",
                     help="generation tasks: also generate for the first N dev examples with every trained method and "
                          "score the texts (ROUGE-L, exact match, chrF; billsum: ROUGE-L) as extra table columns")
    sub.add_argument("--max-new-tokens", type=int, default=None, help="with --generate: tokens per example (default 64)")
    _add_train_flags(sub, skip={"keep_checkpoints"})
    sub.set_defaults(handler=cmd_compare)
    structural["compare"] = {"command", "handler", "config"}

    sub = commands.add_parser("merge", help="fold a trained adapter into the base weights")
    sub.add_argument("--adapter", required=True)
    sub.add_argument("--output", required=True)
    sub.add_argument("--samples", type=int, default=16, help="inputs used to verify merged == unmerged")
    sub.add_argument("--tolerance", type=float, default=1e-4,
                     help="largest allowed |merged - unmerged| output, relative to the largest |output| (at least 1)")
    sub.add_argument("--overwrite", action="store_true", help="replace an earlier `peftlab merge` output at --output")
    sub.add_argument("--push", metavar="ORG/NAME", default=None,
                     help="then upload the merged model and its card to this Hugging Face Hub repository")
    sub.add_argument("--private", action="store_true", help="with --push: create the repository as private")
    sub.set_defaults(handler=cmd_merge)

    sub = commands.add_parser("push", help="upload an adapter (or a merged model) with its model card to the Hub")
    sub.add_argument("--adapter", required=True, help="a train --output folder, a peft adapter folder or a merge output")
    sub.add_argument("--repo", required=True, metavar="ORG/NAME", help="the Hugging Face Hub repository")
    sub.add_argument("--private", action="store_true", help="create the repository as private")
    sub.set_defaults(handler=cmd_push)

    sub = commands.add_parser("export", help="export a merged model (or adapter) to ONNX")
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="a train --output folder (merged first)")
    source.add_argument("--model", help="a merged model folder (peftlab merge --output)")
    sub.add_argument("--format", default="onnx", choices=["onnx"])
    sub.add_argument("--output", required=True)
    sub.add_argument("--quantize", choices=["int8"], default=None)
    sub.add_argument("--data-dir", default=None)
    sub.add_argument("--overwrite", action="store_true", help="replace an earlier `peftlab export` output at --output")
    sub.set_defaults(handler=cmd_export)

    sub = commands.add_parser("serve", help="serve many adapters over one base model (HTTP)")
    sub.add_argument("--base", required=True, help="base model (alias, folder or Hub id)")
    sub.add_argument("--adapter", action="append", help="NAME=DIR, repeatable")
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=int, default=8000)
    sub.add_argument("--threads", type=int, default=None,
                     help="torch threads for inference (default $PEFTLAB_SERVE_THREADS or torch's; 1 on busy machines)")
    sub.add_argument("--api-key", action="append", metavar="KEY",
                     help="accept 'Authorization: Bearer KEY' (repeatable; default $PEFTLAB_API_KEY, comma-separated); "
                          "with a key, every endpoint but /health needs one")
    sub.add_argument("--admin", action="store_true",
                     help="allow loading/unloading adapters at run time (POST/DELETE /v1/adapters; needs a key)")
    sub.add_argument("--adapter-root", metavar="DIR", default=None,
                     help="with --admin: the only folder run-time loads may read from")
    sub.add_argument("--allow-hub", action="store_true", help="with --admin: allow run-time loads of Hub ids")
    sub.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json")
    sub.set_defaults(handler=cmd_serve)

    sub = commands.add_parser("recommend", help="rank the methods for your situation")
    sub.add_argument("--model", required=True)
    from peftlab.methods.base import GUIDE_TASK_TYPES

    what = sub.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="a registered task (sst2, rte, conll2003, alpaca...): its kind decides the type")
    what.add_argument("--task-type", choices=GUIDE_TASK_TYPES)
    sub.add_argument("--memory", default=None,
                     help="memory to plan for, e.g. 16GB (default: this machine's GPU memory, or its RAM without a GPU)")
    sub.add_argument("--tasks", type=int, default=1, help="how many tasks will share one base model")
    sub.add_argument("--latency-critical", action="store_true")
    sub.add_argument("--few-shot", action="store_true")
    sub.add_argument("--domain-specific", action="store_true", help="domain-specific data (favours BitFit)")
    sub.add_argument("--device", choices=["cuda", "cpu"], default=None,
                     help="what to plan for: a CUDA GPU or the CPU (default: this machine's device)")
    sub.add_argument("--batch-size", type=int, default=8)
    sub.add_argument("--max-length", type=int, default=512)
    scale = sub.add_argument_group("several devices: plan one rank's memory (docs/scaling.md)")
    scale.add_argument("--nproc", type=int, default=1, help="data-parallel ranks (GPUs) the training runs on")
    scale.add_argument("--deepspeed", choices=["zero2", "zero3"], default=None, help="DeepSpeed ZeRO stage")
    scale.add_argument("--fsdp", choices=["full_shard", "shard_grad_op", "hybrid_shard"], default=None, help="FSDP mode")
    scale.add_argument("--offload", action="store_true",
                       help="with --deepspeed or --fsdp: optimizer state (ZeRO-3, FSDP: also weights) in host memory")
    sub.add_argument("--json", action="store_true")
    sub.set_defaults(handler=cmd_recommend)
    return parser, structural


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg.startswith(("--local_rank", "--local-rank")) for arg in argv):
        from peftlab.distributed import strip_launcher_args

        argv = strip_launcher_args(argv)  # the `deepspeed` launcher passes --local_rank=N first
    try:
        parser, structural = build_parser()
        args = parser.parse_args(argv)
        args.argv = argv
        if args.handler not in (cmd_train, cmd_compare):  # those quieten after checking their options
            quiet_libraries()
        return int(args.handler(args, structural.get(args.command, {"command", "handler"}) | {"argv"}) or 0)
    except PeftlabError as error:
        print(f"peftlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
