"""8-bit KV caches and shared K=V slots in the thin-key backend's paged attention (no engine).

Both paths with an 8-bit cache (the compiled kernel, which quantizes on write and decodes the slots
in place, and the PyTorch fallback) must equal the float64 reference run on keys and values that
were quantized and dequantized the same way (written out here independently of ``quant.py``), for
every 8-bit kind the backend takes, decodes mixed with chunked prefills, both cache layouts, GQA,
the kernel's intrinsics and portable loops, and float32 / bfloat16 / float16 activations. The
kernel's quantizing write stores the same bytes as ``quant.py``. The same reference holds shared
K=V slots (one vector, rotated when read as a key), plain and 8-bit, on the PyTorch path and on the
rebuild kernel's shared_kv form.
"""

from __future__ import annotations

import pytest
import torch

from thinkeys.attention.backend import ThinKeyAttentionBackend, ThinKeyAttentionImpl
from thinkeys.attention import kernels
from thinkeys.attention.paged import (
    CacheFormat,
    build_metadata,
    paged_attention,
    paged_attention_torch,
    use_kernel,
    write_kv,
    write_kv_torch,
)
from thinkeys.attention.quant import EIGHT_BIT_DTYPES, KVCodec
from thinkeys.attention.reference import causal_attention
from thinkeys.rope import apply_thin_rope

ATOL = 1e-4  # fp32 SDPA over dequantized values vs the float64 reference of the same values
STORAGE = {"int8_per_token_head": torch.int8}  # vLLM's STR_DTYPE_TO_TORCH_DTYPE; the fp8 kinds are uint8


def fake_quant(x: torch.Tensor, kind: str, scale: float = 1.0) -> torch.Tensor:
    """What an 8-bit slot gives back for ``x`` [..., width], in float64: the reference's inputs."""
    x = x.float()  # the write computes in float32: scales, divisions and rounding
    if kind == "int8_per_token_head":
        s = x.abs().amax(-1, keepdim=True) / 127  # scales are stored as float32
        return (x / s).round().clamp(-127, 127).double() * s.double()
    if kind == "fp8_per_token_head":
        s = x.abs().amax(-1, keepdim=True) / 448
        return (x / s).to(torch.float8_e4m3fn).double() * s.double()
    f8 = torch.float8_e5m2 if kind == "fp8_e5m2" else torch.float8_e4m3fn
    return (x / scale).to(f8).double() * scale


STEPS = {
    "decodes": ([1, 1, 1], [5, 17, 40]),
    "mixed": ([1, 9, 4, 1], [30, 9, 50, 1]),  # decodes, a fresh prefill, a chunk after a prefix
}


