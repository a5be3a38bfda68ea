"""Qwen3 (per-head q/k RMSNorm before RoPE): conversion after the norm, the reference, the real engine.

A tiny random Qwen3 (GQA, q/k norm gains drawn away from 1) is built at test time and converted with
``pairs`` (data-free), ``mixed`` (post-norm calibration statistics) and ``rebuild`` (the latent of the
normalised key, rebuilt at read; data-free at r = d, ``joint`` on post-norm statistics below):

- r = d_head: the thin checkpoint is the source model: the PyTorch reference gives the source's
  logits, and the vLLM engine gives stock vLLM's greedy tokens and logprobs (1e-3, fp32);
- r < d_head: vLLM matches the PyTorch reference (1e-3), including a prompt prefilled in chunks and
  a prompt served from the prefix cache; ``pairs`` is exact at r < d when the dropped pairs are
  zeroed by the k-norm gain (the basis acts after the norm);
- the engine's KV capacity equals the accounting's and the planner's;
- what thin keys do not carry for this family is refused in one line (tests/test_convert.py style).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ALL_PROMPTS
from engines import KV_CACHE_GIB, LONG_PROMPT, PREFIX_PROMPTS, run_engine
from safetensors.torch import load_file, save_file
from tiny_models import _TRAINING_TEXT, make_tiny_qwen3
from transformers import AutoModelForCausalLM

from thinkeys.checkpoint import KEY_MAP_NAME, QUERY_MAP_NAME, ThinKeyConfig, ThinKeyError, qk_map_names
from thinkeys.checkpoint_check import check_checkpoint_files
from thinkeys.convert.calibration import collect_calibration
from thinkeys.convert.convert import convert_checkpoint
from thinkeys.convert.qk_norm import PostNormCalibration
from thinkeys.reference import load_thin_model

HEAD_DIM, RANK = 32, 8
ATOL = 1e-3


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> dict[str, Path]:
    """``source``, ``full`` / ``full-mixed`` / ``full-rebuild`` (r = d), ``pairs``, ``mixed`` and ``rebuild`` (r = 8)."""
    root = tmp_path_factory.mktemp("qwen3")
    text = root / "tune.txt"
    text.write_text(_TRAINING_TEXT * 6)
    src = make_tiny_qwen3(root / "source")
    cal = collect_calibration(src, text, tokens=256, window=64, progress=False)
    return {
        "source": src,
        "text": text,
        "full": convert_checkpoint(src, root / "full", HEAD_DIM, progress=False),
        "full-mixed": convert_checkpoint(src, root / "full-mixed", HEAD_DIM, rope="mixed", calibration=cal, progress=False),
        "pairs": convert_checkpoint(src, root / "pairs", RANK, progress=False),
        "mixed": convert_checkpoint(src, root / "mixed", RANK, rope="mixed", calibration=cal, progress=False),
        "full-rebuild": convert_checkpoint(src, root / "full-rebuild", HEAD_DIM, rope="rebuild", progress=False),
        "rebuild": convert_checkpoint(src, root / "rebuild", RANK, rope="rebuild", calibration=cal, progress=False),
    }


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(5))


def _source_logits(src: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits


def _thin_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_thin_model(path)(ids).logits


# --- conversion and the PyTorch reference (no engine) ---------------------------------------------


def test_calibration_is_taken_after_the_norms(qwen3):
    cal = collect_calibration(qwen3["source"], qwen3["text"], tokens=64, window=64, progress=False)
    assert isinstance(cal, PostNormCalibration)
    assert cal.q_moment.shape == (2, 2, HEAD_DIM, HEAD_DIM) and cal.k_mean.shape == (2, 2, HEAD_DIM)
    # A normalised head has mean square g_j^2 over its dims (RMSNorm): the trace of E[k k^T] is sum_j g_j^2 E[u_j^2]
    # with mean(u^2) = 1 per token, so it lies between d * min(g)^2 and d * max(g)^2.
    gains = load_file(qwen3["source"] / "model.safetensors")["model.layers.0.self_attn.k_norm.weight"].double()
    trace = cal.k_moment[0].diagonal(dim1=-2, dim2=-1).sum(-1)  # [Hkv]
    assert ((trace >= HEAD_DIM * gains.min() ** 2 * 0.999) & (trace <= HEAD_DIM * gains.max() ** 2 * 1.001)).all()


@pytest.mark.parametrize("name", ["full", "full-mixed", "full-rebuild"])
def test_full_rank_reference_is_the_source_model(qwen3, input_ids, name):
    diff = (_thin_logits(qwen3[name], input_ids) - _source_logits(qwen3["source"], input_ids)).abs().max().item()
    assert diff < 1e-4, f"{name}: thin reference vs source logits differ by {diff:.2e}"


def test_checkpoint_keeps_the_projections_and_adds_post_norm_maps(qwen3):
    src = load_file(qwen3["source"] / "model.safetensors")
    thin = load_file(qwen3["pairs"] / "model.safetensors")
    config = json.loads((qwen3["pairs"] / "config.json").read_text())
    assert config["architectures"] == ["ThinKeyQwen3ForCausalLM"]
    assert ThinKeyConfig.from_pretrained(qwen3["pairs"]).rank == RANK
    for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "q_norm.weight", "k_norm.weight"):
        assert torch.equal(thin[f"model.layers.1.self_attn.{name}"], src[f"model.layers.1.self_attn.{name}"])
    q_map_name, k_map_name = qk_map_names("model.layers.1")
    q_map, k_map = thin[q_map_name], thin[k_map_name]
    assert q_map.shape == k_map.shape == (2, RANK, HEAD_DIM)
    # pairs: each thin dim selects one normalised source dim, query and key alike
    assert torch.equal(q_map, k_map)
    assert torch.equal(k_map.sum(-1), torch.ones(2, RANK)) and set(k_map.unique().tolist()) == {0.0, 1.0}
    assert check_checkpoint_files(qwen3["pairs"]).rank == RANK
    assert check_checkpoint_files(qwen3["mixed"]).rank == RANK


def test_rebuild_checkpoint_caches_the_latent_of_the_normalised_key(qwen3):
    src = load_file(qwen3["source"] / "model.safetensors")
    thin = load_file(qwen3["rebuild"] / "model.safetensors")
    config = ThinKeyConfig.from_pretrained(qwen3["rebuild"])
    assert (config.rope.value, config.rank, config.rope_dims) == ("rebuild", RANK, HEAD_DIM)
    p = "model.layers.1.self_attn"
    for name in ("q_proj.weight", "k_proj.weight", "q_norm.weight", "k_norm.weight"):
        assert torch.equal(thin[f"{p}.{name}"], src[f"{p}.{name}"])  # the source's projections and norms
    assert f"{p}.{QUERY_MAP_NAME}" not in thin  # queries are the source's normalised ones
    latent, expand = thin[f"{p}.{KEY_MAP_NAME}"], thin[f"{p}.thin_rebuild"]
    assert latent.shape == (2, RANK, HEAD_DIM) and expand.shape == (2, HEAD_DIM, RANK)
    assert check_checkpoint_files(qwen3["rebuild"]).rebuild
    # r < d is an approximation; fitted to the post-norm statistics it is closer to the source on the
    # calibration text than the data-free pairs at the same cache width (KL of the next-token distributions)
    from transformers import AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(qwen3["source"])(_TRAINING_TEXT)["input_ids"][:64]])
    source = _source_logits(qwen3["source"], ids).log_softmax(-1)

    def kl(name: str) -> float:
        return (source.exp() * (source - _thin_logits(qwen3[name], ids).log_softmax(-1))).sum(-1).mean().item()

    assert 0 < kl("rebuild") < 0.8 * kl("pairs"), f"rebuild KL {kl('rebuild'):.4f} vs pairs {kl('pairs'):.4f}"


def test_pairs_below_full_rank_is_exact_when_the_norm_zeroes_the_dropped_pairs(tmp_path, input_ids):
    """The basis acts after the norm: a k-norm gain of 0 on 12 of 16 pairs makes r = 8 exact."""
    src = make_tiny_qwen3(tmp_path / "src")
    state = load_file(src / "model.safetensors")
    kept = [1, 4, 9, 14]
    for i in range(2):
        gain = state[f"model.layers.{i}.self_attn.k_norm.weight"]
        mask = torch.zeros(HEAD_DIM // 2, dtype=torch.bool)
        mask[kept] = True
        gain[~mask.repeat(2)] = 0.0  # pair j is dims j and j + d/2
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    dst = convert_checkpoint(src, tmp_path / "thin", RANK, progress=False)
    k_map = load_file(dst / "model.safetensors")[qk_map_names("model.layers.0")[1]]
    assert k_map[0].nonzero()[:, 1].tolist() == kept + [j + HEAD_DIM // 2 for j in kept]
    diff = (_thin_logits(dst, input_ids) - _source_logits(src, input_ids)).abs().max().item()
    assert diff < 1e-4, f"r = 8 with the dropped pairs zeroed by k_norm differs from the source by {diff:.2e}"


def test_missing_map_is_caught_before_serving(qwen3, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(qwen3["pairs"], broken)
    state = load_file(broken / "model.safetensors")
    del state[f"model.layers.0.self_attn.{QUERY_MAP_NAME}"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ThinKeyError, match=re.escape(f"model.layers.0.self_attn.{QUERY_MAP_NAME} is missing")):
        check_checkpoint_files(broken)
    with pytest.raises(ThinKeyError, match="missing from the checkpoint"):
        load_thin_model(broken)


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


REFUSALS = {
    "svd rope after a q/k norm": (lambda q, t: (q["source"], {"rope": "svd"}), "--rope svd does not apply to Qwen3ForCausalLM"),
    "sliding window": (
        lambda q, t: (_edit_config(q["source"], t / "sw", use_sliding_window=True, sliding_window=64), {}),
        "Qwen3ForCausalLM with sliding-window layers is not supported",
    ),
    "yarn rope": (
        lambda q, t: (
            _edit_config(q["source"], t / "yarn", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
            {},
        ),
        "an attention factor != 1",
    ),
    "dynamic rope": (
        lambda q, t: (
            _edit_config(q["source"], t / "dyn", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
            {},
        ),
        "rope_type 'dynamic' changes its frequencies",
    ),
    "Qwen3-MoE": (
        lambda q, t: (_edit_config(q["source"], t / "moe", architectures=["Qwen3MoeForCausalLM"]), {}),
        "Qwen3MoeForCausalLM is not supported: Qwen3-MoE (mixture-of-experts",
    ),
    "Gemma 3 with vision": (
        lambda q, t: (_edit_config(q["source"], t / "gemmav", architectures=["Gemma3ForConditionalGeneration"]), {}),
        "Gemma3ForConditionalGeneration is not supported: Gemma 3 with vision (multimodal",
    ),
    "attention sinks": (
        lambda q, t: (_edit_config(q["source"], t / "sinks", architectures=["GptOssForCausalLM"]), {}),
        "GptOssForCausalLM is not supported: gpt-oss (attention sinks",
    ),
    "MLA": (
        lambda q, t: (_edit_config(q["source"], t / "mla", architectures=["DeepseekV3ForCausalLM"]), {}),
        "DeepseekV3ForCausalLM is not supported: DeepSeek-V3 (MLA already caches a compressed latent",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_problem_and_leave_nothing(case, qwen3, tmp_path):
    make_case, message = REFUSALS[case]
    src, kwargs = make_case(qwen3, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ThinKeyError, match=re.escape(message)) as info:
        convert_checkpoint(src, out / "thin", kwargs.pop("rank", RANK), progress=False, **kwargs)
    assert "\n" not in str(info.value)
    assert list(out.iterdir()) == []  # no destination, no temporary folder


def test_input_moments_are_refused_for_a_qk_norm_model(qwen3, tmp_path):
    from tiny_models import make_tiny_llama

    llama = make_tiny_llama(tmp_path / "llama")
    wrong = collect_calibration(llama, qwen3["text"], tokens=64, window=64, progress=False)
    with pytest.raises(ThinKeyError, match="taken before a q/k norm, but Qwen3ForCausalLM needs them after one"):
        convert_checkpoint(qwen3["source"], tmp_path / "thin", RANK, rope="mixed", calibration=wrong, progress=False)
    assert not (tmp_path / "thin").exists()


# --- the real vLLM engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(qwen3):
    """Engine runs of every test prompt, one engine at a time, cached for the module."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = run_engine(qwen3[name], ALL_PROMPTS)
        return cache[name]

    return get


