"""Paged attention over a KV cache whose keys are narrower than its values: metadata, cache writes, PyTorch path.

The cache of one layer is vLLM's logical per-layer view ``[num_blocks, H_kv, block_size, r + d]``:
for every token slot the first ``r`` channels hold its (thin, already rotated) key and the last
``d`` its value. Physical strides depend on the KV-cache layout vLLM chose; every access here goes
through the logical view with advanced indexing, so it works for any layout and writes in place.

One code path covers prefill, decode, chunked prefill and prefix-cache hits: a request with
``seq_len`` cached tokens (the new ones included, since the cache is written before attention)
and ``q_len`` new query tokens attends to positions ``0 .. seq_len - 1``, query ``i`` seeing key
``j`` iff ``j <= seq_len - q_len + i``.

Two implementations share the metadata and the cache format:

- the compiled kernel (``kernels.py``, ``csrc/paged_attention.cpp``), used whenever it could be
  built: one call per layer for the whole batch, reading the cache in place;
- the PyTorch path below (``paged_attention_torch``), the fallback and a second opinion in tests:
  decodes (``q_len == 1``; vLLM puts them first when the builder asks for batch reordering) run as
  one batched SDPA call over a padded gather, prefills one SDPA call per request.

Both are checked against the dense float64 reference in ``reference.py``.

8-bit caches go through a :class:`~thinkeys.attention.quant.KVCodec`: the compiled kernel writes
and reads their slots in place (quantizing on write, decoding each chunk as it streams the cache),
the PyTorch path encodes and decodes gathered slots. Shared K=V caches (one vector per token and
KV head, rotated when read as a key) take the PyTorch path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from thinkeys.attention import kernels
from thinkeys.attention.quant import KVCodec
from thinkeys.rope import apply_thin_rope


@dataclass
class PrefillRequest:
    """One request with more than one new token."""

    query_start: int
    query_end: int
    kv_len: int
    kv_blocks: torch.Tensor  # [kv_len] block id of every cached position
    kv_offsets: torch.Tensor  # [kv_len] offset inside that block
    mask: torch.Tensor | None  # [q_len, kv_len] bool (True = attend); None = plain causal (no cached prefix)
    kv_positions: torch.Tensor | None = None  # [kv_len] position of each gathered key; None = 0 .. kv_len - 1


@dataclass
class ThinPagedMetadata:
    """What one model step needs, built once per step and shared by every layer."""

    num_actual_tokens: int
    num_decodes: int  # the first num_decodes requests (and tokens) are single-token decodes
    # Inputs of the compiled kernel: int32 host tensors, as vLLM's CommonAttentionMetadata holds them.
    query_start_loc: torch.Tensor | None = None  # [num_reqs + 1]
    seq_lens: torch.Tensor | None = None  # [num_reqs]
    block_table: torch.Tensor | None = None  # [num_reqs, max_blocks]
    # Whether paged_attention may run the compiled kernel (the backend says False when it chose
    # the PyTorch path, e.g. THINKEYS_ATTENTION_KERNEL=torch).
    kernel: bool = True
    # Index tensors of the PyTorch path; built only when that path may run (see build_metadata).
    torch_path: bool = True
    decode_blocks: torch.Tensor | None = None  # [n_dec, max_len] block id per position (padded with 0)
    decode_offsets: torch.Tensor | None = None  # [n_dec, max_len]
    decode_mask: torch.Tensor | None = None  # [n_dec, 1, 1, max_len] bool, True = real position
    decode_positions: torch.Tensor | None = None  # [n_dec, max_len] key positions (windowed); None = 0 .. max_len - 1
    prefills: list[PrefillRequest] = field(default_factory=list)
    # Sliding window (tokens) these indices honour; None = full causal attention.
    sliding_window: int | None = None
    # What windowed() rebuilds from: the step's host offsets and lengths, the block table, the block size.
    block_size: int = 0
    _source: tuple | None = field(default=None, repr=False)
    _windowed: dict = field(default_factory=dict, repr=False)

    def windowed(self, window: int) -> "ThinPagedMetadata":
        """This step's metadata for layers that attend within ``window`` tokens (PyTorch-path indices that
        gather only the window's keys and mask the rest). Built on first use and shared by every such layer."""
        if window == self.sliding_window:
            return self
        if window not in self._windowed:
            if self._source is None:
                raise RuntimeError("metadata without its source offsets cannot be re-windowed")
            qsl, lens, table = self._source
            self._windowed[window] = build_metadata(
                query_start_loc=qsl, seq_lens=lens, block_table=table, block_size=self.block_size,
                num_actual_tokens=self.num_actual_tokens, kernel=False, sliding_window=window,
            )
        return self._windowed[window]


