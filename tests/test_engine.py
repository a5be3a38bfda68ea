"""Thin-key checkpoints in the real vLLM engine (CPU): exactness, reference agreement, capacity.

- r = d_head (``pairs`` for RoPE models): the converted model served through our plugin gives the
  same greedy tokens and prompt logprobs (1e-3, fp32) as the unconverted model on stock vLLM.
- r < d_head: vLLM's logprobs match the plain-PyTorch reference of the same thin-key model,
  including a prompt prefilled in several chunks and a prompt that hits the prefix cache.
- At the same KV budget, vLLM allocates (2 d) / (r + d) times the stock model's token capacity.
"""

import pytest
import torch

from conftest import ALL_PROMPTS, FAMILIES, HEAD_DIM, THIN_RANK
from engines import LONG_PROMPT, PREFIX_PROMPTS

pytestmark = pytest.mark.engine
ATOL = 1e-3


def _assert_same(run_a, run_b):
    for prompt in ALL_PROMPTS:
        a, b = run_a.completions[prompt], run_b.completions[prompt]
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.token_ids == b.token_ids, f"greedy tokens differ for {prompt[:30]!r}"
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs)
        diffs = [abs(x - y) for x, y in zip(a.prompt_logprobs[1:] + a.logprobs, b.prompt_logprobs[1:] + b.logprobs)]
        assert max(diffs) < ATOL, f"max logprob difference {max(diffs):.2e} for {prompt[:30]!r}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_rank_conversion_is_exact_against_stock_vllm(engine_runs, family):
    _assert_same(engine_runs(f"{family}-full"), engine_runs(family))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_thin_model_matches_pytorch_reference(engine_runs, checkpoints, family):
    from thinkeys.reference import load_thin_model

    run = engine_runs(f"{family}-thin")
    model = load_thin_model(checkpoints[f"{family}-thin"], dtype=torch.float32).eval()
    for prompt in ALL_PROMPTS:
        c = run.completions[prompt]
        ids = torch.tensor([c.prompt_token_ids + c.token_ids])
        with torch.no_grad():
            logprobs = model(ids).logits.float().log_softmax(-1)[0]  # [T, vocab]
        n = len(c.prompt_token_ids)
        ref = logprobs[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]]  # generated tokens
        if c.prompt_logprobs:  # not asked for prefix-cache prompts (see engines.run_engine)
            ref = torch.cat([logprobs[torch.arange(n - 1), ids[0, 1:n]], ref])
        got = torch.tensor(c.prompt_logprobs[1:] + c.logprobs)
        diff = (got - ref).abs().max().item()
        assert diff < ATOL, f"{family}: vLLM vs reference logprobs differ by {diff:.2e} on {prompt[:30]!r}"
        # greedy: each generated token is the reference's argmax given the tokens before it
        assert c.token_ids == logprobs[n - 1 : -1].argmax(-1).tolist()


def test_long_prompt_was_chunked_and_prefix_was_cached(engine_runs, checkpoints):
    run = engine_runs("llama-thin")
    assert len(run.completions[LONG_PROMPT].prompt_token_ids) > 2 * 64  # > 2 chunks of 64 tokens
    first, second = (run.completions[p] for p in PREFIX_PROMPTS)
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= 32, "the shared prefix (a full block) was not served from the cache"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_capacity_grows_by_the_byte_ratio(engine_runs, family):
    stock, thin = engine_runs(family), engine_runs(f"{family}-thin")
    expected = (2 * HEAD_DIM) / (THIN_RANK + HEAD_DIM)
    ratio = thin.kv_cache_size_tokens / stock.kv_cache_size_tokens
    assert ratio == pytest.approx(expected, rel=0.01), (stock.kv_cache_size_tokens, thin.kv_cache_size_tokens)
