"""The compiled CPU attention kernel against the dense float64 reference and the PyTorch path.

Random paged caches, scattered blocks, both KV-cache layouts vLLM may pick for our backend, GQA,
decodes mixed with fresh prefills and chunked prefills (cached-prefix offsets), query tiles that
straddle block boundaries, padding requests and padding slots, strided query/output views (as
vLLM's fused qkv split hands them over), the intrinsics path (r, d multiples of 8) and the portable
loops (other widths), in float32, bfloat16 and float16. The kernel is built once per machine
(see thinkeys.attention.kernels); these tests fail rather than skip when it cannot be built, since
the backend would then silently run the slow path.
"""

from __future__ import annotations

import os

import pytest
import torch

from thinkeys.attention import kernels
from thinkeys.attention.paged import build_metadata, paged_attention, paged_attention_torch, write_kv, write_kv_torch
from thinkeys.attention.reference import causal_attention

ATOL = 1e-3  # the bound the backend promises against the reference (fp32); reached with margin


@pytest.fixture(scope="module", autouse=True)
def compiled_kernel():
    assert kernels.kernel_choice() != "torch", "THINKEYS_ATTENTION_KERNEL=torch disables what this file tests"
    assert kernels.available(), "the CPU attention kernel did not build (see the warning logged above)"


def make_cache(num_blocks, kv_heads, block_size, width, dtype, layout):
    """A zeroed cache with vLLM's logical shape [blocks, H_kv, block_size, width] in either physical layout."""
    if layout == "LBHNC":  # head-major pages
        return torch.zeros(num_blocks, kv_heads, block_size, width, dtype=dtype)
    return torch.zeros(num_blocks, block_size, kv_heads, width, dtype=dtype).permute(0, 2, 1, 3)  # LBNHC