def _token_locations(
    block_table_row: torch.Tensor, positions: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block id, offset) of each position of one request."""
    return block_table_row[positions // block_size], positions % block_size


def _int32_host(x: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device="cpu", dtype=torch.int32)
    return torch.tensor(list(x), dtype=torch.int32)


def build_metadata(
    *,
    query_start_loc: Sequence[int] | torch.Tensor,
    seq_lens: Sequence[int] | torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    num_actual_tokens: int,
    torch_path: bool = True,
    kernel: bool = True,
    sliding_window: int | None = None,
) -> ThinPagedMetadata:
    """Metadata for :func:`paged_attention`, from host-side query offsets and sequence lengths.

    ``sliding_window`` W: the query at position p sees keys p - W < j <= p (vLLM's and transformers'
    convention); the PyTorch path's indices then gather only those keys (positions before the window
    may sit in blocks vLLM's sliding-window manager has already freed) and the compiled kernel, which
    has no lower bound on key positions, is not used (``kernel`` is forced off).

    ``block_table`` is ``[num_reqs, max_blocks]`` on the compute device. The compiled kernel needs
    only the three tensors; ``torch_path=False`` skips the per-request Python work that builds the
    PyTorch path's gather indices and masks (what the backend does when the kernel is loaded).
    """
    qsl_t, lens_t = _int32_host(query_start_loc), _int32_host(seq_lens)
    num_reqs = lens_t.shape[0]
    query_lens_t = qsl_t[1 : num_reqs + 1] - qsl_t[:num_reqs]  # [num_reqs]
    num_decodes = int((query_lens_t == 1).to(torch.int32).cumprod(0).sum())  # leading decodes
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 token, got {sliding_window}")
    windowed = sliding_window is not None
    meta = ThinPagedMetadata(
        num_actual_tokens=num_actual_tokens,
        num_decodes=num_decodes,
        kernel=kernel and not windowed,
        torch_path=torch_path or windowed,
        sliding_window=sliding_window,
        block_size=block_size,
        _source=(qsl_t, lens_t, block_table),
    )
    if block_table.device.type == "cpu":  # the compiled kernel is CPU-only; no device->host copies
        meta.query_start_loc = qsl_t[: num_reqs + 1]
        meta.seq_lens = lens_t
        meta.block_table = block_table[:num_reqs].to(torch.int32)
    if not meta.torch_path:
        if meta.block_table is None:
            raise ValueError("torch_path=False needs host tensors: the compiled kernel runs on the CPU only")
        return meta

    device = block_table.device
    query_start_loc, seq_lens = qsl_t.tolist(), lens_t.tolist()
    query_lens = query_lens_t.tolist()

    if num_decodes and not windowed:
        lens = torch.tensor(seq_lens[:num_decodes], device=device)
        max_len = int(max(seq_lens[:num_decodes]))
        positions = torch.arange(max_len, device=device)  # [max_len]
        valid = positions[None, :] < lens[:, None]  # [n_dec, max_len]
        block_idx = torch.where(valid, positions[None, :] // block_size, 0)
        meta.decode_blocks = torch.gather(block_table[:num_decodes], 1, block_idx)
        meta.decode_offsets = (positions % block_size).expand(num_decodes, max_len)
        meta.decode_mask = valid[:, None, None, :]
    elif num_decodes:  # the last W positions of each decode: start = max(0, len - W)
        lens = torch.tensor(seq_lens[:num_decodes], device=device)
        span = min(int(max(seq_lens[:num_decodes])), sliding_window)
        positions = (lens - sliding_window).clamp_min(0)[:, None] + torch.arange(span, device=device)  # [n_dec, span]
        valid = positions < lens[:, None]
        positions = torch.where(valid, positions, 0)
        meta.decode_blocks = torch.gather(block_table[:num_decodes], 1, positions // block_size)
        meta.decode_offsets = positions % block_size
        meta.decode_mask = valid[:, None, None, :]
        meta.decode_positions = positions

    for i in range(num_decodes, num_reqs):
        q_len, kv_len = query_lens[i], seq_lens[i]
        if q_len == 0:  # padding request
            continue
        context = kv_len - q_len
        first = max(0, context - sliding_window + 1) if windowed else 0  # the first query's earliest key
        positions = torch.arange(first, kv_len, device=device)
        blocks, offsets = _token_locations(block_table[i], positions, block_size)
        mask = None
        if context or windowed:
            q_pos = torch.arange(context, kv_len, device=device)[:, None]
            mask = positions[None, :] <= q_pos  # [q_len, kv_len - first]
            if windowed:
                mask &= positions[None, :] > q_pos - sliding_window
        meta.prefills.append(
            PrefillRequest(
                query_start_loc[i], query_start_loc[i + 1], kv_len - first, blocks, offsets, mask,
                kv_positions=positions if first else None,
            )
        )
    return meta


@dataclass(frozen=True)
class CacheFormat:
    """How a layer's slots are encoded: the codec, per-tensor fp8 scales, (shared K=V, rebuild) the key RoPE
    table, and (rebuild at read) the key expansion table applied before the rotation."""

    codec: KVCodec
    k_scale: float = 1.0
    v_scale: float = 1.0
    key_rope_freqs: torch.Tensor | None = None  # [H_kv, rope_dims / 2]: rotate shared vectors read as keys
    key_expansion: torch.Tensor | None = None  # [H_kv, d, r]: rebuild d-wide keys from cached r-wide latents

    @property
    def plain(self) -> bool:
        """Plain float ``key | value`` slots."""
        return not self.codec.quantized and self.codec.value_width > 0

    @property
    def kernel_format(self) -> str | None:
        """The compiled kernel's ``cache_format`` for these slots; None when only the PyTorch path reads them."""
        return None if self.key_rope_freqs is not None else self.codec.kernel_format


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_format(fmt: CacheFormat | None) -> str | None:
    return "plain" if fmt is None else fmt.kernel_format


