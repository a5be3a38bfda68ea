"""Overload: 4N streaming users on a KV budget that holds N; and the API key on the same servers.

One thin-key (r = 8) and one stock tiny Llama are served with the same small KV budget (1 MiB) and
max_model_len 256, so a user who fills the context needs 2 of 128-token blocks and the budget
holds N of them (vLLM's own "Maximum concurrency" figure; more for thin keys, whose blocks are
smaller). 4N users then stream at once, each asking for exactly max_model_len tokens: vLLM must
queue them and preempt running ones when blocks run out, and every request must still finish
with all its tokens, with the server healthy throughout and the KV cache empty afterwards.

The servers are started as a deployment would be: the key in ``VLLM_API_KEY`` (not on the command
line) and ``--require-api-key``, which is where the API-key tests below come from.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import pytest

from robustness import cache_info, finished, idle, metric, metrics, record, wait_until
from server import start_servers

pytestmark = pytest.mark.engine

KEY = "overload-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
KV_CACHE_MEMORY = "1M"
MAX_MODEL_LEN = 256
LOAD_FACTOR = 4


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    """``{"thin": ServedModel, "stock": ServedModel}``, started together, both behind the API key."""
    logs = tmp_path_factory.mktemp("overload")
    flags = ["--kv-cache-memory-bytes", KV_CACHE_MEMORY, "--max-model-len", str(MAX_MODEL_LEN), "--require-api-key"]
    specs = [
        dict(model_dir=checkpoints[name], log_path=logs / f"{label}.log", served_model_name=f"tiny-{label}",
             extra_args=flags, env={"VLLM_API_KEY": KEY})
        for label, name in (("thin", "llama-thin"), ("stock", "llama"))
    ]  # fmt: skip
    with start_servers(specs) as (thin, stock):
        yield {"thin": thin, "stock": stock}


def _client(served) -> httpx.Client:
    return httpx.Client(base_url=served.base_url, headers=AUTH, timeout=60)


def users_held(served) -> int:
    """N: how many users of max_model_len tokens the server's KV cache holds at once (vLLM's figure)."""
    with _client(served) as client:
        return math.floor(float(cache_info(client)["kv_cache_max_concurrency"]))


async def _stream(client: httpx.AsyncClient, body: dict) -> dict:
    """One streaming completion read to the end: status, finish reason, usage, whether [DONE] came."""
    out = {"status": None, "finish_reason": None, "usage": None, "done": False, "error": None}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        out["status"] = response.status_code
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                out["done"] = True
            elif line.startswith("data: "):
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    out["error"] = chunk["error"]
                for choice in chunk.get("choices") or []:
                    out["finish_reason"] = choice.get("finish_reason") or out["finish_reason"]
                out["usage"] = chunk.get("usage") or out["usage"]
    return out


async def _watch(client: httpx.AsyncClient, stop: asyncio.Event, seen: dict) -> None:
    """Poll /health and /metrics while the users run: peaks of running/waiting requests and KV use."""
    while not stop.is_set():
        seen["polls"] += 1
        if (await client.get("/health")).status_code != 200:
            seen["unhealthy"] += 1
        text = (await client.get("/metrics")).text
        for line in text.splitlines():
            for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
                if line.startswith(name + "{"):
                    seen[name] = max(seen.get(name, 0.0), float(line.rsplit(" ", 1)[1]))
        await asyncio.sleep(0.2)


async def _offer(served, bodies: list[dict]) -> tuple[list[dict], dict, float]:
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(base_url=served.base_url, headers=AUTH, timeout=600, limits=limits) as client:
        stop, seen = asyncio.Event(), {"polls": 0, "unhealthy": 0}
        watcher = asyncio.create_task(_watch(client, stop, seen))
        start = time.monotonic()
        results = await asyncio.gather(*(_stream(client, body) for body in bodies))
        seconds = time.monotonic() - start
        stop.set()
        await watcher
    return results, seen, seconds


@pytest.mark.parametrize("label", ["thin", "stock"])
def test_4n_streaming_users_all_complete(servers, label):
    served = servers[label]
    held = users_held(served)
    offered = LOAD_FACTOR * held
    with _client(served) as client:
        bodies = []
        for i in range(offered):
            prompt = f"User {i} asks about the market, the weather and the quick brown fox near the river bank."
            prompt_tokens = client.post("/tokenize", json={"model": served.served_model_name, "prompt": prompt}).json()["count"]
            bodies.append({
                "model": served.served_model_name, "prompt": prompt, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0,
                "max_tokens": MAX_MODEL_LEN - prompt_tokens,  # every user fills the whole context
            })  # fmt: skip
        before = finished(client)
        preempted_before = metric(client, "vllm:num_preemptions_total")

        results, seen, seconds = asyncio.run(_offer(served, bodies))

        assert wait_until(lambda: idle(client), timeout=60), f"not idle afterwards: {metrics(client)}"
        after = finished(client)
        preemptions = metric(client, "vllm:num_preemptions_total") - preempted_before
        assert client.get("/health").status_code == 200
    delta = {reason: after.get(reason, 0) - before.get(reason, 0) for reason in after}
    failed = [r for r in results if r["status"] != 200 or r["error"] or not r["done"] or r["finish_reason"] != "length"]
    short = [
        (r["usage"], b["max_tokens"]) for r, b in zip(results, bodies)
        if not r["usage"] or r["usage"]["completion_tokens"] != b["max_tokens"]
    ]  # fmt: skip
    record(
        "overload", model=label, users_held=held, users_offered=offered, completed=offered - len(failed),
        failed=len(failed), short=len(short), engine_errors=delta.get("error", 0), aborted=delta.get("abort", 0),
        peak_running=seen.get("vllm:num_requests_running"), peak_waiting=seen.get("vllm:num_requests_waiting"),
        peak_kv_usage=seen.get("vllm:kv_cache_usage_perc"), preemptions=preemptions, unhealthy_polls=seen["unhealthy"],
        health_polls=seen["polls"], seconds=round(seconds, 1), kv_usage_after=0.0, tokens_per_user=MAX_MODEL_LEN,
    )  # fmt: skip
    assert held >= 2
    assert not failed, f"{len(failed)} of {offered} requests failed: {failed[:3]}"
    assert not short, f"{len(short)} requests got fewer tokens than asked: {short[:3]}"
    assert delta.get("length", 0) == offered and delta.get("error", 0) == 0 and delta.get("abort", 0) == 0
    assert seen["unhealthy"] == 0 and seen["polls"] > 0
    # The overload was real: users had to wait for KV blocks (queued, or preempted and recomputed).
    assert seen.get("vllm:num_requests_waiting", 0) > 0 or preemptions > 0
    assert seen.get("vllm:kv_cache_usage_perc", 0) > 0.5


def test_thin_keys_hold_more_users_in_the_same_kv_memory(servers):
    thin, stock = users_held(servers["thin"]), users_held(servers["stock"])
    with _client(servers["thin"]) as client:
        savings = client.get("/v1/thinkeys/savings").json()
    # The thin server's own prediction of the stock layout in its memory matches the real stock server.
    assert math.floor(savings["max_concurrency"]["stock"]) == stock
    assert thin > stock
    record("capacity", kv_cache_memory=KV_CACHE_MEMORY, max_model_len=MAX_MODEL_LEN, users_thin=thin, users_stock=stock)


# --- the API key, on the same servers -----------------------------------------------------------------

#: Routes that run the model or read its tokenizer/state: all need the key (vLLM itself guards only /v1...).
GUARDED = [
    ("GET", "/v1/thinkeys/savings", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", "/invocations", {"prompt": "hi", "max_tokens": 2}),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1, 2]}),
    ("GET", "/load", None),
]
#: Probes and schema stay open: container health checks and Prometheus scrapes carry no key.
PUBLIC = ["/health", "/ping", "/metrics", "/version", "/openapi.json"]


def test_api_key_guards_savings_and_every_inference_route(servers):
    served = servers["thin"]
    answered = {}
    with httpx.Client(base_url=served.base_url, timeout=60) as anonymous:
        for method, path, body in GUARDED:
            payload = None if body is None else {"model": served.served_model_name, **body}
            for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}):
                response = anonymous.request(method, path, json=payload, headers=headers)
                assert response.status_code == 401, f"{method} {path} {headers}: {response.status_code} {response.text[:200]}"
                assert response.json() == {"error": "Unauthorized"}
            keyed = anonymous.request(method, path, json=payload, headers=AUTH)
            assert keyed.status_code == 200, f"{method} {path} with the key: {keyed.status_code} {keyed.text[:200]}"
            answered[f"{method} {path}"] = "401 without / with a wrong key, 200 with the key"
        for path in PUBLIC:
            assert anonymous.get(path).status_code == 200, path
            answered[f"GET {path}"] = "200 without a key (public)"
        savings = anonymous.get("/v1/thinkeys/savings", headers=AUTH).json()
        assert savings["thin_keys"] is True
    record("api_key", routes=answered)