def scenario(kind, q_lens, seq_lens, *, shared=False, layout="LBHNC", heads=6, kv_heads=2, r=16, d=32,
             block_size=16, k_scale=1.0, v_scale=1.0, seed=0, dtype=torch.float32, writer=write_kv, shared_rope=True,
             storage=None):
    """Write every request's keys/values in two steps (earlier context, then this step) and build the metadata.

    Keys, values and queries are rounded to ``dtype`` (the activations' dtype) before anything else.
    Returns (query, cache, meta, fmt, expected [T, H, d] float64).
    """
    g = torch.Generator().manual_seed(seed)
    if shared:
        r = d
    codec = KVCodec(kind, r, 0 if shared else d)
    freqs = (torch.rand(kv_heads, d // 2, generator=g) * 0.5 * shared_rope) if shared else None
    fmt = CacheFormat(codec, k_scale=k_scale, v_scale=v_scale, key_rope_freqs=freqs)
    storage = storage or STORAGE.get(kind, torch.uint8 if kind in EIGHT_BIT_DTYPES else torch.float32)
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
        k = (torch.randn(s, kv_heads, r, generator=g) * 3).to(dtype)
        v = k if shared else torch.randn(s, kv_heads, d, generator=g).to(dtype)
        q = torch.randn(q_len, heads, r, generator=g).to(dtype)
        pos = torch.arange(s)
        slots = table[i, pos // block_size].long() * block_size + pos % block_size
        ctx = s - q_len
        writer(cache, k[:ctx], None if shared else v[:ctx], slots[:ctx], fmt)
        new.append((k[ctx:], v[ctx:], slots[ctx:]))
        kq = fake_quant(k, kind, k_scale) if kind in EIGHT_BIT_DTYPES else k.double()
        vq = kq if shared else (fake_quant(v, kind, v_scale) if kind in EIGHT_BIT_DTYPES else v.double())
        if shared:  # the cached vector is the value as it is and the key rotated at its position
            kq = apply_thin_rope(kq, pos, freqs.double())
        queries.append(q)
        expected.append(causal_attention(q.double(), kq, vq, scale=d**-0.5, context=ctx))
    k_new, v_new, slots_new = (torch.cat(t) for t in zip(*new))
    pad = lambda t: torch.cat([t, torch.full((1, *t.shape[1:]), 9.0, dtype=t.dtype)])  # noqa: E731 - one padding token (slot -1)
    writer(cache, pad(k_new), None if shared else pad(v_new), torch.cat([slots_new, torch.tensor([-1])]), fmt)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    meta = build_metadata(
        query_start_loc=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=table,
        block_size=block_size, num_actual_tokens=int(qsl[-1]),
    )
    return torch.cat(queries), cache, meta, fmt, torch.cat(expected)


@pytest.fixture(scope="module")
def compiled_kernel():
    assert kernels.kernel_choice() != "torch", "THINKEYS_ATTENTION_KERNEL=torch disables the kernel these tests check"
    assert kernels.available(), "the CPU attention kernel did not build (see the warning logged above)"


def torch_writer(cache, key, value, slots, fmt):
    """The PyTorch path's write (what runs when the kernel is not available)."""
    write_kv_torch(cache, key, value, slots, fmt)


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("kind", EIGHT_BIT_DTYPES)
def test_8bit_cache_matches_reference_of_the_same_quantization(compiled_kernel, kind, step, layout, path):
    writer = write_kv if path == "kernel" else torch_writer
    query, cache, meta, fmt, expected = scenario(kind, *STEPS[step], layout=layout, k_scale=0.5, v_scale=0.25, writer=writer)
    out = torch.full((query.shape[0], query.shape[1], 32), float("nan"))
    if path == "kernel":
        assert use_kernel(query, cache, meta, fmt), "paged_attention would not run the compiled kernel here"
        paged_attention(query, cache, meta, 32**-0.5, out, fmt)
    else:
        paged_attention_torch(query, cache, meta, 32**-0.5, out, fmt)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "r,d,heads,kv_heads,block_size",
    [
        (16, 64, 9, 3, 128),  # SmolLM2-135M at r = 16 (GQA 3), vLLM's CPU block size: the intrinsics path
        (32, 64, 9, 3, 32),  # r = 32, the default checkpoint's rank
        (12, 20, 6, 2, 7),  # portable tails: r, d and the block size not multiples of 8
        (5, 3, 3, 1, 5),  # MQA, tiny odd widths
    ],
)
@pytest.mark.parametrize("kind", EIGHT_BIT_DTYPES)
def test_8bit_kernel_shapes(compiled_kernel, kind, r, d, heads, kv_heads, block_size):
    query, cache, meta, fmt, expected = scenario(
        kind, [1, 3, 1, 19], [40, 3, 9, 60], r=r, d=d, heads=heads, kv_heads=kv_heads, block_size=block_size,
        k_scale=2.0, v_scale=0.5, seed=r,
    )
    out = torch.full((query.shape[0], heads, d), float("nan"))
    assert use_kernel(query, cache, meta, fmt)
    paged_attention(query, cache, meta, d**-0.5, out, fmt)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("kind", ["int8_per_token_head", "fp8", "fp8_per_token_head"])
def test_8bit_kernel_half_precision_activations(compiled_kernel, kind, dtype, atol):
    """bf16/fp16 queries over an 8-bit cache: the kernel decodes to fp32, only the output is rounded."""
    query, cache, meta, fmt, expected = scenario(kind, *STEPS["mixed"], dtype=dtype, layout="LBNHC")
    out = torch.full((query.shape[0], query.shape[1], 32), float("nan"), dtype=dtype)
    assert use_kernel(query, cache, meta, fmt)
    paged_attention(query, cache, meta, 32**-0.5, out, fmt)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "r,d,heads,kv_heads,block_size,layout",
    [
        (32, 64, 9, 3, 128, "LBHNC"),  # decodes (vdpbf16ps) and 48-row prefill tiles (AMX brgemm where present)
        (48, 40, 8, 1, 16, "LBNHC"),  # MQA, widths not multiples of 32 (masked loads)
        (12, 20, 6, 2, 7, "LBHNC"),  # odd widths and block size: scalar code tails
    ],
)
@pytest.mark.parametrize("kind", ["int8_per_token_head", "fp8", "fp8_per_token_head"])
def test_8bit_kernel_bf16_activations_shapes(compiled_kernel, kind, r, d, heads, kv_heads, block_size, layout):
    """bf16 queries over 8-bit slots on every path of the bf16 form (on AVX512-BF16 CPUs the codes are
    widened to bf16, exactly, and their scales applied to scores and probabilities in fp32)."""
    query, cache, meta, fmt, expected = scenario(
        kind, [1, 40, 7, 1], [300, 40, 190, 3], r=r, d=d, heads=heads, kv_heads=kv_heads, block_size=block_size,
        k_scale=0.5, v_scale=0.25, seed=r, dtype=torch.bfloat16, layout=layout,
    )
    out = torch.full((query.shape[0], heads, d), float("nan"), dtype=torch.bfloat16)
    assert use_kernel(query, cache, meta, fmt)
    paged_attention(query, cache, meta, d**-0.5, out, fmt)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=0)


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", EIGHT_BIT_DTYPES)
def test_kernel_write_stores_the_bytes_of_quant_py(compiled_kernel, kind, dtype, layout):
    """The kernel's quantizing write and ``KVCodec.encode`` agree byte for byte (scales included)."""
    g = torch.Generator().manual_seed(5)
    codec = KVCodec(kind, 12, 40)
    fmt = CacheFormat(codec, k_scale=0.75, v_scale=1.5)
    storage = STORAGE.get(kind, torch.uint8)
    shape = (6, 3, 8, codec.slot_width) if layout == "LBHNC" else (6, 8, 3, codec.slot_width)
    caches = [torch.zeros(shape, dtype=storage) for _ in range(2)]
    if layout == "LBNHC":
        caches = [c.permute(0, 2, 1, 3) for c in caches]
    # wide dynamic range, exact ties for int8 rounding, zeros (a zero vector's scale is float32's tiny)
    key = (torch.randn(20, 3, 12, generator=g) * torch.logspace(-3, 2, 12)).to(dtype)
    value = (torch.randn(20, 3, 40, generator=g) * 4).to(dtype)
    key[0, 0] = 0
    value[1, 1, :3] = torch.tensor([127.0, 0.5, -1.5])
    slots = torch.randperm(48, generator=g)[:17].long()
    slots[[2, 7]] = -1  # padding tokens; tokens past the mapping (17..19) are ignored too
    kernels.write_kv(caches[0], key, value, slots, codec.kernel_format, fmt.k_scale, fmt.v_scale)
    write_kv_torch(caches[1], key, value, slots, fmt)
    assert torch.equal(caches[0].view(torch.uint8), caches[1].view(torch.uint8))
    assert int(caches[0].view(torch.uint8).ne(0).any(-1).sum()) >= 15 * 3 - 1  # 15 real tokens x 3 heads (one zero key)


