"""The serving engine: one base model in memory, many adapters over it, one inference thread.

Weights
-------
One copy of the base weights stays in memory (``loading.py``: skeletons per task kind and head width).
peft 0.21 cannot put adapters of different peft types on one ``PeftModel`` (``add_adapter`` raises
"Cannot combine adapters with different peft types"), and ``PeftMixedModel`` covers LoRA-family tuners
only. So adapters are grouped into **slots** by what their method declares (``Method.serving_facts()``):
one slot per (task kind, head width, peft type, ``group``, ``mixed_batch``). A slot is a module tree over
the skeleton's very tensors wrapped in one ``PeftModel``; the first adapter of a slot is loaded by its
method, the next ones join with peft's ``load_adapter``. LoRA, IA3, prompt tuning, P-Tuning and prefix
tuning thus run side by side on one set of base weights; a variant that peft cannot batch with the
others (DoRA: ``mixed_batch=False``, its own ``group``) gets a slot of its own. Each classification adapter
brings its own head (peft ``modules_to_save``) and label names. Methods in peftlab's own format get a slot
each (``mode="module-tree"`` or ``"own-copy"``).

Concurrency
-----------
HTTP handlers never touch a model: requests become jobs for the single inference thread (``worker.py``),
which micro-batches them, with mixed-adapter batches where ``Slot.mixed`` allows. Loading an adapter
checks the folder and loads it onto a private module tree in the caller's thread (inference keeps
running); joining an existing slot is a job on the same queue. Unloading removes the name at once (new
requests get 404) and queues the ``delete_adapter`` job behind every request already accepted, so
in-flight requests finish on the adapter they asked for.
"""

from __future__ import annotations

import copy
import itertools
import os
import threading
import time
from typing import Any, Callable

from peftlab.adapter_check import display_model
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.serving.adapters import AdapterSpec, check_name, inspect_adapter, redact
from peftlab.serving.loading import JoinFailed, Loader, first_line
from peftlab.serving.records import (AdapterConflict, AdapterEntry, AdapterGone, BaseModelEntry, Control,  # noqa: F401
                                     Job, LatencyStats, Overloaded, Slot, UnknownAdapter)