@pytest.mark.engine
@pytest.mark.parametrize("name", ["full", "full-rebuild"])
def test_full_rank_is_exact_against_stock_vllm(runs, name):
    thin, stock = runs(name), runs("source")
    for prompt in ALL_PROMPTS:
        a, b = thin.completions[prompt], stock.completions[prompt]
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.token_ids == b.token_ids, f"greedy tokens differ for {prompt[:30]!r}"
        diffs = [abs(x - y) for x, y in zip(a.prompt_logprobs[1:] + a.logprobs, b.prompt_logprobs[1:] + b.logprobs)]
        assert max(diffs) < ATOL, f"max logprob difference {max(diffs):.2e} for {prompt[:30]!r}"


@pytest.mark.engine
@pytest.mark.parametrize("name", ["pairs", "mixed", "rebuild"])
def test_thin_model_matches_pytorch_reference(runs, qwen3, name):
    run = runs(name)
    model = load_thin_model(qwen3[name], dtype=torch.float32).eval()
    for prompt in ALL_PROMPTS:
        c = run.completions[prompt]
        ids = torch.tensor([c.prompt_token_ids + c.token_ids])
        with torch.no_grad():
            logprobs = model(ids).logits.float().log_softmax(-1)[0]  # [T, vocab]
        n = len(c.prompt_token_ids)
        ref = logprobs[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]]
        if c.prompt_logprobs:  # not asked for prefix-cache prompts (see engines.run_engine)
            ref = torch.cat([logprobs[torch.arange(n - 1), ids[0, 1:n]], ref])
        diff = (torch.tensor(c.prompt_logprobs[1:] + c.logprobs) - ref).abs().max().item()
        assert diff < ATOL, f"{name}: vLLM vs reference logprobs differ by {diff:.2e} on {prompt[:30]!r}"
        assert c.token_ids == logprobs[n - 1 : -1].argmax(-1).tolist()
    assert len(run.completions[LONG_PROMPT].prompt_token_ids) > 2 * 64  # prefilled in > 2 chunks of 64
    first, second = (run.completions[p] for p in PREFIX_PROMPTS)
    assert first.num_cached_tokens == 0 and second.num_cached_tokens >= 32  # a prefix-cache hit