def test_kernel_rejects_mismatched_8bit_slots(compiled_kernel):
    query, cache, meta, fmt, _ = scenario("int8_per_token_head", [1], [3])
    out = torch.empty(1, 6, 32)
    with pytest.raises(RuntimeError, match="expected R \\+ D \\+ 8"):
        kernels.paged_attention(query, cache[..., :-4], meta.block_table, meta.query_start_loc, meta.seq_lens, 1.0, out, "int8_per_token_head")
    with pytest.raises(RuntimeError, match="1-byte kv_cache"):
        kernels.paged_attention(query, cache.float(), meta.block_table, meta.query_start_loc, meta.seq_lens, 1.0, out, "fp8_e4m3")
    with pytest.raises(RuntimeError, match="unknown cache_format 'int4'"):
        kernels.paged_attention(query, cache, meta.block_table, meta.query_start_loc, meta.seq_lens, 1.0, out, "int4")


@pytest.mark.parametrize("kind", ["auto", "int8_per_token_head", "fp8"])
def test_shared_kv_slots_match_reference(kind):
    query, cache, meta, fmt, expected = scenario(kind, *STEPS["mixed"], shared=True)
    assert cache.shape[-1] == 32 + (4 if kind == "int8_per_token_head" else 0)  # one vector (+ its scale)
    out = torch.full((query.shape[0], query.shape[1], 32), float("nan"))
    paged_attention(query, cache, meta, 32**-0.5, out, fmt)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("kind,k_scale", [("auto", 1.0), ("int8_per_token_head", 1.0), ("fp8_per_token_head", 1.0), ("fp8", 0.05),
                                          ("fp8_e5m2", 0.5)])
