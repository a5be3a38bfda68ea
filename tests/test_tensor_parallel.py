"""Tensor parallelism on CPU: the thin-key tiny Llama (GQA) at TP = 2 gives the TP = 1 output.

The tiny Llama has 4 query heads and 2 KV heads (GQA, 2 queries per KV head), keys of rank 8 and
values of width 32. At TP = 2 vLLM's ``QKVParallelLinear`` gives each rank 2 query heads and 1 KV
head, ``RowParallelLinear`` all-reduces the output projection, and the plugin splits the per-KV-head
RoPE frequency table the same way. Checked against the single-process run of the same prompts and
engine settings (the session's ``engine_runs("llama-thin")``, also used by test_engine.py):

* the same greedy tokens for every prompt, including a prompt prefilled in chunks and two that hit
  the prefix cache;
* logprobs of every prompt and generated token within 1e-4 (fp32; only the order of the
  all-reduce sums differs);
* each rank's KV cache holds one KV head, so the same per-rank budget holds twice the tokens.

vLLM's CPU backend runs TP with its multiprocessing executor, one worker process per rank. Each
rank needs its own OpenMP core list: ``VLLM_CPU_OMP_THREADS_BIND=auto`` binds rank i to NUMA node
i and refuses to start on a one-node machine ("Not enough allowed NUMA nodes"), so the cores are
given explicitly, split in two halves (``0|1`` on a 2-core machine).
"""

from __future__ import annotations

import os

import pytest

from conftest import ALL_PROMPTS
from engines import ENGINE_DEFAULTS, KV_CACHE_GIB, run_engine

pytestmark = pytest.mark.engine
ATOL = 1e-4
TP = 2


def _core_lists(tp: int) -> str:
    cores = sorted(os.sched_getaffinity(0))
    per_rank = max(1, len(cores) // tp)
    lists = [cores[i * per_rank : (i + 1) * per_rank] or cores[-1:] for i in range(tp)]
    return "|".join(",".join(map(str, c)) for c in lists)


@pytest.fixture(scope="module")
def tp2_run(checkpoints):
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_CPU_OMP_THREADS_BIND", _core_lists(TP))
    try:
        yield run_engine(checkpoints["llama-thin"], ALL_PROMPTS, tensor_parallel_size=TP, distributed_executor_backend="mp")
    finally:
        mp.undo()


def test_tp2_gives_the_single_process_tokens_and_logprobs(tp2_run, engine_runs):
    tp1 = engine_runs("llama-thin")
    worst = 0.0
    for prompt in ALL_PROMPTS:
        a, b = tp1.completions[prompt], tp2_run.completions[prompt]
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.token_ids == b.token_ids, f"TP=2 greedy tokens differ for {prompt[:30]!r}"
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs)
        pairs = list(zip(a.prompt_logprobs[1:] + a.logprobs, b.prompt_logprobs[1:] + b.logprobs))
        worst = max(worst, *(abs(x - y) for x, y in pairs))
    assert worst < ATOL, f"TP=2 vs TP=1 logprobs differ by up to {worst:.2e}"


def test_tp2_prefix_cache_and_chunked_prefill_still_work(tp2_run, engine_runs):
    tp1 = engine_runs("llama-thin")
    second = ALL_PROMPTS[-1]  # the second of the prompts sharing a long prefix
    assert tp2_run.completions[second].num_cached_tokens == tp1.completions[second].num_cached_tokens > 0


def test_tp2_shards_kv_heads_so_each_rank_caches_half(tp2_run, engine_runs, checkpoints):
    from thinkeys.checkpoint import ThinKeyConfig
    import json

    config = json.loads((checkpoints["llama-thin"] / "config.json").read_text())
    thin = ThinKeyConfig.from_hf_config(config)
    block = ENGINE_DEFAULTS["block_size"]
    kv_heads_per_rank = config["num_key_value_heads"] // TP
    bytes_per_block = block * config["num_hidden_layers"] * kv_heads_per_rank * (thin.rank + thin.head_dim) * 4  # fp32
    assert tp2_run.num_blocks == int(KV_CACHE_GIB * 2**30) // bytes_per_block
    assert tp2_run.num_blocks == 2 * engine_runs("llama-thin").num_blocks + (tp2_run.num_blocks % 2)