def scenario(q_lens, seq_lens, *, heads=6, kv_heads=2, r=16, d=32, block_size=16, dtype=torch.float32,
             layout="LBHNC", seed=0, padding_requests=0):
    """A step of a paged engine: cached prefixes written earlier, this step's tokens written now.

    Returns (query, cache, block_table, query_start_loc, seq_lens, expected [T, H, d] in float64).
    """
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_needed) + 5
    cache = make_cache(num_blocks, kv_heads, block_size, r + d, dtype, layout)
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.full((len(seq_lens) + padding_requests, max(blocks_needed) + 2), -7, dtype=torch.int32)
    queries, expected, new_k, new_v, new_slots, used = [], [], [], [], [], 0
    for i, (q_len, s) in enumerate(zip(q_lens, seq_lens)):
        table[i, : blocks_needed[i]] = perm[used : used + blocks_needed[i]].to(torch.int32)
        used += blocks_needed[i]
        k = torch.randn(s, kv_heads, r, generator=g).to(dtype)
        v = torch.randn(s, kv_heads, d, generator=g).to(dtype)
        q = torch.randn(q_len, heads, r, generator=g).to(dtype)
        pos = torch.arange(s)
        slots = table[i, pos // block_size].long() * block_size + pos % block_size
        ctx = s - q_len
        write_kv_torch(cache, k[:ctx], v[:ctx], slots[:ctx])  # earlier steps
        new_k.append(k[ctx:]), new_v.append(v[ctx:]), new_slots.append(slots[ctx:])
        queries.append(q)
        expected.append(causal_attention(q.double(), k.double(), v.double(), scale=d**-0.5, context=ctx))
    # this step's tokens, plus two padding tokens (slot -1) that must not land anywhere
    pad = 2
    write_kv(
        cache,
        torch.cat(new_k + [torch.full((pad, kv_heads, r), 9.0).to(dtype)]),
        torch.cat(new_v + [torch.full((pad, kv_heads, d), 9.0).to(dtype)]),
        torch.cat(new_slots + [torch.full((pad,), -1, dtype=torch.long)]),
    )
    qsl = [0]
    for q_len in list(q_lens) + [0] * padding_requests:
        qsl.append(qsl[-1] + q_len)
    lens = list(seq_lens) + [0] * padding_requests
    return (torch.cat(queries), cache, table, torch.tensor(qsl, dtype=torch.int32),
            torch.tensor(lens, dtype=torch.int32), torch.cat(expected))


def run_kernel(query, cache, table, qsl, lens, d, scale=None):
    out = torch.full((query.shape[0], query.shape[1], d), float("nan"), dtype=query.dtype)
    kernels.paged_attention(query, cache, table, qsl, lens, d**-0.5 if scale is None else scale, out)
    return out


STEPS = {
    "decodes": ([1, 1, 1, 1], [5, 16, 17, 70]),  # ragged, on and across block boundaries
    "prefill": ([37], [37]),  # one fresh prompt over three query tiles
    "mixed": ([1, 1, 9, 4, 1], [30, 2, 9, 50, 1]),  # decodes, fresh prefill, chunk after a prefix, 1-token prompt
    "chunked": ([16, 33, 20], [48, 33, 100]),  # chunks whose context is a block multiple / none / not
}


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("step", list(STEPS))
def test_kernel_matches_reference_fp32(step, layout):
    q_lens, seq_lens = STEPS[step]
    query, cache, table, qsl, lens, expected = scenario(q_lens, seq_lens, layout=layout)
    out = run_kernel(query, cache, table, qsl, lens, d=32)
    torch.testing.assert_close(out.double(), expected, atol=ATOL / 10, rtol=0)


@pytest.mark.parametrize(
    "r,d,heads,kv_heads,block_size",
    [
        (8, 64, 4, 4, 32),  # MHA, the intrinsics path with one 8-wide key chunk
        (16, 64, 9, 3, 128),  # SmolLM2-135M at r = 16 (GQA 3), vLLM's CPU block size
        (24, 40, 8, 1, 16),  # MQA, d not a multiple of 64 (register chunks of 32 + 8)
        (12, 20, 6, 2, 7),  # portable loops: r, d and the block size not multiples of 8
        (5, 3, 3, 3, 5),  # tiny odd widths
    ],
)
def test_kernel_shapes(r, d, heads, kv_heads, block_size):
    query, cache, table, qsl, lens, expected = scenario(
        [1, 3, 1, 19], [40, 3, 9, 60], heads=heads, kv_heads=kv_heads, r=r, d=d, block_size=block_size, seed=r
    )
    out = run_kernel(query, cache, table, qsl, lens, d=d)
    torch.testing.assert_close(out.double(), expected, atol=ATOL / 10, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_kernel_half_precision_matches_torch_path(dtype, atol):
    """In bf16/fp16 both paths round inputs and output alike; the kernel accumulates in fp32."""
    q_lens, seq_lens = STEPS["mixed"]
    query, cache, table, qsl, lens, expected = scenario(q_lens, seq_lens, dtype=dtype, layout="LBNHC")
    out = run_kernel(query, cache, table, qsl, lens, d=32)
    assert out.dtype == dtype
    # against the float64 reference on the same (rounded) inputs: one output rounding apart
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)
    meta = build_metadata(query_start_loc=qsl, seq_lens=lens, block_table=table, block_size=16, num_actual_tokens=int(qsl[-1]))
    torch_out = paged_attention_torch(query, cache, meta, 32**-0.5, torch.empty_like(out))
    torch.testing.assert_close(out.float(), torch_out.float(), atol=atol, rtol=0)


def test_kernel_and_torch_path_agree_through_paged_attention():
    """paged_attention dispatches to the kernel; the fallback gives the same numbers (fp32)."""
    q_lens, seq_lens = STEPS["chunked"]
    query, cache, table, qsl, lens, expected = scenario(q_lens, seq_lens)
    n = int(qsl[-1])
    meta = build_metadata(query_start_loc=qsl.tolist(), seq_lens=lens.tolist(), block_table=table, block_size=16, num_actual_tokens=n)
    fast = paged_attention(query, cache, meta, 32**-0.5, torch.empty(n, 6, 32))
    slow = paged_attention_torch(query, cache, meta, 32**-0.5, torch.empty(n, 6, 32))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.double(), expected, atol=ATOL / 10, rtol=0)
    # what the backend builds when the kernel is loaded: no per-request index tensors at all
    lean = build_metadata(query_start_loc=qsl, seq_lens=lens, block_table=table, block_size=16, num_actual_tokens=n, torch_path=False)
    assert lean.prefills == [] and lean.decode_mask is None and lean.num_decodes == meta.num_decodes == 0
    torch.testing.assert_close(paged_attention(query, cache, lean, 32**-0.5, torch.empty(n, 6, 32)), fast, atol=0, rtol=0)


