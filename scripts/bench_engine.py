#!/usr/bin/env python
"""Whole-engine benchmark: a stock model on vLLM's CPU_ATTN against its thin-key conversion.

Two vLLM engines, each in its own worker process (engine core in-process there:
``VLLM_ENABLE_V1_MULTIPROCESSING=0``), are alive for the whole run and driven step by step from
here, so stock and thin are measured interleaved under the same machine load:

1. per (batch, context) case both engines get ``batch`` requests with the same random
   ``context``-token prompts (greedy, ``ignore_eos``, no prefix caching);
2. prefill: the engines take turns running ``--prefill-chunk`` engine steps until every request
   has its first token. Prefill throughput = prompt tokens / time of those steps; cases of only a
   step or two are repeated with fresh requests (``--prefill-repeats``) and the median is reported;
3. decode: ``--rounds`` rounds in which each engine runs ``--decode-steps`` steps (order flipped
   every round). Every such step decodes one token for each of the ``batch`` requests; decode
   throughput = batch / median step time (output tokens per second of the whole engine);
4. the requests are aborted and the next case starts.

Both wall time and the worker process's CPU time (``time.process_time``: the engine and its
OpenMP threads) are recorded; on a busy shared machine the CPU-time figures are the steadier ones,
since they do not count time the process waited for a core. Ratios are thin / stock throughput.

    python scripts/bench_engine.py                                   # default models and table
    python scripts/bench_engine.py --batches 1,8 --contexts 512      # a subset
    python scripts/bench_engine.py --json bench-results/speed/engine.json
    python scripts/bench_engine.py --kv-cache-dtypes auto,int8_per_token_head:fp8,fp8 --cases 1x512,8x2048

Axes besides (batch, context): ``--dtypes`` (the model dtype of both engines) and
``--kv-cache-dtypes`` (``THIN[:STOCK]``: the thin engine's cache dtype and the stock engine's,
default the same; e.g. ``int8_per_token_head:fp8`` pits our int8 cache against vLLM's own fp8
cache, since CPU_ATTN has no int8 one). Each (dtype, cache dtype) pair gets a fresh pair of engines;
stock and thin are interleaved within it, the pairs run one after the other.

The default thin checkpoint comes from ``thinkeys fetch`` and
``thinkeys convert models/SmolLM2-135M-Instruct models/SmolLM2-135M-Instruct-thin-r16-pairs --rank 16``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_STOCK = Path("models/SmolLM2-135M-Instruct")
DEFAULT_THIN = Path("models/SmolLM2-135M-Instruct-thin-r16-pairs")


# ---- worker process: one engine, driven over a pipe ---------------------------------------------


def _engine_worker(model: str, kv_cache_gib: int, threads: int, engine_kwargs: dict, conn) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process
    # One OpenMP thread, as vLLM's auto binding gives a served engine on 2 cores. An in-process
    # engine core skips that binding, and idle OpenMP threads spin-waiting for a core the other
    # engine (or anything else) holds would dominate the timings.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=model, **engine_kwargs)
        engine = llm.llm_engine
        config = engine.vllm_config
        backend = _attention_backend(llm)
        conn.send(("ready", {
            "model": model,
            "attention_backend": backend,
            "kv_cache_tokens": int(config.cache_config.kv_cache_size_tokens),
            "dtype": str(config.model_config.dtype),
            "block_size": int(config.cache_config.block_size),
            "max_num_batched_tokens": int(config.scheduler_config.max_num_batched_tokens),
        }))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which exits cleanly
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return

    ids: list[str] = []
    started: set[str] = set()

    def step() -> tuple[float, float, int]:
        wall, cpu = time.perf_counter(), time.process_time()
        outputs = engine.step()
        elapsed = (time.perf_counter() - wall, time.process_time() - cpu)
        produced = 0
        for out in outputs:
            if out.outputs and out.outputs[0].token_ids:
                started.add(out.request_id)
                produced += 1
        return elapsed[0], elapsed[1], produced

    while True:
        cmd, *args = conn.recv()
        if cmd == "start":
            prompts, max_tokens, tag = args
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
            ids = [f"{tag}-{i}" for i in range(len(prompts))]
            started.clear()
            for rid, prompt in zip(ids, prompts):
                engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
            conn.send(("ok", None))
        elif cmd == "prefill":  # up to n steps while some request has no token yet
            (n,) = args
            times = []
            while len(times) < n and len(started) < len(ids):
                wall, cpu, _ = step()
                times.append((wall, cpu))
            conn.send(("ok", {"times": times, "done": len(started) == len(ids)}))
        elif cmd == "decode":
            (n,) = args
            times = []
            for _ in range(n):
                wall, cpu, produced = step()
                if produced != len(ids):
                    conn.send(("error", f"a decode step produced {produced} tokens for {len(ids)} requests"))
                    break
                times.append((wall, cpu))
            else:
                conn.send(("ok", {"times": times}))
        elif cmd == "stop":
            engine.abort_request(ids)
            while engine.has_unfinished_requests():
                engine.step()
            ids = []
            conn.send(("ok", None))
        elif cmd == "exit":
            engine.engine_core.shutdown()
            conn.send(("ok", None))
            return


def _attention_backend(llm) -> str:
    """Name of the attention backend of the first attention layer (runs in the worker)."""
    try:
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        for group in runner.attn_groups:
            for g in group:
                return g.backend.get_name()
    except Exception:  # noqa: BLE001 - informational only
        pass
    return "unknown"


class Engine:
    """Parent-side handle of one worker process."""

    def __init__(self, label: str, model: Path, kv_cache_gib: int, threads: int, engine_kwargs: dict) -> None:
        ctx = mp.get_context("spawn")
        self.label = label
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_worker, args=(str(model), kv_cache_gib, threads, engine_kwargs, child), daemon=True)
        self.proc.start()
        self.info: dict = {}

    def wait_ready(self) -> dict:
        status, payload = self.conn.recv()
        if status != "ready":
            raise RuntimeError(f"{self.label} engine failed to start: {payload}")
        self.info = payload
        return payload

    def call(self, *cmd):
        self.conn.send(cmd)
        status, payload = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.label} engine: {payload}")
        return payload

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.call("exit")
        except (EOFError, OSError, RuntimeError):
            pass  # the worker already ended (it reported why)
        finally:
            self.proc.join(timeout=30)
            if self.proc.is_alive():
                self.proc.kill()


# ---- the measurement ----------------------------------------------------------------------------


@dataclass
class CaseResult:
    batch: int
    context: int
    dtype: str
    thin_kv_cache_dtype: str
    stock_kv_cache_dtype: str
    stock_prefill_tok_s: float
    thin_prefill_tok_s: float
    stock_prefill_cpu_tok_s: float
    thin_prefill_cpu_tok_s: float
    stock_decode_tok_s: float
    thin_decode_tok_s: float
    stock_decode_cpu_tok_s: float
    thin_decode_cpu_tok_s: float
    decode_steps_per_engine: int
    prefill_repeats: int

    def ratio(self, what: str) -> float:
        return getattr(self, f"thin_{what}") / getattr(self, f"stock_{what}")


def kv_budget_gib(model: Path, batch: int, context: int, args) -> int:
    """Whole GiB of KV cache that hold ``batch`` requests of ``context`` + decoded tokens of ``model``."""
    import math

    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    key_width = cfg.get("thin_keys", {}).get("rank", head_dim)
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    dtype_bytes = 4 if "float32" in args.dtype or args.dtype == "float" else 2
    per_token = cfg["num_hidden_layers"] * kv_heads * (key_width + head_dim) * dtype_bytes
    block = 128
    tokens_per_request = -(-(context + args.rounds * args.decode_steps + 16) // block) * block
    return math.ceil(batch * tokens_per_request * per_token * 1.05 / 2**30)


def random_prompts(batch: int, context: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(context)] for _ in range(batch)]


def prefill_interleaved(engines: dict[str, Engine], args) -> dict[str, list[tuple[float, float]]]:
    """Step every engine through its prefill phase, ``--prefill-chunk`` steps per turn."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in engines}
    done = dict.fromkeys(engines, False)
    turn = 0
    while not all(done.values()):
        order = list(engines) if turn % 2 == 0 else list(engines)[::-1]
        for key in order:
            if not done[key]:
                res = engines[key].call("prefill", args.prefill_chunk)
                times[key] += res["times"]
                done[key] = res["done"]
        turn += 1
    return times


