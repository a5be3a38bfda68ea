"""Run real vLLM engines on tiny models inside the test process.

``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (set in conftest.py before vLLM is imported) keeps the engine
core in this process: an engine then starts in ~3 s instead of ~45 s, so one test session can run
a stock and a thin-key engine per model family. Engines run one at a time and are shut down after
use; their results are cached per session by the fixtures in conftest.py.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from pathlib import Path

#: One long prompt (chunked prefill with max_num_batched_tokens=64) and two sharing a prefix longer
#: than a block (the second one, run after the first, hits the prefix cache).
SHORT_PROMPTS = [
    "The quick brown fox jumps over",
    "Good morning! How are you today?",
]
LONG_PROMPT = " ".join(
    ["A key opens a door; a value is what you find behind it."] * 6
    + ["Attention asks many questions and keeps only the answers that matter."] * 4
)
SHARED_PREFIX = "Once upon a time there was a little model that wanted to learn the language of the world. " * 3
PREFIX_PROMPTS = [SHARED_PREFIX + "She read every book", SHARED_PREFIX + "The market opened at nine"]

ENGINE_DEFAULTS = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=512,
    block_size=32,
    max_num_batched_tokens=64,  # forces chunked prefill of LONG_PROMPT
    enable_chunked_prefill=True,
    enable_prefix_caching=True,
    seed=0,
)
KV_CACHE_GIB = 1


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    prompt_logprobs: list[float | None]  # logprob of each prompt token (None for the first); [] if not asked
    logprobs: list[float]  # logprob of each generated token
    num_cached_tokens: int


@dataclass
class EngineRun:
    model: str
    kv_cache_size_tokens: int
    num_blocks: int
    completions: dict[str, Completion] = field(default_factory=dict)


def run_engine(model: str | Path, prompts: list[str], *, max_tokens: int = 8, kv_cache_gib: float = KV_CACHE_GIB, **engine_kwargs) -> EngineRun:
    """Greedy-generate each prompt (one ``generate`` call per prompt, in order) and collect logprobs.

    Prompt logprobs are requested for every prompt except PREFIX_PROMPTS: vLLM recomputes the whole
    prompt of a request that asks for prompt logprobs, which would bypass the prefix cache.
    """
    from vllm import LLM, SamplingParams

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    llm = LLM(model=str(model), **{**ENGINE_DEFAULTS, **engine_kwargs})
    try:
        with_prompt_logprobs = SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=0, logprobs=0)
        without = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0)
        cache_config = llm.llm_engine.vllm_config.cache_config
        run = EngineRun(str(model), int(cache_config.kv_cache_size_tokens), int(cache_config.num_gpu_blocks))
        for prompt in prompts:
            params = without if prompt in PREFIX_PROMPTS else with_prompt_logprobs
            (out,) = llm.generate([prompt], params, use_tqdm=False)
            gen = out.outputs[0]
            run.completions[prompt] = Completion(
                prompt_token_ids=list(out.prompt_token_ids),
                token_ids=list(gen.token_ids),
                prompt_logprobs=[
                    None if d is None else d[tok].logprob
                    for d, tok in zip(out.prompt_logprobs or [], out.prompt_token_ids)
                ],
                logprobs=[d[tok].logprob for d, tok in zip(gen.logprobs, gen.token_ids)],
                num_cached_tokens=int(out.num_cached_tokens or 0),
            )
        return run
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
