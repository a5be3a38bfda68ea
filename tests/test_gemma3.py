"""Gemma 3 (``Gemma3ForCausalLM``): QK-norm with ``1 + w`` gains, sliding-window and global layers, end to end.

A tiny random Gemma 3 (layers sliding / full / sliding, window 16 tokens, a RoPE base per layer type,
``query_pre_attn_scalar`` 24, GQA; :func:`tiny_models.make_tiny_gemma3`) is built at test time and
converted with ``pairs`` (data-free), ``mixed`` (post-norm calibration) and ``rebuild`` (the latent of the
normalised key cached, rebuilt and rotated at read; joint fit on post-norm statistics, data-free at r = d):

- r = d_head: the thin checkpoint is the source model (PyTorch reference = transformers' logits), and the
  vLLM engine gives stock vLLM's greedy tokens and logprobs (1e-3, fp32) on every test prompt, which are
  up to 15x longer than the window, one prefilled in chunks of 64 tokens, one served from the prefix cache;
- r < d_head: vLLM matches the PyTorch reference (1e-3) on the same prompts (the rebuild backend's windowed
  layers included), and with an 8-bit cache
  (``int8_per_token_head``) stays within 5e-2 of it (8-bit rounding; 2.3e-2 measured);
- the engine's KV capacity (vLLM's hybrid manager: the sliding layers keep only their window) equals the
  accounting's and the planner's, stock and thin;
- what is not supported is refused in one line.

One engine per checkpoint, cached for the module (about 20 s each on 2 cores).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ALL_PROMPTS
from engines import ENGINE_DEFAULTS, KV_CACHE_GIB, LONG_PROMPT, PREFIX_PROMPTS, run_engine
from safetensors.torch import load_file
from tiny_models import _TRAINING_TEXT, make_tiny_gemma3
from transformers import AutoConfig, AutoModelForCausalLM

from thinkeys.checkpoint import ThinKeyError, qk_map_names, rope_freqs_name
from thinkeys.checkpoint_check import check_checkpoint_files
from thinkeys.convert.calibration import collect_calibration
from thinkeys.convert.convert import convert_checkpoint
from thinkeys.convert.qk_norm import PostNormCalibration
from thinkeys.convert.rope_strategies import layer_inv_freqs
from thinkeys.reference import load_thin_model

HEAD_DIM, RANK, WINDOW = 32, 8, 16
ATOL = 1e-3


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> dict[str, Path]:
    """``source``, ``full`` / ``full-mixed`` / ``full-rebuild`` (r = d), ``pairs``, ``mixed`` and ``rebuild`` (r = 8)."""
    root = tmp_path_factory.mktemp("gemma3")
    text = root / "tune.txt"
    text.write_text(_TRAINING_TEXT * 6)
    src = make_tiny_gemma3(root / "source", sliding_window=WINDOW)
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
    return torch.randint(3, 512, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(5))  # 3 windows long


def _source_logits(src: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits


def _thin_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_thin_model(path)(ids).logits


# --- conversion and the PyTorch reference (no engine) ---------------------------------------------


def test_calibration_is_taken_after_the_norms(gemma3):
    """transformers' Gemma 3 normalises [B, heads, T, d] (heads before tokens): the moments must still be per head."""
    cal = collect_calibration(gemma3["source"], gemma3["text"], tokens=64, window=64, progress=False)
    assert isinstance(cal, PostNormCalibration)
    assert cal.q_moment.shape == (3, 2, HEAD_DIM, HEAD_DIM) and cal.k_mean.shape == (3, 2, HEAD_DIM)
    # RMSNorm makes each head's mean square 1 before the gain 1 + w: trace E[k k^T] in [d min(g)^2, d max(g)^2].
    gains = 1 + load_file(gemma3["source"] / "model.safetensors")["model.layers.0.self_attn.k_norm.weight"].double()
    trace = cal.k_moment[0].diagonal(dim1=-2, dim2=-1).sum(-1)  # [Hkv]
    assert ((trace >= HEAD_DIM * gains.min() ** 2 * 0.999) & (trace <= HEAD_DIM * gains.max() ** 2 * 1.001)).all()


@pytest.mark.parametrize("name", ["full", "full-mixed", "full-rebuild"])
def test_full_rank_reference_is_the_source_model(gemma3, input_ids, name):
    diff = (_thin_logits(gemma3[name], input_ids) - _source_logits(gemma3["source"], input_ids)).abs().max().item()
    assert diff < 1e-4, f"{name}: thin reference vs source logits differ by {diff:.2e}"


