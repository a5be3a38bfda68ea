"""8-bit KV caches and shared K=V slots in the thin-key backend's paged attention (no engine).

The paged path with an 8-bit cache must equal the float64 reference run on keys and values that were
quantized and dequantized the same way (written out here independently of ``quant.py``), for every
8-bit kind the backend takes, decodes mixed with chunked prefills, both cache layouts and GQA. The
same for shared K=V slots (one vector, rotated when read as a key), plain and 8-bit.
"""

from __future__ import annotations

import pytest
import torch

from thinkeys.attention.backend import ThinKeyAttentionBackend, ThinKeyAttentionImpl
from thinkeys.attention.paged import CacheFormat, build_metadata, paged_attention, write_kv
from thinkeys.attention.quant import EIGHT_BIT_DTYPES, KVCodec
from thinkeys.attention.reference import causal_attention
from thinkeys.rope import apply_thin_rope

ATOL = 1e-4  # fp32 SDPA over dequantized values vs the float64 reference of the same values
STORAGE = {"int8_per_token_head": torch.int8}  # vLLM's STR_DTYPE_TO_TORCH_DTYPE; the fp8 kinds are uint8


def fake_quant(x: torch.Tensor, kind: str, scale: float = 1.0) -> torch.Tensor:
    """What an 8-bit slot gives back for ``x`` [..., width], in float64: the reference's inputs."""
    x = x.double()
    if kind == "int8_per_token_head":
        s = (x.abs().amax(-1, keepdim=True) / 127).float().double()  # scales are stored as float32
        return (x / s).round().clamp(-127, 127) * s
    if kind == "fp8_per_token_head":
        s = (x.abs().amax(-1, keepdim=True) / 448).float().double()
        return (x / s).float().to(torch.float8_e4m3fn).double() * s
    f8 = torch.float8_e5m2 if kind == "fp8_e5m2" else torch.float8_e4m3fn
    return (x.float() / scale).to(f8).double() * scale


STEPS = {
    "decodes": ([1, 1, 1], [5, 17, 40]),
    "mixed": ([1, 9, 4, 1], [30, 9, 50, 1]),  # decodes, a fresh prefill, a chunk after a prefix
}


