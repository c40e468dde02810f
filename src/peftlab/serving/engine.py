"""The serving engine: one base model in memory, many adapters over it, one inference thread.

Weights
-------
The base checkpoint is read once per task kind it serves (sequence classification, token
classification, causal LM); the second and later kinds are re-pointed at the first copy's tensors, so
one copy of the backbone stays in memory. Heads of other widths (3 labels next to 2) are derived from
that copy with only a new head. These "skeletons" are never modified.

peft 0.21 cannot put adapters of different peft types on one ``PeftModel`` (``add_adapter`` raises
"Cannot combine adapters with different peft types"), and ``PeftMixedModel`` covers LoRA-family tuners
only (no IA3, no prompt learning). So adapters are grouped into **slots** by compatibility: one slot
per (task kind, head width, peft type). A slot is a copy of the skeleton's *module tree* whose
parameters are the skeleton's very tensors (``copy.deepcopy`` with every shared parameter pre-seeded
in the memo), wrapped in one ``PeftModel``; the first adapter of a slot is loaded with
``PeftModel.from_pretrained(..., adapter_name=...)``, the next ones with ``load_adapter``. LoRA, IA3,
prompt tuning, P-Tuning and prefix tuning / P-Tuning v2 thus run side by side on one set of base
weights. Each classification adapter brings its own head (peft ``modules_to_save``) and label names.
peftlab's own methods get a slot each: the bottleneck adapter injects its layers into its own module
tree (base tensors shared), BitFit gets private copies of the bias vectors (everything else shared), a
full fine-tune is its own model.

Concurrency
-----------
HTTP handlers never touch a model. A request is validated, turned into a job and put on one queue;
a single worker thread takes jobs, forms a micro-batch of what is waiting (no added wait: under load
the queue fills while a forward runs), groups it by slot and runs it. Within a LoRA slot, requests for
different adapters go through **one** forward with peft's ``adapter_names=`` (mixed-adapter batch);
other slots run one forward per adapter after ``set_adapter``. Every forward (with its
``set_adapter``) and every change to a live model happens on that thread while it holds
``model_lock``. Loading an adapter checks the folder and loads it onto a private copy of the module
tree in the caller's thread (inference keeps running); joining an existing slot (``load_adapter``)
is a job on the same queue. Unloading removes the name at once (new requests get 404) and queues the
``delete_adapter`` job behind every request already accepted, so in-flight requests finish on the
adapter they asked for.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import queue
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from peftlab.errors import PeftlabError
from peftlab.serving.adapters import AdapterSpec, check_name, inspect_adapter


class UnknownAdapter(PeftlabError):
    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        listing = ", ".join(known) if known else "none loaded"
        super().__init__(f"Unknown adapter '{name}'. Loaded adapters: {listing}.")


class AdapterGone(PeftlabError):
    """The adapter was unloaded between accepting a request and running it."""


class AdapterConflict(PeftlabError):
    pass


class Overloaded(PeftlabError):
    pass


# ---- sharing weights between module trees -----------------------------------------------------------

def clone_sharing(model, private: Callable[[str], bool] = lambda name: False):
    """A deep copy of ``model``'s module tree whose parameters and buffers ARE ``model``'s tensors,
    except parameters for which ``private(name)`` is true (those are copied)."""
    memo: dict[int, Any] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if not private(name):
            memo[id(parameter)] = parameter
    for _, buffer in model.named_buffers(remove_duplicate=False):
        memo[id(buffer)] = buffer
    return copy.deepcopy(model, memo)


def share_parameters(donor, model, *, skip_prefixes: tuple[str, ...] = ()) -> int:
    """Point ``model``'s parameters at ``donor``'s where name, shape and dtype agree; returns how many.

    Tied parameters (one tensor under two names) stay tied: the mapping is by tensor identity.
    """
    donor_named = dict(donor.named_parameters(remove_duplicate=False))
    mapping: dict[int, Any] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name.split(".")[0] in skip_prefixes:
            continue
        source = donor_named.get(name)
        if source is not None and source.shape == parameter.shape and source.dtype == parameter.dtype:
            mapping[id(parameter)] = source
    for module in model.modules():
        for key, parameter in list(module._parameters.items()):
            if parameter is not None and id(parameter) in mapping:
                module._parameters[key] = mapping[id(parameter)]
    return len(mapping)


def _head_private(name: str) -> bool:
    from peftlab.methods.base import HEAD_NAMES

    return name.split(".")[0] in HEAD_NAMES


def _bias_or_head_private(name: str) -> bool:
    return _head_private(name) or name.rsplit(".", 1)[-1] == "bias"


def resize_head(model, n_outputs: int) -> bool:
    """Give a classification model a fresh head with ``n_outputs`` outputs (in place); False if unknown."""
    import torch
    from torch import nn

    from peftlab.methods.base import head_modules

    old = int(getattr(model.config, "num_labels", 0))
    replaced = False
    for attribute, head in head_modules(model).items():
        for path, module in list(head.named_modules()):  # ("", head) first
            if isinstance(module, nn.Linear) and module.out_features == old:
                new = nn.Linear(module.in_features, n_outputs, bias=module.bias is not None,
                                dtype=module.weight.dtype)
                with torch.no_grad():
                    new.weight.normal_(0.0, 0.02)
                    if new.bias is not None:
                        new.bias.zero_()
                if path == "":
                    setattr(model, attribute, new)
                else:
                    parent_path, _, leaf = path.rpartition(".")
                    parent = head.get_submodule(parent_path) if parent_path else head
                    setattr(parent, leaf, new)
                replaced = True
                break
    if replaced:
        model.config.num_labels = n_outputs
    return replaced


# ---- the engine's records ---------------------------------------------------------------------------

@dataclass
class Slot:
    """One module tree over the shared base weights, holding one or more compatible adapters."""

    id: str
    key: tuple
    kind: str
    model: Any
    peft_type: str | None
    adapters: dict[str, str] = field(default_factory=dict)  # public name -> internal (peft) name
    mixed: bool = False  # LoRA slot: several adapters in one forward (adapter_names=)
    alive: bool = True

    @property
    def is_peft(self) -> bool:
        return self.peft_type is not None


@dataclass
class AdapterEntry:
    spec: AdapterSpec
    slot: Slot
    internal: str
    loaded_at: float
    tokenizer: Any
    generation_tokenizer: Any
    unloaded: bool = False  # set by the worker thread when its weights are gone

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    def info(self) -> dict[str, Any]:
        manifest = self.spec.manifest
        return {
            "name": self.name,
            "method": manifest.method,
            "task": manifest.task,
            "kind": manifest.kind,
            "labels": self.spec.label_names,
            "is_regression": manifest.is_regression,
            "max_length": manifest.max_length,
            "path": str(self.spec.path),
            "peft_type": self.spec.peft_type,
            "group": self.slot.id,
            "group_adapters": sorted(self.slot.adapters),
            "mixed_batching": self.slot.mixed,
            "adapter_parameters": self.spec.parameters,
            "loaded_at": self.loaded_at,
            "notes": self.spec.notes,
        }


@dataclass
class Job:
    entry: AdapterEntry
    op: str  # "predict" | "generate"
    records: list[dict]  # normalised inputs (peftlab.kinds.TaskKind.record_from_input)
    raw: list[Any]
    max_new_tokens: int = 32
    future: Future = field(default_factory=Future)

    @property
    def rows(self) -> int:
        return len(self.records)


@dataclass
class Control:
    function: Callable[[], Any]
    future: Future = field(default_factory=Future)


_STOP = object()


class LatencyStats:
    """Counts and a bounded window of latencies (ms) for percentiles."""

    def __init__(self, window: int = 4096):
        self.requests = 0
        self.errors = 0
        self.inputs = 0
        self.latencies: deque[float] = deque(maxlen=window)

    def record(self, milliseconds: float, inputs: int, error: bool) -> None:
        self.requests += 1
        self.inputs += inputs
        if error:
            self.errors += 1
        else:
            self.latencies.append(milliseconds)

    def summary(self) -> dict[str, Any]:
        values = sorted(self.latencies)
        return {"requests": self.requests, "errors": self.errors, "inputs": self.inputs,
                "latency_ms": {"p50": percentile(values, 50), "p95": percentile(values, 95),
                               "p99": percentile(values, 99), "window": len(values)}}


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return round(sorted_values[rank], 3)


# ---- the engine -------------------------------------------------------------------------------------

class Engine:
    """Base model + adapters + the inference worker. Thread-safe public methods."""

    def __init__(self, base: str, *, max_batch_rows: int = 64, queue_size: int = 1024, device: str = "cpu",
                 threads: int | None = None):
        import torch
        import transformers

        if threads:  # torch's intra-op threads (process-wide). On a busy or small machine 1 is often fastest.
            torch.set_num_threads(int(threads))

        from peftlab.models import load_tokenizer, resolve_model

        self.base_name = base
        resolved = resolve_model(base)
        self.base_resolved = os.path.realpath(resolved) if os.path.exists(resolved) else resolved
        try:
            self.base_config = transformers.AutoConfig.from_pretrained(resolved)
        except (OSError, ValueError) as error:
            raise PeftlabError(f"Could not read the base model '{base}' ({str(error).splitlines()[0][:200]}).") from None
        self.tokenizer = load_tokenizer(base)
        self.device = device
        self.max_batch_rows = max(1, int(max_batch_rows))
        self.model_lock = threading.RLock()  # held for every forward and every change to a live model
        self._registry_lock = threading.Lock()  # adapters, slots, pending names, metrics
        self._skeleton_lock = threading.Lock()
        self._adapters: dict[str, AdapterEntry] = {}
        self._pending: set[str] = set()
        self._slots: dict[tuple, Slot] = {}
        self._skeletons: dict[tuple, Any] = {}
        self._donor = None
        self._counter = itertools.count(1)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self._stats: dict[str, LatencyStats] = {}
        self._totals = LatencyStats()
        self._batches = {"batches": 0, "rows": 0, "mixed_adapter_batches": 0, "max_rows": 0}
        self.started_at = time.time()
        self._worker = threading.Thread(target=self._run, name="peftlab-serve-worker", daemon=True)
        self._worker.start()

    # ---- skeletons (pristine models sharing one copy of the base weights) --------------------------
    def _skeleton(self, kind: str, n_outputs: int | None, labels: list[str] | None, is_regression: bool):
        import torch

        from peftlab.models import load_model

        key = (kind, n_outputs)
        with self._skeleton_lock:
            if key in self._skeletons:
                return self._skeletons[key]
            kind_key = next((k for k in self._skeletons if k[0] == kind), None)
            if kind_key is not None and n_outputs is not None:
                model = clone_sharing(self._skeletons[kind_key], private=_head_private)
                if not resize_head(model, n_outputs):
                    model = None
            else:
                model = None
            if model is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = load_model(self.base_name, kind, label_names=labels if not is_regression else None,
                                       is_regression=is_regression, dtype=torch.float32)
                if self._donor is None:
                    self._donor = model
                else:
                    share_parameters(self._donor, model, skip_prefixes=_head_prefixes())
            model.to(self.device)
            model.eval()
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            self._skeletons[key] = model
            return model

    # ---- adapters -------------------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Check and load an adapter; raises PeftlabError (refused), AdapterConflict (name taken)."""
        check_name(name)
        with self._registry_lock:
            if name in self._adapters or name in self._pending:
                raise AdapterConflict(f"An adapter named '{name}' is already loaded: unload it first "
                                      f"(DELETE /v1/adapters/{name}) or choose another name.")
            self._pending.add(name)
        try:
            try:
                spec = inspect_adapter(name, path, base_name=self.base_name, base_resolved=self.base_resolved,
                                       base_model_type=getattr(self.base_config, "model_type", None))
            except PeftlabError as error:
                raise PeftlabError(f"Refusing adapter '{name}' from '{path}': {error}") from None
            entry = self._load(spec)
            with self._registry_lock:
                self._adapters[name] = entry
                self._stats.setdefault(name, LatencyStats())
            return entry.info()
        finally:
            with self._registry_lock:
                self._pending.discard(name)

    def _load(self, spec: AdapterSpec) -> AdapterEntry:
        from peftlab.methods import get_method

        manifest = spec.manifest
        internal = f"a{next(self._counter)}"
        tokenizer = self.tokenizer
        generation_tokenizer = copy.deepcopy(self.tokenizer) if spec.kind in ("causal-lm", "seq2seq") else None
        if manifest.method == "merged":
            model = self._load_merged(spec)
            slot = Slot(id=f"merged-{internal}", key=("native", internal), kind=spec.kind, model=model,
                        peft_type=None, adapters={spec.name: internal})
            with self._registry_lock:
                self._slots[slot.key] = slot
            return AdapterEntry(spec, slot, internal, time.time(), tokenizer, generation_tokenizer)
        skeleton = self._skeleton(spec.kind, spec.n_outputs, spec.label_names, manifest.is_regression)
        method = get_method(manifest.method, **(manifest.method_options or {}))
        if spec.peft_type is None:
            model = self._load_native(spec, method, skeleton)
            slot = Slot(id=f"{spec.method}-{internal}", key=("native", internal), kind=spec.kind, model=model,
                        peft_type=None, adapters={spec.name: internal})
            with self._registry_lock:
                self._slots[slot.key] = slot
            return AdapterEntry(spec, slot, internal, time.time(), tokenizer, generation_tokenizer)

        # peft: load on a private copy first (every check runs there, nothing live is touched) ...
        probe = self._load_peft_probe(spec, method, skeleton, internal)
        key = (spec.kind, spec.n_outputs, spec.peft_type)
        with self._registry_lock:
            slot = self._slots.get(key)
        if slot is not None:
            # ... then join the existing slot of the same kind (one PeftModel, shared module tree).
            try:
                self.run_control(lambda: self._join_slot(slot, spec, internal))
            except _JoinFailed as failure:
                slot = None
                spec.notes.append(f"kept in its own group ({failure})")
        if slot is None:
            slot = Slot(id=f"{spec.peft_type.lower()}-{spec.kind}-{internal}", key=key, kind=spec.kind, model=probe,
                        peft_type=spec.peft_type, adapters={spec.name: internal},
                        mixed=spec.peft_type == "LORA" and spec.kind in ("seq-cls", "token-cls"))
            with self._registry_lock:
                if key not in self._slots:
                    self._slots[key] = slot
                else:  # another load raced us to this key: keep this one as a separate group
                    slot.key = key + (internal,)
                    self._slots[slot.key] = slot
        return AdapterEntry(spec, slot, internal, time.time(), tokenizer, generation_tokenizer)

    def _load_merged(self, spec: AdapterSpec):
        import torch
        import transformers

        from peftlab.models import AUTO_CLASSES

        auto_class = getattr(transformers, AUTO_CLASSES[spec.kind])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = auto_class.from_pretrained(str(spec.adapter_dir), dtype=torch.float32, use_safetensors=True)
        except Exception as error:  # noqa: BLE001
            raise PeftlabError(f"Refusing adapter '{spec.name}': the merged model does not load "
                               f"({_first_line(error)}).") from None
        if getattr(model.config, "model_type", None) != getattr(self.base_config, "model_type", None):
            raise PeftlabError(f"Refusing adapter '{spec.name}': it is a {model.config.model_type} model; this "
                               f"server's base is a {self.base_config.model_type} model.")
        model.to(self.device)
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model

    def _load_native(self, spec: AdapterSpec, method, skeleton):
        private = _bias_or_head_private if spec.method == "bitfit" else _head_private
        base = clone_sharing(skeleton, private=private) if spec.method != "full" else skeleton
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = method.load(base, spec.adapter_dir, spec.kind)
        except PeftlabError as error:
            raise PeftlabError(f"Refusing adapter '{spec.name}': {error}") from None
        except Exception as error:  # noqa: BLE001
            raise PeftlabError(f"Refusing adapter '{spec.name}': its weights do not fit the base model "
                               f"({_first_line(error)}).") from None
        if hasattr(model, "_peftlab_kind"):
            model.__dict__.pop("_peftlab_kind", None)
        model.to(self.device)
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model

    def _load_peft_probe(self, spec: AdapterSpec, method, skeleton, internal: str):
        from peft import PeftModel

        tree = clone_sharing(skeleton, private=_head_private)
        prepare = getattr(method, "_prepare", None)  # prefix tuning: the transformers-5 signature shim
        if prepare is not None:
            prepare(tree, spec.kind)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = PeftModel.from_pretrained(tree, str(spec.adapter_dir), adapter_name=internal,
                                                  is_trainable=False)
        except Exception as error:  # noqa: BLE001 - peft/torch raise ValueError, RuntimeError, KeyError...
            raise PeftlabError(f"Refusing adapter '{spec.name}': its weights do not fit the base model "
                               f"'{self.base_name}' ({_first_line(error)}).") from None
        problems = _state_mismatch(model, internal, spec)
        if problems:
            raise PeftlabError(f"Refusing adapter '{spec.name}': its weights do not fit the base model "
                               f"'{self.base_name}' ({problems}).")
        finish = getattr(method, "_finish", None)  # what method.load() does after peft's load (generate() fixes)
        if finish is not None:
            model = finish(model, spec.kind) or model
        model.to(self.device)
        model.eval()
        return model

    def _join_slot(self, slot: Slot, spec: AdapterSpec, internal: str) -> None:
        """(worker thread) load_adapter into a live slot; on any failure undo and report."""
        if not slot.alive:
            raise _JoinFailed("its group was unloaded meanwhile")
        model = slot.model
        with self.model_lock:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.load_adapter(str(spec.adapter_dir), adapter_name=internal, is_trainable=False)
                problems = _state_mismatch(model, internal, spec)
                if problems:
                    raise RuntimeError(problems)
            except Exception as error:  # noqa: BLE001
                if internal in getattr(model, "peft_config", {}):
                    try:
                        model.delete_adapter(internal)
                    except Exception:  # noqa: BLE001
                        pass
                raise _JoinFailed(f"could not join group {slot.id}: {_first_line(error)}") from None
            model.eval()
            slot.adapters[spec.name] = internal

    def remove_adapter(self, name: str) -> dict[str, Any]:
        """Unload: the name disappears now; the weights go after the requests already accepted for it."""
        with self._registry_lock:
            entry = self._adapters.pop(name, None)
            known = sorted(self._adapters)
        if entry is None:
            raise UnknownAdapter(name, known)
        self.run_control(lambda: self._unload(entry))
        return {"unloaded": name, "method": entry.spec.method, "group": entry.slot.id}

    def _unload(self, entry: AdapterEntry) -> None:
        slot = entry.slot
        with self.model_lock:
            entry.unloaded = True
            slot.adapters.pop(entry.name, None)
            if slot.adapters:
                slot.model.delete_adapter(entry.internal)
            else:
                slot.alive = False
                with self._registry_lock:
                    if self._slots.get(slot.key) is slot:
                        del self._slots[slot.key]
                slot.model = None

    def adapters(self) -> list[dict[str, Any]]:
        with self._registry_lock:
            entries = list(self._adapters.values())
        return [entry.info() for entry in sorted(entries, key=lambda e: e.name)]

    def names(self) -> list[str]:
        with self._registry_lock:
            return sorted(self._adapters)

    def entry(self, name: str) -> AdapterEntry:
        with self._registry_lock:
            entry = self._adapters.get(name)
            if entry is None:
                raise UnknownAdapter(name, sorted(self._adapters))
            return entry

    # ---- requests -------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        if not self._worker.is_alive():
            raise Overloaded("The inference worker is not running.")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded("The server is busy (request queue full): retry shortly.") from None
        return job.future

    def run_control(self, function: Callable[[], Any], timeout: float | None = 600) -> Any:
        control = Control(function)
        self._queue.put(control)
        return control.future.result(timeout=timeout)

    def record(self, name: str | None, milliseconds: float, inputs: int, error: bool) -> None:
        with self._registry_lock:
            self._totals.record(milliseconds, inputs, error)
            if name is not None and (name in self._stats or name in self._adapters):
                self._stats.setdefault(name, LatencyStats()).record(milliseconds, inputs, error)

    def metrics(self) -> dict[str, Any]:
        with self._registry_lock:
            per_adapter = {name: stats.summary() for name, stats in sorted(self._stats.items())}
            totals = self._totals.summary()
            batches = dict(self._batches)
        batches["mean_rows"] = round(batches["rows"] / batches["batches"], 2) if batches["batches"] else None
        return {"uptime_s": round(time.time() - self.started_at, 1), "queue_depth": self._queue.qsize(),
                **totals, "batching": batches, "adapters": per_adapter}

    def health(self) -> dict[str, Any]:
        alive = self._worker.is_alive()
        with self._registry_lock:
            groups = len(self._slots)
            count = len(self._adapters)
        info = {"status": "ok" if alive else "worker stopped", "base": self.base_name, "adapters": count,
                "groups": groups, "queue_depth": self._queue.qsize(), "uptime_s": round(time.time() - self.started_at, 1)}
        try:
            import psutil

            info["rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)
        except Exception:  # noqa: BLE001
            pass
        return info

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        if self._worker.is_alive():
            self._queue.put(_STOP)
            self._worker.join(timeout)

    # ---- the worker -----------------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, Control):
                self._run_control(item)
                continue
            batch, rows, pending = [item], item.rows, None
            while rows < self.max_batch_rows:
                try:
                    following = self._queue.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(following, Job):
                    pending = following
                    break
                batch.append(following)
                rows += following.rows
            try:
                self._process(batch)
            except BaseException as error:  # noqa: BLE001 - never let one bad batch stop the worker
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(error)
            if pending is _STOP:
                return
            if pending is not None:
                self._run_control(pending)

    @staticmethod
    def _run_control(control: Control) -> None:
        try:
            control.future.set_result(control.function())
        except BaseException as error:  # noqa: BLE001 - handed to the waiting caller
            control.future.set_exception(error)

    def _process(self, batch: list[Job]) -> None:
        groups: dict[int, list[Job]] = {}
        for job in batch:
            if job.entry.unloaded:  # accepted just as its DELETE was queued ahead of it
                job.future.set_exception(AdapterGone(f"Adapter '{job.entry.name}' was unloaded before the "
                                                     "request ran."))
                continue
            groups.setdefault(id(job.entry.slot), []).append(job)
        for jobs in groups.values():
            try:
                with self.model_lock:
                    if jobs[0].op == "generate":
                        self._generate(jobs)
                    else:
                        self._predict(jobs)
            except BaseException as error:  # noqa: BLE001 - reported to each request; the worker goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)

    def _count_batch(self, rows: int, mixed: bool) -> None:
        with self._registry_lock:
            self._batches["batches"] += 1
            self._batches["rows"] += rows
            self._batches["max_rows"] = max(self._batches["max_rows"], rows)
            if mixed:
                self._batches["mixed_adapter_batches"] += 1

    def _predict(self, jobs: list[Job]) -> None:
        slot = jobs[0].entry.slot
        encoded = [_encode(job) for job in jobs]
        adapters = {job.entry.internal for job in jobs}
        if slot.mixed and len(adapters) > 1:
            try:
                self._forward_rows(slot, jobs, encoded, mixed=True)
                return
            except (TypeError, ValueError, NotImplementedError):
                slot.mixed = False  # e.g. a head type peft cannot mix: one adapter per forward from now on
        by_adapter: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            by_adapter.setdefault(job.entry.internal, []).append(index)
        for indices in by_adapter.values():
            try:
                self._forward_rows(slot, [jobs[i] for i in indices], [encoded[i] for i in indices], mixed=False)
            except BaseException as error:  # noqa: BLE001
                for i in indices:
                    if not jobs[i].future.done():
                        jobs[i].future.set_exception(error)

    def _forward_rows(self, slot: Slot, jobs: list[Job], encoded: list, mixed: bool) -> None:
        import torch

        tokenizer = jobs[0].entry.tokenizer
        features, owners = [], []
        for job_index, encoding in enumerate(encoded):
            for row in range(len(encoding["input_ids"])):
                features.append({k: encoding[k][row] for k in encoding.keys()})
                owners.append(job_index)
        outputs = []
        for start in range(0, len(features), self.max_batch_rows):
            chunk = features[start:start + self.max_batch_rows]
            padded = tokenizer.pad(chunk, padding=True, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in padded.items()}
            if slot.is_peft:
                if mixed:
                    inputs["adapter_names"] = [jobs[owners[start + i]].entry.internal for i in range(len(chunk))]
                else:
                    _activate(slot.model, jobs[0].entry.internal)
            with torch.no_grad():
                logits = slot.model(**inputs).logits.float().cpu()
            self._count_batch(len(chunk), mixed)
            left = getattr(tokenizer, "padding_side", "right") == "left"
            for i, feature in enumerate(chunk):
                row = logits[i]
                if row.dim() == 2:  # per-token outputs: keep this row's own positions
                    length = len(feature["input_ids"])
                    row = row[-length:] if left else row[:length]
                outputs.append(row)
        position = 0
        for job, encoding in zip(jobs, encoded):
            count = len(encoding["input_ids"])
            rows = outputs[position:position + count]
            position += count
            job.future.set_result(_postprocess(job, encoding, rows))

    def _generate(self, jobs: list[Job]) -> None:
        from peftlab.inference import Loaded, predict

        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault((job.entry.internal, job.max_new_tokens), []).append(job)
        for (internal, max_new_tokens), members in groups.items():
            entry = members[0].entry
            slot = entry.slot
            try:
                if slot.is_peft:
                    _activate(slot.model, internal)
                loaded = Loaded(model=slot.model, tokenizer=entry.generation_tokenizer, manifest=entry.spec.manifest,
                                method=None, adapter_dir=entry.spec.adapter_dir)
                raw = [item for job in members for item in job.raw]
                results = predict(loaded, raw, batch_size=self.max_batch_rows, max_new_tokens=max_new_tokens)
                self._count_batch(len(raw), False)
                position = 0
                for job in members:
                    job.future.set_result(results[position:position + job.rows])
                    position += job.rows
            except BaseException as error:  # noqa: BLE001
                for job in members:
                    if not job.future.done():
                        job.future.set_exception(error)


class _JoinFailed(Exception):
    pass


def _head_prefixes() -> tuple[str, ...]:
    from peftlab.methods.base import HEAD_NAMES

    return tuple(HEAD_NAMES)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _activate(model, internal: str) -> None:
    """set_adapter (frozen) unless that adapter is already the active one."""
    if getattr(model, "active_adapter", None) != internal:
        model.set_adapter(internal, inference_mode=True)


def _state_mismatch(model, internal: str, spec: AdapterSpec) -> str:
    """Compare the adapter's tensors in the file with what peft built for it: names and shapes."""
    from peft.utils import get_peft_model_state_dict

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, adapter_name=internal).items()}
    found = spec.tensors
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k} (file {found[k]}, model {expected[k]})" for k in set(found) & set(expected)
                   if tuple(found[k]) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:3])}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {', '.join(wrong[:3])}")
    return "; ".join(problems)


