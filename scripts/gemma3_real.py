"""Gemma 3 270M, the real checkpoint: conversions, exactness against stock vLLM, and the quality rows.

Needs ``thinkeys fetch --model gemma-3-270m`` (models/gemma-3-270m; Gemma Terms of Use: it and every
conversion stay in the git-ignored models/) and ``thinkeys fetch --heldout`` (data/).

    python scripts/gemma3_real.py convert [--calibration-tokens 2048]   # r = 256 pairs; r = 128 / 64 pairs, mixed, rebuild (calibrated)
    python scripts/gemma3_real.py exact --json OUT.json       # stock vLLM vs thin r = 256: greedy text, logprobs, capacity

``exact`` runs both engines in fp32 with a 2-window-long prompt (the window is 512 tokens), chunked prefill
of 256 tokens and a prompt sharing the long one's prefix (prefix caching on; it got no hit in the recorded run), one engine at a time, in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parents[1]
MODELS, DATA = ROOT / "models", ROOT / "data"
SOURCE = MODELS / "gemma-3-270m"
WIKI_EVAL = DATA / "wiki" / "eval.txt"
CONVERSIONS = {  # label: (rank, rope, calibrated)
    "pairs-r256": (256, "pairs", False),
    "pairs-r128": (128, "pairs", True),
    "mixed-r128": (128, "mixed", True),
    "pairs-r64": (64, "pairs", True),
    "mixed-r64": (64, "mixed", True),
    "rebuild-r128": (128, "rebuild", True),
    "rebuild-r64": (64, "rebuild", True),
}
PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "In 1969, the first humans",
]


def thin_dir(label: str) -> Path:
    return MODELS / f"gemma-3-270m-thin-{label}"


def convert(args: argparse.Namespace) -> None:
    from thinkeys.convert.calibration import collect_calibration
    from thinkeys.convert.convert import run_conversion

    cal = None
    for label, (rank, rope, calibrated) in CONVERSIONS.items():
        if args.only and label not in args.only:
            continue
        if calibrated and cal is None:
            cal = collect_calibration(SOURCE, DATA / "wiki" / "tune.txt", tokens=args.calibration_tokens, progress=True)
        report = run_conversion(SOURCE, thin_dir(label), rank, rope, force=True, calibration=cal if calibrated else None, progress=False)
        print(label, report.summary(), flush=True)


def _long_prompt() -> str:
    text = WIKI_EVAL.read_text(encoding="utf-8")
    return text[:6000]  # about 1,300 Gemma tokens: past two 512-token windows


def _run(model: Path, prompts: list[str], max_tokens: int) -> dict:
    import gc

    from vllm import LLM, SamplingParams

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    llm = LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=2048, block_size=128,
              max_num_batched_tokens=256, enable_chunked_prefill=True, enable_prefix_caching=True, seed=0)
    try:
        cfg = llm.llm_engine.vllm_config
        out = {"kv_cache_size_tokens": int(cfg.cache_config.kv_cache_size_tokens),
               "num_blocks": int(cfg.cache_config.num_gpu_blocks),
               "max_in_flight_tokens": int(cfg.max_in_flight_tokens), "completions": []}
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0)
        for prompt in prompts:
            (res,) = llm.generate([prompt], params, use_tqdm=False)
            gen = res.outputs[0]
            out["completions"].append({
                "prompt_tokens": len(res.prompt_token_ids), "cached": int(res.num_cached_tokens or 0),
                "text": gen.text, "token_ids": list(gen.token_ids),
                "logprobs": [d[t].logprob for d, t in zip(gen.logprobs, gen.token_ids)],
            })
        return out
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def exact(args: argparse.Namespace) -> None:
    long = _long_prompt()
    prompts = PROMPTS + [long, long[:3000] + " In summary,"]  # shares the long one's first 3,000 characters
    started = time.perf_counter()
    stock = _run(SOURCE, prompts, args.max_tokens)
    thin = _run(thin_dir("pairs-r256"), prompts, args.max_tokens)
    rows = []
    for p, a, b in zip(prompts, stock["completions"], thin["completions"]):
        diff = max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"]))
        rows.append({"prompt": p[:40], "prompt_tokens": a["prompt_tokens"], "cached_thin": b["cached"],
                     "same_tokens": a["token_ids"] == b["token_ids"], "max_logprob_diff": diff, "stock_text": a["text"]})
        print(f"{p[:30]!r:34} {a['prompt_tokens']:5} tokens  same greedy tokens: {a['token_ids'] == b['token_ids']}  "
              f"max |dlogprob| {diff:.2e}  {a['text'][:60]!r}", flush=True)
    result = {"rows": rows, "capacity": {k: {"kv_cache_size_tokens": r["kv_cache_size_tokens"], "num_blocks": r["num_blocks"],
                                             "max_in_flight_tokens": r["max_in_flight_tokens"]} for k, r in (("stock", stock), ("thin-r256", thin))},
              "seconds": time.perf_counter() - started}
    print(json.dumps(result["capacity"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--only", nargs="*", choices=sorted(CONVERSIONS))
    c.add_argument("--calibration-tokens", type=int, default=8192)
    e = sub.add_parser("exact")
    e.add_argument("--max-tokens", type=int, default=24)
    e.add_argument("--json")
    args = parser.parse_args()
    {"convert": convert, "exact": exact}[args.cmd](args)


if __name__ == "__main__":
    main()
