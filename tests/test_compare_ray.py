"""``peftlab compare --ray``: a small grid on a local Ray instance with two workers gives the same per-cell metrics
and the same results.json as the sequential run of the same seeds; an address nothing listens at fails in one
sentence within seconds. Needs Ray (``pip install peftlab[ray]``)."""

from __future__ import annotations

import socket
import time

import pytest

from compare_world import FAST_LATENCY, TINY_OPTIONS, make_world
from peftlab.errors import PeftlabError

pytest.importorskip("ray")

METHODS = "lora,bitfit"


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_dir):
    return make_world(tmp_path_factory.mktemp("compare-ray"), data_dir)


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ray_grid_matches_the_sequential_run(world, tmp_path, monkeypatch):
    """Both single-threaded (OMP_NUM_THREADS=1 here; each Ray job asks for 1 of the 2 CPUs), so the metrics agree
    exactly; the tolerance allows only float noise (1e-9)."""
    from peftlab.compare import compare

    base, data = world
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(data))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    options = {"model": str(base), **TINY_OPTIONS}
    sequential = compare(methods=METHODS, output=tmp_path / "sequential", tasks="sst2", isolate=False,
                         echo=lambda m: None, latency=FAST_LATENCY, train_options=options)
    lines = []
    began = time.perf_counter()
    on_ray = compare(methods=METHODS, output=tmp_path / "ray", tasks="sst2", ray=True, workers=2, echo=lines.append,
                     latency=FAST_LATENCY, train_options=options)
    assert time.perf_counter() - began < 300
    import ray

    assert not ray.is_initialized()  # the local instance compare started is shut down again
    assert on_ray["settings"]["backend"] == "ray" and "on Ray (a local instance)" in lines[0]
    assert "each job asks for 1 CPU(s)" in lines[0]
    assert set(on_ray) == set(sequential) and set(on_ray["settings"]) == set(sequential["settings"])
    ray_rows = {r["method"]: r for r in on_ray["results"]}
    for row in sequential["results"]:
        other = ray_rows[row["method"]]
        assert other["status"] == row["status"] == "ok"
        assert set(other) == set(row) - {"peak_memory_note"}  # that note is for runs in the compare process
        assert other["metric"] == pytest.approx(row["metric"], abs=1e-9)
        assert other["metrics"] == pytest.approx(row["metrics"], abs=1e-9)
        assert other["final_train_loss"] == pytest.approx(row["final_train_loss"], abs=1e-6)
        assert other["trainable_params"] == row["trainable_params"] and other["seed"] == row["seed"] == 42
        assert other["isolated"] is True and other["threads"] == 1 and other["run_dir"] == row["run_dir"]
        assert (tmp_path / "ray" / other["run_dir"] / "adapter").is_dir()
    assert (tmp_path / "ray" / "report.html").is_file()


def test_an_unreachable_ray_address_fails_in_one_sentence(world, tmp_path, monkeypatch):
    from peftlab.compare import compare

    base, data = world
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(data))
    port = free_loopback_port()
    began = time.perf_counter()
    with pytest.raises(PeftlabError, match=rf"^Cannot reach the Ray cluster at '127.0.0.1:{port}' .*ray start --head"):
        compare(methods="lora", output=tmp_path / "never", tasks="sst2", ray=f"127.0.0.1:{port}",
                echo=lambda m: None, train_options={"model": str(base), **TINY_OPTIONS})
    assert time.perf_counter() - began < 30
    assert not (tmp_path / "never").exists()