from peftlab.serving.worker import Worker


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
        self.base_display = display_model(base)
        resolved = resolve_model(base)
        self.base_resolved = os.path.realpath(resolved) if os.path.exists(resolved) else resolved
        try:
            self.base_config = transformers.AutoConfig.from_pretrained(resolved)
        except (OSError, ValueError) as error:
            raise PeftlabError(f"Could not read the base model '{base}' ({str(error).splitlines()[0][:200]}).") from None
        self.tokenizer = load_tokenizer(base)
        self.device = device
        self.max_batch_rows = max(1, int(max_batch_rows))
        self._registry_lock = threading.Lock()  # adapters, slots, pending names, metrics
        self._adapters: dict[str, AdapterEntry] = {}
        self._pending: set[str] = set()
        self._slots: dict[tuple, Slot] = {}
        self._counter = itertools.count(1)
        self._stats: dict[str, LatencyStats] = {}
        self._totals = LatencyStats()
        self._loader = Loader(base, self.base_config, device)
        self.started_at = time.time()
        from peftlab.serving import metrics

        self.prometheus = metrics.ServingMetrics(self._scrape_state) if metrics.available() else None
        self._base_entry: BaseModelEntry | None = None
        self._worker = Worker(max_batch_rows=self.max_batch_rows, queue_size=queue_size, device=device,
                              on_batch=self.prometheus.record_batch if self.prometheus else None)
        self._queue = self._worker.queue
        self.model_lock = self._worker.model_lock  # held for every forward and every change to a live model

    # ---- adapters -------------------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str | os.PathLike) -> dict[str, Any]:
        """Check and load an adapter; raises PeftlabError (refused), AdapterConflict (name taken).

        The reason names no server path: the folder is called "the adapter folder" and the base by its
        alias, Hub id or last folder name."""
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
                entry = self._load(spec)
            except PeftlabError as error:
                reason = redact(str(error), {str(path): "the adapter folder", self.base_resolved: self.base_display})
                raise PeftlabError(f"Refusing adapter '{name}': {reason}") from None
            with self._registry_lock:
                self._adapters[name] = entry
                self._stats.setdefault(name, LatencyStats())
            return entry.info()
        finally:
            with self._registry_lock:
                self._pending.discard(name)

    def _load(self, spec: AdapterSpec) -> AdapterEntry:
        from peftlab.inference import saved_chat_template

        internal = f"a{next(self._counter)}"
        generation_tokenizer = copy.deepcopy(self.tokenizer) if TaskKind(spec.kind).is_generative else None
        template = saved_chat_template(spec.adapter_dir) if generation_tokenizer is not None else None
        if template:  # a chat adapter answers through the template it was trained with (/v1/chat/completions)
            generation_tokenizer.chat_template = template

        def entry(slot: Slot) -> AdapterEntry:
            return AdapterEntry(spec, slot, internal, time.time(), self.tokenizer, generation_tokenizer)

        facts = spec.facts
        if facts.mode != "peft":
            model = self._loader.merged(spec) if spec.checked.merged else self._loader.module_tree(spec)
            label = "merged" if spec.checked.merged else spec.method_name
            return entry(self._own_slot(Slot(id=f"{label}-{internal}", key=("own", internal), kind=spec.kind,
                                             model=model, peft_type=None, adapters={spec.name: internal})))

        # peft: load on a private copy first (every check runs there, nothing live is touched) ...
        probe = self._loader.peft_probe(spec, internal)
        group = facts.group or spec.peft_type
        key = (spec.kind, spec.n_outputs, spec.peft_type, group, facts.mixed_batch)
        with self._registry_lock:
            slot = self._slots.get(key)
        if slot is not None:
            # ... then join the live slot of the same kind and group (one PeftModel, shared module tree).
            try:
                self.run_control(lambda: self._loader.join(slot, spec, internal, self.model_lock))
                return entry(slot)
            except JoinFailed as failure:
                reason = redact(str(failure), {str(spec.adapter_dir): "the adapter folder"})
                spec.notes.append(f"kept in its own group ({reason})")
        # Mixed batches only where the method says peft can run them, and only for classification heads.
        mixed = facts.mixed_batch and TaskKind(spec.kind).is_classification
        slot = Slot(id=f"{group.lower()}-{spec.kind}-{internal}", key=key, kind=spec.kind, model=probe,
                    peft_type=spec.peft_type, adapters={spec.name: internal}, mixed=mixed)
        with self._registry_lock:
            if key not in self._slots:
                self._slots[key] = slot
            else:  # another load raced us to this key: keep this one as a separate group
                slot.key = key + (internal,)
                self._slots[slot.key] = slot
        return entry(slot)

    def _own_slot(self, slot: Slot) -> Slot:
        with self._registry_lock:
            self._slots[slot.key] = slot
        return slot

    def remove_adapter(self, name: str) -> dict[str, Any]:
        """Unload: the name disappears now; the weights go after the requests already accepted for it."""
        with self._registry_lock:
            entry = self._adapters.pop(name, None)
            known = sorted(self._adapters)
        if entry is None:
            raise UnknownAdapter(name, known)
        self.run_control(lambda: self._unload(entry))
        return {"unloaded": name, "method": entry.spec.method_name, "group": entry.slot.id}

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
    def submit(self, job: Job):
        return self._worker.submit(job)

    def run_control(self, function: Callable[[], Any], timeout: float | None = 600) -> Any:
        return self._worker.run_control(function, timeout)

    def record(self, name: str | None, milliseconds: float, inputs: int, error: bool, *, endpoint: str = "predict",
               status: int | None = None) -> None:
        """Count a finished request (JSON stats and Prometheus); ``name`` counts only if it is loaded (or the base)."""
        with self._registry_lock:
            self._totals.record(milliseconds, inputs, error)
            known = name is not None and (name in self._stats or name in self._adapters or name == self.base_display)
            if known:
                self._stats.setdefault(name, LatencyStats()).record(milliseconds, inputs, error)
        if self.prometheus is not None:
            from peftlab.serving.metrics import UNKNOWN

            self.prometheus.record_request(name if known else UNKNOWN, endpoint,
                                           status if status is not None else (500 if error else 200),
                                           milliseconds / 1000.0, inputs)

    def _scrape_state(self) -> dict[str, Any]:
        return {"queue_depth": self._queue.qsize(), "adapters": self.adapters(), "alive": self.alive,
                "started_at": self.started_at}

    # ---- the base model itself (OpenAI requests naming the base) ------------------------------------------
    @property
    def base_kind(self) -> TaskKind | None:
        """causal-lm or seq2seq when the base checkpoint is a generative model, else None."""
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

        architectures = set(getattr(self.base_config, "architectures", None) or [])
        if architectures & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
            return TaskKind.CAUSAL_LM
        if architectures & set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values()):
            return TaskKind.SEQ2SEQ
        return None

    def base_entry(self) -> BaseModelEntry:
        """The base model as a generation target (loaded on first use; shares the base weights)."""
        kind = self.base_kind
        if kind is None:
            raise PeftlabError(f"The base model '{self.base_display}' is not a generative model: name a generative "
                               "adapter instead.")
        with self._registry_lock:
            if self._base_entry is not None:
                return self._base_entry
        model = self._loader.skeleton(kind, None, None, False)
        slot = Slot(id=f"base-{kind}", key=("base", str(kind)), kind=kind, model=model, peft_type=None)
        entry = BaseModelEntry(name=self.base_display, kind=kind, slot=slot,
                               generation_tokenizer=copy.deepcopy(self.tokenizer))
        with self._registry_lock:
            self._base_entry = self._base_entry or entry
            self._stats.setdefault(self.base_display, LatencyStats())
            return self._base_entry

    def metrics(self) -> dict[str, Any]:
        with self._registry_lock:
            per_adapter = {name: stats.summary() for name, stats in sorted(self._stats.items())}
            totals = self._totals.summary()
        return {"uptime_s": round(time.time() - self.started_at, 1), "queue_depth": self._queue.qsize(),
                **totals, "batching": self._worker.batch_stats(), "adapters": per_adapter}

    def health(self) -> dict[str, Any]:
        with self._registry_lock:
            groups = len(self._slots)
            count = len(self._adapters)
        info = {"status": "ok" if self.alive else "worker stopped", "base": self.base_display, "adapters": count,
                "groups": groups, "queue_depth": self._queue.qsize(), "uptime_s": round(time.time() - self.started_at, 1)}
        try:
            import psutil

            info["rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)
        except Exception:  # noqa: BLE001
            pass
        return info

    @property
    def alive(self) -> bool:
        return self._worker.alive

    def stop(self, timeout: float = 10.0) -> None:
        self._worker.stop(timeout)


__all__ = ["Engine", "AdapterConflict", "AdapterGone", "Overloaded", "UnknownAdapter", "Job", "Control", "Slot",
           "AdapterEntry", "LatencyStats", "first_line"]
