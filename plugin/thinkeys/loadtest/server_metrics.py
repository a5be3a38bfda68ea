"""What the server says about its own queue: vLLM's Prometheus ``/metrics``, sampled during a load step.

The client sees latencies; only the server knows whether a request was *running* (holding KV blocks
and being stepped) or *waiting* (queued because the KV cache, or the step's token budget, was full),
and how often it had to preempt a running request to free blocks. vLLM publishes exactly that as
gauges and counters, so a load step samples ``/metrics`` a few times a second and keeps:

* ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` (gauges, summed over engines),
* ``vllm:num_preemptions`` (a counter: the step's count is last minus first sample),
* ``vllm:kv_cache_usage_perc`` (gauge, 0..1),
* once per server, ``vllm:cache_config_info`` (its labels carry ``num_gpu_blocks`` and
  ``block_size``: the KV capacity the engine actually allocated).

The text format is parsed with ``prometheus_client.parser`` (the library vLLM itself exports with).
Behind a load balancer, give every replica's ``/metrics`` URL: samples are summed across them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import aiohttp
import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, computed_field

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
PREEMPTIONS = "vllm:num_preemptions"  # counter; its sample is named ..._total
KV_USAGE = "vllm:kv_cache_usage_perc"
CACHE_INFO = "vllm:cache_config_info"


class MetricsSample(BaseModel):
    """One scrape of every metrics URL, summed (``t`` is seconds since the step started)."""

    t: float
    running: float
    waiting: float
    preemptions: float
    kv_cache_usage: float  # mean over replicas, 0..1


class QueueSummary(BaseModel):
    """What the server reported during one load step."""

    samples: int
    max_running: float
    max_waiting: float
    mean_waiting: float
    preemptions: float
    max_kv_cache_usage: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def queued(self) -> bool:
        """Some request had to wait (queued, or preempted back into the queue) during the step."""
        return self.max_waiting > 0 or self.preemptions > 0


def parse_metrics(text: str) -> dict[str, float]:
    """Sum of every sample of the families we read, by family name (``preemptions`` from ``_total``)."""
    totals = {RUNNING: 0.0, WAITING: 0.0, PREEMPTIONS: 0.0, KV_USAGE: 0.0}
    kv_count = 0
    for family in text_string_to_metric_families(text):
        if family.name not in totals:
            continue
        for sample in family.samples:
            if family.name == PREEMPTIONS and not sample.name.endswith("_total"):
                continue  # skip ..._created
            totals[family.name] += sample.value
            kv_count += family.name == KV_USAGE
    if kv_count:
        totals[KV_USAGE] /= kv_count
    return totals


def parse_cache_info(text: str) -> dict[str, Any]:
    """Labels of ``vllm:cache_config_info`` (``num_gpu_blocks``, ``block_size``, ...); empty if absent."""
    for family in text_string_to_metric_families(text):
        if family.name == CACHE_INFO and family.samples:
            return dict(family.samples[0].labels)
    return {}


async def fetch_text(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> str:
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as response:
        response.raise_for_status()
        return await response.text()


async def scrape(session: aiohttp.ClientSession, urls: list[str], headers: dict[str, str] | None = None) -> dict[str, float]:
    """One sample summed over ``urls`` (kv usage averaged)."""
    texts = await asyncio.gather(*(fetch_text(session, url, headers) for url in urls))
    return _sum_scrapes(texts)


def _sum_scrapes(texts: list[str]) -> dict[str, float]:
    parsed = [parse_metrics(text) for text in texts]
    total = {key: sum(p[key] for p in parsed) for key in (RUNNING, WAITING, PREEMPTIONS)}
    total[KV_USAGE] = sum(p[KV_USAGE] for p in parsed) / len(parsed)
    return total


class MetricsSampler:
    """Samples ``urls`` every ``interval`` seconds in a background thread while a load step runs.

    Use as ``async with MetricsSampler(urls, ...) as sampler: ...``; ``sampler.samples`` then holds
    the series and ``sampler.summary()`` the step's numbers. A scrape that fails is counted in
    ``errors`` and skipped: a slow ``/metrics`` must not stop the load.

    The sampler has its own thread and a blocking HTTP client rather than a task on the load's event
    loop: that loop carries every user's token stream (hundreds of SSE events a second on a fast
    model) and stalls whenever the process does (see ``ramp._frozen_heap``); a sampling task queued
    behind it was seen to miss whole seconds, and with them a queue that lasted less than that.
    """

    def __init__(self, urls: list[str], *, interval: float = 0.25, headers: dict[str, str] | None = None) -> None:
        self.urls, self.interval, self.headers = urls, interval, headers or {}
        self.samples: list[MetricsSample] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def sample_once(self, client: httpx.Client) -> None:
        try:
            texts = []
            for url in self.urls:
                response = client.get(url, headers=self.headers)
                response.raise_for_status()
                texts.append(response.text)
        except (httpx.HTTPError, ValueError):
            self.errors += 1
            return
        values = _sum_scrapes(texts)
        self.samples.append(
            MetricsSample(
                t=time.perf_counter() - self._t0,
                running=values[RUNNING],
                waiting=values[WAITING],
                preemptions=values[PREEMPTIONS],
                kv_cache_usage=values[KV_USAGE],
            )
        )

    def _loop(self, client: httpx.Client) -> None:
        while not self._stop.wait(self.interval):
            self.sample_once(client)

    async def __aenter__(self) -> "MetricsSampler":
        self._client = httpx.Client(timeout=10, trust_env=False)
        self._t0 = time.perf_counter()
        await asyncio.to_thread(self.sample_once, self._client)  # the baseline for the preemption counter
        self._thread = threading.Thread(target=self._loop, args=(self._client,), name="metrics-sampler", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._thread is not None
        self._stop.set()
        await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self.sample_once, self._client)  # the final counter value, after the last request finished
        self._client.close()

    def summary(self) -> QueueSummary:
        s = self.samples
        if not s:
            return QueueSummary(samples=0, max_running=0, max_waiting=0, mean_waiting=0, preemptions=0, max_kv_cache_usage=0)
        return QueueSummary(
            samples=len(s),
            max_running=max(x.running for x in s),
            max_waiting=max(x.waiting for x in s),
            mean_waiting=sum(x.waiting for x in s) / len(s),
            preemptions=s[-1].preemptions - s[0].preemptions,
            max_kv_cache_usage=max(x.kv_cache_usage for x in s),
        )
