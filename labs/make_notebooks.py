"""Generate the four notebooks of every lab from one description, so that they stay consistent.

    .venv/bin/python labs/make_notebooks.py          # rewrite every labs/<lab>/0N-*.ipynb
    .venv/bin/python labs/make_notebooks.py --check  # exit 1 if a notebook differs from what this writes

Each lab is ``labs/<lab>/`` with ``recipe.yaml`` (Hub default), ``recipe.offline.yaml`` (bundled models,
runs on a CPU) and four notebooks that call peftlab's Python API:

1. ``01-Setup``: environment report, device and bf16 check, the task's data and token lengths;
2. ``02-Train``: ``peftlab.train`` with monitoring, loss curve and dev metric per epoch, a summary;
3. ``03-Inference``: reload the adapter, predictions, dev score, latency at batch 1 and 32 vs the base;
4. ``04-Merge_and_Deploy``: merge and verify (mergeable methods) or explain and serve unmerged / export.

The notebooks read ``PEFTLAB_LAB_RECIPE`` (offline|hub), ``PEFTLAB_LAB_OUTPUT`` and ``PEFTLAB_SMOKE``
(see ``peftlab.labs``). Edit this file, not the notebooks.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from peftlab.methods import get_method_class

HERE = Path(__file__).resolve().parent
NOTEBOOKS = ("01-Setup", "02-Train", "03-Inference", "04-Merge_and_Deploy")


@dataclass
class LabSpec:
    name: str
    title: str
    method: str  # the method of the recipe
    idea: str  # one paragraph: what the method does
    hub: str  # model + data of recipe.yaml
    offline: str  # model + data of recipe.offline.yaml
    kind: str  # task kind of the recipe's task
    runs: dict[str, dict] = field(default_factory=lambda: {"run": {}})  # run name -> options that differ
    examples: list = field(default_factory=list)  # inputs for peftlab.predict in 03
    max_new_tokens: int = 32
    notes: str = ""  # extra markdown for 01 (what the offline variant stands in for)
    extra: str = ""  # "judge" (imdb-gen), "t5" (tiny T5 + BillSum stand-in), "deepspeed" (ZeRO run)
    nproc: int = 0  # > 0: a distributed lab; 02 launches this many processes ($PEFTLAB_LAB_NPROC overrides)
    reference: bool = False  # distributed labs: 02 also runs one process at the same global batch
    merge_tolerance: float | None = None  # 04: merge's max |merged - unmerged| (None: merge's default, 1e-4)


SST2_EXAMPLES = ["a gripping, funny and beautifully acted film", "the plot is thin and the jokes fall flat",
                 "an uneven but ultimately rewarding experience"]
MRPC_EXAMPLES = [
    {"text": "The company said profits rose 5% in the third quarter.",
     "text_pair": "Third-quarter profits were up 5 percent, the company said."},
    {"text": "The committee approved the budget on Tuesday.",
     "text_pair": "The weather in Geneva was cold on Tuesday."},
]
CONLL_EXAMPLES = [{"tokens": "Angela Merkel met Emmanuel Macron in Paris on Monday .".split()},
                  {"tokens": "Apple shares rose in New York after the announcement .".split()}]

LABS = [
    LabSpec(
        name="1.1-hf-basics", title="Hugging Face basics: one LoRA run end to end", method="lora",
        idea=("The smallest complete loop of the Hugging Face stack, through peftlab: a tokenizer turns text into "
              "ids, `AutoModelForSequenceClassification` adds a fresh classification head to a pretrained encoder, "
              "peft wraps it (here with LoRA), the `Trainer` runs the optimisation, and the adapter is saved, "
              "reloaded, merged and served. Every later lab follows these four stages."),
        hub="`bert-base-uncased` + GLUE SST-2", offline="bundled `minilm` + SST-2 (`$PEFTLAB_DATA_DIR`)",
        kind="seq-cls", examples=SST2_EXAMPLES),
    LabSpec(
        name="01-lora-qlora", title="LoRA and QLoRA: chat fine-tuning of a decoder", method="qlora",
        idea=("**LoRA** freezes every pretrained weight W and learns a low-rank update: W + (alpha/r)·B·A with "
              "B (d×r) and A (r×k), r ≪ d. **QLoRA** is the same adapter on a base stored in 4-bit NormalFloat "
              "(NF4, double-quantised): the base's memory drops about 4× (a 7B model fits one 24 GB GPU), the "
              "adapter still trains in 16/32-bit. This lab trains both from one recipe (same rank, same layers), "
              "so the only difference is the quantised base."),
        hub="`meta-llama/Llama-2-7b-hf` + `timdettmers/openassistant-guanaco` (the QLoRA paper's Guanaco recipe; "
            "Llama 2 is gated: accept its licence on the Hub and log in)",
        offline="bundled `smollm2` (SmolLM2-135M-Instruct) + the Alpaca sample (instruction following in "
                "place of the Guanaco chats, which are Hub-only)",
        kind="causal-lm", runs={"qlora": {}, "lora": {"method": "lora"}},
        examples=[{"instruction": "Give three tips for staying healthy."},
                  {"instruction": "What is the capital of France?"}],
        max_new_tokens=48),
    LabSpec(
        name="02-adapter", title="Bottleneck adapters (Houlsby)", method="adapter",
        idea=("A small bottleneck MLP, h + up(act(down(h))), is inserted after the attention output and after the "
              "feed-forward output of every layer (Houlsby et al.; the Pfeiffer variant keeps only the second). "
              "Only the adapters and the task head train. The adapter is extra computation in series with the "
              "layer, so it cannot be folded into the base weights."),
        hub="`bert-base-uncased` + GLUE MRPC", offline="bundled `minilm` + MRPC (`$PEFTLAB_DATA_DIR`)",
        kind="seq-cls", examples=MRPC_EXAMPLES),
    LabSpec(
        name="03-prompt-tuning", title="Prompt tuning on an encoder-decoder (summarisation)",
        method="prompt-tuning",
        idea=("Prompt tuning (Lester et al.) learns only n virtual-token embeddings that are prepended to every "
              "input; the model is untouched. It shines on large models (at T5-XXL it matches full fine-tuning) "
              "and needs high learning rates. On an encoder-decoder, the virtual tokens go in front of the "
              "encoder input."),
        hub="`t5-small` + BillSum (`FiscalNote/billsum`)",
        offline=("a tiny **random** T5 built here + a BillSum-format stand-in made from the IMDB reviews "
                 "(summary = the review's first sentence): **code path only**"),
        kind="seq2seq", examples=[{"source": "The committee approved the new budget on Tuesday. It funds schools "
                                             "and roads for two years."}],
        max_new_tokens=24,
        notes=("**Offline, this lab is a code-path exercise.** No pretrained encoder-decoder and no BillSum copy "
               "can be obtained offline, so the offline recipe trains prompt tuning on a tiny random T5 (built in "
               "the next cells, with minilm's WordPiece tokenizer as a stand-in vocabulary) over a BillSum-format "
               "file made from IMDB reviews. Every step runs (virtual tokens on an encoder-decoder, generation, "
               "ROUGE-L, saving, reloading, serving); the summaries and scores mean nothing. Run the Hub recipe "
               "(`PEFTLAB_LAB_RECIPE=hub`) on a machine with Hub access for real results."),
        extra="t5"),
    LabSpec(
        name="04-prefix-tuning", title="Prefix tuning: sentiment-conditioned review generation",
        method="prefix-tuning",
        idea=("Prefix tuning (Li & Liang) prepends n trainable key/value vectors to the attention of **every** "
              "layer; during training they are produced by a small MLP from an n×d embedding "
              "(reparameterisation, more stable), and only the resulting prefix is kept for inference. The model "
              "is frozen; the prefix steers generation."),
        hub="`gpt2` + IMDB (`stanfordnlp/imdb`) as review generation", offline="bundled `smollm2` + the IMDB sample",
        kind="causal-lm", examples=["positive", "negative"], max_new_tokens=48, extra="judge"),
    LabSpec(
        name="05-ia3", title="(IA)3: rescaling activations", method="ia3",
        idea=("(IA)3 (Liu et al., T-Few) learns three vectors per layer that rescale the attention keys and "
              "values and the feed-forward activations elementwise: l ⊙ h. That is the fewest trained parameters "
              "of any method here, and because an elementwise rescaling of a linear layer's input or output is a "
              "rescaling of its weight, it merges into the base."),
        hub="`gpt2` + IMDB review generation", offline="bundled `smollm2` + the IMDB sample",
        kind="causal-lm", examples=["positive", "negative"], max_new_tokens=48, extra="judge"),
    LabSpec(
        name="06-bitfit", title="BitFit: train only the biases", method="bitfit",
        idea=("BitFit (Ben Zaken et al.) freezes every weight matrix and trains only the bias terms (plus the task "
              "head): about 0.1% of BERT's parameters, competitive with full fine-tuning on small GLUE tasks. "
              "The trained model is an ordinary model with new biases, so there is nothing to merge. Llama-family "
              "and T5 linear layers have no biases, so BitFit has nothing to train there."),
        hub="`bert-base-uncased` + GLUE MRPC", offline="bundled `minilm` + MRPC (`$PEFTLAB_DATA_DIR`)",
        kind="seq-cls", examples=MRPC_EXAMPLES),
    LabSpec(
        name="07-p-tuning", title="P-Tuning: virtual tokens from a prompt encoder", method="p-tuning",
        idea=("P-Tuning (Liu et al., 'GPT Understands, Too') prepends n virtual tokens like prompt tuning, but "
              "produces them with a trainable prompt encoder (an MLP, or the paper's bidirectional LSTM + MLP) "
              "over n embeddings, which makes optimisation easier on mid-sized models. At inference only the "
              "encoder's output is kept."),
        hub="`bert-base-uncased` + GLUE SST-2", offline="bundled `minilm` + SST-2 (`$PEFTLAB_DATA_DIR`)",
        kind="seq-cls", examples=SST2_EXAMPLES),
    LabSpec(
        name="08-p-tuning-v2", title="P-Tuning v2: deep prompts across tasks", method="p-tuning-v2",
        idea=("P-Tuning v2 (Liu et al. 2022) is deep prompt tuning: trainable key/value prefixes in every layer "
              "(prefix tuning without the reparameterisation MLP) and a plain classification head. Because the "
              "prompt acts in every layer, it matches fine-tuning across model sizes and on hard sequence "
              "labelling tasks. This lab trains it on three tasks: sentiment (SST-2), paraphrase (MRPC) and "
              "named entities (CoNLL-2003), then serves all three adapters over one base model."),
        hub="`bert-base-uncased` on SST-2, MRPC and CoNLL-2003 (the paper also covers SQuAD and more; "
            "extractive QA is not a peftlab task kind yet)",
        offline="bundled `minilm` on SST-2, MRPC and CoNLL-2003 (`$PEFTLAB_DATA_DIR`)",
        kind="seq-cls", runs={"sst2": {}, "mrpc": {"task": "mrpc"}, "conll2003": {"task": "conll2003"}},
        examples=SST2_EXAMPLES),
    LabSpec(
        name="1.2-ddp", title="Data-parallel training (DDP): one run on N processes", method="lora",
        idea=("**Distributed data parallel** (DDP) runs N copies of the same training process (ranks), one per "
              "GPU (or, on a CPU, N processes sharing the cores). Every rank holds the whole model, takes its own "
              "1/N of each global batch, computes gradients, and an all-reduce averages the gradients across the "
              "ranks before every optimizer step, so all replicas stay identical. One step then sees "
              "`batch_size × grad_accum × N` examples and an epoch has N times fewer steps: with N GPUs an epoch "
              "takes about 1/N of the time. The ranks must be started together by a launcher (`torchrun`, here "
              "through `peftlab train --nproc N`); they rendezvous, form a process group (NCCL on GPUs, gloo on "
              "CPU), and only rank 0 prints, evaluates and saves. This lab trains LoRA on SST-2 with N = 2 and "
              "compares it with one process at the same global batch."),
        hub="`bert-base-uncased` + GLUE SST-2 (`--nproc N`, one GPU per process, NCCL)",
        offline="bundled `minilm` + 4,000 SST-2 examples (`$PEFTLAB_DATA_DIR`), 2 gloo processes on the CPU",
        kind="seq-cls", examples=SST2_EXAMPLES, nproc=2, reference=True),
    LabSpec(
        name="1.3-alpaca-deepspeed", title="Instruction tuning with DeepSpeed ZeRO-2", method="lora",
        idea=("**DeepSpeed ZeRO** (Rajbhandari et al. 2020) is data parallelism without the redundancy: plain DDP "
              "keeps the whole training state (weights, gradients, Adam's fp32 master weights and two moments) on "
              "every rank; ZeRO partitions it across the N ranks. Stage 1 partitions the optimizer state, stage 2 "
              "the gradients too (each rank reduces and keeps only its 1/N), stage 3 the weights as well (gathered "
              "layer by layer when needed). Through the Hugging Face `Trainer` it is one option: "
              "`deepspeed: zero2` in the recipe. This lab instruction-tunes a Llama-family decoder with LoRA on "
              "Alpaca under ZeRO-2 on N = 2 ranks, shows the generated DeepSpeed config and the memory per rank "
              "each stage would need, then reloads, merges and serves the adapter like any other."),
        hub="`TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T` + `tatsu-lab/alpaca` (52k instructions, 512 "
            "tokens), ZeRO-2, `--nproc N` GPUs",
        offline="bundled `smollm2` (SmolLM2-135M-Instruct) + 200 examples of the Alpaca sample, 256 tokens, ZeRO-2 "
                "on 2 gloo processes on the CPU",
        kind="causal-lm", examples=[{"instruction": "Give three tips for staying healthy."},
                                    {"instruction": "What is the capital of France?"}],
        max_new_tokens=48, extra="deepspeed", nproc=2),
]


# ---- cells -----------------------------------------------------------------------------------------

def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


def setup_cell(lab: LabSpec):
    nproc = (f"\nNPROC = lab.nproc({lab.nproc})  # data-parallel processes ($PEFTLAB_LAB_NPROC overrides)\n"
             f"print('processes:', NPROC)") if lab.nproc else ""
    return code(f"""
