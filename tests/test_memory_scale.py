"""The per-rank memory estimate (``--nproc``, ``--deepspeed``, ``--fsdp``, offload) against measured ranks.

MEASURED holds what benchmarks/zero3_memory.py recorded on this 2-core CPU machine (shared with other jobs,
so loaded; memory, not time, is measured): SmolLM2-135M on Alpaca, fp32, batch 1 per rank, 64 tokens,
DeepSpeed ZeRO-3 with the base built partitioned (zero.Init), 1 and 2 ranks, full fine-tuning and LoRA.
EARLIER holds the DDP and ZeRO-2 ranks of the same recipe measured for docs/scaling.md before. The estimate
must be within 15% of each: the weights a rank holds after loading, what it keeps between steps, and its peak.
"""

from __future__ import annotations

import pytest

from peftlab.errors import PeftlabError
from peftlab.memory.estimate import MiB, estimate, process_runtime_bytes
from peftlab.memory.sharding import Sharding

TOLERANCE = 0.15
RECIPE = dict(batch_size=1, seq_length=64, device="cpu", precision="fp32")

# (method, ranks): per rank [param MiB after load, model state MiB between steps, peak RSS MiB in training]
MEASURED = {
    ("full", 1): [(513.1, 2566.9, 5568.6)],
    ("full", 2): [(256.6, 1284.2, 3647.9), (256.6, 1284.2, 3520.3)],
    ("lora", 1): [(514.9, 523.2, 1835.2)],
    ("lora", 2): [(258.3, 264.1, 1972.0), (258.3, 264.1, 2003.2)],
}
# full fine-tuning, 2 ranks: engine -> per rank peak RSS MiB (docs/scaling.md, "How memory per device falls")
EARLIER = {None: (3433, 3507), "zero2": (3233, 3388)}


def within(estimated: float, measured: float) -> bool:
    return abs(estimated - measured) <= TOLERANCE * measured


@pytest.mark.parametrize("method, ranks", sorted(MEASURED))
def test_zero3_per_rank_estimate_matches_the_measured_ranks(method, ranks):
    result = estimate("smollm2", method, "causal-lm", nproc=ranks, deepspeed="zero3", **RECIPE)
    parts = result.components
    weights = parts["weights"] / MiB
    kept = (parts["weights"] + parts["gradients"] + parts["optimizer_states"]) / MiB
    peak = (result.peak_bytes + process_runtime_bytes("cpu", "zero3")) / MiB
    for after_load, state, measured_peak in MEASURED[(method, ranks)]:
        assert within(weights, after_load), (weights, after_load)
        assert within(kept, state), (kept, state)
        assert within(peak, measured_peak), (peak, measured_peak)
    assert result.nproc == ranks and "ZeRO-3" in result.sharding


@pytest.mark.parametrize("engine", sorted(EARLIER, key=str))
def test_ddp_and_zero2_estimates_match_the_earlier_measurements(engine):
    result = estimate("smollm2", "full", "causal-lm", nproc=2, deepspeed=engine, **RECIPE)
    peak = (result.peak_bytes + process_runtime_bytes("cpu", engine)) / MiB
    for measured in EARLIER[engine]:
        assert within(peak, measured), (peak, measured)


def test_what_sharding_buys_on_gpus():
    """Llama-2-7B full fine-tuning on 8 GPUs: each engine holds less than the one before it; offload moves the
    state to host memory on a GPU and changes nothing on CPU, where the device is host memory."""
    def rank(**options):
        return estimate("meta-llama/Llama-2-7b-hf", "full", "causal-lm", batch_size=1, seq_length=512, nproc=8,
                        **options)

    ddp, zero2, zero3, fsdp = rank(), rank(deepspeed="zero2"), rank(deepspeed="zero3"), rank(fsdp="full_shard")
    assert ddp.peak_bytes > zero2.peak_bytes > zero3.peak_bytes
    assert ddp.peak_bytes > rank(fsdp="shard_grad_op").peak_bytes > fsdp.peak_bytes
    assert ddp.components["ddp_buckets"] == ddp.components["gradients"]
    offloaded = rank(deepspeed="zero3", offload=True)
    assert offloaded.peak_bytes < zero3.peak_bytes and offloaded.offloaded_bytes > 0
    assert offloaded.components["optimizer_states"] == 0
    on_cpu = estimate("smollm2", "full", "causal-lm", nproc=2, deepspeed="zero3", offload=True, **RECIPE)
    assert on_cpu.offloaded_bytes == 0 and on_cpu.peak_bytes == estimate(
        "smollm2", "full", "causal-lm", nproc=2, deepspeed="zero3", **RECIPE).peak_bytes
    one = estimate("smollm2", "lora", "causal-lm", **RECIPE)
    assert one.sharding == "one process" and one.components["gathered_weights"] == 0


@pytest.mark.parametrize("options, message", [
    (dict(deepspeed="zero2", fsdp="full_shard"), "two ways to shard"),
    (dict(offload=True), "Offload needs a sharding engine"),
    (dict(deepspeed="zero1"), "knows --deepspeed zero2 and zero3"),
    (dict(fsdp="everything"), "Unknown --fsdp 'everything'"),
    (dict(nproc=0), "--nproc must be a positive"),
])
def test_bad_scale_options(options, message):
    with pytest.raises(PeftlabError, match=message):
        Sharding.from_options(**{"nproc": 2, **options})


def test_qlora_under_zero3_is_refused_and_recommend_plans_per_rank():
    from peftlab.recommend import recommend

    with pytest.raises(PeftlabError, match="ZeRO-3 cannot partition"):
        estimate("smollm2", "qlora", "causal-lm", nproc=2, deepspeed="zero3", **RECIPE)
    single = recommend("smollm2", "generation", memory="2GB", device="cpu", batch_size=1, max_length=64)
    sharded = recommend("smollm2", "generation", memory="2GB", device="cpu", batch_size=1, max_length=64, nproc=2,
                        deepspeed="zero3")
    rows = {row["method"]: row for row in sharded["ranking"]}
    assert rows["qlora"]["status"] == "unsupported" and "ZeRO-3" in rows["qlora"]["reason"]
    full_single = next(row for row in single["ranking"] if row["method"] == "full")
    assert rows["full"]["training_memory_gb"] < full_single["training_memory_gb"]
    assert sharded["sharding"] == "DeepSpeed ZeRO-3 over 2 ranks"
    assert any("memory per rank: DeepSpeed ZeRO-3 over 2 ranks" in line for line in sharded["assumptions"])