@pytest.mark.engine
def test_kv_capacity_equals_accounting_and_planner(runs, qwen3):
    from engines import ENGINE_DEFAULTS

    from thinkeys.accounting import KVFootprint, geometry_from_config, resolve_kv_dtype
    from thinkeys.planner import make_plan

    stock, thin = runs("source"), runs("pairs")
    memory, context, block = int(KV_CACHE_GIB * 2**30), ENGINE_DEFAULTS["max_model_len"], ENGINE_DEFAULTS["block_size"]
    for run, path in ((stock, qwen3["source"]), (thin, qwen3["pairs"])):
        config = json.loads((path / "config.json").read_text())
        footprint = KVFootprint(
            geometry=geometry_from_config(config), kv_dtype=resolve_kv_dtype("auto", "float32"), block_size=block
        )
        capacity = footprint.capacity(memory, context)
        assert (capacity.num_blocks, capacity.capacity_tokens) == (run.num_blocks, run.kv_cache_size_tokens)
    # the engine runs dtype float32 (the planner's 'auto' would plan vLLM's bf16 for a float32 config; its
    # stock column keeps that 'auto' dtype, so only its thin column is the engine's figure here)
    plan = make_plan(
        str(qwen3["pairs"] / "config.json"), rank=None, kv_memory=memory, context=context, kv_dtype="float32", block_size=block
    )
    assert plan.capacity_tokens.thin == thin.kv_cache_size_tokens
    assert plan.max_concurrency.thin == thin.num_blocks / -(-context // block)  # vLLM: blocks / blocks per request
    assert thin.kv_cache_size_tokens / stock.kv_cache_size_tokens == pytest.approx(2 * HEAD_DIM / (RANK + HEAD_DIM), rel=0.01)
    assert runs("rebuild").kv_cache_size_tokens == thin.kv_cache_size_tokens  # the latent is r wide too