%matplotlib inline
import json

import pandas as pd
from IPython.display import display

import peftlab
from peftlab import labs

lab = labs.Lab.open({lab.name!r})
lab.describe()
RUNS = {lab.runs!r}  # run name -> options that differ from the recipe{nproc}
""")


def shell_command(lab: LabSpec) -> str:
    return f"peftlab train --config labs/{lab.name}/recipe.offline.yaml" + (f" --nproc {lab.nproc}" if lab.nproc else "")


def header(lab: LabSpec, stage: int, what: str) -> str:
    return (f"# {lab.title} · {stage}. {what}\n\n"
            f"Lab `{lab.name}`, method **{lab.method}**. Notes on the method and measured results: "
            f"[docs/labs/{lab.name}.md](../../docs/labs/{lab.name}.md).")


def setup_notebook(lab: LabSpec):
    cells = [
        md(f"""
{header(lab, 1, "Setup")}

{lab.idea}

| recipe | model and data |
|---|---|
| `recipe.yaml` (Hub default; use a GPU) | {lab.hub} |
| `recipe.offline.yaml` (runs on a CPU, no Hub) | {lab.offline} |

The notebooks run the offline recipe unless `PEFTLAB_LAB_RECIPE=hub`. Runs go to `runs/labs/{lab.name}/`
(or `$PEFTLAB_LAB_OUTPUT`); `PEFTLAB_SMOKE=1` runs every cell on the smallest budgets (what the test
suite does). The same recipe runs from a shell: `{shell_command(lab)}`.
"""),
    ]
    if lab.notes:
        cells.append(md(lab.notes))
    cells += [
        setup_cell(lab),
        md("## The machine\n\nWhat peftlab sees: Python and package versions, CPU/GPU, whether each task's data "
           "and the bundled models can be reached."),
        code("""
