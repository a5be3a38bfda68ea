"""The compiled rebuild-at-read kernel (and the PyTorch read path) against a dense float64 reference.

Random paged caches of latents ``c`` (r wide) and values (d wide), scattered blocks, both KV-cache
layouts, GQA, decodes mixed with fresh and chunked prefills (cached-prefix offsets), padding
requests; float32, bfloat16 and float16. The reference rebuilds every key as ``A^T c`` in float64,
rotates it with the source's RoPE at its position (``thinkeys.rope.apply_thin_rope``) and runs
causal attention with the d-wide query. Fails rather than skips when the kernel cannot be built.

The forms (see csrc/rebuild_attention.cpp): the bf16 form on AVX512-BF16 CPUs (vdpbf16ps or AMX
expansion, pages kept across a prefill's tiles, the fused RoPE for d in 32 / 64 / 128), the fp32
form (AVX-512 scores and P.V, transposed-key scoring for prefill tiles), the AVX2 form
(THINKEYS_KERNEL_ISA=avx2, in a subprocess) and the bf16 form without AMX (THINKEYS_KERNEL_NO_AMX=1).

8-bit caches (read in place by both forms): int8 / fp8 per-token-head and per-tensor fp8 slots
encoded by ``quant.KVCodec``, held to the float64 reference of the same codes and scales on decodes,
prefills, chunks after a prefix, GQA / MQA and odd r: bf16 queries in the bf16 form, float32 /
float16 queries in the fp32 form, bf16 queries in the AVX2 form (subprocess).
"""

from __future__ import annotations

import os

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


# ---- the forms: bf16 on AVX512-BF16 / AMX CPUs, the AVX2 form, no AMX ---------------------------------

BF16_ATOL = 3e-2  # bf16 inputs and output, keys rebuilt with a bf16 table and rounded to bf16, probabilities in bf16


def test_kernel_form_follows_the_cpu():
    """The rebuild kernel is built like the main one: the bf16 form where torch reports AVX512_BF16."""
    from thinkeys.attention import kernels

    form = rebuild_kernel.kernel_isa()
    if kernels.cpu_isa() == "avx512bf16":
        amx = (torch.cpu._is_amx_tile_supported() and os.environ.get("THINKEYS_KERNEL_AMX") != "0"
               and not os.environ.get("THINKEYS_KERNEL_NO_AMX"))
        assert form == ("avx512bf16+amx" if amx else "avx512bf16")  # AMX tiles for prefills where the CPU has them
    else:
        assert form in ("avx2", "portable")


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("step", list(STEPS))
def test_bf16_kernel_matches_reference(step, layout):
    """SmolLM2's group (9 heads, 3 KV heads, d = 64) at r = 32: decodes, prefill tiles, chunks after a prefix."""
    case = scenario(*STEPS[step], heads=9, kv_heads=3, r=32, d=64, dtype=torch.bfloat16, layout=layout)
    torch.testing.assert_close(run_kernel(*case[:-1]).double(), case[-1], atol=BF16_ATOL, rtol=0)


@pytest.mark.parametrize(
    "r,d,heads,kv_heads,block_size",
    [
        (32, 64, 9, 3, 128),  # the default served model, vLLM's CPU block size: tiles of 96 rows
        (16, 64, 9, 3, 32),
        (64, 64, 4, 4, 16),  # full rank, MHA
        (5, 40, 8, 1, 16),  # odd r (no brgemm expansion; the last latent pair masked), d / 2 = 20: masked RoPE
        (7, 32, 4, 2, 24),  # odd r, d = 32: the K^T expansion's last latent pair masked (on AMX tiles too: K = 16 bytes)
        (4, 12, 6, 1, 7),  # MQA, tiny widths, odd block size
    ],
)
def test_bf16_kernel_shapes(r, d, heads, kv_heads, block_size):
    """Long prefills (several 32-token tiles sharing the rebuilt pages), chunks, decodes and padding requests."""
    case = scenario([1, 3, 1, 70, 100], [300, 3, 9, 150, 100], heads=heads, kv_heads=kv_heads, r=r, d=d, block_size=block_size,
                    dtype=torch.bfloat16, seed=r, padding_requests=1)
    torch.testing.assert_close(run_kernel(*case[:-1]).double(), case[-1], atol=BF16_ATOL, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, ATOL / 10), (torch.bfloat16, BF16_ATOL)])
