"""Multi-node launch on one machine: two ``peftlab train`` launchers, one rank each, meeting at a rendezvous on
127.0.0.1, train exactly like one 2-rank node (same per-step losses, same adapter). A rendezvous that cannot
complete ends in one sentence within a minute, not a hang.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from ranks import (COMMON, RUN_TIMEOUT, assert_same_run, cli_has_launch_flags, make_models, peftlab_train, rank_env,
                   train_two_ranks, training_calls)

needs_launch_flags = pytest.mark.skipif(
    not (cli_has_launch_flags() and training_calls("save_trained")),
    reason="peftlab train has no --nnodes/--master-addr/--rdzv-endpoint flags yet (cli integration)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"))["tiny"]


@pytest.fixture(scope="module")
def options(tiny_model):
    return [*COMMON, "--model", tiny_model, "--max-train-samples", "64", "--batch-size", "4"]


@pytest.fixture(scope="module")
def one_node(options, data_dir, tmp_path_factory):
    """The reference: one node with 2 ranks (``--nproc 2``)."""
    run = tmp_path_factory.mktemp("one-node") / "run"
    train_two_ranks([*options, "--output", str(run)], data_dir)
    return run


def two_nodes(options, data_dir, run, node_flags) -> list[str]:
    """Start one launcher per node flag list (the first one first), wait for both; their outputs."""
    processes = []
    for flags in node_flags:
        processes.append(subprocess.Popen([sys.executable, "-m", "peftlab.cli", "train", *options, "--output", str(run),
                                           "--nproc", "1", "--nnodes", "2", *flags],
                                          env=rank_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        time.sleep(1)
    outputs = []
    for process in processes:
        try:
            out, _ = process.communicate(timeout=RUN_TIMEOUT)
        finally:
            process.kill()
        outputs.append(out)
        assert process.returncode == 0, out[-4000:]
    return outputs


@needs_launch_flags
def test_two_nodes_with_an_elastic_rendezvous_train_like_one_node(options, one_node, data_dir, tmp_path):
    run = tmp_path / "two-nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    outputs = two_nodes(options, data_dir, run, [["--rdzv-endpoint", endpoint, "--rdzv-id", "test"]] * 2)
    assert_same_run(one_node, run)
    assert sum(out.count("Done: dev accuracy") for out in outputs) == 1  # global rank 0 alone reports
    assert all("data-parallel process on one of 2 nodes" in out for out in outputs)


@needs_launch_flags
@pytest.mark.slow
def test_two_nodes_with_fixed_ranks_train_like_one_node(options, one_node, data_dir, tmp_path):
    run = tmp_path / "two-nodes-static"
    address = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    # node 1 first: it waits for node 0's rendezvous to open
    two_nodes(options, data_dir, run, [["--node-rank", "1", *address], ["--node-rank", "0", *address]])
    assert_same_run(one_node, run)


@needs_launch_flags
@pytest.mark.parametrize("flags, message", [
    (["--node-rank", "1", "--master-addr", "127.0.0.1"], "No rendezvous at 127.0.0.1:{port}: nothing accepted"),
    (["--node-rank", "0", "--master-addr", "127.0.0.1"], "timed out after 3 s with 1 of 2 nodes"),
    (["--rdzv-endpoint", "127.0.0.1:{port}"], "did not complete within 3 s"),
])
def test_a_rendezvous_that_cannot_complete_is_one_sentence(flags, message, options, data_dir, tmp_path):
    port = free_port()
    flags = [flag.format(port=port) for flag in flags]
    if "--master-addr" in flags:
        flags += ["--master-port", str(port)]
    started = time.monotonic()
    output = peftlab_train([*options, "--output", str(tmp_path / "run"), "--nnodes", "2", "--rdzv-timeout", "3",
                            *flags], data_dir, expect=2, timeout=120)
    assert time.monotonic() - started < 60
    errors = [line for line in output.splitlines() if line.startswith("peftlab: error:")]
    assert len(errors) == 1 and message.format(port=port) in errors[0], output[-3000:]
    assert "Traceback" not in output and not (tmp_path / "run").exists()


@needs_launch_flags
@pytest.mark.parametrize("flags, message", [
    (["--nnodes", "2"], "--nnodes 2 needs the address where the nodes meet"),
    (["--nnodes", "2", "--master-addr", "127.0.0.1", "--node-rank", "0", "--fsdp", "full_shard", "--deepspeed",
      "zero2"], "two ways to shard the same model"),
    (["--master-addr", "127.0.0.1"], "--master-addr is for a run over several machines"),
])
def test_bad_launch_flags_are_refused_before_any_rank_starts(flags, message, options, data_dir, tmp_path):
    output = peftlab_train([*options, "--output", str(tmp_path / "run"), *flags], data_dir, expect=2, timeout=120)
    assert message in output and "torchrun" not in output and "Traceback" not in output