from peftlab.env import environment_report, render

report = environment_report(check_models=True)
render(report)
"""),
        md("bf16 is a real speed lever where the hardware runs it natively (GPUs since Ampere, CPUs with "
           "AVX512-BF16/AMX); elsewhere peftlab trains in fp32 (`precision: auto`). A small matrix product in both:"),
        code("labs.device_check()"),
    ]
    if lab.nproc:
        cells += [
            md(f"""
## Processes and devices

This lab trains in `NPROC` processes (default {lab.nproc}; `PEFTLAB_LAB_NPROC` changes it). On GPUs each process
needs a GPU of its own and the ranks talk over NCCL; on a CPU the processes share the cores (each gets
`cores / NPROC` torch threads unless `OMP_NUM_THREADS` says otherwise) and talk over gloo. What that means on
this machine:
"""),
            code("labs.distributed_report(NPROC)"),
        ]
    cells += [
        md("## The data\n\nEvery task is loaded into one normalised schema per task kind (classification: "
           "`text`/`text_pair`/`label`; tagging: `tokens`/`tags`; causal LM: `prompt`/`response`; seq2seq: "
           "`source`/`target`), so preprocessing never looks at a raw file layout."),
    ]
    if lab.extra == "t5":
        cells.append(code("""
options = lab.options()
if lab.variant == "offline":  # the stand-ins of the offline recipe (see above)
    print("tiny random T5:", labs.build_tiny_t5(options["model"]))
    print("BillSum-format stand-in data:", labs.write_billsum_standin(options["data_dir"]))