def scenario(kind, q_lens, seq_lens, *, shared=False, layout="LBHNC", heads=6, kv_heads=2, r=16, d=32,
             block_size=16, k_scale=1.0, v_scale=1.0, seed=0):
    """Write every request's keys/values in two steps (earlier context, then this step) and build the metadata.

    Returns (query, cache, meta, fmt, expected [T, H, d] float64).
    """
    g = torch.Generator().manual_seed(seed)
    if shared:
        r = d
    codec = KVCodec(kind, r, 0 if shared else d)
    freqs = (torch.rand(kv_heads, d // 2, generator=g) * 0.5) if shared else None
    fmt = CacheFormat(codec, k_scale=k_scale, v_scale=v_scale, key_rope_freqs=freqs)
    storage = STORAGE.get(kind, torch.uint8 if kind in EIGHT_BIT_DTYPES else torch.float32)
    blocks_needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    if layout == "LBHNC":
        cache = torch.zeros(num_blocks, kv_heads, block_size, codec.slot_width, dtype=storage)
    else:
        cache = torch.zeros(num_blocks, block_size, kv_heads, codec.slot_width, dtype=storage).permute(0, 2, 1, 3)
    table = torch.zeros(len(seq_lens), max(blocks_needed), dtype=torch.int32)
    perm, used = torch.randperm(num_blocks, generator=g), 0
    queries, expected, new = [], [], []
    for i, (q_len, s) in enumerate(zip(q_lens, seq_lens)):
        table[i, : blocks_needed[i]] = perm[used : used + blocks_needed[i]].to(torch.int32)
        used += blocks_needed[i]
        k = torch.randn(s, kv_heads, r, generator=g) * 3
        v = k if shared else torch.randn(s, kv_heads, d, generator=g)
        q = torch.randn(q_len, heads, r, generator=g)
        pos = torch.arange(s)
        slots = table[i, pos // block_size].long() * block_size + pos % block_size
        ctx = s - q_len
        write_kv(cache, k[:ctx], None if shared else v[:ctx], slots[:ctx], fmt)
        new.append((k[ctx:], v[ctx:], slots[ctx:]))
        kq = fake_quant(k, kind, k_scale) if kind in EIGHT_BIT_DTYPES else k.double()
        vq = kq if shared else (fake_quant(v, kind, v_scale) if kind in EIGHT_BIT_DTYPES else v.double())
        if shared:  # the cached vector is the value as it is and the key rotated at its position
            kq = apply_thin_rope(kq, pos, freqs.double())
        queries.append(q)
        expected.append(causal_attention(q.double(), kq, vq, scale=d**-0.5, context=ctx))
    k_new, v_new, slots_new = (torch.cat(t) for t in zip(*new))
    pad = lambda t: torch.cat([t, torch.full((1, *t.shape[1:]), 9.0)])  # noqa: E731 - one padding token (slot -1)
    write_kv(cache, pad(k_new), None if shared else pad(v_new), torch.cat([slots_new, torch.tensor([-1])]), fmt)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    meta = build_metadata(
        query_start_loc=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=table,
        block_size=block_size, num_actual_tokens=int(qsl[-1]),
    )
    return torch.cat(queries), cache, meta, fmt, torch.cat(expected)


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("kind", EIGHT_BIT_DTYPES)
def test_8bit_cache_matches_reference_of_the_same_quantization(kind, step, layout):
    query, cache, meta, fmt, expected = scenario(kind, *STEPS[step], layout=layout, k_scale=0.5, v_scale=0.25)
    out = torch.full((query.shape[0], query.shape[1], 32), float("nan"))
    paged_attention(query, cache, meta, 32**-0.5, out, fmt)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["auto", "int8_per_token_head", "fp8"])
def test_shared_kv_slots_match_reference(kind):
    query, cache, meta, fmt, expected = scenario(kind, *STEPS["mixed"], shared=True)
    assert cache.shape[-1] == 32 + (4 if kind == "int8_per_token_head" else 0)  # one vector (+ its scale)
    out = torch.full((query.shape[0], query.shape[1], 32), float("nan"))
    paged_attention(query, cache, meta, 32**-0.5, out, fmt)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=0)


def test_int8_per_token_head_is_closer_than_per_tensor_fp8():
    """Why ``int8_per_token_head`` is the recommended 8-bit cache: on the same values its error is far smaller."""
    x = torch.randn(4096, 3, 64) * torch.logspace(-1, 1, 64)  # channels of very different size, like real keys
    err = {kind: (fake_quant(x, kind) - x.double()).pow(2).mean().sqrt().item() for kind in ("int8_per_token_head", "fp8", "fp8_e5m2", "fp8_per_token_head")}
    assert err["int8_per_token_head"] < err["fp8_per_token_head"] < err["fp8"] < err["fp8_e5m2"], err


def test_slot_layout_and_sizes():
    codec = KVCodec("int8_per_token_head", 16, 64)
    assert codec.slot_width == 16 + 64 + 8  # key, value, two float32 scales
    assert KVCodec("fp8", 16, 64).slot_width == 80
    assert KVCodec("fp8_per_token_head", 64, 0).slot_width == 68
    slots = codec.encode(torch.ones(2, 3, 16), torch.full((2, 3, 64), -2.0), torch.int8)
    assert slots.shape == (2, 3, 88) and slots.dtype == torch.int8
    k, v = codec.decode(slots, torch.float32)
    torch.testing.assert_close(k, torch.ones(2, 3, 16))
    torch.testing.assert_close(v, torch.full((2, 3, 64), -2.0))


def test_backend_refuses_what_it_cannot_store():
    assert {"fp8", "fp8_e4m3", "fp8_e5m2", "int8_per_token_head", "fp8_per_token_head"} <= set(
        ThinKeyAttentionBackend.supported_kv_cache_dtypes
    )
    with pytest.raises(NotImplementedError, match="kv_cache_dtype=int4_per_token_head .*pick one of those for --kv-cache-dtype"):
        ThinKeyAttentionImpl(4, 16, 0.25, 2, kv_cache_dtype="int4_per_token_head")