def test_reference_honours_the_window(gemma3, input_ids):
    """The reference's sliding layers see only the window: widening it in config.json changes the logits."""
    thin = load_thin_model(gemma3["pairs"])
    with torch.no_grad():
        windowed = thin(input_ids).logits
        thin.config.sliding_window = 10 * WINDOW
        wide = thin(input_ids).logits
    assert (windowed[:, :WINDOW] - wide[:, :WINDOW]).abs().max() < 1e-5  # no difference inside the first window
    assert (windowed[:, WINDOW:] - wide[:, WINDOW:]).abs().max() > 1e-2


def test_each_layer_keeps_its_own_rope_base(gemma3):
    """Sliding layers rotate at the local base (10^4), the global layer at 10^6; pairs keeps the source frequencies."""
    config = AutoConfig.from_pretrained(gemma3["source"])
    tables = layer_inv_freqs("Gemma3ForCausalLM", config, HEAD_DIM)
    assert tables[0][1].item() == pytest.approx(10000.0 ** (-2 / HEAD_DIM))
    assert tables[1][1].item() == pytest.approx(1e6 ** (-2 / HEAD_DIM))
    state = load_file(gemma3["full"] / "model.safetensors")
    for i in range(3):
        torch.testing.assert_close(state[rope_freqs_name(f"model.layers.{i}")], tables[i].expand(2, -1))


@pytest.mark.parametrize("rope", ["pairs", "rebuild"])
def test_one_kv_head_converts_exactly(tmp_path, input_ids, rope):
    """Gemma 3 270M has one KV head: every layer's RoPE table must be stored (layers sharing a base once
    shared one tensor, which the checkpoint writer kept under one name only)."""
    src = make_tiny_gemma3(tmp_path / "mqa", kv_heads=1, sliding_window=WINDOW)
    dst = convert_checkpoint(src, tmp_path / "thin", HEAD_DIM, rope=rope, progress=False)
    assert all(rope_freqs_name(f"model.layers.{i}") in load_file(dst / "model.safetensors") for i in range(3))
    diff = (_thin_logits(dst, input_ids) - _source_logits(src, input_ids)).abs().max().item()
    assert diff < 1e-4, f"{rope}, one KV head: thin reference vs source logits differ by {diff:.2e}"


def test_checkpoint_keeps_the_projections_and_adds_post_norm_maps(gemma3):
    src = load_file(gemma3["source"] / "model.safetensors")
    thin = load_file(gemma3["pairs"] / "model.safetensors")
    config = json.loads((gemma3["pairs"] / "config.json").read_text())
    assert config["architectures"] == ["ThinKeyGemma3ForCausalLM"]
    assert config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "q_norm.weight", "k_norm.weight"):
        assert torch.equal(thin[f"model.layers.1.self_attn.{name}"], src[f"model.layers.1.self_attn.{name}"])
    q_map, k_map = (thin[n] for n in qk_map_names("model.layers.1"))
    assert q_map.shape == k_map.shape == (2, RANK, HEAD_DIM) and torch.equal(q_map, k_map)
    for name in ("pairs", "mixed"):
        assert check_checkpoint_files(gemma3[name]).rank == RANK


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