"""))
    cells.append(code("""
from peftlab.models import load_tokenizer
from peftlab.tasks import get_task

datasets, lengths = {}, {}
for run, overrides in RUNS.items():
    options = lab.options(run, **overrides)
    task = get_task(options["task"])
    train = task.load("train", options.get("data_dir"))
    dev = task.load("dev", options.get("data_dir"))
    datasets[task.name] = train
    print(f"{task.name}: {task.description}\\n  {len(train):,} train / {len(dev):,} dev examples · kind {task.kind} · "
          f"metric {task.metric_name}")
    display(labs.show_examples(train, 3))
"""))
    if lab.extra == "judge":
        cells.append(md("Each review becomes a prompt naming its sentiment and the review (cut to about 64 words) as "
                        "the response: the loss is on the review only."))
    cells += [
        md("How long are the examples in tokens? Everything beyond `max_length` is cut; padding is per batch, so "
           "short tasks cost little."),
        code("""
tokenizer = load_tokenizer(options["model"])
for name, train in datasets.items():
    lengths[name] = labs.token_lengths(train, get_task(name).kind, tokenizer, limit=200 if lab.smoke else 2000)
labs.plot_token_lengths(lengths, options.get("max_length", 128), title="token lengths")
"""),
        md("Next: **02-Train**."),
    ]
    return cells


def train_notebook(lab: LabSpec):
    if lab.nproc:
        return distributed_train_notebook(lab)
    multi = len(lab.runs) > 1
    cells = [
        md(f"""
{header(lab, 2, "Train")}

`peftlab.train` takes the recipe's options (the same names as the CLI flags). While it runs you see a progress
bar (loss, learning rate, examples/s, ETA) and the dev score after every epoch; everything is also written to
`<run>/log.jsonl`, with `metrics.json` (final scores, parameter counts, speed, memory), the adapter, and
`peftlab.json` (what was trained) beside it.
"""),
        setup_cell(lab),
        md("The recipe, as `peftlab.train` will receive it:" if not multi else
           f"One recipe, {len(lab.runs)} runs: " + ", ".join(f"`{r}`" for r in lab.runs) +
           " (the options that differ are in `RUNS`)."),
        code("""
results = {}
for run, overrides in RUNS.items():
    options = lab.options(run, **overrides)
    print(run, json.dumps(options, default=str))
    labs.fresh_run(options["output"])  # re-running this notebook retrains
    results[run] = peftlab.train(**options)
"""),
        md("## Monitoring\n\nTraining loss at every logging step and the dev metric after every epoch, read back "
           "from `log.jsonl`:"),
        code(f"labs.plot_loss({{run: lab.run_dir(run) for run in RUNS}}, title={lab.title!r})"),
        code("labs.summary({run: lab.run_dir(run) for run in RUNS})"),
    ]
    if lab.name == "01-lora-qlora":
        cells.append(md("Same rank, same layers, same data: the QLoRA run stores the frozen base in 4-bit NF4. On "
                        "a GPU that cuts the base's memory about 4×; on a CPU the 4-bit matmuls are dequantised on "
                        "the fly, so QLoRA is slower there and saves memory only on large models."))
    cells.append(md("Next: **03-Inference** reloads these runs from disk."))
    return cells


def distributed_train_notebook(lab: LabSpec):
    deepspeed = lab.extra == "deepspeed"
    cells = [
        md(f"""
{header(lab, 2, "Train")}

