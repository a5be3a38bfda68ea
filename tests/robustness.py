"""Helpers shared by the robustness tests (overload, client faults, bad requests, bad checkpoints, interrupts).

* :func:`record`: the figures a test measured, for bench-results/robustness. When
  ``THINKEYS_ROBUSTNESS_RECORD`` names a file, each call appends one JSON line
  (``{"topic": ..., **fields}``); otherwise it does nothing, so the tests run the same either way and
  the report (scripts/robustness_report.py) shows exactly what the tests asserted on.
* :func:`metrics` / :func:`wait_until`: read a live server's Prometheus samples (vLLM's ``vllm:*``
  and ours ``thinkeys:*``) and wait for a condition on them.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

RECORD_ENV = "THINKEYS_ROBUSTNESS_RECORD"


def record(topic: str, **fields: Any) -> None:
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"topic": topic, **fields}, default=str) + "\n")


def metrics(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    """``{(sample name, labels without model_name/engine): value}`` from ``/metrics``."""
    response = client.get("/metrics")
    response.raise_for_status()
    return {
        (s.name, frozenset((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine"))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    values = metrics(client)
    key = (name, frozenset(labels.items()))
    if key not in values:
        raise AssertionError(f"{name} {labels} missing from /metrics")
    return values[key]


def cache_info(client: httpx.Client) -> dict[str, str]:
    """vLLM's cache_config labels (num_gpu_blocks, block_size, kv_cache_max_concurrency, ...)."""
    response = client.get("/metrics")
    for family in text_string_to_metric_families(response.text):
        if family.name == "vllm:cache_config_info":
            return family.samples[0].labels
    raise AssertionError("vllm:cache_config_info missing from /metrics")


def finished(client: httpx.Client) -> dict[str, float]:
    """vLLM's finished-request counters by reason (stop, length, abort, error, ...)."""
    return {
        dict(labels)["finished_reason"]: value
        for (name, labels), value in metrics(client).items()
        if name == "vllm:request_success_total"
    }


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def idle(client: httpx.Client) -> bool:
    """No request running or waiting, no KV block in use, and our savings endpoint lists nobody."""
    values = metrics(client)
    get = lambda name: values[(name, frozenset())]  # noqa: E731
    users = client.get("/v1/thinkeys/savings").json()["active_users"]
    return (
        get("vllm:num_requests_running") == 0
        and get("vllm:num_requests_waiting") == 0
        and get("vllm:kv_cache_usage_perc") == 0
        and users == []
    )