def _kernel_takes(kind: str | None, x: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether the kernel reads/writes ``kv_cache`` in format ``kind`` against activations like ``x``."""
    if kind is None or x.dtype not in _KERNEL_DTYPES or x.device.type != "cpu" or kv_cache.device.type != "cpu":
        return False
    return x.dtype == kv_cache.dtype if kind == "plain" else kv_cache.element_size() == 1


def write_kv(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    slot_mapping: torch.Tensor,
    fmt: CacheFormat | None = None,
) -> None:
    """Store each token's thin key ``[T, H_kv, r]`` and value ``[T, H_kv, d]`` at its slot (in place).

    Padding tokens have slot -1 and are skipped. Uses the compiled kernel when it is loaded (it
    quantizes 8-bit slots itself); ``fmt`` encodes 8-bit and shared K=V slots (``value`` None for
    shared, which the PyTorch path writes).
    """
    kind = _kernel_format(fmt)
    if (
        _kernel_takes(kind, key, kv_cache)
        and value is not None
        and value.dtype == key.dtype
        and slot_mapping.device.type == "cpu"
        and kernels.available()
    ):
        scales = (1.0, 1.0) if fmt is None else (fmt.k_scale, fmt.v_scale)
        kernels.write_kv(kv_cache, key, value, slot_mapping.to(torch.int64), kind, *scales)
        return
    write_kv_torch(kv_cache, key, value, slot_mapping, None if fmt is None or fmt.plain else fmt)


def write_kv_torch(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    slot_mapping: torch.Tensor,
    fmt: CacheFormat | None = None,
) -> None:
    """:func:`write_kv` in plain PyTorch (advanced-index assignment through the logical view)."""
    num_tokens = slot_mapping.shape[0]
    key = key[:num_tokens]
    value = None if value is None else value[:num_tokens]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, key = slot_mapping[valid], key[valid]
        value = None if value is None else value[valid]
    block_size = kv_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    if fmt is None:
        entry = torch.cat((key, value), dim=-1).to(kv_cache.dtype)  # [T, H_kv, r + d]
    else:
        entry = fmt.codec.encode(key, value, kv_cache.dtype, fmt.k_scale, fmt.v_scale)  # [T, H_kv, slot]
    kv_cache[blocks, :, offsets] = entry


def use_kernel(query: torch.Tensor, kv_cache: torch.Tensor, meta: ThinPagedMetadata, fmt: CacheFormat | None = None) -> bool:
    """Whether :func:`paged_attention` runs the compiled kernel for these inputs."""
    return (
        meta.kernel
        and meta.query_start_loc is not None
        and _kernel_takes(_kernel_format(fmt), query, kv_cache)
        and kernels.available()
    )


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: ThinPagedMetadata,
    scale: float,
    output: torch.Tensor,
    fmt: CacheFormat | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of ``query`` ``[T, H, r]`` over the cache; writes ``output`` ``[T, H, d]``.

    The compiled kernel when it is loaded and takes these slots (plain in the query's dtype, or
    8-bit key | value slots), else :func:`paged_attention_torch`. A layer with a ``sliding_window``
    always takes the PyTorch path, on this step's windowed indices (:meth:`ThinPagedMetadata.windowed`):
    the compiled kernels have no lower bound on key positions, so they are never handed a window.
    """
    if sliding_window is not None:
        return paged_attention_torch(query, kv_cache, meta.windowed(sliding_window), scale, output, fmt)
    if meta.sliding_window is not None:
        raise RuntimeError(f"metadata windowed to {meta.sliding_window} tokens used for a full-attention layer")
    if use_kernel(query, kv_cache, meta, fmt) and output.dtype == query.dtype:
        scales = (1.0, 1.0) if fmt is None else (fmt.k_scale, fmt.v_scale)
        return kernels.paged_attention(
            query, kv_cache, meta.block_table, meta.query_start_loc, meta.seq_lens, scale, output,
            _kernel_format(fmt), *scales,
        )
    if not meta.torch_path:
        raise RuntimeError("metadata was built without the PyTorch path's indices (torch_path=False)")
    return paged_attention_torch(query, kv_cache, meta, scale, output, fmt)


def _read_slots(
    slots: torch.Tensor, r: int, dtype: torch.dtype, fmt: CacheFormat | None, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[..., H_kv, r]`` and values ``[..., H_kv, d]`` of gathered slots ``[..., H_kv, slot]``.

    ``positions`` (``slots.shape[:-2]``) are the token positions, used to rotate shared K=V vectors.
    """
    if fmt is None:
        kv = slots.to(dtype)
        return kv[..., :r], kv[..., r:]
    k, v = fmt.codec.decode(slots, dtype, fmt.k_scale, fmt.v_scale)
    if fmt.key_expansion is not None:
        k = torch.einsum("...gr,gdr->...gd", k, fmt.key_expansion.to(dtype))  # [..., H_kv, d]
    if fmt.key_rope_freqs is not None:
        k = apply_thin_rope(k, positions, fmt.key_rope_freqs)
    return k, v


def paged_attention_torch(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: ThinPagedMetadata,
    scale: float,
    output: torch.Tensor,
    fmt: CacheFormat | None = None,
) -> torch.Tensor:
    """:func:`paged_attention` in plain PyTorch: a padded gather + SDPA for the decodes, SDPA per prefill."""
    r = query.shape[-1]
    num_kv_heads = kv_cache.shape[1]
    gqa = query.shape[1] != num_kv_heads

    n_dec = meta.num_decodes
    if n_dec:
        slots = kv_cache[meta.decode_blocks, :, meta.decode_offsets]  # [n_dec, max_len, H_kv, slot]
        positions = meta.decode_positions
        if positions is None:
            positions = torch.arange(slots.shape[1], device=slots.device).expand(n_dec, -1)
        k, v = _read_slots(slots, r, query.dtype, fmt, positions)
        out = F.scaled_dot_product_attention(
            query[:n_dec].unsqueeze(2),  # [n_dec, H, 1, r]
            k.transpose(1, 2),  # [n_dec, H_kv, max_len, r]
            v.transpose(1, 2),
            attn_mask=meta.decode_mask,
            scale=scale,
            enable_gqa=gqa,
        )  # [n_dec, H, 1, d]
        output[:n_dec] = out.squeeze(2)

    for req in meta.prefills:
        slots = kv_cache[req.kv_blocks, :, req.kv_offsets]  # [L, H_kv, slot]
        positions = req.kv_positions if req.kv_positions is not None else torch.arange(slots.shape[0], device=slots.device)
        k, v = _read_slots(slots, r, query.dtype, fmt, positions)
        q = query[req.query_start : req.query_end].transpose(0, 1)  # [H, q_len, r]
        out = F.scaled_dot_product_attention(
            q,
            k.transpose(0, 1),  # [H_kv, L, r]
            v.transpose(0, 1),
            attn_mask=req.mask,
            is_causal=req.mask is None,
            scale=scale,
            enable_gqa=gqa,
        )  # [H, q_len, d]
        output[req.query_start : req.query_end] = out.transpose(0, 1)
    return output
