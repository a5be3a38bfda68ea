"""What a running thin-key server saves: the figures behind the start-up line, the endpoint and the gauges.

Built once per API-server process after the engine has started, from the config the engine sent
back (vLLM syncs ``num_gpu_blocks``, ``kv_cache_size_tokens``, ``kv_cache_max_concurrency``,
``block_size`` and ``max_model_len`` into the frontend's ``VllmConfig`` in its start-up handshake).
The thin capacity is the engine's own figure; the stock capacity is what vLLM would allocate for
the stock model in the same KV memory, computed by :mod:`thinkeys.accounting` (as is every other
number here). Byte figures are for the whole model across pipeline-parallel stages (every stage caches
its own layers in a budget of its own, and a block spans all stages: ``pp`` x the budget holds the
engine's blocks of every layer), and per tensor-parallel rank (each rank caches its share of the KV
heads); with data parallelism, one engine.

Per-request figures count the tokens whose KV the engine has written as far as the API server
knows: a request that has streamed ``n >= 1`` tokens has ``prompt + n - 1`` cached tokens (the
newest token's KV is written in the next step) and holds ``cdiv(that, block_size)`` blocks; a
request still queued or in prefill counts 0. Prefix-cache blocks shared between requests are
counted once per request that uses them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from thinkeys.accounting import (
    CapacityComparison,
    KVFootprint,
    compare,
    format_bytes,
    format_gain,
    geometry_from_config,
    resolve_kv_dtype,
)
from thinkeys.checkpoint import is_thin_key_config

# --- the JSON served at /v1/thinkeys/savings ---------------------------------------------------


class ThinStock(BaseModel):
    thin: int
    stock: int


class MaxConcurrency(BaseModel):
    thin: float = Field(description="requests of context_tokens that fit at once (vLLM's 'Maximum concurrency')")
    stock: float
    context_tokens: int = Field(description="the server's max_model_len")


class RunningRequest(BaseModel):
    """One unfinished request as the API server sees it."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    prompt_tokens: int
    output_tokens: int

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens - 1 if self.output_tokens else 0


class ActiveUser(BaseModel):
    request_id: str = Field(description="vLLM's request id (the response id plus a per-choice suffix)")
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int = Field(description="tokens whose KV is cached (prompt + output - 1; 0 before the first token)")
    kv_bytes: int = Field(description="KV bytes the request occupies (whole blocks)")
    stock_kv_bytes: int = Field(description="KV bytes the same tokens would occupy with stock keys")
    saved_bytes: int


class ActiveTotals(BaseModel):
    users: int
    cached_tokens: int
    kv_bytes: int
    stock_kv_bytes: int
    saved_bytes: int


class SavingsReport(BaseModel):
    """KV savings of this server: static capacity, thin vs stock, and the requests running now."""

    model: str = Field(description="served model name")
    thin_keys: bool = Field(description="false when the served checkpoint is a stock model (then thin == stock)")
    rank: int = Field(description="cached key dims per head (r)")
    head_dim: int = Field(description="value dims per head (d), the stock key width")
    num_layers: int
    num_kv_heads: int
    shared_kv: bool = Field(default=False, description="one cached vector per token and KV head serves as key and value")
    kv_cache_dtype: str = Field(description="the served cache's dtype (vLLM's --kv-cache-dtype, 'auto' resolved)")
    stock_kv_cache_dtype: str = Field(description="the stock model's cache dtype in the comparison: the model's dtype")
    block_size: int
    bytes_per_token: ThinStock
    bytes_per_block: ThinStock
    kv_cache_memory_bytes: int
    kv_cache_memory_source: Literal["configured", "allocated"] = Field(
        description="'configured': the KV budget (--kv-cache-memory-bytes / VLLM_CPU_KVCACHE_SPACE); "
        "'allocated': no budget was set, so num_blocks.thin * bytes_per_block.thin"
    )
    num_blocks: ThinStock
    capacity_tokens: ThinStock = Field(description="thin: vLLM's kv_cache_size_tokens; stock: the same rule, same memory")
    max_concurrency: MaxConcurrency
    concurrency_gain: float | None = Field(description="max_concurrency.thin / max_concurrency.stock")
    per_user_savings_bytes: int = Field(description="KV bytes one request of max_model_len tokens saves")
    active_users: list[ActiveUser]
    active_totals: ActiveTotals


