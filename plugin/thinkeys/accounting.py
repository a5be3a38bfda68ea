"""KV-cache accounting: bytes per token and per block, capacity and concurrency, thin vs stock.

This is the ONE place where KV sizes are computed. The start-up log line, the
``/v1/thinkeys/savings`` endpoint, the Prometheus gauges and ``thinkeys plan`` all take their
numbers from here, so the server and the planner can never disagree.

Why blocks matter: vLLM does not hand out KV memory per token but in whole blocks of
``block_size`` tokens, and a request holds ``cdiv(tokens, block_size)`` blocks. The numbers below
reproduce vLLM 0.32's own rule (``v1/kv_cache_interface.py`` and ``v1/core/kv_cache_utils.py``)
for a model whose attention layers all share one full-attention spec::

    page_size_bytes  = block_size * num_kv_heads * (head_size + head_size_v) * dtype_bytes  (one layer)
    bytes_per_block  = num_layers * page_size_bytes
    num_blocks       = kv_cache_memory_bytes // bytes_per_block            (get_kv_cache_config_from_groups)
    blocks_per_req   = cdiv(max_model_len, block_size)                     (FullAttentionSpec.max_memory_usage_bytes)
    max_concurrency  = num_blocks / blocks_per_req                         (get_max_concurrency_for_kv_cache_config)
    kv_cache_size_tokens = int(max_concurrency * max_model_len)            (get_kv_cache_capacity)

A thin-key model caches keys of width ``head_size = rank`` next to values of width
``head_size_v = head_dim``; the stock model caches both at ``head_dim``. Like vLLM, capacity counts
every block, including the one null block its ``BlockPool`` keeps back.

Models with sliding-window layers among full-attention ones (Gemma 3: ``layer_types``) get vLLM's
hybrid KV-cache manager, which vLLM 0.32 keeps on for CPU too (``CpuPlatform.support_hybrid_kv_cache``)
unless ``--disable-hybrid-kv-cache-manager`` is given. Its rule (``_get_kv_cache_groups_uniform_page_size``,
``SlidingWindowSpec.max_memory_usage_bytes``), with F full and S sliding layers of window W, all with the
same page (thin keys make every layer's page ``r + d`` wide alike)::

    group_size       = min(F, S), or max(F, S) when max < 1.5 * min
    groups           = cdiv(F, group_size) full + cdiv(S, group_size) sliding; every block of the shared
                       pool holds one page of each layer of one group
    bytes_per_block  = group_size * page_size_bytes
    blocks_per_req   = full groups * cdiv(max_model_len, block_size)
                     + sliding groups * (cdiv(min(W - 1 + max_in_flight_tokens, max_model_len), block_size) + 1)

where ``max_in_flight_tokens`` is the engine's (``max_num_batched_tokens`` times the concurrent
batches: 2 with async scheduling). With the hybrid manager off every layer counts as full attention.

The per-token cell is described by :class:`AttentionGeometry` (cached key width, value width, a
shared-K=V flag) and :class:`KVCacheDtype` (bytes per element plus per-(token, head) scale bytes),
so quantized 8-bit caches with scales and shared-KV checkpoints only add table entries or flags.

Pure Python and pydantic: importing this module never imports torch or vLLM.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from pydantic import BaseModel, ByteSize, ConfigDict, Field, TypeAdapter, ValidationError, computed_field

from thinkeys.checkpoint import ThinKeyConfig, ThinKeyError, is_thin_key_config

# --- KV-cache element types --------------------------------------------------------------------


class KVCacheDtype(BaseModel):
    """How one cached element is stored.

    ``scale_bytes_per_vector`` is the room a quantized cache keeps inline, per cached vector (the
    key and the value of one token and KV head are two vectors; a shared K=V cache stores one),
    for its scale: vLLM's per-token-head modes (``int8_per_token_head``, ``fp8_per_token_head``)
    pack one float32 scale after each vector (``TritonAttentionBackend.customize_spec``; the
    thin-key backend does the same). 0 for plain float caches and per-tensor-scaled fp8, whose
    scales (``k_scale`` / ``v_scale``) live outside the pages.
    """

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="vLLM's kv_cache_dtype name, e.g. 'bfloat16' or 'fp8_e4m3'")
    element_bytes: int = Field(ge=1)
    scale_bytes_per_vector: int = Field(default=0, ge=0)

    @property
    def is_8bit(self) -> bool:
        return self.element_bytes == 1


#: vLLM kv_cache_dtype (and model dtype) names whose page size this module reproduces, with their
#: element size (``vllm.utils.torch_utils.STR_DTYPE_TO_TORCH_DTYPE``). fp8 variants keep one byte
#: per element and a per-tensor scale outside the page.
KV_CACHE_DTYPES: dict[str, KVCacheDtype] = {
    d.name: d
    for d in (
        KVCacheDtype(name="float32", element_bytes=4),
        KVCacheDtype(name="float16", element_bytes=2),
        KVCacheDtype(name="bfloat16", element_bytes=2),
        KVCacheDtype(name="fp8", element_bytes=1),
        KVCacheDtype(name="fp8_e4m3", element_bytes=1),
        KVCacheDtype(name="fp8_e5m2", element_bytes=1),
        KVCacheDtype(name="fp8_inc", element_bytes=1),
        KVCacheDtype(name="int8", element_bytes=1),
        KVCacheDtype(name="int8_per_token_head", element_bytes=1, scale_bytes_per_vector=4),
        KVCacheDtype(name="fp8_per_token_head", element_bytes=1, scale_bytes_per_vector=4),
    )
}
_DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16"}


def resolve_kv_dtype(kv_cache_dtype: str, model_dtype: Any = None) -> KVCacheDtype:
    """The cache element type for vLLM's ``--kv-cache-dtype`` value.

    ``"auto"`` means "the model's dtype" (a name like ``"bfloat16"`` or a ``torch.dtype``).
    """
    name = _dtype_name(kv_cache_dtype)
    if name == "auto":
        if model_dtype is None:
            raise ThinKeyError(
                "kv cache dtype 'auto' needs the model's dtype, and the config names none: "
                f"pass an explicit KV dtype (one of {', '.join(KV_CACHE_DTYPES)})"
            )
        name = _dtype_name(model_dtype)
        if name == "auto":
            raise ThinKeyError("the model dtype cannot itself be 'auto'")
    if name not in KV_CACHE_DTYPES:
        raise ThinKeyError(
            f"KV cache dtype {name!r} is not one the accounting knows "
            f"(known: auto, {', '.join(KV_CACHE_DTYPES)}); 4-bit caches are not modelled"
        )
    return KV_CACHE_DTYPES[name]


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).strip().lower().removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


# --- model geometry -------------------------------------------------------------------------


class AttentionGeometry(BaseModel):
    """What decides a model's KV size: layers, KV heads and the width of each cached vector.

    ``head_dim`` (d) is the value width and the stock key width; ``key_dim`` is the cached key width
    (r for thin keys, d for the stock model). With ``shared_kv`` one cached vector per token and
    head serves as both key and value.
    """

    model_config = ConfigDict(frozen=True)

    name: str | None = None
    num_layers: int = Field(ge=1, description="attention layers that cache keys and values")
    num_query_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1, description="d: value width, and key width of the stock model")
    key_dim: int = Field(ge=1, description="cached key width: r for thin keys, d for stock")
    shared_kv: bool = False
    model_dtype: str | None = Field(default=None, description="weights dtype, what KV dtype 'auto' means")
    max_position_embeddings: int | None = None
    sliding_window: int | None = Field(
        default=None, description="window (tokens) of the sliding-window layers; vLLM caps their KV"
    )
    num_sliding_layers: int = Field(
        default=0, ge=0, description="layers that attend within sliding_window (layer_types 'sliding_attention')"
    )

    @property
    def hybrid(self) -> bool:
        """Sliding-window layers next to full-attention ones (vLLM's hybrid KV-cache manager groups them)."""
        return self.num_sliding_layers > 0 and self.sliding_window is not None

    @property
    def rank(self) -> int:
        return self.key_dim

    @property
    def cached_dims_per_head(self) -> int:
        """Elements cached per token and KV head: key + value, or one shared vector."""
        return self.key_dim if self.shared_kv else self.key_dim + self.head_dim

    @property
    def cached_vectors_per_head(self) -> int:
        """Vectors cached per token and KV head (each carries its own scale in per-token-head caches)."""
        return 1 if self.shared_kv else 2

    @property
    def is_stock(self) -> bool:
        return self.key_dim == self.head_dim and not self.shared_kv

    def stock(self) -> "AttentionGeometry":
        """The same model with its original layout: full-width keys, separate values."""
        return self.model_copy(update={"key_dim": self.head_dim, "shared_kv": False})

    def with_rank(self, rank: int) -> "AttentionGeometry":
        """The same model with keys factored to ``rank`` dims (for planning a conversion)."""
        if rank < 1:
            raise ThinKeyError(f"rank must be a positive number of key dims, got {rank}")
        return make_geometry(**{**self.model_dump(), "key_dim": rank})


def make_geometry(**fields: Any) -> AttentionGeometry:
    """Build and check an :class:`AttentionGeometry`; problems become one clear ThinKeyError."""
    try:
        geometry = AttentionGeometry(**fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ThinKeyError(f"invalid model geometry ({problems})") from None
    if geometry.key_dim > geometry.head_dim:
        raise ThinKeyError(
            f"rank {geometry.key_dim} is larger than head_dim {geometry.head_dim}: "
            f"choose 1 <= rank <= {geometry.head_dim}"
        )
    if geometry.num_query_heads % geometry.num_kv_heads:
        raise ThinKeyError(
            f"{geometry.num_query_heads} query heads cannot be split into {geometry.num_kv_heads} KV groups"
        )
    if geometry.shared_kv and geometry.key_dim != geometry.head_dim:
        raise ThinKeyError(
            "a shared K=V cache stores one vector that is both key and value, so its key width "
            f"must equal head_dim ({geometry.head_dim}), not {geometry.key_dim}"
        )
    return geometry


#: HF config keys, first match wins (GPT-2 spells them n_layer / n_head / n_embd / n_positions).
_CONFIG_KEYS = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_query_heads": ("num_attention_heads", "n_head"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "head_dim": ("head_dim",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
    "dtype": ("dtype", "torch_dtype"),
    "sliding_window": ("sliding_window",),
}


def geometry_from_config(config: Any, *, rank: int | None = None, name: str | None = None) -> AttentionGeometry:
    """Read the KV geometry from a HF config (a ``PretrainedConfig`` or a config.json dict).

    A thin-key checkpoint config gives its own rank and head_dim (via ``ThinKeyConfig``); a stock
    config gives the stock layout, or the layout after factoring to ``rank`` when one is given.
    """
    text_config = _text_config(config)

    def get(field: str) -> Any:
        for key in _CONFIG_KEYS[field]:
            value = _lookup(text_config, key)
            if value is not None:
                return value
        return None

    num_layers, num_query_heads = get("num_layers"), get("num_query_heads")
    if num_layers is None or num_query_heads is None:
        raise ThinKeyError(
            "config has no layer or attention-head count (num_hidden_layers / num_attention_heads): "
            "pass a decoder-only transformer's config.json"
        )
    head_dim = get("head_dim")
    if head_dim is None:
        hidden_size = get("hidden_size")
        if hidden_size is None:
            raise ThinKeyError("config has neither head_dim nor hidden_size: cannot tell the head size")
        head_dim = int(hidden_size) // int(num_query_heads)
    if rank is not None and rank < 1:
        raise ThinKeyError(f"rank must be a positive number of key dims, got {rank}")
    key_dim = int(head_dim) if rank is None else rank

    if is_thin_key_config(config):
        thin = ThinKeyConfig.from_hf_config(config)
        if rank is not None and rank != thin.rank:
            raise ThinKeyError(
                f"this is a thin-key checkpoint of rank {thin.rank}; --rank {rank} would need a new "
                "conversion from the source model (plan from the source config.json instead)"
            )
        head_dim, key_dim = thin.head_dim, thin.rank
        shared_kv = thin.shared_kv
    else:
        shared_kv = False

    dtype = get("dtype")
    uses_window = _lookup(text_config, "use_sliding_window")
    layer_types = _lookup(text_config, "layer_types") or []
    return make_geometry(
        name=name if name is not None else _config_name(config),
        num_layers=int(num_layers),
        num_query_heads=int(num_query_heads),
        num_kv_heads=int(get("num_kv_heads") or num_query_heads),
        head_dim=int(head_dim),
        key_dim=key_dim,
        shared_kv=shared_kv,
        model_dtype=None if dtype is None else _dtype_name(dtype),
        max_position_embeddings=get("max_position_embeddings"),
        # Qwen2 configs carry a window they do not use unless use_sliding_window is set.
        sliding_window=None if uses_window is False else get("sliding_window"),
        num_sliding_layers=sum(t == "sliding_attention" for t in layer_types) if get("sliding_window") else 0,
    )


def _lookup(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def _text_config(config: Any) -> Any:
    """The language-model part of a config (multimodal configs nest it under ``text_config``)."""
    if isinstance(config, Mapping):
        return config.get("text_config") or config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _config_name(config: Any) -> str | None:
    raw = _lookup(config, "_name_or_path" if isinstance(config, Mapping) else "name_or_path")
    if raw:
        return str(raw)
    archs = _lookup(config, "architectures")
    return archs[0] if archs else None


# --- footprint of one layout ----------------------------------------------------------------


class KVFootprint(BaseModel):
    """The KV bytes of one cache layout (thin or stock) under one dtype and block size."""

    model_config = ConfigDict(frozen=True)

    geometry: AttentionGeometry
    kv_dtype: KVCacheDtype
    block_size: int = Field(ge=1, description="tokens per KV block")
    max_in_flight_tokens: int | None = Field(
        default=None, ge=1,
        description="the engine's max_in_flight_tokens (max_num_batched_tokens x concurrent batches); "
        "needed for sliding-window layers under the hybrid KV-cache manager",
    )
    hybrid_kv_cache_manager: bool = Field(
        default=True, description="vLLM's hybrid manager (the default): sliding-window layers keep only the window"
    )

    @property
    def _groups(self) -> tuple[int, int, int]:
        """(layers per KV-cache group, full-attention groups, sliding-window groups), vLLM's grouping."""
        g = self.geometry
        if not (g.hybrid and self.hybrid_kv_cache_manager):
            return g.num_layers, 1, 0
        full, sliding = g.num_layers - g.num_sliding_layers, g.num_sliding_layers
        if full == 0:  # one uniform sliding-window group
            return sliding, 0, 1
        size = min(full, sliding)
        if max(full, sliding) < 1.5 * size:
            size = max(full, sliding)
        return size, -(-full // size), -(-sliding // size)

    def _sliding_blocks(self, context_tokens: int) -> int:
        """Blocks one sliding-window group admits for a request of ``context_tokens`` (vLLM's admission cap)."""
        if self.max_in_flight_tokens is None:
            raise ThinKeyError(
                "a model with sliding-window layers needs the engine's max_in_flight_tokens "
                "(max_num_batched_tokens x concurrent batches) to count its KV blocks"
            )
        window = self.geometry.sliding_window
        tokens = min(window - 1 + self.max_in_flight_tokens, context_tokens)
        return -(-tokens // self.block_size) + 1

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bytes_per_token_per_layer(self) -> int:
        g, t = self.geometry, self.kv_dtype
        return g.num_kv_heads * (
            g.cached_dims_per_head * t.element_bytes + g.cached_vectors_per_head * t.scale_bytes_per_vector
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bytes_per_token(self) -> int:
        return self.geometry.num_layers * self.bytes_per_token_per_layer

    @computed_field  # type: ignore[prop-decorator]
    @property
    def page_size_bytes(self) -> int:
        """One layer's block: vLLM's ``AttentionSpec.page_size_bytes``."""
        return self.block_size * self.bytes_per_token_per_layer

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bytes_per_block(self) -> int:
        """One block of vLLM's pool: the divisor it turns KV memory into blocks with (all layers, or with
        the hybrid manager one page of each layer of one group)."""
        return self._groups[0] * self.page_size_bytes

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks a request with ``num_tokens`` cached tokens holds (whole blocks, summed over KV-cache groups;
        a sliding-window group holds at most the window's blocks)."""
        _, full, sliding = self._groups
        blocks = -(-num_tokens // self.block_size)
        if not sliding:
            return full * blocks
        window = self.geometry.sliding_window
        return full * blocks + sliding * min(blocks, -(-(window - 1) // self.block_size) + 1)

    def blocks_per_request(self, context_tokens: int) -> int:
        """Blocks vLLM reserves for one request of ``context_tokens`` (``get_max_concurrency_for_kv_cache_config``)."""
        _, full, sliding = self._groups
        per_full = -(-context_tokens // self.block_size)
        return full * per_full + (sliding * self._sliding_blocks(context_tokens) if sliding else 0)

    def bytes_for_tokens(self, num_tokens: int) -> int:
        """KV bytes a request with ``num_tokens`` cached tokens occupies (whole blocks)."""
        return self.blocks_for_tokens(num_tokens) * self.bytes_per_block

    def capacity(self, kv_memory_bytes: int, context_tokens: int) -> "KVCapacity":
        """What ``kv_memory_bytes`` of KV cache holds in this layout, vLLM's way."""
        if kv_memory_bytes < 0:
            raise ThinKeyError(f"KV memory must be >= 0 bytes, got {kv_memory_bytes}")
        return self.capacity_from_blocks(kv_memory_bytes // self.bytes_per_block, context_tokens)

    def capacity_from_blocks(self, num_blocks: int, context_tokens: int) -> "KVCapacity":
        """Capacity of a cache of ``num_blocks`` blocks (e.g. the count the engine allocated)."""
        if context_tokens < 1:
            raise ThinKeyError(f"context length must be >= 1 token, got {context_tokens}")
        blocks_per_request = self.blocks_per_request(context_tokens)
        # The exact float expressions of vLLM's get_max_concurrency_for_kv_cache_config and
        # get_kv_cache_capacity, so capacity_tokens matches its kv_cache_size_tokens bit for bit.
        max_concurrency = num_blocks / blocks_per_request
        return KVCapacity(
            num_blocks=num_blocks,
            block_size=self.block_size,
            context_tokens=context_tokens,
            blocks_per_request=blocks_per_request,
            max_concurrency=max_concurrency,
            capacity_tokens=int(max_concurrency * context_tokens),
            max_users=num_blocks // blocks_per_request,
            bytes_per_user=blocks_per_request * self.bytes_per_block,
        )


class KVCapacity(BaseModel):
    """How much one KV cache holds, counted the way vLLM counts it."""

    model_config = ConfigDict(frozen=True)

    num_blocks: int = Field(description="blocks in the cache (vLLM's num_gpu_blocks)")
    block_size: int
    context_tokens: int = Field(description="tokens per request the concurrency is counted at")
    blocks_per_request: int = Field(
        description="cdiv(context_tokens, block_size); summed over KV-cache groups with sliding-window layers"
    )
    max_concurrency: float = Field(description="num_blocks / blocks_per_request: vLLM's 'Maximum concurrency'")
    capacity_tokens: int = Field(description="int(max_concurrency * context_tokens): vLLM's kv_cache_size_tokens")
    max_users: int = Field(description="whole requests of context_tokens that fit at once")
    bytes_per_user: int = Field(description="KV bytes one request of context_tokens holds")


# --- thin vs stock ---------------------------------------------------------------------------


class CapacityComparison(BaseModel):
    """A thin-key cache next to the stock cache of the same model in the same KV memory."""

    model_config = ConfigDict(frozen=True)

    kv_memory_bytes: int
    context_tokens: int
    thin_footprint: KVFootprint
    stock_footprint: KVFootprint
    thin: KVCapacity
    stock: KVCapacity

    @computed_field  # type: ignore[prop-decorator]
    @property
    def per_user_saved_bytes(self) -> int:
        """KV bytes one request of ``context_tokens`` saves against the stock layout."""
        return self.stock.bytes_per_user - self.thin.bytes_per_user

    @computed_field  # type: ignore[prop-decorator]
    @property
    def concurrency_gain(self) -> float | None:
        """thin / stock max concurrency (None when not even one stock request's blocks fit)."""
        if self.stock.max_concurrency == 0:
            return None
        return self.thin.max_concurrency / self.stock.max_concurrency

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bytes_per_token_ratio(self) -> float:
        """stock / thin bytes per token: the gain when memory is large against one block."""
        return self.stock_footprint.bytes_per_token / self.thin_footprint.bytes_per_token

    def request_bytes(self, num_tokens: int) -> tuple[int, int]:
        """(thin, stock) KV bytes a request with ``num_tokens`` cached tokens occupies."""
        return self.thin_footprint.bytes_for_tokens(num_tokens), self.stock_footprint.bytes_for_tokens(num_tokens)


def compare(
    thin: KVFootprint,
    *,
    kv_memory_bytes: int,
    context_tokens: int,
    thin_num_blocks: int | None = None,
    stock_kv_dtype: KVCacheDtype | None = None,
) -> CapacityComparison:
    """Thin vs stock for one KV memory budget and request length.

    ``thin_num_blocks``, when given, is the block count the engine really allocated; the thin
    capacity then comes from it instead of from the formula. Stock is always what vLLM would
    allocate for the stock model in ``kv_memory_bytes``, with its cache at the model's own dtype
    (``stock_kv_dtype``, default :func:`stock_kv_dtype`): an 8-bit thin cache is compared with the
    stock model as it is served by default, not with a stock model quantized the same way.
    """
    stock = thin.model_copy(
        update={"geometry": thin.geometry.stock(), "kv_dtype": stock_kv_dtype or default_stock_kv_dtype(thin)}
    )
    thin_capacity = (
        thin.capacity(kv_memory_bytes, context_tokens)
        if thin_num_blocks is None
        else thin.capacity_from_blocks(thin_num_blocks, context_tokens)
    )
    return CapacityComparison(
        kv_memory_bytes=kv_memory_bytes,
        context_tokens=context_tokens,
        thin_footprint=thin,
        stock_footprint=stock,
        thin=thin_capacity,
        stock=stock.capacity(kv_memory_bytes, context_tokens),
    )


def default_stock_kv_dtype(thin: KVFootprint) -> KVCacheDtype:
    """The stock model's KV dtype: the model's weights dtype ('auto'), else the thin cache's own float dtype."""
    if thin.geometry.model_dtype is not None:
        return resolve_kv_dtype("auto", thin.geometry.model_dtype)
    if thin.kv_dtype.is_8bit:
        raise ThinKeyError(
            f"comparing an 8-bit ({thin.kv_dtype.name}) cache with the stock model needs the model's dtype, "
            "and the geometry names none: set model_dtype (config.json 'dtype') or pass stock_kv_dtype"
        )
    return thin.kv_dtype


# --- units ---------------------------------------------------------------------------------

_BYTES = TypeAdapter(ByteSize)


def parse_bytes(text: str | int) -> int:
    """``"80GiB"`` -> 85899345920, ``"80GB"`` -> 80000000000 (pydantic's ByteSize units)."""
    try:
        return int(_BYTES.validate_python(text.strip() if isinstance(text, str) else text))
    except ValidationError:
        raise ThinKeyError(
            f"{text!r} is not a memory size: write a number with a unit, e.g. 80GiB, 24GB, 512MiB"
        ) from None


def parse_tokens(text: str | int) -> int:
    """``"128K"`` -> 131072, ``"4096"`` -> 4096 (K and M are binary, as in "128K context")."""
    raw = str(text).strip().replace("_", "").replace(",", "")
    factor = {"k": 1024, "m": 1024 * 1024}.get(raw[-1:].lower(), 1)
    digits = raw[:-1] if factor > 1 else raw
    if not digits.isdigit() or int(digits) * factor < 1:
        raise ThinKeyError(f"{text!r} is not a token count: write e.g. 4096, 32K or 1M (K = 1024 tokens)")
    return int(digits) * factor


def format_bytes(num_bytes: int | float) -> str:
    """``25769803776`` -> ``"24.0 GiB"``."""
    sign = "-" if num_bytes < 0 else ""
    return sign + ByteSize(int(abs(num_bytes))).human_readable(separator=" ")


def format_bytes_both(num_bytes: int | float) -> str:
    """``25769803776`` -> ``"24.0 GiB (25.8 GB)"``: binary and decimal units side by side."""
    sign = "-" if num_bytes < 0 else ""
    size = ByteSize(int(abs(num_bytes)))
    return f"{sign}{size.human_readable(separator=' ')} ({sign}{size.human_readable(decimal=True, separator=' ')})"


def format_gain(gain: float | None) -> str:
    return "n/a" if gain is None or math.isnan(gain) else f"{gain:.2f}x"
