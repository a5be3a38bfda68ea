"""Rebuild-at-read checkpoints (``rope: rebuild``): the converter, the PyTorch reference and the real vLLM engine.

- r = d (``svd``, data-free): the converted model is the source, in PyTorch and in vLLM (same greedy
  tokens, prompt logprobs within 1e-3 fp32, against stock vLLM serving the source).
- r < d (``joint`` fit to calibration statistics): vLLM's logprobs match the PyTorch reference within
  1e-3, including a prompt prefilled in several chunks and a prompt that hits the prefix cache;
  GQA (tiny Llama: 4 query heads over 2 KV heads) and Qwen2's q/k biases.
- The engine allocates exactly the blocks :mod:`thinkeys.accounting` predicts for an ``r + d`` slot
  (2d / (r + d) times the stock tokens), also with an 8-bit cache, which stays close to the float one.
- The checkpoint holds what the format says, and bad ranks are refused.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import ALL_PROMPTS, HEAD_DIM, THIN_RANK
from engines import LONG_PROMPT, PREFIX_PROMPTS
from test_kv_options import assert_same, max_logprob_diff, predicted_blocks

from thinkeys.checkpoint import RopeStrategy, ThinKeyConfig, ThinKeyError, rebuild_table_name, rope_freqs_name
from thinkeys.convert.convert import convert_checkpoint
from thinkeys.reference import load_thin_model, thin_qk_parameters
from thinkeys.rope import default_inv_freq

ATOL = 1e-3


def reference_logprobs(model, completion) -> torch.Tensor:
    ids = torch.tensor([completion.prompt_token_ids + completion.token_ids])
    with torch.no_grad():
        logprobs = model(ids).logits.float().log_softmax(-1)[0]
    n = len(completion.prompt_token_ids)
    ref = logprobs[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]]
    if completion.prompt_logprobs:  # not asked for prefix-cache prompts
        ref = torch.cat([logprobs[torch.arange(n - 1), ids[0, 1:n]], ref])
    return ref


# --- converter and reference ------------------------------------------------------------------------


def test_checkpoint_format(rebuild_checkpoints, checkpoints):
    dst = rebuild_checkpoints["llama-rebuild"]
    thin = ThinKeyConfig.from_pretrained(dst)
    assert (thin.rope, thin.rank, thin.rope_dims, thin.query_width) == (RopeStrategy.REBUILD, THIN_RANK, HEAD_DIM, HEAD_DIM)
    config = json.loads((dst / "config.json").read_text())
    assert config["thin_keys_provenance"]["rebuild_kind"] == "joint"
    state, src = load_file(dst / "model.safetensors"), load_file(checkpoints["llama"] / "model.safetensors")
    p = "model.layers.0.self_attn"
    torch.testing.assert_close(state[f"{p}.q_proj.weight"], src[f"{p}.q_proj.weight"])  # queries untouched
    assert state[f"{p}.k_proj.weight"].shape == (2 * THIN_RANK, 128)
    assert state[rebuild_table_name("model.layers.0")].shape == (2, HEAD_DIM, THIN_RANK)
    assert state[rebuild_table_name("model.layers.0")].dtype == torch.float32
    freqs = state[rope_freqs_name("model.layers.0")]
    theta = json.loads((checkpoints["llama"] / "config.json").read_text())["rope_parameters"]["rope_theta"]
    torch.testing.assert_close(freqs, default_inv_freq(HEAD_DIM, theta)[None].expand(2, -1))  # the source's own RoPE


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_serve_time_file_check_knows_the_rebuild_shapes(rebuild_checkpoints, family, tmp_path):
    """`thinkeys serve` checks weight files against thin_keys before vLLM starts: d-wide queries, an r-wide
    latent key and its [Hkv, d, r] table are right; a missing table is named."""
    import shutil

    from safetensors.torch import save_file

    from thinkeys.checkpoint_check import check_checkpoint_files

    src = rebuild_checkpoints[f"{family}-rebuild"]
    assert check_checkpoint_files(src).rope == RopeStrategy.REBUILD
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    state = load_file(broken / "model.safetensors")
    del state[rebuild_table_name("model.layers.1")]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ThinKeyError, match=r"model\.layers\.1\.self_attn\.thin_rebuild is missing"):
        check_checkpoint_files(broken)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_full_rank_reference_is_the_source(rebuild_checkpoints, checkpoints, family):
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32).eval()(ids).logits
        full = load_thin_model(rebuild_checkpoints[f"{family}-rebuild-full"])(ids).logits
        low = load_thin_model(rebuild_checkpoints[f"{family}-rebuild"])(ids).logits
    torch.testing.assert_close(full, expected, atol=2e-5, rtol=1e-4)
    assert (low - expected).abs().max() > 1e-3  # r < d is an approximation


def test_reference_matches_the_rebuilt_transformers_model(rebuild_checkpoints, checkpoints, tmp_path):
    """The served format computes what convert/rebuild.py's measurement model computes (the figures measured before)."""
    from tiny_models import _TRAINING_TEXT

    from thinkeys.convert.calibration import collect_calibration
    from thinkeys.convert.rebuild import rebuild_model

    text = tmp_path / "tune.txt"
    text.write_text(_TRAINING_TEXT * 6)
    cal = collect_calibration(checkpoints["llama"], text, tokens=256, window=64, progress=False)
    ids = torch.randint(3, 500, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = rebuild_model(checkpoints["llama"], THIN_RANK, "joint", cal)(ids).logits
        got = load_thin_model(rebuild_checkpoints["llama-rebuild"])(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_trainable_parameters_include_the_expansion_table(rebuild_checkpoints):
    model = load_thin_model(rebuild_checkpoints["llama-rebuild"])
    names = {id(p) for p in thin_qk_parameters(model)}
    table = model.model.layers[0].self_attn.thin_rebuild
    assert id(table) in names and table.shape == (2, HEAD_DIM, THIN_RANK)


def test_refusals(checkpoints, tmp_path):
    with pytest.raises(ThinKeyError, match="--rope rebuild needs a rank that divides head_dim 32"):
        convert_checkpoint(checkpoints["llama"], tmp_path / "a", 12, rope="rebuild", progress=False)
    with pytest.raises(ThinKeyError, match="no rotary embedding"):
        convert_checkpoint(checkpoints["gpt2"], tmp_path / "b", 8, rope="rebuild", progress=False)
    assert list(tmp_path.iterdir()) == []


# --- the vLLM engine ------------------------------------------------------------------------------------


@pytest.mark.engine
def test_full_rank_is_exact_against_stock_vllm(engine_runs):
    assert_same(engine_runs("llama-rebuild-full"), engine_runs("llama"))


@pytest.mark.engine
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_vllm_matches_pytorch_reference(engine_runs, rebuild_checkpoints, family):
    run = engine_runs(f"{family}-rebuild")
    model = load_thin_model(rebuild_checkpoints[f"{family}-rebuild"], dtype=torch.float32).eval()
    for prompt in ALL_PROMPTS:
        c = run.completions[prompt]
        diff = (torch.tensor(c.prompt_logprobs[1:] + c.logprobs) - reference_logprobs(model, c)).abs().max().item()
        assert diff < ATOL, f"{family}: vLLM vs reference logprobs differ by {diff:.2e} on {prompt[:30]!r}"
    assert len(run.completions[LONG_PROMPT].prompt_token_ids) > 2 * 64  # prefilled in > 2 chunks
    assert run.completions[PREFIX_PROMPTS[1]].num_cached_tokens >= 32  # served from the prefix cache


@pytest.mark.engine
@pytest.mark.parametrize("kind", [None, "int8_per_token_head"])
def test_capacity_is_what_the_accounting_predicts(engine_runs, rebuild_checkpoints, checkpoints, kind):
    kwargs = {} if kind is None else {"kv_cache_dtype": kind}
    run = engine_runs("llama-rebuild", **kwargs)
    assert run.num_blocks == predicted_blocks(rebuild_checkpoints["llama-rebuild"], kind or "auto")
    if kind is None:  # the same r + d slot as any thin checkpoint of this rank
        assert run.num_blocks == engine_runs("llama-thin").num_blocks
        ratio = run.kv_cache_size_tokens / engine_runs("llama").kv_cache_size_tokens
        assert ratio == pytest.approx(2 * HEAD_DIM / (THIN_RANK + HEAD_DIM), rel=0.01)


@pytest.mark.engine
def test_8bit_cache_stays_close(engine_runs):
    diff = max_logprob_diff(engine_runs("llama-rebuild", kv_cache_dtype="int8_per_token_head"), engine_runs("llama-rebuild"))
    assert diff < 0.05


@pytest.mark.engine
@pytest.mark.parametrize("dtype,tolerance", [("bfloat16", 0.1), ("float32", 0.05)])
def test_8bit_cache_runs_on_the_kernel(engine_runs, rebuild_checkpoints, monkeypatch, dtype, tolerance):
    """The int8 cache is read in place by the rebuild kernel (not the PyTorch path): in its bf16 form for bfloat16
    on an AVX512-BF16 CPU, in its fp32 form otherwise; and it stays close to the float cache of the same dtype."""
    from engines import run_engine

    from thinkeys.attention import rebuild_kernel

    assert rebuild_kernel.reads_8bit(getattr(torch, dtype))
    formats = []
    real = rebuild_kernel.paged_attention

    def spy(*args, **kwargs):
        formats.append(args[9] if len(args) > 9 else kwargs.get("cache_format", "plain"))
        return real(*args, **kwargs)

    monkeypatch.setattr(rebuild_kernel, "paged_attention", spy)
    quant = run_engine(rebuild_checkpoints["llama-rebuild"], ALL_PROMPTS, dtype=dtype, kv_cache_dtype="int8_per_token_head")
    assert formats and set(formats) == {"int8_per_token_head"}, set(formats)
    monkeypatch.undo()
    diff = max_logprob_diff(quant, engine_runs("llama-rebuild", **({"dtype": dtype} if dtype != "float32" else {})))
    assert diff < tolerance, diff