# --- the server's figures ----------------------------------------------------------------------


class ServerSavings:
    """The static thin-vs-stock comparison of one server, and its per-request view."""

    def __init__(
        self,
        *,
        model: str,
        comparison: CapacityComparison,
        memory_source: Literal["configured", "allocated"],
        engine_capacity_tokens: int | None = None,
        engine_max_concurrency: float | None = None,
    ) -> None:
        self.model = model
        self.comparison = comparison
        self.memory_source = memory_source
        # vLLM's own figures win over ours when the engine reported them.
        self.capacity_tokens_thin = (
            comparison.thin.capacity_tokens if engine_capacity_tokens is None else engine_capacity_tokens
        )
        self.max_concurrency_thin = (
            comparison.thin.max_concurrency if engine_max_concurrency is None else engine_max_concurrency
        )

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> tuple["ServerSavings", list[str]]:
        """From the frontend's ``VllmConfig`` after engine start-up; also returns warnings to log."""
        model_config, cache_config, parallel_config = (
            vllm_config.model_config,
            vllm_config.cache_config,
            vllm_config.parallel_config,
        )
        model = str(model_config.served_model_name or model_config.model)
        geometry = geometry_from_config(model_config.hf_config, name=model)
        # Per tensor-parallel rank, as vLLM sizes pages (KV heads split by tensor parallelism); all the
        # layers, whatever the pipeline stages (each stage has its own budget for its own layers).
        pipeline_stages = int(getattr(parallel_config, "pipeline_parallel_size", 1) or 1)
        geometry = geometry.model_copy(update={"num_kv_heads": model_config.get_num_kv_heads(parallel_config)})
        thin = KVFootprint(
            geometry=geometry,
            kv_dtype=resolve_kv_dtype(cache_config.cache_dtype, model_config.dtype),
            block_size=cache_config.block_size,
            # Sliding-window layers (Gemma 3): how vLLM's hybrid KV-cache manager sizes them.
            max_in_flight_tokens=int(vllm_config.max_in_flight_tokens),
            hybrid_kv_cache_manager=not vllm_config.scheduler_config.disable_hybrid_kv_cache_manager,
        )
        num_blocks = int(cache_config.num_gpu_blocks or 0)
        warnings: list[str] = []
        if cache_config.kv_cache_memory_bytes is not None:
            memory, source = int(cache_config.kv_cache_memory_bytes) * pipeline_stages, "configured"
            predicted = memory // thin.bytes_per_block
            if predicted != num_blocks and cache_config.num_gpu_blocks_override is None:
                warnings.append(
                    f"thin-keys accounting predicts {predicted} KV blocks of {thin.bytes_per_block} bytes in "
                    f"{memory} bytes, the engine allocated {num_blocks}: the stock comparison may be off"
                )
        else:
            memory, source = num_blocks * thin.bytes_per_block, "allocated"
        comparison = compare(
            thin,
            kv_memory_bytes=memory,
            context_tokens=int(model_config.max_model_len),
            thin_num_blocks=num_blocks,
            # The stock model as vLLM serves it by default: its cache at the model's dtype, even
            # when this server stores an 8-bit cache.
            stock_kv_dtype=resolve_kv_dtype("auto", model_config.dtype),
        )
        savings = cls(
            model=model,
            comparison=comparison,
            memory_source=source,
            engine_capacity_tokens=getattr(cache_config, "kv_cache_size_tokens", None),
            engine_max_concurrency=getattr(cache_config, "kv_cache_max_concurrency", None),
        )
        if savings.capacity_tokens_thin != comparison.thin.capacity_tokens:
            warnings.append(
                f"the engine reports {savings.capacity_tokens_thin} KV tokens, the accounting "
                f"{comparison.thin.capacity_tokens} for its {num_blocks} blocks"
            )
        if not is_thin_key_config(model_config.hf_config):
            warnings.append(f"{model} is not a thin-key checkpoint: its savings are 0 (thin == stock)")
        return savings, warnings

    # --- derived figures ---------------------------------------------------------------------

    @property
    def thin_keys(self) -> bool:
        return not self.comparison.thin_footprint.geometry.is_stock

    @property
    def concurrency_gain(self) -> float | None:
        stock = self.comparison.stock.max_concurrency
        return None if stock == 0 else self.max_concurrency_thin / stock

    def active_user(self, request: RunningRequest) -> ActiveUser:
        kv_bytes, stock_kv_bytes = self.comparison.request_bytes(request.cached_tokens)
        return ActiveUser(
            request_id=request.request_id,
            prompt_tokens=request.prompt_tokens,
            output_tokens=request.output_tokens,
            cached_tokens=request.cached_tokens,
            kv_bytes=kv_bytes,
            stock_kv_bytes=stock_kv_bytes,
            saved_bytes=stock_kv_bytes - kv_bytes,
        )

    def active(self, requests: Iterable[RunningRequest]) -> tuple[list[ActiveUser], ActiveTotals]:
        users = [self.active_user(r) for r in requests]
        totals = ActiveTotals(
            users=len(users),
            cached_tokens=sum(u.cached_tokens for u in users),
            kv_bytes=sum(u.kv_bytes for u in users),
            stock_kv_bytes=sum(u.stock_kv_bytes for u in users),
            saved_bytes=sum(u.saved_bytes for u in users),
        )
        return users, totals

    def report(self, requests: Iterable[RunningRequest]) -> SavingsReport:
        c = self.comparison
        thin, stock = c.thin_footprint, c.stock_footprint
        users, totals = self.active(requests)
        return SavingsReport(
            model=self.model,
            thin_keys=self.thin_keys,
            rank=thin.geometry.rank,
            head_dim=thin.geometry.head_dim,
            num_layers=thin.geometry.num_layers,
            num_kv_heads=thin.geometry.num_kv_heads,
            shared_kv=thin.geometry.shared_kv,
            kv_cache_dtype=thin.kv_dtype.name,
            stock_kv_cache_dtype=stock.kv_dtype.name,
            block_size=thin.block_size,
            bytes_per_token=ThinStock(thin=thin.bytes_per_token, stock=stock.bytes_per_token),
            bytes_per_block=ThinStock(thin=thin.bytes_per_block, stock=stock.bytes_per_block),
            kv_cache_memory_bytes=c.kv_memory_bytes,
            kv_cache_memory_source=self.memory_source,
            num_blocks=ThinStock(thin=c.thin.num_blocks, stock=c.stock.num_blocks),
            capacity_tokens=ThinStock(thin=self.capacity_tokens_thin, stock=c.stock.capacity_tokens),
            max_concurrency=MaxConcurrency(
                thin=self.max_concurrency_thin, stock=c.stock.max_concurrency, context_tokens=c.context_tokens
            ),
            concurrency_gain=self.concurrency_gain,
            per_user_savings_bytes=c.per_user_saved_bytes,
            active_users=users,
            active_totals=totals,
        )

    def startup_line(self) -> str:
        """One line for the server log, next to vLLM's "KV cache size: N tokens" line."""
        c = self.comparison
        g = c.thin_footprint.geometry
        layout = f"Shared K=V (d={g.head_dim})" if g.shared_kv else f"Thin keys (r={g.rank} of d={g.head_dim})"
        return (
            f"{layout}, KV cache {c.thin_footprint.kv_dtype.name} vs stock {c.stock_footprint.kv_dtype.name}: "
            f"KV bytes/token {c.thin_footprint.bytes_per_token:,} thin vs {c.stock_footprint.bytes_per_token:,} stock; "
            f"KV cache {format_bytes(c.kv_memory_bytes)} holds {self.capacity_tokens_thin:,} tokens thin vs "
            f"{c.stock.capacity_tokens:,} stock; max concurrency for {c.context_tokens:,} tokens per request "
            f"{self.max_concurrency_thin:.2f}x thin vs {c.stock.max_concurrency:.2f}x stock: "
            f"gain {format_gain(self.concurrency_gain)}, {format_bytes(c.per_user_saved_bytes)} saved per full-length user"
        )
