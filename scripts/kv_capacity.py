"""KV-cache capacity vLLM really allocates for each model at the same KV budget (in-process engines).

    python scripts/kv_capacity.py models/SmolLM2-135M-Instruct models/SmolLM2-135M-Instruct-thin-r32-mixed --kv-gib 1 [--out bench-results/capacity/default.json]

Prints vLLM's own ``kv_cache_size_tokens`` and block count per model and the ratio to the first.
"""

import argparse
import gc
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--kv-gib", type=int, default=1, help="whole GiB (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--out", default="bench-results/capacity/default.json")
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_gib)
    from vllm import LLM

    rows = []
    for model in args.models:
        llm = LLM(model=model, max_model_len=args.max_model_len, enforce_eager=True)
        cc = llm.llm_engine.vllm_config.cache_config
        rows.append({"model": model, "kv_cache_size_tokens": int(cc.kv_cache_size_tokens), "num_blocks": int(cc.num_gpu_blocks), "block_size": int(cc.block_size)})
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    base = rows[0]["kv_cache_size_tokens"]
    for r in rows:
        r["ratio_to_first"] = round(r["kv_cache_size_tokens"] / base, 4)
    result = json.dumps({"kv_gib": args.kv_gib, "max_model_len": args.max_model_len, "models": rows}, indent=2)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(result + "\n")
    print(result)


if __name__ == "__main__":
    main()
