"""Load test for ``peftlab serve``: concurrent requests over loopback, throughput and latency percentiles.

Three configurations, each a real ``peftlab serve`` process on 127.0.0.1 driven for ``--seconds``:

* ``multi``: one base with several adapters of different methods (LoRA SST-2, LoRA MRPC, IA3 SST-2,
  prompt tuning SST-2); the clients spread their requests over all of them (round robin);
* ``lora-alone``: the LoRA SST-2 adapter alone, unmerged;
* ``merged-alone``: the same LoRA adapter merged (``peftlab merge``) and served alone.

Adapters come from ``--workdir`` (trained there, tiny, on first use: quality is irrelevant for speed).
Every client sends one input per request, taken from the SST-2 dev set, and waits for the answer
before sending the next (closed loop); the first second of each run is warm-up. Bounded: ``--seconds``
per configuration and round, at most ``--max-requests`` each, ``--rounds`` (alternating the
configurations, because a shared machine's load drifts) at most 10.

    python benchmarks/serve_load.py --seconds 20 --concurrency 8 --rounds 2 --output runs/serve-bench.json

``--soak SECONDS`` is the endurance test instead: one server (the first of ``--configs``), its capacity
measured closed-loop for ``--seconds``, then requests sent open-loop at ``--rate`` (default: twice that
capacity) for SECONDS. It passes when no answer is a 5xx other than 503 (load shedding), no request fails
at the transport level, and the server's resident memory grows less than 5% from the end of the warm-up
(``--soak-warmup``, default 60 s) to the end. ``--api-key`` runs the server with a key and sends it.

    python benchmarks/serve_load.py --configs multi --soak 600 --api-key bench --output runs/serve-soak.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = {  # name -> (method, task)
    "sst2-lora": ("lora", "sst2"),
    "mrpc-lora": ("lora", "mrpc"),
    "sst2-ia3": ("ia3", "sst2"),
    "sst2-prompt": ("prompt-tuning", "sst2"),
}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def prepare(workdir: Path, data_dir: str | None, train_samples: int) -> dict[str, Path]:
    """Tiny trained runs for every adapter, plus the LoRA SST-2 run merged."""
    from peftlab.training import TrainConfig, train

    runs = {}
    for name, (method, task) in ADAPTERS.items():
        output = workdir / name
        if not (output / "metrics.json").is_file():
            train(TrainConfig(method=method, task=task, model="minilm", output=str(output), epochs=1,
                              max_train_samples=train_samples, max_eval_samples=32, eval_each_epoch=False,
                              progress=False, data_dir=data_dir))
        runs[name] = output
    merged = workdir / "sst2-lora-merged"
    if not (merged / "peftlab_merge.json").is_file():
        from peftlab.merge import merge

        merge(runs["sst2-lora"], merged, data_dir=data_dir)
    runs["sst2-lora-merged"] = merged
    return runs


def dev_texts(data_dir: str | None, count: int = 256) -> list[str]:
    from peftlab.tasks import get_task

    dev = get_task("sst2").load("dev", data_dir)
    return [dev[i]["text"] for i in range(min(count, len(dev)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(adapters: dict[str, Path], port: int, threads: int | None,
                 api_key: str | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "peftlab.cli", "serve", "--base", "minilm", "--host", "127.0.0.1",
               "--port", str(port)]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["PEFTLAB_SERVE_THREADS"] = str(threads)
    env.pop("PEFTLAB_API_KEY", None)
    if api_key:
        env["PEFTLAB_API_KEY"] = api_key
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


@contextlib.contextmanager
def serving(adapters: dict[str, Path], threads: int | None, api_key: str | None):
    """A ``peftlab serve`` process on a free loopback port, ready: yields (url, process); stopped after."""
    port = free_port()
    process = start_server(adapters, port, threads, api_key)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_ready(process: subprocess.Popen, url: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def drive(url: str, names: list[str], texts: list[str], seconds: float, concurrency: int,
          max_requests: int, headers: dict[str, str] | None = None) -> dict:
    """Closed-loop clients for ``seconds`` (or ``max_requests``): latency of every successful request."""
    import httpx

    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    counter = iter(range(max_requests))
    warmup_end = time.perf_counter() + 1.0  # first second: warm-up, not measured
    end = warmup_end + seconds

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60, headers=headers) as session:
            position = index
            while time.perf_counter() < end:
                name = names[position % len(names)]
                text = texts[position % len(texts)]
                position += concurrency
                started = time.perf_counter()
                response = session.post("/v1/predict", json={"adapter": name, "inputs": [text]})
                finished = time.perf_counter()
                if started < warmup_end:
                    continue
                with lock:
                    if next(counter, None) is None:
                        return
                    if response.status_code == 200:
                        latencies.append((finished - started) * 1000.0)
                    else:
                        errors.append(response.status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = min(seconds, max(1e-9, time.perf_counter() - warmup_end))
    server_metrics = httpx.get(url + "/v1/stats", timeout=10, headers=headers).json()
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "seconds": round(elapsed, 2),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50) or 0, 1),
        "p95_ms": round(percentile(latencies, 95) or 0, 1),
        "p99_ms": round(percentile(latencies, 99) or 0, 1),
        "server_mean_batch_rows": server_metrics["batching"]["mean_rows"],
        "server_mixed_adapter_batches": server_metrics["batching"]["mixed_adapter_batches"],
    }


def resident_mb(pid: int) -> float | None:
    """The resident memory of process ``pid`` (Linux /proc), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def soak(url: str, names: list[str], texts: list[str], *, rate: float, seconds: float, warmup: float, pid: int,
         headers: dict[str, str] | None = None, sample_every: float = 10.0, max_outstanding: int = 512) -> dict:
    """Open-loop requests at ``rate`` per second for ``seconds``: status counts and the server's memory."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    statuses: Counter = Counter()
    lock = threading.Lock()
    slots = threading.Semaphore(max_outstanding)  # a client that falls behind drops requests, it does not queue
    limits = httpx.Limits(max_connections=max_outstanding, max_keepalive_connections=64)
    with httpx.Client(base_url=url, timeout=30, headers=headers, limits=limits) as client, \
            ThreadPoolExecutor(max_workers=min(max_outstanding, 128)) as pool:

        def one(index: int) -> None:
            try:
                code = client.post("/v1/predict", json={"adapter": names[index % len(names)],
                                                        "inputs": [texts[index % len(texts)]]}).status_code
            except httpx.HTTPError:
                code = 0  # connection refused, reset or timed out
            finally:
                slots.release()
            with lock:
                statuses[code] += 1

        start = time.perf_counter()
        sent = dropped = 0
        samples: list[tuple[float, float | None]] = []
        next_sample = start
        while True:
            now = time.perf_counter()
            if now >= next_sample:
                samples.append((round(now - start, 1), resident_mb(pid)))
                next_sample += sample_every
            if now >= start + seconds:
                break
            due = start + sent / rate
            if due > now:
                time.sleep(min(due - now, 0.01))
                continue
            if slots.acquire(blocking=False):
                pool.submit(one, sent)
            else:
                dropped += 1
            sent += 1
    after_warmup = next((mb for t, mb in samples if t >= warmup and mb is not None), None)
    final = next((mb for _, mb in reversed(samples) if mb is not None), None)
    growth = round(100.0 * (final - after_warmup) / after_warmup, 2) if after_warmup and final else None
    server_errors = sum(count for code, count in statuses.items() if code >= 500 and code != 503)
    return {
        "rate_rps": round(rate, 1), "seconds": seconds, "sent": sent, "dropped_by_client": dropped,
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "server_errors_not_503": server_errors, "transport_errors": statuses.get(0, 0),
        "rss_mb_after_warmup": after_warmup, "rss_mb_end": final, "rss_growth_pct": growth,
        "rss_samples": samples,
        "passed": server_errors == 0 and statuses.get(0, 0) == 0 and growth is not None and growth < 5.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/serve-bench", help="trained adapters are kept here")
    parser.add_argument("--data-dir", default=None, help="default $PEFTLAB_DATA_DIR")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per configuration")
    parser.add_argument("--concurrency", type=int, default=8, help="simultaneous clients")
    parser.add_argument("--max-requests", type=int, default=20000, help="cap per configuration")
    parser.add_argument("--train-samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the server (PEFTLAB_SERVE_THREADS; 0 = torch's default)")
    parser.add_argument("--configs", default="multi,lora-alone,merged-alone")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the configurations, alternating")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--api-key", default=None, help="start the server with this key and send it")
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                        help="endurance test of the first configuration for SECONDS (at most 3600) instead")
    parser.add_argument("--rate", type=float, default=None, help="--soak: requests per second (default: twice "
                                                                  "the capacity measured over --seconds)")
    parser.add_argument("--soak-warmup", type=float, default=60.0, help="--soak: seconds before memory counts")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.seconds > 600 or args.concurrency < 1 or args.concurrency > 256:
        parser.error("--seconds must be in (0, 600] and --concurrency in [1, 256]")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be 1..10")
    if not 0 <= args.soak <= 3600 or (args.rate is not None and not 0 < args.rate <= 10000):
        parser.error("--soak must be in [0, 3600] seconds and --rate in (0, 10000] requests per second")

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs = prepare(workdir, args.data_dir, args.train_samples)
    texts = dev_texts(args.data_dir)
    configs = {
        "multi": {name: runs[name] for name in ADAPTERS},
        "lora-alone": {"sst2-lora": runs["sst2-lora"]},
        "merged-alone": {"sst2-lora-merged": runs["sst2-lora-merged"]},
    }
    results: dict[str, list[dict]] = {}
    load_before = os.getloadavg()
    order = [c.strip() for c in args.configs.split(",") if c.strip()]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    if args.soak:
        return run_soak(args, configs[order[0]], texts, headers)
    for round_number in range(1, args.rounds + 1):  # rounds alternate the configurations (shared machines drift)
        for config in order:
            adapters = configs[config]
            with serving(adapters, args.threads, args.api_key) as (url, _):
                row = drive(url, list(adapters), texts, args.seconds, args.concurrency, args.max_requests, headers)
            row.update(adapters=list(adapters), round=round_number, load_average_1min=os.getloadavg()[0])
            results.setdefault(config, []).append(row)
            print(config, json.dumps(row), flush=True)

    import torch

    from peftlab.compare import cpu_name

    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "server_torch_threads": args.threads or "default",
               "load_average_after": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__}
    machine["load_average_before"] = load_before
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine,
              "seconds": args.seconds, "concurrency": args.concurrency, "results": results}
    print()
    print("| configuration | round | adapters | requests | errors | throughput (req/s) | p50 ms | p95 ms | p99 ms | "
          "mean rows/batch | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for config, rows in results.items():
        for row in rows:
            print(f"| {config} | {row['round']} | {len(row['adapters'])} | {row['requests']} | {row['errors']} | "
                  f"{row['throughput_rps']} | {row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} | "
                  f"{row['server_mean_batch_rows']} | {row['load_average_1min']:.1f} |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def run_soak(args, adapters: dict[str, Path], texts: list[str], headers: dict[str, str] | None) -> int:
    """Capacity (closed loop), then the open-loop soak at ``--rate`` on the same server process."""
    with serving(adapters, args.threads, args.api_key) as (url, process):
        capacity = drive(url, list(adapters), texts, args.seconds, args.concurrency, args.max_requests, headers)
        rate = args.rate or max(1.0, 2 * capacity["throughput_rps"])
        print("capacity", json.dumps(capacity), flush=True)
        result = soak(url, list(adapters), texts, rate=rate, seconds=args.soak, warmup=args.soak_warmup,
                      pid=process.pid, headers=headers)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "adapters": list(adapters),
              "capacity": capacity, "soak": result, "load_average_after": os.getloadavg(), "cores": os.cpu_count()}
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=1), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
