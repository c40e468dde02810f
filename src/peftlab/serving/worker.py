"""The inference thread: one queue, micro-batches formed from what is waiting, one forward per group.

HTTP handlers never touch a model. A request becomes a :class:`Job` on one queue; this single worker
thread takes jobs, forms a micro-batch of what is waiting (no added wait: under load the queue fills
while a forward runs), groups it by slot and runs it. Within a slot whose adapters may share a forward
(``Slot.mixed``: the method's ``ServingFacts.mixed_batch``), requests for different adapters go through
**one** forward with peft's ``adapter_names=``; other slots run one forward per adapter after
``set_adapter``. Every forward (with its ``set_adapter``) and every change to a live model
(:class:`Control` functions: joining or leaving a slot) happens on this thread while it holds
``model_lock``, so in-flight requests always finish on the adapter they asked for.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from peftlab.kinds import TaskKind
from peftlab.serving.records import STOP, AdapterGone, Control, Job, Overloaded, Slot


class Worker:
    def __init__(self, *, max_batch_rows: int, queue_size: int, device: str,
                 on_batch: Callable[[int, bool], None] | None = None):
        self.max_batch_rows = max(1, int(max_batch_rows))
        self.device = device
        self.on_batch = on_batch  # told the rows of every forward (the Prometheus histogram)
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self.model_lock = threading.RLock()  # held for every forward and every change to a live model
        self._stats_lock = threading.Lock()
        self._batches = {"batches": 0, "rows": 0, "mixed_adapter_batches": 0, "max_rows": 0}
        self._thread = threading.Thread(target=self._run, name="peftlab-serve-worker", daemon=True)
        self._thread.start()

    # ---- what the engine calls ------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job):
        if not self.alive:
            raise Overloaded("The inference worker is not running.")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Overloaded("The server is busy (request queue full): retry shortly.") from None
        return job.future

    def run_control(self, function: Callable[[], Any], timeout: float | None = 600) -> Any:
        """Run ``function`` on the worker thread after the jobs already queued; its result or its exception."""
        control = Control(function)
        self.queue.put(control)
        return control.future.result(timeout=timeout)

    def batch_stats(self) -> dict[str, Any]:
        with self._stats_lock:
            batches = dict(self._batches)
        batches["mean_rows"] = round(batches["rows"] / batches["batches"], 2) if batches["batches"] else None
        return batches

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive:
            self.queue.put(STOP)
            self._thread.join(timeout)

    # ---- the loop -------------------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while True:
            item = self.queue.get()
            if item is STOP:
                return
            if isinstance(item, Control):
                _run_control(item)
                continue
            batch, rows, pending = [item], item.rows, None
            while rows < self.max_batch_rows:
                try:
                    following = self.queue.get_nowait()
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
            if pending is STOP:
                return
            if pending is not None:
                _run_control(pending)

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
                    if jobs[0].op == "complete":
                        self._complete(jobs)
                    elif jobs[0].op == "generate":
                        self._generate(jobs)
                    else:
                        self._predict(jobs)
            except BaseException as error:  # noqa: BLE001 - reported to each request; the worker goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)

    def _count_batch(self, rows: int, mixed: bool) -> None:
        with self._stats_lock:
            self._batches["batches"] += 1
            self._batches["rows"] += rows
            self._batches["max_rows"] = max(self._batches["max_rows"], rows)
            if mixed:
                self._batches["mixed_adapter_batches"] += 1
        if self.on_batch is not None:
            self.on_batch(rows, mixed)

    # ---- classification and tagging -------------------------------------------------------------------
    def _predict(self, jobs: list[Job]) -> None:
        slot = jobs[0].entry.slot
        encoded = [encode(job) for job in jobs]
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
                    activate(slot.model, jobs[0].entry.internal)
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
            job.future.set_result(postprocess(job, encoding, rows))

    # ---- generation -----------------------------------------------------------------------------------
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
                    activate(slot.model, internal)
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


    # ---- OpenAI completions: one prompt per job, sampled, maybe streamed ----------------------------------
    def _complete(self, jobs: list[Job]) -> None:
        from peftlab.serving.generation import complete

        for job in jobs:
            entry = job.entry
            try:
                if entry.slot.is_peft:
                    activate(entry.slot.model, entry.internal)
                result = complete(entry.slot.model, entry.generation_tokenizer, job.records[0]["prompt"],
                                  job.sampling, device=self.device,
                                  decoder_only=TaskKind(entry.kind) is TaskKind.CAUSAL_LM)
                self._count_batch(1, False)
                job.future.set_result(result)
            except BaseException as error:  # noqa: BLE001
                if not job.future.done():
                    job.future.set_exception(error)


def _run_control(control: Control) -> None:
    try:
        control.future.set_result(control.function())
    except BaseException as error:  # noqa: BLE001 - handed to the waiting caller
        control.future.set_exception(error)


def activate(model, internal: str) -> None:
    """set_adapter (frozen) unless that adapter is already the active one."""
    if getattr(model, "active_adapter", None) != internal:
        model.set_adapter(internal, inference_mode=True)


def encode(job: Job):
    """Tokenise one request exactly as ``peftlab predict`` does (no padding: rows are padded per batch)."""
    entry = job.entry
    tokenizer = entry.tokenizer
    max_length = entry.spec.manifest.max_length
    if TaskKind(entry.kind) is TaskKind.TOKEN_CLS:
        return tokenizer([r["tokens"] for r in job.records], is_split_into_words=True, truncation=True,
                         max_length=max_length)
    pairs = [r.get("text_pair") for r in job.records]
    has_pairs = any(p is not None for p in pairs)
    return tokenizer([r["text"] for r in job.records], [p or "" for p in pairs] if has_pairs else None,
                     truncation=True, max_length=max_length)


def postprocess(job: Job, encoding, rows) -> list[dict[str, Any]]:
    """The same result objects as ``peftlab.inference.predict``."""
    from peftlab.inference import entities_from_tags

    entry = job.entry
    manifest = entry.spec.manifest
    names = entry.spec.label_names
    per_token = TaskKind(entry.kind) is TaskKind.TOKEN_CLS
    results = []
    for index, (record, logits) in enumerate(zip(job.records, rows)):
        if not per_token:
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