A data-parallel run is `NPROC` processes started together by a launcher, so it cannot run inside this
notebook's kernel (one process). `labs.launch(options, NPROC)` writes the options as a recipe beside the run
folder and runs `peftlab train --config <that recipe>` under `torchrun` with `NPROC` ranks, exactly what
`{shell_command(lab)}` does from a shell. It streams rank 0's output here (banner, progress bar, dev score
after each epoch), waits for every rank to exit, and returns the wall time and `metrics.json`. The kernel stays
out of the process group; interrupting it stops every rank.

Rank 0 writes the usual run folder: `log.jsonl`, `metrics.json` (with `effective_batch_size` = batch per
process × grad_accum × NPROC), `peftlab.json` and the adapter.
"""),
        setup_cell(lab),
        code("""
options = lab.options()
print(json.dumps(options, default=str))
labs.fresh_run(options["output"])  # re-running this notebook retrains
launched = {}
"""),
    ]
    if deepspeed:
        cells += [
            md("""
## The DeepSpeed config

`deepspeed: zero2` in the recipe is expanded by `peftlab.distributed.deepspeed_config` into the config below.
Batch sizes, gradient accumulation, clipping and bf16/fp16 are `"auto"`: the `Trainer` fills them in from the
recipe, so the two can never disagree. There is no optimizer section, so the `Trainer`'s AdamW and linear
schedule are used, as in a run without DeepSpeed.
"""),
            code("""
from peftlab.distributed import deepspeed_config

print(json.dumps(deepspeed_config(options["deepspeed"], options.get("offload")), indent=1))
"""),
        ]
    cells += [
        md("## The distributed run"),
        code("""
launched[f"{NPROC} processes"] = labs.launch(options, NPROC, name="run")
print(f"wall time {launched[f'{NPROC} processes']['wall_seconds']} s (start-up of every rank included)")
"""),
        md("## Monitoring\n\nTraining loss at every logging step and the dev metric after every epoch, read back "
           "from `log.jsonl` (rank 0 logs the loss averaged over the ranks):"),
        code(f"labs.plot_loss({{f'{{NPROC}} processes': lab.run_dir()}}, title={lab.title!r})"),
        code("labs.summary({f'{NPROC} processes': lab.run_dir()})"),
    ]
    if lab.reference:
        cells += [
            md("""
## One process at the same global batch

The same recipe in **one** process with `batch_size` × NPROC, so that every optimizer step sees the same
number of examples: same number of steps, same learning-rate schedule, the same loss curve up to dropout
(the ranks draw their own dropout masks; with dropout off the per-step losses agree to about 1e-5). What can
differ is speed. On N GPUs each rank does 1/N of the work of every step, so an epoch takes about 1/N of the
time, minus the gradient all-reduce. On a CPU the processes share the same cores: one process already uses all
of them (intra-op threads), so DDP can only win where one process cannot keep the cores busy, and the
all-reduce and the per-rank start-up cost extra.
"""),
            code("""
per_step = options["batch_size"] * options.get("grad_accum", 1) * NPROC
reference = dict(lab.options("one-process"), batch_size=per_step)
labs.fresh_run(reference["output"])
launched["1 process"] = labs.launch(reference, 1, name="one-process")
"""),
            code("""
table = labs.compare_runs(launched)
display(table)
labs.plot_comparison(table, title=f"{NPROC} processes vs 1 process, global batch {per_step}")
"""),
            code("labs.plot_loss({label: result['output'] for label, result in launched.items()}, "
                 "title='same global batch')"),
            md("The loss curves should lie on top of each other (same data order, same global batches); the dev "
               "metric should agree within the noise of dropout. `launch wall s` includes what every process "
               "pays before the first step (importing torch, loading the model, the rendezvous); `train s` "
               "and examples/s count the training loop only."),
        ]
    if deepspeed:
        cells += [
            md("""
## Memory per rank

What ZeRO saves is memory, not time. The ZeRO paper's accounting of the model state per rank for this run
(LoRA: the frozen base dominates, the trainable part is tiny) and for full fine-tuning of the same model, at
this run's precision and number of ranks (activations and temporary buffers not included; docs/scaling.md has
measured numbers). With LoRA, ZeRO-2 partitions almost nothing; ZeRO-3 splits the frozen base across the
ranks. For full fine-tuning ZeRO-2 already removes most of the optimizer state from every rank.
"""),
            code("""
m = labs.load_metrics(lab.run_dir())
memory = labs.zero_memory(m["total_params"], m["trainable_params"], NPROC, m["precision"])
display(memory)
labs.plot_zero_memory(memory)
"""),
        ]
    cells.append(md("Next: **03-Inference** reloads the adapter from disk, in this one process: inference needs "
                    "no launcher."))
    return cells


DISTRIBUTED_INFERENCE = """
The run was trained in several processes, but what rank 0 saved is an ordinary adapter (under DeepSpeed
ZeRO the partitioned tensors are gathered before saving), so inference runs in this one process, no launcher.
"""


def inference_notebook(lab: LabSpec):
    first = next(iter(lab.runs))
    cells = [
        md(f"""
{header(lab, 3, "Inference")}

