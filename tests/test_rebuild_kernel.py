"""The compiled rebuild-at-read kernel (and the PyTorch read path) against a dense float64 reference.

Random paged caches of latents ``c`` (r wide) and values (d wide), scattered blocks, both KV-cache
layouts, GQA, decodes mixed with fresh and chunked prefills (cached-prefix offsets), padding
requests; float32, bfloat16 and float16. The reference rebuilds every key as ``A^T c`` in float64,
rotates it with the source's RoPE at its position (``thinkeys.rope.apply_thin_rope``) and runs
causal attention with the d-wide query. Fails rather than skips when the kernel cannot be built.
"""

from __future__ import annotations

import pytest
import torch
from test_attention_kernels import STEPS, make_cache

from thinkeys.attention import rebuild_kernel
from thinkeys.attention.paged import CacheFormat, build_metadata, paged_attention_torch, write_kv_torch
from thinkeys.attention.quant import KVCodec
from thinkeys.attention.reference import causal_attention
from thinkeys.rope import apply_thin_rope, default_inv_freq

ATOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def compiled_kernel():
    assert rebuild_kernel.available(), "the rebuild attention kernel did not build (see the warning logged above)"


def scenario(q_lens, seq_lens, *, heads=6, kv_heads=2, r=8, d=32, block_size=16, dtype=torch.float32, layout="LBHNC", seed=0, padding_requests=0):
    """(query [T, H, d], cache, expansion [H_kv, d, r], freqs [H_kv, d/2], block_table, qsl, seq_lens, expected float64)."""
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_needed) + 5
    cache = make_cache(num_blocks, kv_heads, block_size, r + d, dtype, layout)
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.full((len(seq_lens) + padding_requests, max(blocks_needed) + 2), -7, dtype=torch.int32)
    expand = torch.randn(kv_heads, d, r, generator=g) / r**0.5  # [H_kv, d, r]
    freqs = default_inv_freq(d, 10000.0)[None].repeat(kv_heads, 1)  # [H_kv, d/2]
    queries, expected, used = [], [], 0
    for i, (q_len, s) in enumerate(zip(q_lens, seq_lens)):
        table[i, : blocks_needed[i]] = perm[used : used + blocks_needed[i]].to(torch.int32)
        used += blocks_needed[i]
        c = torch.randn(s, kv_heads, r, generator=g).to(dtype)
        v = torch.randn(s, kv_heads, d, generator=g).to(dtype)
        q = torch.randn(q_len, heads, d, generator=g).to(dtype)
        pos = torch.arange(s)
        write_kv_torch(cache, c, v, table[i, pos // block_size].long() * block_size + pos % block_size)
        k = apply_thin_rope(torch.einsum("sgr,gdr->sgd", c.double(), expand.double()), pos, freqs.double())
        queries.append(q)
        expected.append(causal_attention(q.double(), k, v.double(), scale=d**-0.5, context=s - q_len))
    qsl = [0]
    for q_len in list(q_lens) + [0] * padding_requests:
        qsl.append(qsl[-1] + q_len)
    lens = list(seq_lens) + [0] * padding_requests
    return (torch.cat(queries), cache, expand, freqs, table, torch.tensor(qsl, dtype=torch.int32),
            torch.tensor(lens, dtype=torch.int32), torch.cat(expected))


def run_kernel(query, cache, expand, freqs, table, qsl, lens):
    out = torch.full_like(query, float("nan"))
    rebuild_kernel.paged_attention(query, cache, expand, freqs, table, qsl, lens, query.shape[-1] ** -0.5, out)
    return out


def run_torch(query, cache, expand, freqs, table, qsl, lens, kv_cache_dtype="auto"):
    r = expand.shape[-1]
    meta = build_metadata(query_start_loc=qsl, seq_lens=lens, block_table=table, block_size=cache.shape[2], num_actual_tokens=query.shape[0])
    fmt = CacheFormat(KVCodec(kv_cache_dtype, r, query.shape[-1]), key_rope_freqs=freqs, key_expansion=expand)
    out = torch.full_like(query, float("nan"))
    return paged_attention_torch(query, cache, meta, query.shape[-1] ** -0.5, out, fmt)


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("step", list(STEPS))
def test_kernel_and_torch_path_match_reference_fp32(step, layout):
    case = scenario(*STEPS[step], layout=layout)
    expected = case[-1]
    torch.testing.assert_close(run_kernel(*case[:-1]).double(), expected, atol=ATOL / 10, rtol=0)
    torch.testing.assert_close(run_torch(*case[:-1]).double(), expected, atol=ATOL / 10, rtol=0)


@pytest.mark.parametrize(
    "r,d,heads,kv_heads,block_size",
    [
        (32, 64, 9, 3, 128),  # SmolLM2-135M at r = 32, vLLM's CPU block size
        (16, 64, 9, 3, 32),
        (64, 64, 4, 4, 16),  # full rank
        (4, 12, 6, 1, 7),  # MQA, odd block size
    ],
)
def test_kernel_shapes(r, d, heads, kv_heads, block_size):
    case = scenario([1, 3, 1, 70], [40, 3, 9, 150], heads=heads, kv_heads=kv_heads, r=r, d=d, block_size=block_size, seed=r, padding_requests=1)
    torch.testing.assert_close(run_kernel(*case[:-1]).double(), case[-1], atol=ATOL / 10, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_kernel_low_precision(dtype, atol):
    case = scenario(*STEPS["mixed"], dtype=dtype)
    torch.testing.assert_close(run_kernel(*case[:-1]).double(), case[-1], atol=atol, rtol=0)


def test_torch_path_reads_8bit_latents():
    """int8 per-token-head slots: latents and values dequantized, then rebuilt; close to the float result."""
    q_lens, seq_lens = STEPS["mixed"]
    query, cache, expand, freqs, table, qsl, lens, expected = scenario(q_lens, seq_lens)
    codec = KVCodec("int8_per_token_head", expand.shape[-1], query.shape[-1])
    slots = cache.reshape(-1, cache.shape[1], cache.shape[3]) if cache.is_contiguous() else None
    assert slots is not None
    quant = torch.zeros(*cache.shape[:3], codec.slot_width, dtype=torch.int8)
    r = expand.shape[-1]
    quant.view(-1, cache.shape[1], codec.slot_width)[:] = codec.encode(slots[..., :r], slots[..., r:], torch.int8)
    out = run_torch(query, quant, expand, freqs, table, qsl, lens, kv_cache_dtype="int8_per_token_head")
    err = (out.double() - expected).abs().max()
    assert 0 < err < 0.05, err
