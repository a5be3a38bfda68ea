"""Sliding-window layers (Gemma 3's local layers) on the thin-key backend, against the dense reference.

The query at position p sees keys p - W < j <= p. What is checked, on random paged caches:

- prefill, decode, chunked prefill and prefix-hit requests (contexts shorter and longer than the
  window, windows inside one block and across blocks), float and 8-bit (``int8_per_token_head``) caches;
- the metadata the builder makes when the compiled kernel is loaded (``torch_path=False``) still
  serves a windowed layer: ``paged_attention(..., sliding_window=W)`` routes it to the PyTorch path
  on windowed indices, never to the kernel, which has no lower bound on key positions;
- blocks before the window are never read: vLLM's sliding-window manager frees them and points the
  block table at its null block, so here those blocks are filled with NaN;
- the backends that do not serve windows (rebuild at read, shared K=V) refuse one in a line.
"""

from __future__ import annotations

import pytest
import torch

from thinkeys.attention import kernels
from thinkeys.attention.backend import ThinKeyAttentionImpl
from thinkeys.attention.paged import CacheFormat, build_metadata, paged_attention, write_kv
from thinkeys.attention.quant import KVCodec
from thinkeys.attention.reference import causal_attention

SCENARIOS = {
    "decodes": ([1, 1, 1], [5, 17, 40]),  # one shorter than the window, two longer
    "prefill longer than the window": ([37], [37]),
    "mixed": ([1, 1, 9, 4, 16], [30, 2, 9, 50, 48]),  # decodes, fresh prefill, chunks after a cached prefix
}
WINDOWS = (6, 16, 23)  # inside one block, exactly one block, across blocks (block size 16)