Reload the trained adapter from disk (base model + adapter, as a fresh process would), predict, score the dev
set, and measure what the method costs at inference: latency at batch 1 and batch 32, adapter vs base model.
{DISTRIBUTED_INFERENCE if lab.nproc else ""}"""),
        setup_cell(lab),
        code(f"""
RUN = lab.run_dir({first!r})
loaded = peftlab.load_trained(RUN)
m = loaded.manifest
print(f"{{m.method}} on {{m.task}} ({{m.kind}}), base {{m.model}}; inference cost: {{loaded.method.inference_cost()}}")
"""),
        md("## Predictions"),
    ]
    if lab.name in ("01-lora-qlora", "1.3-alpaca-deepspeed"):
        cells.append(code(f"""
from peftlab.tasks.alpaca import format_prompt

EXAMPLES = {lab.examples!r}
prompts = [{{"prompt": format_prompt(e["instruction"])}} for e in EXAMPLES]  # the recipe's prompt template
for run in RUNS:
    adapter = loaded if run == {first!r} else peftlab.load_trained(lab.run_dir(run))
    for example, prediction in zip(EXAMPLES, peftlab.predict(adapter, prompts, max_new_tokens={lab.max_new_tokens})):
        print(f"[{{run}}] {{example['instruction']}}\\n  -> {{prediction['generated']!r}}")
"""))
    elif lab.name == "08-p-tuning-v2":
        cells.append(code(f"""
EXAMPLES = {{"sst2": {SST2_EXAMPLES!r},
            "mrpc": {MRPC_EXAMPLES!r},
            "conll2003": {CONLL_EXAMPLES!r}}}
adapters = {{run: (loaded if run == {first!r} else peftlab.load_trained(lab.run_dir(run))) for run in RUNS}}
for run, adapter in adapters.items():
    print(run)
    display(pd.DataFrame(peftlab.predict(adapter, EXAMPLES[run])).drop(columns=["probabilities"], errors="ignore"))
"""))
    else:
        cells.append(code(f"""
EXAMPLES = {lab.examples!r}
pd.DataFrame(peftlab.predict(loaded, EXAMPLES, max_new_tokens={lab.max_new_tokens}))
"""))
    cells += [
        md("## Dev score of the reloaded adapter\n\nThe same number training reported, recomputed from disk:"),
        code("""
for run in RUNS:
    scores = peftlab.evaluate(lab.run_dir(run), loaded=loaded if run == next(iter(RUNS)) else None,
                              max_eval_samples=lab.eval_limit, data_dir=lab.data_dir)
    print(f"{run}: dev {scores['metric_name']} = {scores['metric']:.4f} on {scores['eval_examples']} examples")
"""),
    ]
    if lab.extra == "t5":
        cells += [
            md("BillSum's metric is ROUGE-L F1 of *generated* summaries (longest common subsequence of words; "
               "implemented in `peftlab.tasks.billsum`, as `rouge_score` is not installed). On the offline stand-in "
               "with a random T5 it is near zero, as expected."),
            code("""
rouge = labs.generation_scores(loaded, n=8 if lab.smoke else 32, max_new_tokens=24 if lab.smoke else 96,
                               data_dir=lab.data_dir)
print(rouge["scores"])
pd.DataFrame(rouge["examples"][:3])
"""),
        ]
    if lab.extra == "judge":
        cells += [
            md("""
## Does the review carry the requested sentiment?

Perplexity says how well the model fits IMDB reviews, not whether it follows the requested sentiment. A
sentiment classifier trained with peftlab itself (LoRA on minilm over the IMDB reviews; trained once and shared
by the generation labs) judges each generated review; agreement is the share it labels with the requested
sentiment. The base model, without the adapter, is the reference.
"""),
            code("""
judge = labs.train_sentiment_judge(lab.output.parent / "imdb-judge")
n = 2 if lab.smoke else 8
tuned = labs.sentiment_agreement(labs.generate_reviews(loaded, n, max_new_tokens=16 if lab.smoke else 64), judge)
base = labs.base_of(loaded)
reference = labs.sentiment_agreement(labs.generate_reviews(base, n, max_new_tokens=16 if lab.smoke else 64), judge)
print(f"agreement with the requested sentiment: adapter {tuned['agreement']:.0%} {tuned['per_sentiment']} · "
      f"base model {reference['agreement']:.0%}")
pd.DataFrame(tuned["rows"])
"""),
        ]
    cells += [
        md("## Latency\n\n`peftlab.predict` over the same 32 dev inputs, one at a time (batch 1) and all at once "
           "(batch 32), for the adapter and for the base model without it: milliseconds per example (median of "
           "the repeats; tokenisation included"
           + ("; 16 new tokens generated greedily" if lab.kind in ("causal-lm", "seq2seq") else "")
           + "). Batching amortises the per-call overhead; methods that add virtual tokens or prefixes make every "
           "sequence longer; merged or selective methods cost nothing extra."),
        code(f"""
inputs = labs.dev_inputs(loaded, 32, lab.data_dir)
{"# `base` (the model without the adapter) was loaded above" if lab.extra == "judge" else "base = labs.base_of(loaded)"}
latency = {{f"{{m.method}} adapter": labs.measure_latency(loaded, inputs, (1, 32), repeats=1 if lab.smoke else 3),
           "base model": labs.measure_latency(base, inputs, (1, 32), repeats=1 if lab.smoke else 3)}}
