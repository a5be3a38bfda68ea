"""Prometheus gauges for the thin-key savings, served on vLLM's own ``/metrics``.

vLLM's ``/metrics`` exports prometheus_client's default registry (``v1/metrics/prometheus.py``),
so gauges made here appear next to ``vllm:*`` with the same ``model_name`` label. The static
figures are set once at start-up; the live ones (running requests, their KV bytes and what they
save) are read from the request tracker at scrape time (``Gauge.set_function``), so they are exact
whenever Prometheus looks, with no polling task.

With several API-server processes vLLM switches prometheus_client to multiprocess mode, which
exports only values written with ``set()``: the static gauges still work, the live ones do not
(each process only sees its own requests anyway), and a warning says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from thinkeys.server.savings import ActiveTotals, ServerSavings

PREFIX = "thinkeys:"


class SavingsMetrics:
    """The gauges. One instance per process (see :func:`get_metrics`): prometheus_client refuses duplicates."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(
                PREFIX + name, doc, labelnames=("model_name", *labels), registry=registry, multiprocess_mode="mostrecent"
            )

        # Static: fixed once the engine has allocated its KV cache.
        self.key_rank = gauge("key_rank", "Cached key dims per KV head (r); head_dim for a stock model")
        self.head_dim = gauge("head_dim", "Value dims per KV head (d), the stock key width")
        self.bytes_per_token = gauge("kv_bytes_per_token", "KV-cache bytes per token, all layers", "layout")
        self.memory = gauge("kv_cache_memory_bytes", "KV-cache memory the thin and stock capacities are counted in")
        self.num_blocks = gauge("kv_cache_blocks", "KV-cache blocks in that memory", "layout")
        self.capacity = gauge(
            "kv_cache_capacity_tokens", "KV-cache capacity in tokens (thin: vLLM's kv_cache_size_tokens)", "layout"
        )
        self.concurrency = gauge("max_concurrency", "Requests of max_model_len tokens that fit at once", "layout")
        self.gain = gauge("concurrency_gain", "max_concurrency thin / stock")
        self.per_user_saved = gauge(
            "per_user_saved_bytes", "KV bytes one request of max_model_len tokens saves against stock keys"
        )
        # Live: the requests running now.
        self.active_users = gauge("active_users", "Unfinished requests")
        self.active_tokens = gauge("active_cached_tokens", "Cached tokens of unfinished requests")
        self.active_kv = gauge(
            "active_kv_bytes", "KV bytes unfinished requests occupy (thin), or would with stock keys (stock)", "layout"
        )
        self.active_saved = gauge("active_saved_bytes", "KV bytes unfinished requests save against stock keys")

    def publish(self, savings: ServerSavings, live_totals: Callable[[], ActiveTotals]) -> list[str]:
        """Set the static gauges and bind the live ones to ``live_totals``; returns warnings to log."""
        report = savings.report([])
        name = report.model
        self.key_rank.labels(name).set(report.rank)
        self.head_dim.labels(name).set(report.head_dim)
        self.memory.labels(name).set(report.kv_cache_memory_bytes)
        for layout in ("thin", "stock"):
            self.bytes_per_token.labels(name, layout).set(getattr(report.bytes_per_token, layout))
            self.num_blocks.labels(name, layout).set(getattr(report.num_blocks, layout))
            self.capacity.labels(name, layout).set(getattr(report.capacity_tokens, layout))
            self.concurrency.labels(name, layout).set(getattr(report.max_concurrency, layout))
        self.gain.labels(name).set(report.concurrency_gain if report.concurrency_gain is not None else float("nan"))
        self.per_user_saved.labels(name).set(report.per_user_savings_bytes)

        self.active_users.labels(name).set_function(lambda: live_totals().users)
        self.active_tokens.labels(name).set_function(lambda: live_totals().cached_tokens)
        self.active_kv.labels(name, "thin").set_function(lambda: live_totals().kv_bytes)
        self.active_kv.labels(name, "stock").set_function(lambda: live_totals().stock_kv_bytes)
        self.active_saved.labels(name).set_function(lambda: live_totals().saved_bytes)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return [
                "prometheus_client runs in multiprocess mode (several API servers): the live thinkeys:active_* "
                "gauges are not exported; GET /v1/thinkeys/savings still lists running requests"
            ]
        return []


_METRICS: SavingsMetrics | None = None


def get_metrics() -> SavingsMetrics:
    """The process's gauges, created on first use in prometheus_client's default registry."""
    global _METRICS
    if _METRICS is None:
        _METRICS = SavingsMetrics()
    return _METRICS