def test_kernel_reads_and_writes_strided_views():
    """vLLM hands over query as a view of the fused qkv output and output as a view of [T, H * d]."""
    q_lens, seq_lens = STEPS["mixed"]
    query, cache, table, qsl, lens, expected = scenario(q_lens, seq_lens)
    T, H, r = query.shape
    qkv = torch.randn(T, H * r + 40)
    qkv[:, : H * r] = query.reshape(T, H * r)
    query_view = qkv[:, : H * r].view(T, H, r)  # row stride H * r + 40
    assert not query_view.is_contiguous()
    out_wide = torch.full((T, H, 32 + 8), 5.0)
    out_view = out_wide[:, :, :32]  # head stride 40
    kernels.paged_attention(query_view, cache, table, qsl, lens, 32**-0.5, out_view)
    torch.testing.assert_close(out_view.double(), expected, atol=ATOL / 10, rtol=0)
    assert out_wide[:, :, 32:].eq(5.0).all(), "the kernel wrote outside the output view"


def test_padding_requests_and_tokens_are_left_alone():
    q_lens, seq_lens = STEPS["decodes"]
    query, cache, table, qsl, lens, expected = scenario(q_lens, seq_lens, padding_requests=2)
    n = int(qsl[-1])
    padded_query = torch.cat([query, torch.randn(3, *query.shape[1:])])  # 3 padding tokens at the end
    out = torch.full((n + 3, 6, 32), 7.0)
    kernels.paged_attention(padded_query, cache, table, qsl, lens, 32**-0.5, out)
    torch.testing.assert_close(out[:n].double(), expected, atol=ATOL / 10, rtol=0)
    assert out[n:].eq(7.0).all()


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_kernel_matches_torch(layout, dtype):
    g = torch.Generator().manual_seed(3)
    caches = [make_cache(6, 3, 8, 4 + 10, dtype, layout) for _ in range(2)]
    key = torch.randn(20, 3, 4, generator=g).to(dtype)
    value = torch.randn(20, 3, 10, generator=g).to(dtype)
    slots = torch.randperm(48, generator=g)[:17].long()  # 17 of the 48 slots, for 20 tokens:
    slots[[2, 7]] = -1  # two padding tokens; tokens past the mapping (17..19) are ignored too
    kernels.write_kv(caches[0], key, value, slots)
    write_kv_torch(caches[1], key, value, slots)
    assert torch.equal(caches[0], caches[1])
    assert int(caches[0].ne(0).any(-1).sum()) == 15 * 3  # 17 tokens minus 2 padding, 3 heads each