display(pd.DataFrame([dict(model=k, **row) for k, rows in latency.items() for row in rows]))
labs.plot_latency(latency, title=f"{{m.method}} vs base model ({{m.model.split('/')[-1]}}, {{m.task}})")
"""),
        md("Next: **04-Merge_and_Deploy**."),
    ]
    return cells


def deploy_notebook(lab: LabSpec):
    first = next(iter(lab.runs))
    mergeable = get_method_class(lab.method).mergeable  # the method's declared fact
    cells = [
        md(f"""
{header(lab, 4, "Merge and deploy")}

{"**" + lab.method + " is mergeable**: its update is a change to existing weights, so it can be folded into the base and the result deployed as an ordinary transformers model with no adapter code and no extra latency." if mergeable else "**" + lab.method + " is not mergeable**: what it trains is extra computation or extra inputs, not a change to existing weights. It is deployed *unmerged*: the base model plus the adapter, served together (`peftlab serve`), or exported with the adapter inside the graph (`peftlab export`) where the graph allows it."}
"""),
        setup_cell(lab),
        code(f"""
from peftlab.errors import PeftlabError

merge = labs.optional("peftlab.merge", "merge")  # None on a peftlab without `peftlab merge`
serving = labs.optional("peftlab.serving")  # `peftlab serve`
RUN = lab.run_dir({first!r})
loaded = peftlab.load_trained(RUN)
print(f"{{loaded.method.name}}: mergeable = {{loaded.method.mergeable}}")
"""),
    ]
    if lab.extra == "deepspeed":
        cells += [
            md("## The adapter saved under ZeRO\n\nUnder ZeRO each rank holds only its partition of the training "
               "state (under ZeRO-3 even of the weights), so saving the model as rank 0 sees it can write empty "
               "or stale tensors, a classic failure of hand-written PEFT + DeepSpeed scripts. peftlab gathers the "
               "full fp32 value of every trainable tensor on all ranks before rank 0 writes. Every tensor in the "
               "saved adapter is complete:"),
            code("""
tensors = labs.adapter_tensors(RUN)
display(tensors.head(6))
print(f"{len(tensors)} tensors, {tensors['elements'].sum():,} values; empty: {int((tensors['elements'] == 0).sum())}, "
      f"all-zero: {int((tensors['norm'] == 0).sum())} (LoRA's B matrices start at zero and must have moved)")
"""),
        ]
    if mergeable:
        cells += [
            md("## Merge and verify\n\n`merge` folds the adapter into a copy of the base, saves it, reloads the "
               "saved folder and checks that it reproduces the unmerged model's outputs (max |difference| within "
               "the tolerance), else it writes nothing."
               + (" For QLoRA the merge goes into a float32 copy of the base: folding B·A into 4-bit weights "
                  "would re-quantise the sum and lose most of the update." if lab.method == "qlora" else "")
               + (f" The tolerance here is {lab.merge_tolerance:g} instead of merge's default 1e-4: a causal LM's "
                  "logits reach about ±35 over a 49k-token vocabulary, and W·x + B·(A·x) and (W + B·A)·x round "
                  "differently in float32 (measured on the offline recipe's run: 1.03e-4, a relative error of "
                  "3e-6). A wrong merge is off by orders of magnitude more." if lab.merge_tolerance else "")),
            code("""
merged_dirs = {}
if merge is not None:
    for run in RUNS:
        merged_dirs[run] = lab.output / f"{run}-merged"
        report = merge(lab.run_dir(run), merged_dirs[run], data_dir=lab.data_dir@TOLERANCE@)
        print({k: report[k] for k in ("method", "auto_class", "max_abs_diff", "tolerance", "samples")})
""".replace("@TOLERANCE@", f", tolerance={lab.merge_tolerance!r}" if lab.merge_tolerance else "")),
            md("The merged folder is a plain transformers model: load it **without peft** and compare predictions "
               "with the adapter's."),
            code(f"""
if merged_dirs:
    merged = labs.loaded_from_folder(merged_dirs[{first!r}], loaded)
    print("merged model class:", type(merged.model).__name__, "· peft wrapper:", hasattr(merged.model, "peft_config"))
    inputs = labs.dev_inputs(loaded, 8, lab.data_dir)
    before = peftlab.predict(loaded, inputs, max_new_tokens=16)
    after = peftlab.predict(merged, inputs, max_new_tokens=16)
    key = "label" if "label" in before[0] else ("generated" if "generated" in before[0] else "tags")
    same = sum(a[key] == b[key] for a, b in zip(before, after))
    print(f"{{same}}/{{len(inputs)}} identical predictions ({{key}}) between the adapter and the merged model")
"""),
            md("## What merging buys\n\nSize on disk (the adapter alone vs a standalone model) and latency "
               "(unmerged adapter vs merged model):"),
            code(f"""
if merged_dirs:
    print(f"adapter {{labs.folder_size_mb(loaded.adapter_dir):.1f}} MB · merged model "
          f"{{labs.folder_size_mb(merged_dirs[{first!r}]):.1f}} MB")
    inputs = labs.dev_inputs(loaded, 32, lab.data_dir)
    repeats = 1 if lab.smoke else 3
    latency = {{"unmerged adapter": labs.measure_latency(loaded, inputs, (1, 32), repeats=repeats),
               "merged": labs.measure_latency(merged, inputs, (1, 32), repeats=repeats)}}
    display(labs.plot_latency(latency, title=f"{{loaded.method.name}}: unmerged vs merged"))