@pytest.mark.parametrize("step", ["decodes", "mixed"])
def test_shared_kv_kernel_matches_reference(kind, k_scale, step, layout):
    """The rebuild kernel's shared_kv form (r = d, no expansion) reads the same slots in place: same reference."""
    from thinkeys.attention import rebuild_kernel

    assert rebuild_kernel.available()
    query, cache, meta, fmt, expected = scenario(kind, *STEPS[step], shared=True, layout=layout, k_scale=k_scale)
    out = torch.full((query.shape[0], query.shape[1], 32), float("nan"))
    kernel_format = "plain" if kind == "auto" else {"fp8": "fp8_e4m3"}.get(kind, kind)
    rebuild_kernel.shared_kv_attention(query, cache, fmt.key_rope_freqs, meta.block_table, meta.query_start_loc, meta.seq_lens,
                                       32**-0.5, out, kernel_format, k_scale)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind,storage,tol", [("auto", torch.bfloat16, 1e-2), ("int8_per_token_head", None, 1e-2), ("auto", None, 0.0)])
def test_shared_kv_kernel_bf16_and_no_rope(kind, storage, tol):
    """bf16 activations (read by the fp32 form, widened), and a layer without RoPE (GPT-2: freqs None)."""
    from thinkeys.attention import rebuild_kernel

    assert rebuild_kernel.available()
    dtype = storage or torch.float32
    if kind == "int8_per_token_head":
        dtype = torch.bfloat16
    rope = storage is not None or kind != "auto"
    query, cache, meta, fmt, expected = scenario(kind, *STEPS["mixed"], shared=True, dtype=dtype, storage=storage, shared_rope=rope)
    query = query.to(dtype)
    out = torch.full((query.shape[0], query.shape[1], 32), float("nan"), dtype=dtype)
    rebuild_kernel.shared_kv_attention(query, cache, fmt.key_rope_freqs if rope else None, meta.block_table, meta.query_start_loc,
                                       meta.seq_lens, 32**-0.5, out, "plain" if kind == "auto" else kind)
    # bf16: the output is rounded to bf16 (half an ulp is 0.2% of values up to ~10 here)
    torch.testing.assert_close(out.double(), expected, atol=ATOL + tol, rtol=tol)


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