def test_kernel_with_two_threads_matches_one(dtype, atol):
    """Work items split over threads (each keeps its own rebuilt pages): same numbers as one thread."""
    case = scenario([1, 130, 40, 1], [200, 130, 300, 77], heads=9, kv_heads=3, r=32, d=64, block_size=32, dtype=dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_kernel(*case[:-1])
        torch.set_num_threads(2)
        two = run_kernel(*case[:-1])
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one.double(), case[-1], atol=atol, rtol=0)
    torch.testing.assert_close(two, one, atol=0, rtol=0)


def test_per_head_rope_frequencies():
    """Frequencies that differ between KV heads keep a table per head (the shared table is one row)."""
    query, cache, expand, freqs, table, qsl, lens, _ = scenario(*STEPS["mixed"], heads=6, kv_heads=2, r=8, d=32)
    freqs = freqs.clone()
    freqs[1] *= 0.5
    cos, _ = rebuild_kernel.rope_tables(freqs, 64)
    assert cos.shape[1] == 2
    expected = run_torch(query, cache, expand, freqs, table, qsl, lens).double()
    torch.testing.assert_close(run_kernel(query, cache, expand, freqs, table, qsl, lens).double(), expected, atol=ATOL / 10, rtol=0)
    shared, _ = rebuild_kernel.rope_tables(freqs[:1].repeat(2, 1), 64)
    assert shared.shape[1] == 1


def test_rope_lane_tables_are_the_tables_transposed():
    """The lane tables the K^T / fused-score expansions load 16 positions at a time from: cos / sin transposed
    to [H_cs, d / 2, P + 16], zeros past the end; they grow with the tables."""
    freqs = default_inv_freq(32, 10000.0)[None].repeat(2, 1)
    freqs[1] *= 0.5
    for positions in (40, 5000):
        cos, sin = rebuild_kernel.rope_tables(freqs, positions)
        cos_lanes, sin_lanes = rebuild_kernel.rope_lane_tables(freqs, positions)
        p = cos.shape[0]
        assert p >= positions and cos_lanes.shape == (2, 16, p + rebuild_kernel.LANE_PAD) and sin_lanes.shape == cos_lanes.shape
        assert torch.equal(cos_lanes[..., :p], cos.permute(1, 2, 0)) and torch.equal(sin_lanes[..., :p], sin.permute(1, 2, 0))
        assert not cos_lanes[..., p:].any() and not sin_lanes[..., p:].any()


@pytest.mark.skipif(not rebuild_kernel.available() or not rebuild_kernel.kernel_isa().startswith("avx512bf16"),
                    reason="the bf16 form (AVX512-BF16) is the one that reads the lane tables")
def test_bf16_form_refuses_a_call_without_lane_tables():
    query, cache, expand, freqs, table, qsl, lens, _ = scenario(*STEPS["decodes"], dtype=torch.bfloat16)
    expand_t, pairs = rebuild_kernel.prepared_tables(expand)
    cos, sin = rebuild_kernel.rope_tables(freqs, int(lens.max()))
    with pytest.raises(RuntimeError, match="cos_lanes and sin_lanes"):
        torch.ops.thinkeys_rebuild.paged_attention(query, cache, expand_t, pairs, cos, sin, table, qsl, lens, 0.125, torch.empty_like(query))


