"""FSDP (FSDP2 through the Trainer) on 2 CPU ranks with gloo, against one process.

accelerate enables FSDP only for accelerator devices and silently runs plain DDP on CPU ranks;
``peftlab.distributed.fsdp.enable_on_cpu`` lets it take its FSDP2 path there, which is what makes this
file possible on a CPU-only machine (torch's ``fully_shard`` itself runs on gloo). The contract is the
DDP one (tests/ranks.py): per-step losses within 1e-5 and the same saved adapter, for LoRA, (IA)3,
bottleneck adapters and full fine-tuning. QLoRA needs CUDA (bitsandbytes): scripts/gpu-check.sh covers it.
"""

from __future__ import annotations

import pytest

from peftlab import distributed
from ranks import assert_same_run, common_for, make_models, train_here, train_two_ranks, training_calls

needs_fsdp_integration = pytest.mark.skipif(
    not training_calls("training_arguments", "forward_is_collective", "fsdp"),
    reason="peftlab.training does not take TrainConfig.fsdp / distributed.training_arguments yet")


# ---- arguments and wrapping (no processes) ---------------------------------------------------------

def test_fsdp_arguments_per_mode():
    full = distributed.fsdp_arguments("full_shard")
    assert full["fsdp"] is True
    assert full["fsdp_config"] == {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                   "cpu_offload": False, "state_dict_type": "FULL_STATE_DICT"}
    assert distributed.fsdp_arguments("shard-grad-op", True)["fsdp_config"]["reshard_after_forward"] is False
    assert distributed.fsdp_arguments("SHARD_GRAD_OP", True)["fsdp_config"]["cpu_offload"] is True
    # hybrid: shard inside a node, replicate across nodes (a 2-D mesh); on one node it is full_shard
    assert distributed.fsdp_arguments("hybrid_shard", nodes=1, ranks_per_node=2) == full
    hybrid = distributed.fsdp_arguments("hybrid_shard", nodes=2, ranks_per_node=4)
    assert (hybrid["parallelism_config"].dp_replicate_size, hybrid["parallelism_config"].dp_shard_size) == (2, 4)
    assert distributed.fsdp_arguments(None) == {} and distributed.fsdp_mode("none") is None


def test_transformer_blocks_are_the_wrapping_units():
    import tiny
    from peftlab.methods import get_method

    assert distributed.block_classes(tiny.tiny_llama()) == ["LlamaDecoderLayer"]
    assert distributed.block_classes(tiny.tiny_gpt2()) == ["GPT2Block"]
    assert distributed.block_classes(tiny.tiny_t5()) == ["T5Block"]
    bert = tiny.tiny_bert()  # declares BertEmbeddings too: wrapped once by accelerate itself, not twice
    assert distributed.block_classes(bert) == ["BertLayer"]
    method = get_method("lora")
    method.total_steps = 1
    assert distributed.block_classes(method.apply(bert, "seq-cls")) == ["BertLayer"]  # through the PeftModel
    arguments = distributed.fsdp_arguments("full_shard", model=tiny.tiny_llama())
    assert arguments["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]


def test_cpu_support_is_installed_once():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    distributed.enable_on_cpu()
    init, state_dict = AcceleratorState.__init__, Accelerator.get_state_dict
    distributed.enable_on_cpu()
    assert AcceleratorState.__init__ is init and Accelerator.get_state_dict is state_dict
    assert getattr(init, "peftlab_cpu_fsdp", False)


# ---- 2 CPU ranks against one process --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"))["tiny"]


@needs_fsdp_integration
@pytest.mark.parametrize("method, mode", [
    ("lora", "full_shard"),
    ("full", "shard_grad_op"),
    pytest.param("ia3", "full_shard", marks=pytest.mark.slow),
    pytest.param("adapter", "hybrid_shard", marks=pytest.mark.slow),
])
def test_fsdp_matches_one_process(method, mode, tiny_model, data_dir, tmp_path):
    reference, run = tmp_path / "one-process", tmp_path / f"fsdp-{mode}"
    options = [*common_for(method), "--model", tiny_model, "--max-train-samples", "64"]
    train_here([*options, "--batch-size", "8", "--output", str(reference)], data_dir)
    output = train_two_ranks([*options, "--batch-size", "4", "--fsdp", mode, "--output", str(run)], data_dir)
    assert_same_run(reference, run)
    assert output.count("Done: dev accuracy") == 1  # rank 0 reports; both ranks evaluated (collective forwards)

