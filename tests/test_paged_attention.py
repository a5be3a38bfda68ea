"""The paged thin-key attention kernel against the dense reference, on random paged caches.

Covers what the engine produces: decodes batched at the front, prefills with and without a cached
prefix (chunked prefill, prefix-cache hits), GQA, keys narrower than values, scattered blocks.
"""

import pytest
import torch

from thinkeys.attention.paged import build_metadata, paged_attention, write_kv
from thinkeys.attention.reference import causal_attention


def _scenario(q_lens, seq_lens, *, heads=4, kv_heads=2, r=8, d=32, block_size=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum((s + block_size - 1) // block_size for s in seq_lens) + 7
    cache = torch.zeros(num_blocks, block_size, kv_heads, r + d, dtype=dtype).permute(0, 2, 1, 3)  # LBNHC view
    perm = torch.randperm(num_blocks, generator=g)  # scatter each request's blocks
    max_blocks = max((s + block_size - 1) // block_size for s in seq_lens)
    block_table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    keys, values, queries, slots, used = [], [], [], [], 0
    for i, s in enumerate(seq_lens):
        nb = (s + block_size - 1) // block_size
        block_table[i, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
        k = torch.randn(s, kv_heads, r, generator=g, dtype=dtype)
        v = torch.randn(s, kv_heads, d, generator=g, dtype=dtype)
        keys.append(k), values.append(v)
        pos = torch.arange(s)
        slot = block_table[i, pos // block_size].long() * block_size + pos % block_size
        # the cached prefix was written by earlier steps; the new tokens are written now
        ctx = s - q_lens[i]
        write_kv(cache, k[:ctx], v[:ctx], slot[:ctx])
        slots.append(slot[ctx:])
        queries.append(torch.randn(q_lens[i], heads, r, generator=g, dtype=dtype))
    new_k = torch.cat([k[s - q:] for k, s, q in zip(keys, seq_lens, q_lens)])
    new_v = torch.cat([v[s - q:] for v, s, q in zip(values, seq_lens, q_lens)])
    slot_mapping = torch.cat(slots + [torch.full((3,), -1, dtype=torch.long)])  # + padding tokens
    write_kv(cache, torch.cat([new_k, torch.zeros(3, kv_heads, r)]), torch.cat([new_v, torch.zeros(3, kv_heads, d)]), slot_mapping)
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    meta = build_metadata(query_start_loc=qsl, seq_lens=list(seq_lens), block_table=block_table, block_size=block_size, num_actual_tokens=qsl[-1])
    query = torch.cat(queries)
    expected = torch.cat([
        causal_attention(q, k, v, scale=d**-0.5, context=s - q.shape[0])
        for q, k, v, s in zip(queries, keys, values, seq_lens)
    ])
    return query, cache, meta, expected, d


@pytest.mark.parametrize(
    "q_lens,seq_lens",
    [
        ([1, 1, 1], [5, 17, 40]),  # decodes only, ragged lengths across block boundaries
        ([7], [7]),  # plain prefill
        ([1, 1, 9, 4], [30, 2, 9, 50]),  # decodes + fresh prefill + chunked prefill / prefix hit
        ([16, 33], [48, 33]),  # chunk continuing a cached prefix of exactly one block
    ],
)
def test_paged_attention_matches_reference(q_lens, seq_lens):
    query, cache, meta, expected, d = _scenario(q_lens, seq_lens)
    out = torch.full((query.shape[0], query.shape[1], d), float("nan"))
    paged_attention(query, cache, meta, d**-0.5, out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_paged_attention_bf16_within_tolerance():
    query, cache, meta, expected, d = _scenario([1, 1, 6], [20, 3, 30], dtype=torch.bfloat16)
    out = torch.empty(query.shape[0], query.shape[1], d, dtype=torch.bfloat16)
    paged_attention(query, cache, meta, d**-0.5, out)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_decodes_are_batched_and_prefills_split():
    _, _, meta, _, _ = _scenario([1, 1, 5, 3], [10, 4, 5, 20])
    assert meta.num_decodes == 2
    assert meta.decode_mask.shape == (2, 1, 1, 10)
    assert [p.mask is None for p in meta.prefills] == [True, False]  # no prefix vs cached prefix


def test_write_kv_skips_padding_slots():
    cache = torch.zeros(2, 2, 4, 3 + 5)  # [blocks, H_kv, block, r + d]
    key, value = torch.ones(3, 2, 3), torch.full((3, 2, 5), 2.0)
    write_kv(cache, key, value, torch.tensor([1, -1, 6]))
    assert cache[0, :, 1, :3].eq(1).all() and cache[0, :, 1, 3:].eq(2).all()
    assert cache[1, :, 2].ne(0).all()
    assert int(cache.ne(0).any(-1).sum()) == 4  # 2 slots x 2 heads, nothing else touched
