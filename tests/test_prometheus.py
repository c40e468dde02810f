"""GET /metrics in the Prometheus text format, scraped from a real server on 127.0.0.1 and parsed with
prometheus_client's own parser; the JSON summary lives at /v1/stats. With an API key, /metrics needs it."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from test_serve_auth import running, save_lora_run, world  # noqa: E402,F401 (world: a fixture)

KEY = "prometheus-key-0123456789"


@pytest.fixture(scope="module")
def served(world):
    """test_serve_auth's tiny BERT base with two LoRA adapters, served with a key."""
    from peftlab.serving import build
    from peftlab.serving.app import create_app

    second = save_lora_run(world["base"], world["top"] / "prometheus-b", seed=3)
    engine = build(str(world["base"]), {"a": str(world["root"] / "good"), "b": str(second)})
    try:
        with running(create_app(engine, api_keys=[KEY])) as url:
            with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
                yield client, url
    finally:
        engine.stop()


def scrape(client) -> dict[str, dict]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    families = {}
    for family in text_string_to_metric_families(response.text):
        families[family.name] = family
    return families


def value(family, name: str, **labels) -> float:
    found = [s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, family.samples)
    return found[0]


def test_metrics_parse_and_count_what_happened(served):
    client, _ = served
    for _ in range(3):
        assert client.post("/v1/predict", json={"adapter": "a", "inputs": ["fine", "bad"]}).status_code == 200
    assert client.post("/v1/predict", json={"adapter": "b", "inputs": ["fine"]}).status_code == 200
    assert client.post("/v1/predict", json={"adapter": "no-such-adapter", "inputs": ["x"]}).status_code == 404
    assert client.post("/v1/predict", json={"adapter": "a", "inputs": [{"nonsense": 1}]}).status_code == 422

    families = scrape(client)
    requests = families["peftlab_requests"]
    assert requests.type == "counter"
    assert value(requests, "peftlab_requests_total", adapter_name="a", endpoint="predict", status="200") == 3
    assert value(requests, "peftlab_requests_total", adapter_name="b", endpoint="predict", status="200") == 1
    assert value(requests, "peftlab_requests_total", adapter_name="a", endpoint="predict", status="422") == 1
    # a name nobody loaded never becomes a label value
    assert value(requests, "peftlab_requests_total", adapter_name="unknown", endpoint="predict", status="404") == 1
    assert not any("no-such-adapter" in str(s.labels) for f in families.values() for s in f.samples)

    latency = families["peftlab_request_duration_seconds"]
    assert latency.type == "histogram"
    assert value(latency, "peftlab_request_duration_seconds_count", adapter_name="a", endpoint="predict") == 3
    assert value(latency, "peftlab_request_duration_seconds_sum", adapter_name="a", endpoint="predict") > 0
    assert value(latency, "peftlab_request_duration_seconds_bucket", adapter_name="a", endpoint="predict", le="+Inf") == 3
    assert value(families["peftlab_request_inputs"], "peftlab_request_inputs_total", adapter_name="a") >= 6

    batches = families["peftlab_batch_rows"]
    assert batches.type == "histogram" and value(batches, "peftlab_batch_rows_count") >= 4
    assert value(families["peftlab_queue_depth"], "peftlab_queue_depth") == 0
    assert value(families["peftlab_adapters_loaded"], "peftlab_adapters_loaded") == 2
    assert value(families["peftlab_adapter_info"], "peftlab_adapter_info", adapter_name="a", method="lora",
                 kind="seq-cls") == 1
    assert value(families["peftlab_worker_up"], "peftlab_worker_up") == 1
    assert value(families["peftlab_uptime_seconds"], "peftlab_uptime_seconds") > 0


def test_the_json_summary_moved_to_stats(served):
    client, _ = served
    stats = client.get("/v1/stats").json()
    assert {"requests", "errors", "batching", "adapters", "queue_depth"} <= set(stats)
    assert "# TYPE" not in client.get("/v1/stats").text


def test_metrics_need_the_key_when_one_is_set(served):
    _, url = served
    anonymous = httpx.get(url + "/metrics", timeout=30)
    assert anonymous.status_code == 401 and "api key" in anonymous.json()["error"].lower()
    assert httpx.get(url + "/health", timeout=30).status_code == 200