def test_kernel_rejects_bad_inputs():
    query, cache, table, qsl, lens, _ = scenario([1], [3])
    with pytest.raises(RuntimeError, match="share one dtype"):
        kernels.paged_attention(query.double(), cache, table, qsl, lens, 1.0, torch.empty(1, 6, 32, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="int32"):
        kernels.paged_attention(query, cache, table.long(), qsl, lens, 1.0, torch.empty(1, 6, 32))
    with pytest.raises(RuntimeError, match="R \\+ D"):
        kernels.paged_attention(query, cache, table, qsl, lens, 1.0, torch.empty(1, 6, 31))
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.write_kv(cache, torch.zeros(1, 2, 16), torch.zeros(1, 2, 32), torch.tensor([10_000]))


def _load_in_subprocess(tmp_path, choice):
    """kernels.available() in a fresh process whose compiler is broken (CXX=/bin/false)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "THINKEYS_ATTENTION_KERNEL": choice, "THINKEYS_KERNEL_CACHE": str(tmp_path), "CXX": "/bin/false"}
    code = "from thinkeys.attention import kernels; print('available', kernels.available())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_without_a_compiler_auto_falls_back_with_a_warning(tmp_path):
    proc = _load_in_subprocess(tmp_path, "auto")
    assert proc.returncode == 0, proc.stderr
    assert "available False" in proc.stdout
    assert "CPU attention kernel unavailable" in proc.stderr and "PyTorch path" in proc.stderr


def test_without_a_compiler_compiled_mode_fails_clearly(tmp_path):
    proc = _load_in_subprocess(tmp_path, "compiled")
    assert proc.returncode != 0
    assert "ThinKeyError" in proc.stderr and "THINKEYS_ATTENTION_KERNEL=torch" in proc.stderr


def test_unknown_kernel_choice_is_a_clear_error(monkeypatch):
    from thinkeys.checkpoint import ThinKeyError

    monkeypatch.setenv("THINKEYS_ATTENTION_KERNEL", "fast")
    with pytest.raises(ThinKeyError, match="auto, compiled, torch"):
        kernels.kernel_choice()


# ---- the bf16 form for AVX512-BF16 / AMX CPUs (plain bf16 caches) ---------------------------------

BF16_ATOL = 2e-2  # bf16 inputs and output, probabilities rounded to bf16 before P.V (as CPU_ATTN's AMX path)


def test_kernel_form_follows_the_cpu():
    """On a CPU with AVX512_BF16 the bf16 form is what runs (and brgemm's AMX tiles where torch can pack bf16)."""
    if not torch.cpu._is_avx512_bf16_supported():
        assert kernels.kernel_isa() in ("avx2", "portable")
        return
    assert kernels.cpu_isa() == "avx512bf16" or os.environ.get(kernels.ENV_ISA)
    if kernels.cpu_isa() == "avx512bf16":
        amx = (torch.cpu._is_amx_tile_supported() and os.environ.get("THINKEYS_KERNEL_AMX") != "0"
               and not os.environ.get("THINKEYS_KERNEL_NO_AMX"))
        assert kernels.kernel_isa() == ("avx512bf16+amx" if amx else "avx512bf16")  # AMX tiles for prefills where the CPU has them


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("step", list(STEPS))
def test_bf16_kernel_matches_reference(step, layout):
    """Decodes (vdpbf16ps rows) and prefill tiles of >= 16 rows (brgemm on AMX) against float64."""
    q_lens, seq_lens = STEPS[step]
    query, cache, table, qsl, lens, expected = scenario(q_lens, seq_lens, heads=9, kv_heads=3, r=32, d=64, dtype=torch.bfloat16,
                                                        layout=layout, block_size=16)
    out = run_kernel(query, cache, table, qsl, lens, d=64)
    torch.testing.assert_close(out.double(), expected, atol=BF16_ATOL, rtol=0)


@pytest.mark.parametrize(
    "r,d,heads,kv_heads,block_size",
    [
        (32, 64, 9, 3, 128),  # SmolLM2-135M at r = 32, vLLM's CPU block size: brgemm tiles of 48 rows
        (48, 96, 4, 2, 32),  # two 16-pair key transposes, three value chunks
        (16, 40, 8, 1, 16),  # MQA: 8-row decodes, 128-row prefill tiles; d = 40 masked loads
        (12, 20, 6, 2, 7),  # widths and block size not multiples of 8 or 16
        (5, 3, 3, 3, 5),  # tiny odd widths
    ],
)
def test_bf16_kernel_shapes(r, d, heads, kv_heads, block_size):
    query, cache, table, qsl, lens, expected = scenario(
        [1, 3, 1, 40, 7], [300, 3, 9, 60, 190], heads=heads, kv_heads=kv_heads, r=r, d=d, block_size=block_size, seed=r,
        dtype=torch.bfloat16,
    )
    out = run_kernel(query, cache, table, qsl, lens, d=d)
    torch.testing.assert_close(out.double(), expected, atol=BF16_ATOL, rtol=0)


def test_bf16_strided_views():
    q_lens, seq_lens = [1, 20, 1], [33, 20, 130]
    query, cache, table, qsl, lens, expected = scenario(q_lens, seq_lens, dtype=torch.bfloat16, layout="LBNHC")
    T, H, r = query.shape
    qkv = torch.randn(T, H * r + 40).bfloat16()
    qkv[:, : H * r] = query.reshape(T, H * r)
    query_view = qkv[:, : H * r].view(T, H, r)
    out_wide = torch.full((T, H, 32 + 8), 5.0, dtype=torch.bfloat16)
    kernels.paged_attention(query_view, cache, table, qsl, lens, 32**-0.5, out_wide[:, :, :32])
    torch.testing.assert_close(out_wide[:, :, :32].double(), expected, atol=BF16_ATOL, rtol=0)
    assert out_wide[:, :, 32:].eq(5.0).all(), "the kernel wrote outside the output view"


def test_isa_selection_falls_back_without_avx512_bf16(monkeypatch):
    """The AVX512-BF16 build is chosen only where torch reports it; THINKEYS_KERNEL_ISA caps it."""
    from thinkeys.checkpoint import ThinKeyError

    monkeypatch.delenv(kernels.ENV_ISA, raising=False)
    cases = [("AVX2", True, "avx2"), ("AVX512", False, "avx2"), ("AVX512", True, "avx512bf16"), ("DEFAULT", True, "baseline")]
    for capability, bf16, isa in cases:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda b=bf16: b)
        assert kernels.cpu_isa() == isa, (capability, bf16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setenv(kernels.ENV_ISA, "avx2")
    assert kernels.cpu_isa() == "avx2" and kernels.isa_flags("avx2") == kernels.AVX2_FLAGS
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert kernels.cpu_isa() == "baseline"  # a cap never raises the detected set
    monkeypatch.setenv(kernels.ENV_ISA, "avx1024")
    with pytest.raises(ThinKeyError, match="THINKEYS_KERNEL_ISA"):
        kernels.cpu_isa()


def test_avx2_form_on_this_cpu_agrees(tmp_path):
    """THINKEYS_KERNEL_ISA=avx2 builds the fp32-widening form (what AVX2-only CPUs run) in a fresh
    process: same bf16 inputs, same reference, and the two forms agree."""
    import subprocess
    import sys

    q_lens, seq_lens = [1, 1, 20, 3], [40, 200, 20, 70]
    query, cache, table, qsl, lens, expected = scenario(q_lens, seq_lens, heads=9, kv_heads=3, r=32, d=64, dtype=torch.bfloat16,
                                                        block_size=32)
    torch.save((query, cache, table, qsl, lens), tmp_path / "inputs.pt")
    code = (
        "import torch; from thinkeys.attention import kernels\n"
        f"q, c, t, s, l = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "assert kernels.available(); print('form', kernels.kernel_isa())\n"
        "out = torch.empty(q.shape[0], q.shape[1], 64, dtype=q.dtype)\n"
        f"kernels.paged_attention(q, c, t, s, l, 64**-0.5, out); torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {**os.environ, kernels.ENV_ISA: "avx2"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"form {'portable' if kernels.detected_isa() == 'baseline' else 'avx2'}" in proc.stdout
    avx2 = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(avx2.double(), expected, atol=BF16_ATOL, rtol=0)
    here = run_kernel(query, cache, table, qsl, lens, d=64)
    torch.testing.assert_close(here.float(), avx2.float(), atol=BF16_ATOL, rtol=0)


def test_bf16_form_without_amx_agrees(tmp_path):
    """THINKEYS_KERNEL_NO_AMX=1: prefill tiles take vdpbf16ps, as on an AVX512-BF16 CPU without AMX (Zen 4)."""
    import subprocess
    import sys

    if kernels.cpu_isa() != "avx512bf16":
        pytest.skip("this CPU does not run the bf16 form")
    q_lens, seq_lens = [1, 40, 7], [300, 40, 190]
    query, cache, table, qsl, lens, expected = scenario(q_lens, seq_lens, heads=9, kv_heads=3, r=32, d=64, dtype=torch.bfloat16,
                                                        block_size=128, layout="LBNHC")
    torch.save((query, cache, table, qsl, lens), tmp_path / "inputs.pt")
    code = (
        "import torch; from thinkeys.attention import kernels\n"
        f"q, c, t, s, l = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "assert kernels.available(); print('form', kernels.kernel_isa())\n"
        "out = torch.empty(q.shape[0], q.shape[1], 64, dtype=q.dtype)\n"
        f"kernels.paged_attention(q, c, t, s, l, 64**-0.5, out); torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "THINKEYS_KERNEL_NO_AMX": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "form avx512bf16\n" in proc.stdout
    no_amx = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(no_amx.double(), expected, atol=BF16_ATOL, rtol=0)
    torch.testing.assert_close(run_kernel(query, cache, table, qsl, lens, d=64).float(), no_amx.float(), atol=BF16_ATOL, rtol=0)
