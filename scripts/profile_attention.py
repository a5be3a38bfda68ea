#!/usr/bin/env python
"""One attention-op case in a loop, for profilers and quick A/B runs: thin or stock, --layers cold caches.

The same shapes, caches and kernels as scripts/bench_attention.py (its options, and its make_case), but one
case and one kernel, called over and over for --seconds (after one warm-up pass), so that ``perf record -p
PID`` sees nothing else; prints the mean time per call. A/B against another checkout of the plugin: run it
once with ``PYTHONPATH=OTHER/plugin THINKEYS_KERNEL_CACHE=/tmp/kc_other`` (the kernels are compiled per
source, into that cache) and once without, alternately.

    python scripts/profile_attention.py --rebuild --rank 32 --kv-format int8_per_token_head --layers 30 --case 32:512:1
    python scripts/profile_attention.py --kernel stock --stock-kv-cache-dtype fp8 --layers 30 --case 32:512:1 --seconds 20 &
    perf record -p $! -- sleep 5 && perf report --stdio
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import build_parser, init_amx, make_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = build_parser(__doc__)
    p.add_argument("--case", default="32:512:1", help="batch:context:query_len (default 32:512:1, a decode)")
    p.add_argument("--kernel", default="thin", choices=["thin", "stock"])
    p.add_argument("--seconds", type=float, default=5.0, help="how long to call it (after one warm-up pass)")
    args = p.parse_args(argv)
    try:
        batch, context, query_len = (int(v) for v in args.case.split(":"))
    except ValueError:
        p.error(f"--case {args.case!r}: give batch:context:query_len, e.g. 32:512:1")
    torch.set_num_threads(args.threads)
    init_amx()
    calls = []
    for _ in range(max(1, args.layers)):
        stock, thin, _ = make_case(batch, context, query_len, args, False)
        calls.append(thin if args.kernel == "thin" else stock)
    for call in calls:  # warm-up: kernels compiled and loaded, scratch sized
        call()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        for call in calls:
            call()
        n += len(calls)
    ms = (time.perf_counter() - t0) / n * 1e3
    print(f"{args.kernel} {batch}x{context} q={query_len} ({args.kv_format if args.kernel == 'thin' else args.stock_kv_cache_dtype}): "
          f"{ms:.4f} ms per call over {n} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