"""),
            md("## Deploy\n\nThe merged folder loads anywhere transformers runs: "
               "`AutoModelFor...from_pretrained(folder)`. It can also be served (`peftlab serve --base "
               "<base> --adapter name=<merged folder>`) or exported to ONNX (`peftlab export --model <merged "
               "folder>`). In-process, through the same HTTP API `peftlab serve` exposes:"),
            code(f"""
if merged_dirs and serving:
    endpoint = "/v1/generate" if loaded.kind in ("causal-lm", "seq2seq") else "/v1/predict"
    with labs.served(loaded.manifest.model, {{"merged": merged_dirs[{first!r}]}}) as client:
        response = client.post(endpoint, json={{"adapter": "merged", "inputs": labs.dev_inputs(loaded, 2, lab.data_dir)}})
        print(response.status_code, json.dumps(response.json(), indent=1)[:800])
"""),
        ]
    else:
        names = {run: f"{lab.name.split('-', 1)[1]}-{run}" if run != "run" else lab.name.split("-", 1)[1]
                 for run in lab.runs}
        cells += [
            md("## Why it cannot be merged\n\n`merge` refuses, and says why and what to do instead:"),
            code("""
if merge is not None:
    try:
        merge(RUN, lab.output / "merged")
    except PeftlabError as error:
        print(error)
"""),
            md("## Serve it unmerged\n\n`peftlab serve` keeps **one** base model in memory and runs any number of "
               "adapters over it (adapters of the same kind share one forward where peft allows). Here the server "
               "runs in this process behind a test client, with the same HTTP API as `peftlab serve --base "
               "<base> --adapter name=<run>`"
               + (": all three task adapters over one minilm." if len(lab.runs) > 1 else ".")),
            code(f"""
ADAPTERS = {{name: lab.run_dir(run) for run, name in {names!r}.items()}}
endpoint = "/v1/generate" if loaded.kind in ("causal-lm", "seq2seq") else "/v1/predict"
if serving:
    with labs.served(loaded.manifest.model, ADAPTERS) as client:
        print(json.dumps(client.get("/v1/adapters").json(), indent=1)[:1200])
        for name, run_dir in ADAPTERS.items():
            body = {{"adapter": name, "inputs": labs.dev_inputs(run_dir, 2, lab.data_dir)}}
            if endpoint == "/v1/generate":
                body["max_new_tokens"] = 16
            response = client.post(endpoint, json=body)
            print(name, response.status_code, json.dumps(response.json())[:600])
        print("server stats:", json.dumps(client.get("/v1/stats").json())[:600])
else:  # the unmerged adapter still runs in-process
    display(pd.DataFrame(peftlab.predict(loaded, labs.dev_inputs(loaded, 2, lab.data_dir), max_new_tokens=16)))
"""),
        ]
        cells += [
            md("## Export it unmerged\n\n`peftlab export` traces the base model *with* the adapter into one "
               "ONNX graph and checks onnxruntime against PyTorch at two batch sizes and lengths; a graph that "
               "does not reproduce PyTorch is refused with the reason, and serving (above) is then the way to "
               "deploy."
               + (" peftlab does not export encoder-decoder (seq2seq) models, so here the export is refused and "
                  "serving is the deployment path." if lab.kind == "seq2seq" else "")),
            code("""
export = labs.optional("peftlab.export", "export")
if export is not None:
    try:
        report = export(adapter=RUN, output=lab.output / "onnx", data_dir=lab.data_dir)
        print({k: report[k] for k in ("method", "merged", "fp32_bytes", "verification")})
    except PeftlabError as error:
        print("not exported:", error)
"""),
        ]
    cells.append(md("That completes the lab. The method, its parameter formula and the numbers measured here are in "
                    f"[docs/labs/{lab.name}.md](../../docs/labs/{lab.name}.md)."))
    return cells


BUILDERS = {"01-Setup": setup_notebook, "02-Train": train_notebook, "03-Inference": inference_notebook,
            "04-Merge_and_Deploy": deploy_notebook}


def build(lab: LabSpec, stage: str):
    notebook = new_notebook(cells=BUILDERS[stage](lab))
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "peftlab": {"lab": lab.name, "stage": stage, "generated_by": "labs/make_notebooks.py"},
    }
    for index, cell in enumerate(notebook.cells):  # stable ids: regenerating gives identical files
        cell["id"] = f"{stage.split('-')[0]}-{index:02d}"
    return notebook


def write_all(check: bool = False) -> list[Path]:
    changed = []
    for lab in LABS:
        folder = HERE / lab.name
        folder.mkdir(exist_ok=True)
        for stage in NOTEBOOKS:
            path = folder / f"{stage}.ipynb"
            text = nbformat.writes(build(lab, stage)) + "\n"
            if not path.is_file() or path.read_text() != text:
                changed.append(path)
                if not check:
                    path.write_text(text)
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report notebooks that differ")
    args = parser.parse_args(argv)
    changed = write_all(check=args.check)
    for path in changed:
        print(("differs: " if args.check else "wrote: ") + str(path.relative_to(HERE.parent)))
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
