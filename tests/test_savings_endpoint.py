"""The savings endpoint plugin: per-request figures, gauges, OpenAPI, and a real served thin-key model."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from thinkeys.accounting import KVFootprint, compare, make_geometry, resolve_kv_dtype
from thinkeys.server.metrics import SavingsMetrics
from thinkeys.server.savings import RunningRequest, ServerSavings

GiB = 1024**3


@pytest.fixture
def savings() -> ServerSavings:
    """A server of 2 layers x 2 KV heads, d = 64, r = 16, bf16, block 16, 1 GiB, max_model_len 2048."""
    geometry = make_geometry(num_layers=2, num_query_heads=4, num_kv_heads=2, head_dim=64, key_dim=16)
    thin = KVFootprint(geometry=geometry, kv_dtype=resolve_kv_dtype("bfloat16"), block_size=16)
    # 2 x 2 x (16 + 64) x 2 = 640 bytes per token, 10240 per block: 1 GiB holds 104857 blocks.
    comparison = compare(thin, kv_memory_bytes=GiB, context_tokens=2048, thin_num_blocks=104_857)
    return ServerSavings(model="tiny-thin", comparison=comparison, memory_source="configured")


def test_per_request_bytes(savings):
    requests = [
        RunningRequest(request_id="cmpl-a-0", prompt_tokens=10, output_tokens=0),  # queued / prefilling
        RunningRequest(request_id="cmpl-b-0", prompt_tokens=10, output_tokens=1),  # 10 cached: 1 block
        RunningRequest(request_id="cmpl-c-0", prompt_tokens=30, output_tokens=4),  # 33 cached: 3 blocks
    ]
    users, totals = savings.active(requests)
    assert [u.cached_tokens for u in users] == [0, 10, 33]
    # thin block: 16 x 640 = 10240 bytes; stock block: 16 x 2 x 2 x 128 x 2 = 16384 bytes.
    assert [u.kv_bytes for u in users] == [0, 10_240, 30_720]
    assert [u.stock_kv_bytes for u in users] == [0, 16_384, 49_152]
    assert [u.saved_bytes for u in users] == [0, 6_144, 18_432]
    assert totals.model_dump() == {
        "users": 3, "cached_tokens": 43, "kv_bytes": 40_960, "stock_kv_bytes": 65_536, "saved_bytes": 24_576,
    }


def test_report_and_startup_line(savings):
    report = savings.report([RunningRequest(request_id="x", prompt_tokens=5, output_tokens=3)])
    assert report.thin_keys and (report.rank, report.head_dim) == (16, 64)
    assert report.bytes_per_token.model_dump() == {"thin": 640, "stock": 1024}
    assert report.num_blocks.model_dump() == {"thin": 104_857, "stock": GiB // 16_384}
    assert report.capacity_tokens.model_dump() == {"thin": 104_857 * 16, "stock": 65_536 * 16}
    assert report.max_concurrency.context_tokens == 2048
    assert report.max_concurrency.thin == 104_857 / 128
    assert report.concurrency_gain == pytest.approx(104_857 / 65_536)
    assert report.per_user_savings_bytes == 2048 * (1024 - 640)
    assert report.active_totals.users == 1 and report.active_users[0].cached_tokens == 7
    line = savings.startup_line()
    assert "KV bytes/token 640 thin vs 1,024 stock" in line
    assert "holds 1,677,712 tokens thin vs 1,048,576 stock" in line
    assert "gain 1.60x" in line


def test_engine_figures_win(savings):
    engine = ServerSavings(
        model="m", comparison=savings.comparison, memory_source="configured",
        engine_capacity_tokens=123, engine_max_concurrency=4.5,
    )
    report = engine.report([])
    assert report.capacity_tokens.thin == 123
    assert report.max_concurrency.thin == 4.5
    assert report.concurrency_gain == pytest.approx(4.5 / savings.comparison.stock.max_concurrency)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_gauges_follow_running_requests(savings):
    registry = CollectorRegistry()
    metrics = SavingsMetrics(registry)
    running: list[RunningRequest] = []
    assert metrics.publish(savings, lambda: savings.active(running)[1]) == []
    values = _samples(registry)
    assert values[("thinkeys:kv_bytes_per_token", (("layout", "thin"),))] == 640
    assert values[("thinkeys:kv_bytes_per_token", (("layout", "stock"),))] == 1024
    assert values[("thinkeys:kv_cache_capacity_tokens", (("layout", "thin"),))] == 104_857 * 16
    assert values[("thinkeys:concurrency_gain", ())] == pytest.approx(104_857 / 65_536)
    assert values[("thinkeys:active_users", ())] == 0
    running.append(RunningRequest(request_id="a", prompt_tokens=30, output_tokens=4))
    values = _samples(registry)
    assert values[("thinkeys:active_users", ())] == 1
    assert values[("thinkeys:active_cached_tokens", ())] == 33
    assert values[("thinkeys:active_kv_bytes", (("layout", "thin"),))] == 30_720
    assert values[("thinkeys:active_saved_bytes", ())] == 18_432
    running.clear()
    assert _samples(registry)[("thinkeys:active_saved_bytes", ())] == 0


def test_plugin_loads_through_vllm_and_is_in_openapi(monkeypatch):
    pytest.importorskip("vllm")
    from fastapi import FastAPI
    from vllm.plugins import load_endpoint_plugins

    from thinkeys.server.endpoint import SAVINGS_PATH, ThinKeysEndpoint

    monkeypatch.setenv("VLLM_PLUGINS", "thinkeys_savings")
    plugins = load_endpoint_plugins(("generate",))
    assert [type(p) for p in plugins] == [ThinKeysEndpoint]
    assert load_endpoint_plugins(("embed",)) == []  # needs a generating model
    app = FastAPI()
    plugins[0].attach_router(app)
    schema = app.openapi()
    assert "get" in schema["paths"][SAVINGS_PATH]
    report = schema["components"]["schemas"]["SavingsReport"]
    for field in ("model", "rank", "head_dim", "kv_cache_dtype", "bytes_per_token", "kv_cache_memory_bytes",
                  "capacity_tokens", "max_concurrency", "concurrency_gain", "per_user_savings_bytes",
                  "active_users", "active_totals"):
        assert field in report["properties"]


# --- against a real server -----------------------------------------------------------------------


def _get(client, path: str):
    response = client.get(path)
    response.raise_for_status()
    return response


def _vllm_cache_info(client) -> dict[str, str]:
    """vLLM's own cache_config (with kv_cache_size_tokens) from its vllm:cache_config_info gauge."""
    for family in text_string_to_metric_families(_get(client, "/metrics").text):
        if family.name == "vllm:cache_config_info":
            return family.samples[0].labels
    raise AssertionError("vllm:cache_config_info missing from /metrics")