REFUSALS = {
    "svd rope after a q/k norm": (lambda g, t: (g["source"], {"rope": "svd"}), "--rope svd does not apply to Gemma3ForCausalLM"),
    "attention soft-capping": (
        lambda g, t: (_edit_config(g["source"], t / "cap", attn_logit_softcapping=50.0), {}),
        "Gemma3ForCausalLM with attn_logit_softcapping is not supported",
    ),
    "bidirectional": (
        lambda g, t: (_edit_config(g["source"], t / "bidi", use_bidirectional_attention=True), {}),
        "Gemma3ForCausalLM with use_bidirectional_attention is not supported",
    ),
    "Gemma 3 with vision": (
        lambda g, t: (_edit_config(g["source"], t / "gemmav", architectures=["Gemma3ForConditionalGeneration"]), {}),
        "Gemma3ForConditionalGeneration is not supported: Gemma 3 with vision (multimodal",
    ),
    "Gemma 2": (
        lambda g, t: (_edit_config(g["source"], t / "gemma2", architectures=["Gemma2ForCausalLM"]), {}),
        "Gemma2ForCausalLM is not supported: Gemma 2 (sliding-window layers and attention-logit soft-capping",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_problem_and_leave_nothing(case, gemma3, tmp_path):
    make_case, message = REFUSALS[case]
    src, kwargs = make_case(gemma3, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ThinKeyError, match=re.escape(message)) as info:
        convert_checkpoint(src, out / "thin", RANK, progress=False, **kwargs)
    assert "\n" not in str(info.value)
    assert list(out.iterdir()) == []  # no destination, no temporary folder


# --- the real vLLM engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(gemma3):
    """Engine runs of every test prompt, one engine at a time, cached for the module."""
    cache: dict[tuple, object] = {}

    def get(name: str, **engine_kwargs):
        key = (name, tuple(sorted(engine_kwargs.items())))
        if key not in cache:
            cache[key] = run_engine(gemma3[name], ALL_PROMPTS, **engine_kwargs)
        return cache[key]

    return get


def _assert_prompts_exercise_the_window(run) -> None:
    assert len(run.completions[LONG_PROMPT].prompt_token_ids) > max(2 * 64, 8 * WINDOW)  # > 2 chunks, many windows
    first, second = (run.completions[p] for p in PREFIX_PROMPTS)
    assert first.num_cached_tokens == 0 and second.num_cached_tokens >= 2 * WINDOW  # a prefix-cache hit past the window


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
    _assert_prompts_exercise_the_window(thin)


def _reference_diff(run, path: Path) -> float:
    model = load_thin_model(path, dtype=torch.float32).eval()
    worst = 0.0
    for prompt in ALL_PROMPTS:
        c = run.completions[prompt]
        ids = torch.tensor([c.prompt_token_ids + c.token_ids])
        with torch.no_grad():
            logprobs = model(ids).logits.float().log_softmax(-1)[0]  # [T, vocab]
        n = len(c.prompt_token_ids)
        ref = logprobs[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]]
        if c.prompt_logprobs:  # not asked for prefix-cache prompts (see engines.run_engine)
            ref = torch.cat([logprobs[torch.arange(n - 1), ids[0, 1:n]], ref])
        worst = max(worst, (torch.tensor(c.prompt_logprobs[1:] + c.logprobs) - ref).abs().max().item())
    return worst


@pytest.mark.engine
@pytest.mark.parametrize("name", ["pairs", "mixed", "rebuild"])
def test_thin_model_matches_pytorch_reference(runs, gemma3, name):
    run = runs(name)
    diff = _reference_diff(run, gemma3[name])
    assert diff < ATOL, f"{name}: vLLM vs reference logprobs differ by {diff:.2e}"
    _assert_prompts_exercise_the_window(run)


@pytest.mark.engine
def test_8bit_cache_stays_close_to_the_reference(runs, gemma3):
    diff = _reference_diff(runs("pairs", kv_cache_dtype="int8_per_token_head"), gemma3["pairs"])
    assert diff < 5e-2, f"int8_per_token_head cache vs reference logprobs differ by {diff:.2e}"


@pytest.mark.engine
def test_kv_capacity_equals_accounting_and_planner(runs, gemma3):
    from thinkeys.accounting import KVFootprint, geometry_from_config, resolve_kv_dtype
    from thinkeys.planner import make_plan

    memory, context, block = int(KV_CACHE_GIB * 2**30), ENGINE_DEFAULTS["max_model_len"], ENGINE_DEFAULTS["block_size"]
    in_flight = ENGINE_DEFAULTS["max_num_batched_tokens"]  # CPU: no async scheduling, one batch in flight
    stock, thin = runs("source"), runs("pairs")
    for run, path in ((stock, gemma3["source"]), (thin, gemma3["pairs"])):
        config = json.loads((path / "config.json").read_text())
        geometry = geometry_from_config(config)
        assert (geometry.num_sliding_layers, geometry.sliding_window) == (2, WINDOW)
        footprint = KVFootprint(
            geometry=geometry, kv_dtype=resolve_kv_dtype("auto", "float32"), block_size=block, max_in_flight_tokens=in_flight
        )
        capacity = footprint.capacity(memory, context)
        assert (capacity.num_blocks, capacity.capacity_tokens) == (run.num_blocks, run.kv_cache_size_tokens)
        # the sliding layers' groups hold only the window (+ in-flight tokens), not the whole context
        assert capacity.blocks_per_request < 3 * context // block
    plan = make_plan(
        str(gemma3["pairs"] / "config.json"), rank=None, kv_memory=memory, context=context, kv_dtype="float32",
        block_size=block, max_in_flight_tokens=in_flight,
    )
    assert plan.capacity_tokens.thin == thin.kv_cache_size_tokens
    assert thin.kv_cache_size_tokens / stock.kv_cache_size_tokens == pytest.approx(2 * HEAD_DIM / (RANK + HEAD_DIM), rel=0.01)