def _encode(job: Job):
    """Tokenise one request exactly as ``peftlab predict`` does (no padding: rows are padded per batch)."""
    entry = job.entry
    tokenizer = entry.tokenizer
    max_length = entry.spec.manifest.max_length
    if entry.kind == "token-cls":
        return tokenizer([r["tokens"] for r in job.records], is_split_into_words=True, truncation=True,
                         max_length=max_length)
    pairs = [r.get("text_pair") for r in job.records]
    has_pairs = any(p is not None for p in pairs)
    return tokenizer([r["text"] for r in job.records], [p or "" for p in pairs] if has_pairs else None,
                     truncation=True, max_length=max_length)


def _postprocess(job: Job, encoding, rows) -> list[dict[str, Any]]:
    """The same result objects as ``peftlab.inference.predict``."""
    from peftlab.inference import entities_from_tags

    entry = job.entry
    manifest = entry.spec.manifest
    names = entry.spec.label_names
    results = []
    for index, (record, logits) in enumerate(zip(job.records, rows)):
        if entry.kind == "seq-cls":
            if manifest.is_regression:
                results.append({"text": record["text"], "score": float(logits.reshape(-1)[0])})
                continue
            probabilities = logits.softmax(-1)
            best = int(probabilities.argmax())
            labels = names or [str(i) for i in range(len(probabilities))]
            results.append({
                "text": record["text"], **({"text_pair": record["text_pair"]} if record.get("text_pair") else {}),
                "label": labels[best], "score": float(probabilities[best]),
                "probabilities": {labels[i]: float(p) for i, p in enumerate(probabilities)},
            })
        else:
            tags, previous = [], None
            for position, word in enumerate(encoding.word_ids(index)):
                if word is not None and word != previous:
                    tags.append(names[int(logits[position].argmax())])
                previous = word
            tags += ["O"] * (len(record["tokens"]) - len(tags))
            results.append({"tokens": record["tokens"], "tags": tags, "entities": entities_from_tags(record["tokens"], tags)})
    return results