def _metric(client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(_get(client, "/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"{name} {labels} missing from /metrics")


def _wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _stream_chunks(response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


@pytest.mark.engine
def test_served_savings(thin_server):
    import httpx

    from thinkeys.checkpoint import ThinKeyConfig

    with httpx.Client(base_url=thin_server.base_url, timeout=60) as client:
        report = _get(client, "/v1/thinkeys/savings").json()
        info = _vllm_cache_info(client)
        # The thin capacity is vLLM's own figure.
        assert report["capacity_tokens"]["thin"] == int(info["kv_cache_size_tokens"])
        assert report["num_blocks"]["thin"] == int(info["num_gpu_blocks"])
        assert report["max_concurrency"]["thin"] == pytest.approx(float(info["kv_cache_max_concurrency"]))
        # And the accounting's prediction for that memory agrees with what the engine allocated.
        assert report["kv_cache_memory_source"] == "configured"
        assert report["num_blocks"]["thin"] == report["kv_cache_memory_bytes"] // report["bytes_per_block"]["thin"]

        thin = ThinKeyConfig.from_pretrained(thin_server.model_dir)
        config = json.loads((thin_server.model_dir / "config.json").read_text())
        assert report["model"] == thin_server.served_model_name
        assert report["thin_keys"] is True
        assert (report["rank"], report["head_dim"]) == (thin.rank, thin.head_dim)
        element = {"bfloat16": 2, "float16": 2, "float32": 4}[report["kv_cache_dtype"]]
        layers, kv_heads = config["num_hidden_layers"], config.get("num_key_value_heads", config["num_attention_heads"])
        assert report["bytes_per_token"] == {
            "thin": layers * kv_heads * (thin.rank + thin.head_dim) * element,
            "stock": layers * kv_heads * 2 * thin.head_dim * element,
        }
        assert report["concurrency_gain"] == pytest.approx(
            report["max_concurrency"]["thin"] / report["max_concurrency"]["stock"]
        )
        assert report["concurrency_gain"] > 1
        assert "/v1/thinkeys/savings" in _get(client, "/openapi.json").json()["paths"]
        assert _metric(client, "thinkeys:kv_cache_capacity_tokens", layout="thin") == report["capacity_tokens"]["thin"]
        assert _metric(client, "thinkeys:concurrency_gain") == pytest.approx(report["concurrency_gain"])


@pytest.mark.engine
def test_active_users_follow_streams(thin_server):
    import httpx

    prompt = "The quick brown fox jumps over the lazy dog near the river bank."
    with httpx.Client(base_url=thin_server.base_url, timeout=60) as client:
        static = _get(client, "/v1/thinkeys/savings").json()
        block, thin_block = static["block_size"], static["bytes_per_block"]["thin"]
        prompt_tokens = client.post("/tokenize", json={"model": thin_server.served_model_name, "prompt": prompt})
        prompt_tokens = prompt_tokens.json()["count"]
        body = {
            "model": thin_server.served_model_name,
            "prompt": prompt,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
        }

        def listed(request_id: str) -> list[dict]:
            users = _get(client, "/v1/thinkeys/savings").json()["active_users"]
            return [u for u in users if u["request_id"].startswith(request_id)]

        # A long stream, read a little, then the client goes away.
        long_body = {**body, "max_tokens": static["max_concurrency"]["context_tokens"] - prompt_tokens - 1}
        generated_before = _metric(client, "vllm:generation_tokens_total")
        with httpx.Client(base_url=thin_server.base_url, timeout=60) as streamer:
            with streamer.stream("POST", "/v1/completions", json=long_body) as response:
                response.raise_for_status()
                chunks = _stream_chunks(response)
                first = [next(chunks) for _ in range(3)]
                request_id = first[0]["id"]
                [user] = listed(request_id)
                assert user["prompt_tokens"] == prompt_tokens
                assert user["output_tokens"] >= 3
                assert user["cached_tokens"] == prompt_tokens + user["output_tokens"] - 1
                assert user["kv_bytes"] == -(-user["cached_tokens"] // block) * thin_block
                assert user["saved_bytes"] == user["stock_kv_bytes"] - user["kv_bytes"] > 0
                assert _metric(client, "thinkeys:active_users") >= 1
                assert _metric(client, "thinkeys:active_saved_bytes") >= user["saved_bytes"]
        # Disconnected: vLLM aborts the request and it leaves the list.
        assert _wait_until(lambda: not listed(request_id)), "a disconnected stream is still listed"
        assert _wait_until(lambda: _metric(client, "thinkeys:active_users") == 0)
        # ... because it was aborted, not because it ran to max_tokens.
        assert _metric(client, "vllm:generation_tokens_total") - generated_before < long_body["max_tokens"]

        # A short stream read to the end.
        with client.stream("POST", "/v1/completions", json={**body, "max_tokens": 8}) as response:
            response.raise_for_status()
            chunks = list(_stream_chunks(response))
        assert _wait_until(lambda: not listed(chunks[0]["id"]), timeout=5), "a finished stream is still listed"
        final = _get(client, "/v1/thinkeys/savings").json()
        assert final["active_totals"]["users"] == len(final["active_users"])
