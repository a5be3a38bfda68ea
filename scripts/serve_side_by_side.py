"""Serve the stock and the thin-key default model side by side: capacity and greedy chat output.

Starts both with `thinkeys serve` at the same KV-cache budget, reads each engine's own capacity
(vLLM's `vllm:cache_config_info` on /metrics) and the thin server's /v1/thinkeys/savings, and asks
both the same chat prompts greedily. Writes JSON and prints a Markdown table.

    python scripts/serve_side_by_side.py models/SmolLM2-135M-Instruct models/SmolLM2-135M-Instruct-thin-r16-mixed \
        --kv-memory 1GiB --out bench-results/side_by_side/default.json
"""

from __future__ import annotations

import argparse
import json
import platform
import os
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from thinkeys.loadtest.servers import start_servers

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "Give me three tips for staying healthy.",
]


def engine_capacity(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:cache_config_info":
            labels = family.samples[0].labels
            return {k: float(labels[k]) for k in ("num_gpu_blocks", "block_size", "kv_cache_size_tokens") if k in labels}
    raise RuntimeError(f"{base_url}/metrics has no vllm:cache_config_info")


def chat(base_url: str, model: str, prompt: str, max_tokens: int) -> str:
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0},
        timeout=300,
    )
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stock")
    ap.add_argument("thin")
    ap.add_argument("--kv-memory", default="1GiB")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path("bench-results/side_by_side/default.json"))
    args = ap.parse_args()
    from thinkeys.accounting import parse_bytes

    t0 = time.monotonic()
    with start_servers(
        [("stock", args.stock), ("thin", args.thin)],
        kv_cache_memory=str(parse_bytes(args.kv_memory)),
        max_model_len=args.max_model_len,
        extra_args=[],
        log_dir=args.out.parent / "logs",
    ) as (stock, thin):
        ready_s = time.monotonic() - t0
        result = {
            "stock_model": args.stock,
            "thin_model": args.thin,
            "kv_memory": args.kv_memory,
            "max_model_len": args.max_model_len,
            "both_servers_ready_s": round(ready_s, 1),
            "capacity": {"stock": engine_capacity(stock.base_url), "thin": engine_capacity(thin.base_url)},
            "savings_endpoint": httpx.get(f"{thin.base_url}/v1/thinkeys/savings", timeout=30).json(),
            "outputs": [
                {"prompt": p, "stock": chat(stock.base_url, "stock", p, args.max_tokens), "thin": chat(thin.base_url, "thin", p, args.max_tokens)}
                for p in PROMPTS
            ],
            "machine": f"{os.cpu_count()} vCPU {platform.machine()}, Python {platform.python_version()}",
        }
    cap = result["capacity"]
    result["capacity_ratio"] = cap["thin"]["kv_cache_size_tokens"] / cap["stock"]["kv_cache_size_tokens"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"| | stock | thin |\n|---|---|---|")
    print(f"| KV cache tokens ({args.kv_memory}) | {cap['stock']['kv_cache_size_tokens']:,.0f} | {cap['thin']['kv_cache_size_tokens']:,.0f} ({result['capacity_ratio']:.3f}x) |")
    for o in result["outputs"]:
        print(f"| {o['prompt']} | {o['stock']!r} | {o['thin']!r} |".replace("\n", " "))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