def run_case(engines: dict[str, Engine], batch: int, context: int, args, seed: int, variant=("", "", "")) -> CaseResult:
    prompts = random_prompts(batch, context, args.vocab, seed)
    max_tokens = args.max_model_len - context
    tokens = batch * context
    # prefill: small cases take one or two steps, so they are repeated (fresh requests each time)
    repeats = max(1, min(args.prefill_repeats, args.prefill_repeat_tokens // tokens))
    prefill_rates: dict[str, list[tuple[float, float]]] = {k: [] for k in engines}
    for rep in range(repeats):
        for e in engines.values():
            e.call("start", prompts, max_tokens, f"b{batch}c{context}s{seed}r{rep}")
        for key, times in prefill_interleaved(engines, args).items():
            prefill_rates[key].append((tokens / sum(w for w, _ in times), tokens / sum(c for _, c in times)))
        if rep < repeats - 1:
            for e in engines.values():
                e.call("stop")
    # decode, interleaved rounds, on the requests of the last prefill
    decode = {k: [] for k in engines}
    for rnd in range(args.rounds):
        order = list(engines) if rnd % 2 == 0 else list(engines)[::-1]
        for key in order:
            decode[key] += engines[key].call("decode", args.decode_steps)["times"]
    for e in engines.values():
        e.call("stop")

    pre = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in prefill_rates.items()}
    dec = {k: (batch / statistics.median(w for w, _ in v), batch / statistics.median(c for _, c in v)) for k, v in decode.items()}
    return CaseResult(
        batch, context, *variant,
        pre["stock"][0], pre["thin"][0], pre["stock"][1], pre["thin"][1],
        dec["stock"][0], dec["thin"][0], dec["stock"][1], dec["thin"][1],
        args.rounds * args.decode_steps, repeats,
    )


def print_table(results: list[CaseResult], engine_infos: list[dict]) -> None:
    print()
    for info in engine_infos:
        for key, i in info.items():
            print(f"{key}: {i['model']} ({i['attention_backend']}, {i['dtype']}, cache {i.get('kv_cache_dtype')}, "
                  f"block {i['block_size']}, {i['kv_cache_tokens']} KV tokens, max {i['max_num_batched_tokens']} tokens/step)")
    head = (f"{'dtype':>9}{'cache thin:stock':>30}{'batch':>6}{'ctx':>6} | {'decode tok/s: stock':>19}{'thin':>8}{'ratio':>7}{'(cpu)':>8} | "
            f"{'prefill tok/s: stock':>20}{'thin':>8}{'ratio':>7}{'(cpu)':>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        cache = f"{r.thin_kv_cache_dtype}:{r.stock_kv_cache_dtype}"
        print(f"{r.dtype:>9}{cache:>30}{r.batch:>6}{r.context:>6} | {r.stock_decode_tok_s:>19.1f}{r.thin_decode_tok_s:>8.1f}"
              f"{r.ratio('decode_tok_s'):>6.2f}x{r.ratio('decode_cpu_tok_s'):>7.2f}x | "
              f"{r.stock_prefill_tok_s:>20.1f}{r.thin_prefill_tok_s:>8.1f}{r.ratio('prefill_tok_s'):>6.2f}x"
              f"{r.ratio('prefill_cpu_tok_s'):>7.2f}x")
    print("ratio = thin / stock throughput from wall time; (cpu) = the same from worker CPU time")


def plot(results: list[CaseResult], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(r: CaseResult) -> str:
        cache = r.thin_kv_cache_dtype if r.thin_kv_cache_dtype == r.stock_kv_cache_dtype else f"{r.thin_kv_cache_dtype}\nvs {r.stock_kv_cache_dtype}"
        return f"{r.dtype}\n{cache}\nb={r.batch} ctx={r.context}"

    labels = [label(r) for r in results]
    x = range(len(results))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(results)), 8), sharey=True)
    for ax, what, goal in ((axes[0], "decode", 1.0), (axes[1], "prefill", 0.9)):
        ax.bar([i - 0.2 for i in x], [r.ratio(f"{what}_cpu_tok_s") for r in results], 0.4, label="CPU time")
        ax.bar([i + 0.2 for i in x], [r.ratio(f"{what}_tok_s") for r in results], 0.4, label="wall time", alpha=0.6)
        ax.axhline(goal, color="black", linewidth=0.8, linestyle="--", label=f"goal {goal}x")
        ax.set_xticks(list(x), labels, fontsize=6)
        ax.set_title(f"{what} tok/s, thin / stock", fontsize=9)
    axes[0].set_ylabel("throughput ratio (> 1: thin faster)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Whole vLLM engine on CPU: {args.thin.name} vs {args.stock.name}", fontsize=9)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stock", type=Path, default=DEFAULT_STOCK, help="the source model (served on CPU_ATTN)")
    p.add_argument("--thin", type=Path, default=DEFAULT_THIN, help="its thin-key conversion")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--cases", default=None, help="BATCHxCONTEXT list (e.g. 1x512,8x2048) instead of --batches x --contexts")
    p.add_argument("--kv-cache-dtypes", default="auto",
                   help="comma list of THIN[:STOCK] cache dtypes, one engine pair each (e.g. auto,int8_per_token_head:fp8,fp8)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved decode rounds per case")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps per engine per round")
    p.add_argument("--prefill-chunk", type=int, default=2, help="prefill steps per engine per turn")
    p.add_argument("--prefill-repeats", type=int, default=3, help="prefill repeats of cases small enough (median reported)")
    p.add_argument("--prefill-repeat-tokens", type=int, default=12288,
                   help="a case is repeated only while repeats x batch x context stays within this many tokens")
    p.add_argument("--kv-cache-gib", type=int, default=None,
                   help="VLLM_CPU_KVCACHE_SPACE of both engines (default: the smallest whole GiB that holds the "
                        "stock model's largest batch x (context + decoded tokens))")
    p.add_argument("--dtypes", "--dtype", dest="dtype", default="float32",
                   help="engine dtype (default float32: on CPUs without AVX512-BF16/AMX, vLLM's bf16 linear layers "
                        "fall back to a slow PyTorch path that hides everything else; 'auto' = the model's bf16); "
                        "a comma list runs one engine pair per dtype")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads per engine (default 1, as served on 2 cores)")
    p.add_argument("--vocab", type=int, default=49152, help="prompt token ids are drawn below this")
    p.add_argument("--enforce-eager", action="store_true", help="skip vLLM's torch.compile of the model (default: compiled, as served)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of the ratios here (needs matplotlib)")
    args = p.parse_args(argv)

    for path in (args.stock, args.thin):
        if not (path / "config.json").is_file():
            print(f"error: {path} is not a model folder: run `thinkeys fetch` and `thinkeys convert "
                  f"{DEFAULT_STOCK} {DEFAULT_THIN} --rank 16` (or pass --stock/--thin)", file=sys.stderr)
            return 2
    if args.cases:
        cases = [tuple(int(v) for v in c.lower().split("x")) for c in args.cases.split(",")]
    else:
        cases = [(int(b), int(c)) for c in args.contexts.split(",") for b in args.batches.split(",")]
    batches = [b for b, _ in cases]
    contexts = [c for _, c in cases]
    # one budget for every engine (what the stock model needs for the largest case); capacity does not change speed
    kv_cache_gib = args.kv_cache_gib or kv_budget_gib(args.stock, max(batches), max(contexts), args)
    variants = []
    for dtype in args.dtype.split(","):
        for pair in args.kv_cache_dtypes.split(","):
            thin_kv, _, stock_kv = pair.partition(":")
            variants.append((dtype, thin_kv, stock_kv or thin_kv))
    from tqdm import tqdm

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_attention import machine_info, write_json

    machine_at_start = machine_info()
    results: list[CaseResult] = []
    engine_infos: list[dict] = []
    for dtype, thin_kv, stock_kv in variants:
        engine_kwargs = dict(
            dtype=dtype,
            max_model_len=args.max_model_len,
            enable_prefix_caching=False,
            max_num_seqs=max(batches),
            seed=0,
            enforce_eager=args.enforce_eager,
        )
        engines = {"stock": Engine("stock", args.stock, kv_cache_gib, args.threads, {**engine_kwargs, "kv_cache_dtype": stock_kv}),
                   "thin": Engine("thin", args.thin, kv_cache_gib, args.threads, {**engine_kwargs, "kv_cache_dtype": thin_kv})}
        try:
            for e in engines.values():
                e.wait_ready()
                e.info["kv_cache_dtype"] = e.label == "thin" and thin_kv or stock_kv
            engine_infos.append({k: e.info for k, e in engines.items()})
            # warm-up: one small case, not reported
            run_case(engines, 2, 64, argparse.Namespace(**{**vars(args), "rounds": 1, "decode_steps": 4}), seed=-1)
            for i, (b, c) in enumerate(tqdm(cases, desc=f"{dtype} {thin_kv}:{stock_kv}", file=sys.stderr)):
                results.append(run_case(engines, b, c, args, seed=i, variant=(dtype, thin_kv, stock_kv)))
        finally:
            for e in engines.values():
                e.close()
    print_table(results, engine_infos)
    if args.plot:
        plot(results, args)
    if args.json:
        payload = {
            "benchmark": "whole vLLM engine, thin-key checkpoint vs its stock source on CPU_ATTN",
            "command": "python scripts/bench_engine.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine_at_start | {"load_average_at_end": os.getloadavg()},
            "engines": engine_infos,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("json", "plot")}
            | {"kv_cache_gib": kv_cache_gib},
            "results": [asdict(r) | {"decode_ratio": r.ratio("decode_tok_s"), "decode_ratio_cpu": r.ratio("decode_cpu_tok_s"),
                                     "prefill_ratio": r.ratio("prefill_tok_s"), "prefill_ratio_cpu": r.ratio("prefill_cpu_tok_s")}
                        for r in results],
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