def test_prepared_tables_follow_in_place_updates():
    """The per-layer fp32 / bf16-pair tables are cached on the table tensor and redone when it changes."""
    expand = torch.randn(2, 32, 8)
    first, pairs = rebuild_kernel.prepared_tables(expand)
    assert rebuild_kernel.prepared_tables(expand)[0] is first
    assert pairs.shape == (2, 4, 32, 2) and pairs.dtype == torch.bfloat16
    torch.testing.assert_close(pairs.float().transpose(2, 3).reshape(2, 8, 32), expand.transpose(1, 2).bfloat16().float())
    expand.mul_(2)
    again, _ = rebuild_kernel.prepared_tables(expand)
    torch.testing.assert_close(again, expand.transpose(1, 2))


def _run_in_subprocess(tmp_path, env, case, dtype_name, cache_format="plain"):
    """The kernel in a fresh process with ``env`` (a form chosen at load); returns (its form, its output)."""
    import os
    import subprocess
    import sys

    torch.save(case[:-1], tmp_path / "inputs.pt")
    code = (
        "import torch; from thinkeys.attention import rebuild_kernel\n"
        f"q, c, e, f, t, s, l = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "assert rebuild_kernel.available(); print('form', rebuild_kernel.kernel_isa())\n"
        "out = torch.empty_like(q)\n"
        f"rebuild_kernel.paged_attention(q, c, e, f, t, s, l, q.shape[-1] ** -0.5, out, {cache_format!r})\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    form = proc.stdout.split("form ", 1)[1].split()[0]
    return form, torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_avx2_form_on_this_cpu_agrees(tmp_path, dtype):
    """THINKEYS_KERNEL_ISA=avx2: the fp32-widening form AVX2-only CPUs run (AVX2 expansion), same reference."""
    from thinkeys.attention import kernels

    case = scenario([1, 1, 40, 3], [40, 200, 40, 70], heads=9, kv_heads=3, r=32, d=64, block_size=32, dtype=dtype)
    form, out = _run_in_subprocess(tmp_path, {kernels.ENV_ISA: "avx2"}, case, str(dtype))
    assert form == ("portable" if kernels.detected_isa() == "baseline" else "avx2")
    atol = BF16_ATOL if dtype == torch.bfloat16 else ATOL / 10
    torch.testing.assert_close(out.double(), case[-1], atol=atol, rtol=0)
    torch.testing.assert_close(run_kernel(*case[:-1]).float(), out.float(), atol=atol, rtol=0)


def test_bf16_form_without_amx_agrees(tmp_path):
    """THINKEYS_KERNEL_NO_AMX=1: expansion, scores and P.V by vdpbf16ps, as on an AVX512-BF16 CPU without AMX."""
    from thinkeys.attention import kernels

    if kernels.cpu_isa() != "avx512bf16":
        pytest.skip("this CPU does not run the bf16 form")
    case = scenario([1, 40, 7, 1], [300, 40, 190, 5], heads=9, kv_heads=3, r=32, d=64, block_size=128, dtype=torch.bfloat16,
                    layout="LBNHC")
    form, out = _run_in_subprocess(tmp_path, {"THINKEYS_KERNEL_NO_AMX": "1"}, case, "bfloat16")
    assert form == "avx512bf16"
    torch.testing.assert_close(out.double(), case[-1], atol=BF16_ATOL, rtol=0)
    torch.testing.assert_close(run_kernel(*case[:-1]).float(), out.float(), atol=BF16_ATOL, rtol=0)


# ---- 8-bit caches: both forms read the codes in place -------------------------------------------

EIGHT_BIT_STORAGE = {"int8_per_token_head": torch.int8}  # vLLM's; the fp8 kinds are uint8


def kernel_table(kind, query, expand, lens):
    """The expansion table the kernel computes with: int8-rounded (rebuild_kernel.int8_table) where it expands
    int8 latents in int8 (for this call), else the table itself."""
    if (kind == "int8_per_token_head" and query.dtype == torch.bfloat16
            and rebuild_kernel.int8_expansion(query.shape[-1], query.shape[0], lens.shape[0])):
        return rebuild_kernel.int8_table(expand)
    return expand


def quantize_cache(case, kind, k_scale=1.0, v_scale=1.0, expansion=None):
    """``case`` (a scenario) with its cache re-encoded as ``kind`` slots (same physical layout) and the
    expected output recomputed in float64 from what the slots hold (the reference of the same quantization),
    with the expansion table the kernel uses (``kernel_table``) unless ``expansion`` is given."""
    from test_attention_kernels import make_cache

    query, cache, expand, freqs, table, qsl, lens, _ = case
    blocks, kv_heads, block_size, width = cache.shape
    r = expand.shape[-1]
    d = width - r
    reference_table = (kernel_table(kind, query, expand, lens) if expansion is None else expansion).double()
    codec = KVCodec(kind, r, d)
    storage = EIGHT_BIT_STORAGE.get(kind, torch.uint8)
    layout = "LBHNC" if cache.is_contiguous() else "LBNHC"
    quant = make_cache(blocks, kv_heads, block_size, codec.slot_width, storage, layout)
    quant[:] = codec.encode(cache[..., :r].contiguous(), cache[..., r:].contiguous(), storage, k_scale, v_scale)
    codes = quant[..., : r + d].contiguous().view(codec.element_dtype).double()
    if codec.per_token_head:
        scales = quant[..., r + d :].contiguous().view(torch.float32).double()
        lat, val = codes[..., :r] * scales[..., :1], codes[..., r:] * scales[..., 1:2]
    else:
        lat, val = codes[..., :r] * k_scale, codes[..., r:] * v_scale
    expected, d_scale = [], query.shape[-1] ** -0.5
    for i in range(lens.shape[0]):
        q0, q1, s = int(qsl[i]), int(qsl[i + 1]), int(lens[i])
        if q1 == q0:
            continue
        pos = torch.arange(s)
        blk, off = table[i, pos // block_size].long(), pos % block_size
        c, v = lat[blk, :, off], val[blk, :, off]  # [s, H_kv, r], [s, H_kv, d]
        k = apply_thin_rope(torch.einsum("sgr,gdr->sgd", c, reference_table), pos, freqs.double())
        expected.append(causal_attention(query[q0:q1].double(), k, v, scale=d_scale, context=s - (q1 - q0)))
    return (query, quant, expand, freqs, table, qsl, lens, torch.cat(expected))


def run_kernel_8bit(kind, query, cache, expand, freqs, table, qsl, lens, k_scale=1.0, v_scale=1.0):
    from thinkeys.attention.quant import KERNEL_FORMATS

    out = torch.full_like(query, float("nan"))
    rebuild_kernel.paged_attention(query, cache, expand, freqs, table, qsl, lens, query.shape[-1] ** -0.5, out, KERNEL_FORMATS[kind],
                                   k_scale, v_scale)
    return out


def _needs_8bit_form():
    if not rebuild_kernel.reads_8bit(torch.bfloat16):
        pytest.skip("8-bit caches are read by the bf16 form only (AVX512-BF16 CPUs); the PyTorch path reads them elsewhere")


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("step", list(STEPS))
def test_bf16_kernel_reads_int8_pages(step, layout):
    """int8_per_token_head: decodes, a prefill, chunks after a prefix (SmolLM2's group, r = 32), against the float64
    reference of the same codes and scales (and the kernel's table, int8-rounded where it expands in int8); the
    PyTorch path (dequantize, expand with the table itself, SDPA) against the reference with the table itself."""
    _needs_8bit_form()
    source = scenario(*STEPS[step], heads=9, kv_heads=3, r=32, d=64, dtype=torch.bfloat16, layout=layout)
    case = quantize_cache(source, "int8_per_token_head")
    out = run_kernel_8bit("int8_per_token_head", *case[:-1])
    torch.testing.assert_close(out.double(), case[-1], atol=BF16_ATOL, rtol=0)
    exact = quantize_cache(source, "int8_per_token_head", expansion=source[2])
    torch.testing.assert_close(run_torch(*exact[:-1], kv_cache_dtype="int8_per_token_head").double(), exact[-1], atol=BF16_ATOL, rtol=0)


def _coarse_table_case(d=64, step="decodes"):
    """A scenario whose table has one large entry per output channel, so int8 rounding moves the others a lot
    (steps of 2 / 127 against entries of ~0.05): far more than bf16 rounding does."""
    case = list(scenario(*STEPS[step], heads=9, kv_heads=3, r=32, d=d, dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(5)
    expand = torch.randn(3, d, 32, generator=g) * 0.05
    expand[:, torch.arange(d), torch.arange(d) % 32] = 2.0
    case[2] = expand
    return case


def test_int8_expansion_uses_the_int8_rounded_table():
    """Where the kernel expands int8 latents in int8 (a call of decodes), it computes with rebuild_kernel.int8_table: it
    matches the float64 reference with that table and not the one with the exact table (on a table that int8
    rounding moves a lot); int8_tables holds the same codes in quads."""
    _needs_8bit_form()
    if not rebuild_kernel.int8_expansion(64):
        pytest.skip("no int8 expansion on this CPU (needs AVX512-VNNI and AVX512-BF16)")
    case = _coarse_table_case()
    expand = case[2]
    rounded = quantize_cache(case, "int8_per_token_head", expansion=rebuild_kernel.int8_table(expand))
    exact = quantize_cache(case, "int8_per_token_head", expansion=expand)
    out = run_kernel_8bit("int8_per_token_head", *rounded[:-1]).double()
    torch.testing.assert_close(out, rounded[-1], atol=BF16_ATOL, rtol=0)
    # the exact table is not what it used: 4x further on average here (bf16 rounding is the rest)
    assert (out - exact[-1]).abs().mean() > 3 * (out - rounded[-1]).abs().mean()
    quads, side = rebuild_kernel.int8_tables(expand)
    codes = quads.transpose(1, 2).reshape(3, 64, -1)[..., :32].float()  # [H_kv, d16, r4] -> [H_kv, d, r]
    torch.testing.assert_close(codes * side[:, 0, :64, None], rebuild_kernel.int8_table(expand), atol=0, rtol=0)
    torch.testing.assert_close(side[:, 1, :64], 128 * codes.sum(-1), atol=0, rtol=0)


def test_prefills_on_amx_use_the_bf16_table():
    """Where the kernel prefills on AMX tiles, a call with prefill tokens reads int8 pages with the bf16 table (codes
    widened, brgemm); its decodes too (one rule per call, what rebuild_kernel.int8_expansion says)."""
    _needs_8bit_form()
    if not rebuild_kernel.amx_tiles():
        pytest.skip("no AMX tiles here: every call expands int8 latents in int8")
    case = _coarse_table_case(step="mixed")
    assert not rebuild_kernel.int8_expansion(64, case[0].shape[0], case[6].shape[0])
    exact = quantize_cache(case, "int8_per_token_head", expansion=case[2])
    torch.testing.assert_close(run_kernel_8bit("int8_per_token_head", *exact[:-1]).double(), exact[-1], atol=BF16_ATOL, rtol=0)


def test_int8_prefill_without_amx_agrees(tmp_path):
    """On an AMX host, THINKEYS_KERNEL_NO_AMX=1 (in a subprocess): prefill tiles expand int8 latents in int8 with
    vdpbf16ps scores, as on AVX512-VNNI CPUs without AMX, against the int8-rounded table's reference."""
    from thinkeys.attention import kernels
    from thinkeys.attention.quant import KERNEL_FORMATS

    _needs_8bit_form()
    if not rebuild_kernel.amx_tiles():
        pytest.skip("no AMX here: test_bf16_kernel_int8_shapes already runs int8 prefills this way")
    if not rebuild_kernel.int8_expansion(64):
        pytest.skip("no int8 expansion on this CPU")
    assert kernels.cpu_isa() == "avx512bf16"
    case = scenario([1, 40, 7, 1], [300, 40, 190, 5], heads=9, kv_heads=3, r=32, d=64, block_size=128, dtype=torch.bfloat16)
    rounded = quantize_cache(case, "int8_per_token_head", expansion=rebuild_kernel.int8_table(case[2]))
    form, out = _run_in_subprocess(tmp_path, {"THINKEYS_KERNEL_NO_AMX": "1"}, rounded, "bfloat16", KERNEL_FORMATS["int8_per_token_head"])
    assert form == "avx512bf16"
    torch.testing.assert_close(out.double(), rounded[-1], atol=BF16_ATOL, rtol=0)


def test_int8_expansion_can_be_switched_off(monkeypatch):
    """THINKEYS_INT8_EXPANSION=0: the codes are widened to bf16 and expanded with the bf16 table (the exact table's reference)."""
    _needs_8bit_form()
    monkeypatch.setenv(rebuild_kernel.ENV_INT8_EXPANSION, "0")
    assert not rebuild_kernel.int8_expansion(64)
    case = _coarse_table_case()
    exact = quantize_cache(case, "int8_per_token_head", expansion=case[2])
    torch.testing.assert_close(run_kernel_8bit("int8_per_token_head", *exact[:-1]).double(), exact[-1], atol=BF16_ATOL, rtol=0)


@pytest.mark.parametrize(
    "r,d,heads,kv_heads,block_size",
    [
        (32, 64, 9, 3, 128),  # the default served model, vLLM's CPU block size (pages kept across tiles)
        (16, 64, 9, 3, 32),
        (64, 64, 4, 4, 16),  # full rank, MHA
        (5, 40, 8, 1, 16),  # odd r: the widened page's last latent pair masked
        (6, 32, 4, 2, 16),  # r not a multiple of 4: the int8 expansion's last quad meets zero table rows
        (20, 128, 8, 2, 32),  # d = 128 (int8 expansion: eight blocks of channel pairs)
        (80, 128, 4, 1, 24),  # int8 expansion: latents wider than one 64-byte transpose, pages of 24 (groups of 16 cut)
        (16, 64, 6, 2, 272),  # pages of more than 256 tokens: int8 P.V flushes its int32 sums every 128 token pairs
        (4, 12, 6, 1, 7),  # MQA, tiny widths, odd block size
    ],
)
@pytest.mark.parametrize("q_lens", [[1, 3, 1, 70, 100], [1, 1, 1, 1, 1]], ids=["mixed", "decodes"])
def test_bf16_kernel_int8_shapes(r, d, heads, kv_heads, block_size, q_lens):
    """Decodes only: the int8 expansion and P.V on the codes on every CPU with AVX512-VNNI; with prefills, on AMX
    hosts, the bf16 table on AMX tiles (rebuild_kernel.int8_expansion)."""
    _needs_8bit_form()
    case = quantize_cache(scenario(q_lens, [300, 3, 9, 150, 100], heads=heads, kv_heads=kv_heads, r=r, d=d,
                                   block_size=block_size, dtype=torch.bfloat16, seed=r, padding_requests=1), "int8_per_token_head")
    torch.testing.assert_close(run_kernel_8bit("int8_per_token_head", *case[:-1]).double(), case[-1], atol=BF16_ATOL, rtol=0)


@pytest.mark.parametrize("kind,k_scale,v_scale", [("fp8_per_token_head", 1.0, 1.0), ("fp8", 0.05, 0.02), ("fp8_e5m2", 0.1, 0.5)])
@pytest.mark.parametrize("step", ["mixed", "chunked"])
def test_bf16_kernel_reads_fp8_pages(kind, k_scale, v_scale, step):
    """fp8 slots (per token-head scales, or the layer's per-tensor ones) through the same page step."""
    _needs_8bit_form()
    case = quantize_cache(scenario(*STEPS[step], heads=9, kv_heads=3, r=32, d=64, dtype=torch.bfloat16), kind, k_scale, v_scale)
    out = run_kernel_8bit(kind, *case[:-1], k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(out.double(), case[-1], atol=BF16_ATOL, rtol=0)


def test_int8_kernel_with_two_threads_matches_one():
    _needs_8bit_form()
    case = quantize_cache(scenario([1, 130, 40, 1], [200, 130, 300, 77], heads=9, kv_heads=3, r=32, d=64, block_size=32,
                                   dtype=torch.bfloat16), "int8_per_token_head")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_kernel_8bit("int8_per_token_head", *case[:-1])
        torch.set_num_threads(2)
        two = run_kernel_8bit("int8_per_token_head", *case[:-1])
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one.double(), case[-1], atol=BF16_ATOL, rtol=0)
    torch.testing.assert_close(two, one, atol=0, rtol=0)


EIGHT_BIT_KINDS = [("int8_per_token_head", 1.0, 1.0), ("fp8_per_token_head", 1.0, 1.0), ("fp8", 0.05, 0.02), ("fp8_e5m2", 0.1, 0.5)]


@pytest.mark.parametrize("kind,k_scale,v_scale", EIGHT_BIT_KINDS)
@pytest.mark.parametrize("step", list(STEPS))
def test_fp32_form_reads_8bit_pages(kind, k_scale, v_scale, step):
    """float32 queries over 8-bit slots (the fp32 form: each chunk dequantized to fp32, then rebuilt): decodes,
    prefills, chunks after a prefix, against the float64 reference of the same codes and scales."""
    assert rebuild_kernel.reads_8bit(torch.float32) and rebuild_kernel.reads_8bit(torch.float16)
    case = quantize_cache(scenario(*STEPS[step], heads=9, kv_heads=3, r=32, d=64, layout="LBNHC"), kind, k_scale, v_scale)
    out = run_kernel_8bit(kind, *case[:-1], k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(out.double(), case[-1], atol=ATOL / 10, rtol=0)


@pytest.mark.parametrize("r,d,heads,kv_heads,block_size", [(16, 64, 9, 3, 32), (5, 40, 8, 1, 16), (4, 12, 6, 1, 7)])
def test_fp32_form_8bit_shapes_and_float16(r, d, heads, kv_heads, block_size):
    """Odd r (an 8-bit latent shorter than a vector), MQA, odd block sizes; float16 queries take the same form."""
    case = quantize_cache(scenario([1, 3, 1, 70, 100], [300, 3, 9, 150, 100], heads=heads, kv_heads=kv_heads, r=r, d=d,
                                   block_size=block_size, seed=r, padding_requests=1), "int8_per_token_head")
    torch.testing.assert_close(run_kernel_8bit("int8_per_token_head", *case[:-1]).double(), case[-1], atol=ATOL / 10, rtol=0)
    half = (case[0].half(), *case[1:-1])
    torch.testing.assert_close(run_kernel_8bit("int8_per_token_head", *half).double(), case[-1], atol=4e-3, rtol=0)


def test_avx2_form_reads_int8_pages(tmp_path):
    """THINKEYS_KERNEL_ISA=avx2: what an AVX2-only CPU runs for bf16 (and fp32) queries over an int8 cache."""
    from thinkeys.attention import kernels

    case = quantize_cache(scenario([1, 1, 40, 3], [40, 200, 40, 70], heads=9, kv_heads=3, r=32, d=64, block_size=32,
                                   dtype=torch.bfloat16), "int8_per_token_head")
    form, out = _run_in_subprocess(tmp_path, {kernels.ENV_ISA: "avx2"}, case, "bfloat16", cache_format="int8_per_token_head")
    assert form == ("portable" if kernels.detected_isa() == "baseline" else "avx2")
    torch.testing.assert_close(out.double(), case[-1], atol=BF16_ATOL, rtol=0)


def test_kernel_refuses_a_slot_of_the_wrong_width():
    case = quantize_cache(scenario(*STEPS["decodes"]), "int8_per_token_head")
    with pytest.raises(RuntimeError, match="expected"):
        bad = case[1][..., :-4]
        run_kernel_8bit("int8_per_token_head", case[0].bfloat16(), bad, *case[2:-1])