def _scenario(q_lens, seq_lens, window, *, kind="auto", heads=4, kv_heads=2, r=8, d=32, block_size=16, seed=0,
              freed_blocks_nan=True):
    """A paged cache (8-bit when ``kind`` is one), the builder's metadata, and the windowed float64 reference.

    Blocks wholly before every query's window are replaced by a NaN-filled block in the block table,
    as vLLM's sliding-window manager replaces freed blocks by its null block.
    """
    g = torch.Generator().manual_seed(seed)
    codec = KVCodec(kind, r, d) if kind != "auto" else None
    fmt = CacheFormat(codec) if codec else None
    width, storage = (codec.slot_width, torch.uint8) if codec else (r + d, torch.float32)
    blocks_needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_needed) + 2
    cache = torch.zeros(num_blocks, kv_heads, block_size, width, dtype=storage)
    nan_block = num_blocks - 1
    if codec is None:
        cache[nan_block] = float("nan")
    else:
        cache[nan_block] = 0x7F  # 8-bit codes decode to finite numbers; the scale bytes make a NaN float32 scale
        cache[nan_block, :, :, -8:] = torch.tensor([float("nan")] * 2).view(torch.uint8)
    table = torch.zeros(len(seq_lens), max(blocks_needed), dtype=torch.int32)
    perm, used = torch.randperm(num_blocks - 2, generator=g), 0
    queries, expected, new = [], [], []
    for i, (q_len, s) in enumerate(zip(q_lens, seq_lens)):
        table[i, : blocks_needed[i]] = perm[used : used + blocks_needed[i]].to(torch.int32)
        used += blocks_needed[i]
        k = torch.randn(s, kv_heads, r, generator=g) * 2
        v = torch.randn(s, kv_heads, d, generator=g)
        q = torch.randn(q_len, heads, r, generator=g)
        pos = torch.arange(s)
        slots = table[i, pos // block_size].long() * block_size + pos % block_size
        ctx = s - q_len
        write_kv(cache, k[:ctx], v[:ctx], slots[:ctx], fmt)
        new.append((k[ctx:], v[ctx:], slots[ctx:]))
        if codec is not None:  # what the cache holds, decoded: the reference attends over the same numbers
            kq, vq = codec.decode(codec.encode(k, v, torch.uint8, 1.0, 1.0), torch.float64, 1.0, 1.0)
        else:
            kq, vq = k.double(), v.double()
        queries.append(q)
        expected.append(causal_attention(q.double(), kq, vq, scale=d**-0.5, context=ctx, sliding_window=window))
        if freed_blocks_nan:  # blocks that end before the first query's window: freed by vLLM
            first_needed = max(0, ctx - window + 1) // block_size
            table[i, :first_needed] = nan_block
    k_new, v_new, slots_new = (torch.cat(t) for t in zip(*new))
    write_kv(cache, k_new, v_new, slots_new, fmt)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    kernel = kernels.available()
    meta = build_metadata(  # as ThinKeyMetadataBuilder builds it
        query_start_loc=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=table,
        block_size=block_size, num_actual_tokens=int(qsl[-1]), torch_path=not kernel, kernel=kernel,
    )
    return torch.cat(queries), cache, meta, fmt, torch.cat(expected), d


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_windowed_attention_matches_reference(name, window):
    q_lens, seq_lens = SCENARIOS[name]
    query, cache, meta, fmt, expected, d = _scenario(q_lens, seq_lens, window)
    out = torch.full((query.shape[0], query.shape[1], d), float("nan"))
    paged_attention(query, cache, meta, d**-0.5, out, fmt, sliding_window=window)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_windowed_attention_reads_8bit_caches(name):
    q_lens, seq_lens = SCENARIOS[name]
    query, cache, meta, fmt, expected, d = _scenario(q_lens, seq_lens, 16, kind="int8_per_token_head")
    out = torch.empty(query.shape[0], query.shape[1], d)
    paged_attention(query, cache, meta, d**-0.5, out, fmt, sliding_window=16)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_window_changes_the_result_and_is_never_given_to_the_kernel():
    """Same cache and metadata, with and without a window: different outputs, and the windowed call equals
    the windowed reference even though the metadata asks for the compiled kernel (when it is loaded)."""
    q_lens, seq_lens = SCENARIOS["mixed"]
    query, cache, meta, fmt, expected, d = _scenario(q_lens, seq_lens, 6, freed_blocks_nan=False)
    windowed = torch.empty(query.shape[0], query.shape[1], d)
    paged_attention(query, cache, meta, d**-0.5, windowed, fmt, sliding_window=6)
    full = torch.empty_like(windowed)
    paged_attention(query, cache, meta, d**-0.5, full, fmt)
    torch.testing.assert_close(windowed.double(), expected, atol=1e-5, rtol=1e-5)
    assert (windowed - full).abs().max() > 1e-2
    assert meta.kernel == kernels.available() and not meta.windowed(6).kernel
    assert meta.windowed(6) is meta.windowed(6)  # built once per step and window, shared by the layers
    with pytest.raises(RuntimeError, match="windowed to 6 tokens used for a full-attention layer"):
        paged_attention(query, cache, meta.windowed(6), d**-0.5, full, fmt)


def test_backends_without_window_support_refuse_one():
    from thinkeys.attention.rebuild import ThinKeyRebuildImpl
    from thinkeys.attention.shared import ThinKeySharedKVImpl

    for impl in (ThinKeyAttentionImpl, ThinKeyRebuildImpl):
        assert impl(4, 8, 0.2, num_kv_heads=2, sliding_window=512).sliding_window == 512
    with pytest.raises(NotImplementedError, match="sliding_window=512 \\(this backend attends over the whole context\\)"):
        ThinKeySharedKVImpl(4, 8, 0.2, num_kv_heads=2, sliding_window=512)


def test_rebuild_layers_honour_the_window():
    """Rebuild at read (cached latents, keys A^T c rebuilt and rotated at their positions) with a window: the
    rebuild backend's impl, on the metadata the builder makes, equals the windowed float64 reference."""
    from thinkeys.attention.rebuild import ThinKeyRebuildImpl
    from thinkeys.rope import apply_thin_rope

    g = torch.Generator().manual_seed(3)
    heads, kv_heads, r, d, block_size, window = 4, 2, 8, 32, 16, 6
    q_lens, seq_lens = [1, 1, 9, 16], [30, 3, 9, 48]
    table_t = torch.randn(kv_heads, d, r, generator=g) / r**0.5  # A^T
    freqs = torch.rand(kv_heads, d // 2, generator=g) * 0.5
    blocks_needed = [-(-s // block_size) for s in seq_lens]
    cache = torch.zeros(sum(blocks_needed) + 1, kv_heads, block_size, r + d)
    block_table = torch.zeros(len(seq_lens), max(blocks_needed), dtype=torch.int32)
    queries, expected, used = [], [], 1
    for i, (q_len, s) in enumerate(zip(q_lens, seq_lens)):
        block_table[i, : blocks_needed[i]] = torch.arange(used, used + blocks_needed[i], dtype=torch.int32)
        used += blocks_needed[i]
        c, v = torch.randn(s, kv_heads, r, generator=g), torch.randn(s, kv_heads, d, generator=g)
        pos = torch.arange(s)
        write_kv(cache, c, v, block_table[i, pos // block_size].long() * block_size + pos % block_size)
        keys = apply_thin_rope(torch.einsum("sgr,gdr->sgd", c, table_t), pos, freqs)  # rebuilt, rotated
        q = apply_thin_rope(torch.randn(q_len, heads, d, generator=g), pos[s - q_len :], freqs)  # the source's query
        queries.append(q)
        expected.append(causal_attention(q.double(), keys.double(), v.double(), scale=d**-0.5, context=s - q_len, sliding_window=window))
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    kernel = kernels.available()
    meta = build_metadata(
        query_start_loc=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=block_table,
        block_size=block_size, num_actual_tokens=int(qsl[-1]), torch_path=not kernel, kernel=kernel,
    )
    impl = ThinKeyRebuildImpl(heads, r, d**-0.5, num_kv_heads=kv_heads, sliding_window=window)
    impl.rebuild_table, impl.key_rope_freqs = table_t, freqs
    query = torch.cat(queries)
    out = torch.empty(query.shape[0], heads, d)
    impl.forward(None, query.reshape(-1, heads * d), None, None, cache, meta, out)
    torch.testing.assert_close(out.double(), torch.cat(expected), atol=1e-5, rtol=1e-5)
