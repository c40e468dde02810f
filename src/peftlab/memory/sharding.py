"""What N data-parallel ranks hold each, under DDP, DeepSpeed ZeRO-2/3 or FSDP (the per-rank estimate).

``per_rank(components, sharding, ...)`` turns the one-device components of ``peftlab.memory.estimate`` into
one rank's, for Ψ parameters (Ψ_t trainable) on N ranks. Activations, logits and autocast copies belong to the
rank's own batch (``batch_size`` is per device) and do not change. The rest:

* **DDP**: every rank holds the whole model and its optimizer state, plus DDP's gradient buckets (a second copy
  of the gradients, 4Ψ_t bytes, kept between steps).
* **ZeRO-2** (DeepSpeed): the model's weights whole (cast to bf16 when training in bf16); an fp32 master copy,
  the Adam moments and the fp32 gradient partition are split: (4 + 8)Ψ_t/N kept, 4Ψ_t/N during the step.
* **ZeRO-3**: the weights are split too, from the load on (``zero.Init``): E·Ψ/N, plus an fp32 gradient
  partition kept between steps: (E + 4 + 4 + 8)Ψ/N for full fine-tuning, the 20Ψ/N of the ZeRO paper in fp32.
  While a step runs, DeepSpeed gathers the weights it computes with and keeps them live up to
  ``stage3_max_live_parameters`` (peftlab's preset: 1e9 parameters, so all of a model smaller than that), in
  full-size buffers of their own: ``gathered_weights`` (none on one rank, whose slice is the whole).
* **FSDP** (FSDP2, ``full_shard`` / ``hybrid_shard``): weights, gradients and Adam moments split (the sharded
  fp32 weights are the master copy: no extra one); while a step runs the root unit (embeddings, head) and two
  transformer blocks are gathered; ``shard_grad_op`` keeps every gathered block from forward to backward.
  ``hybrid_shard`` shards within a node (N is then the ranks per node).
* **offload** (ZeRO ``--offload cpu``, ``--fsdp-offload``) moves the optimizer state (ZeRO-3 and FSDP: the
  weights too) to host memory: on a GPU they leave the device's total (reported as ``offloaded_bytes``); on
  CPU the device is host memory and nothing changes.

Checked against measured ranks (SmolLM2-135M, ZeRO-3, 1 and 2 ranks, full fine-tuning and LoRA) in
tests/test_memory_scale.py; the numbers are in docs/scaling.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.errors import PeftlabError

ENGINES = ("ddp", "zero2", "zero3", "fsdp")
FSDP_MODES = ("full_shard", "shard_grad_op", "hybrid_shard")
ZERO3_MAX_LIVE_PARAMETERS = int(1e9)  # peftlab's ZeRO-3 preset (peftlab.distributed.zero.preset)


@dataclass(frozen=True)
class Sharding:
    """How training is spread: ``nproc`` ranks, the engine, and whether state is offloaded to host memory."""

    nproc: int = 1
    engine: str = "ddp"
    fsdp_mode: str | None = None
    offload: bool = False

    @classmethod
    def from_options(cls, nproc: int = 1, deepspeed: str | None = None, fsdp: str | None = None,
                     offload: bool | str | None = False) -> "Sharding":
        """From the ``train`` / ``recommend`` flags: ``--nproc``, ``--deepspeed zero2|zero3``, ``--fsdp MODE``, offload."""
        if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
            raise PeftlabError(f"--nproc must be a positive number of processes; got {nproc!r}.")
        if deepspeed and fsdp:
            raise PeftlabError(f"--fsdp {fsdp} and --deepspeed {deepspeed} are two ways to shard the same model: "
                               "choose one.")
        offloaded = bool(offload) and str(offload).strip().lower() not in ("none", "false", "no")
        if deepspeed:
            engine = str(deepspeed).strip().lower()
            if engine not in ("zero2", "zero3"):
                raise PeftlabError(f"The memory estimate knows --deepspeed zero2 and zero3; got '{deepspeed}'.")
            return cls(nproc=nproc, engine=engine, offload=offloaded)
        if fsdp:
            mode = str(fsdp).strip().lower().replace("-", "_")
            if mode not in FSDP_MODES:
                raise PeftlabError(f"Unknown --fsdp '{fsdp}'. Valid values: {', '.join(FSDP_MODES)}.")
            return cls(nproc=nproc, engine="fsdp", fsdp_mode=mode, offload=offloaded)
        if offloaded:
            raise PeftlabError("Offload needs a sharding engine: --deepspeed zero2|zero3 or --fsdp MODE.")
        return cls(nproc=nproc)

    @property
    def plain(self) -> bool:
        """One process, nothing sharded: the one-device estimate as it is."""
        return self.nproc == 1 and self.engine == "ddp"

    def describe(self) -> str:
        what = {"ddp": "DDP" if self.nproc > 1 else "one process", "zero2": "DeepSpeed ZeRO-2",
                "zero3": "DeepSpeed ZeRO-3", "fsdp": f"FSDP {self.fsdp_mode}"}[self.engine]
        offload = " with offload to host memory" if self.offload else ""
        return f"{what} over {self.nproc} rank{'s' if self.nproc > 1 else ''}{offload}" if self.nproc > 1 or \
            self.engine != "ddp" else what


def per_rank(components: dict[str, float], sharding: Sharding, *, total: int, trainable: int, quantized: int,
             root_params: int, block_params: int, precision: str, weights: str, device: str) -> tuple[dict[str, float], float]:
    """(one rank's components, bytes offloaded to host) from the one-device ``components``.

    ``root_params``: parameters outside the transformer blocks (embeddings, head, final norm);
    ``block_params``: one transformer block's.
    """
    out = dict(components)
    out.setdefault("gathered_weights", 0.0)
    out.setdefault("ddp_buckets", 0.0)
    n = sharding.nproc
    if sharding.plain:
        return out, 0.0
    grad_bytes = components["gradients"] / max(trainable, 1)  # 4 (2 with bf16 weights)
    if sharding.engine == "ddp":
        out["ddp_buckets"] = components["gradients"]
        return out, 0.0
    offloaded: dict[str, float] = {}
    if precision == "bf16":
        # DeepSpeed casts the model to bf16 and FSDP gathers it in bf16: no autocast copies of fp32 weights
        out["autocast_weight_copies"] = 0.0
    if sharding.engine in ("zero2", "zero3"):
        element = 2 if precision == "bf16" else 4  # DeepSpeed casts the model to bf16 when training in bf16
        unquantized = total - quantized
        whole_weights = element * unquantized + (components["weights"] - 4 * unquantized if quantized else 0)
        out["gradients"] = 4 * trainable / n  # the fp32 gradient partition
        out["optimizer_states"] = (4 + 8) * trainable / n  # fp32 master copy + Adam moments
        out["optimizer_step_temporary"] = 4 * trainable / n
        if sharding.engine == "zero2":
            out["weights"] = whole_weights
            if sharding.offload:
                offloaded = {"optimizer_states": out["optimizer_states"], "optimizer_step_temporary": out["optimizer_step_temporary"]}
        else:
            out["weights"] = element * total / n
            # gathered into full-size buffers of their own (the rank's slice stays where it is)
            out["gathered_weights"] = element * min(total, ZERO3_MAX_LIVE_PARAMETERS) if n > 1 else 0.0
            if sharding.offload:
                offloaded = {key: out[key] for key in ("weights", "optimizer_states", "optimizer_step_temporary")}
    else:  # FSDP2
        shards = n
        unquantized = total - quantized
        quantized_bytes = components["weights"] - 4 * unquantized if quantized else 0.0  # 4-bit: left whole
        weight_element = 2 if weights == "bf16" else 4
        out["weights"] = weight_element * unquantized / shards + quantized_bytes
        out["gradients"] = grad_bytes * trainable / shards
        out["optimizer_states"] = components["optimizer_states"] / shards
        out["optimizer_step_temporary"] = components["optimizer_step_temporary"] / shards
        compute = 2 if precision == "bf16" else weight_element  # FSDP's mixed precision gathers in the compute dtype
        if sharding.fsdp_mode == "shard_grad_op":
            gathered = unquantized
        else:
            gathered = min(unquantized, root_params + 2 * block_params)
        out["gathered_weights"] = compute * gathered if shards > 1 else 0.0  # all-gathered into full-size buffers
        if sharding.offload:
            offloaded = {key: out[key] for key in ("weights", "gradients", "optimizer_states", "optimizer_step_temporary")}
    if device == "cuda" and offloaded:
        for key in offloaded:
            out[key] = 0.0
        return out, float(sum(offloaded.values()))
    return out, 0.0
