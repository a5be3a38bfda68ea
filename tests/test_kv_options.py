"""8-bit KV caches and shared K=V checkpoints in the real vLLM engine (CPU), and the shared-KV converter.

- 8-bit caches: the engine allocates exactly the blocks the accounting predicts (per-token-head
  scales included), and the logprobs stay close to the float cache's.
- Shared K=V: a stock vLLM model whose v_proj equals its k_proj (tiny Llama with RoPE: the cache
  holds the un-rotated vector, rotated when read as a key; tiny GPT-2 without RoPE) and its shared
  K=V checkpoint served by the plugin give the same greedy tokens and logprobs (fp32, 1e-3), the
  plugin's logprobs match the plain-PyTorch reference, and the engine holds 2x the stock tokens.
- The converter refuses models whose value projection is not the key projection.
"""

import json

import pytest
import torch

from conftest import ALL_PROMPTS
from engines import ENGINE_DEFAULTS, KV_CACHE_GIB

from thinkeys.accounting import KVFootprint, geometry_from_config, resolve_kv_dtype
from thinkeys.checkpoint import ThinKeyConfig, ThinKeyError

pytestmark = pytest.mark.engine
ATOL = 1e-3
GiB = 1024**3


def predicted_blocks(checkpoint, kv_cache_dtype: str) -> int:
    config = json.loads((checkpoint / "config.json").read_text())
    footprint = KVFootprint(
        geometry=geometry_from_config(config),
        kv_dtype=resolve_kv_dtype(kv_cache_dtype, ENGINE_DEFAULTS["dtype"]),
        block_size=ENGINE_DEFAULTS["block_size"],
    )
    return footprint.capacity(int(KV_CACHE_GIB * GiB), ENGINE_DEFAULTS["max_model_len"]).num_blocks


def max_logprob_diff(run_a, run_b) -> float:
    diffs = []
    for prompt in ALL_PROMPTS:
        a, b = run_a.completions[prompt], run_b.completions[prompt]
        assert a.prompt_token_ids == b.prompt_token_ids
        diffs += [abs(x - y) for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])]
    return max(diffs)


def assert_same(run_a, run_b):
    for prompt in ALL_PROMPTS:
        a, b = run_a.completions[prompt], run_b.completions[prompt]
        assert a.token_ids == b.token_ids, f"greedy tokens differ for {prompt[:30]!r}"
        diffs = [abs(x - y) for x, y in zip(a.prompt_logprobs[1:] + a.logprobs, b.prompt_logprobs[1:] + b.logprobs)]
        assert max(diffs) < ATOL, f"max logprob difference {max(diffs):.2e} for {prompt[:30]!r}"


# --- 8-bit caches for thin keys ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fp8", "int8_per_token_head"])
def test_8bit_cache_capacity_is_what_the_accounting_predicts(engine_runs, checkpoints, kind):
    run, plain = engine_runs("llama-thin", kv_cache_dtype=kind), engine_runs("llama-thin")
    assert run.num_blocks == predicted_blocks(checkpoints["llama-thin"], kind)
    # fp32 model: (8 + 32) x 4 bytes per token and head, vs (8 + 32) x 1 (+ 8 bytes of scales).
    expected = 160 / (40 + (8 if kind.endswith("per_token_head") else 0))
    assert run.num_blocks / plain.num_blocks == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("kind,tolerance", [("int8_per_token_head", 0.05), ("fp8", 0.25)])
def test_8bit_cache_stays_close_to_the_float_cache(engine_runs, kind, tolerance):
    diff = max_logprob_diff(engine_runs("llama-thin", kv_cache_dtype=kind), engine_runs("llama-thin"))
    assert 0 < diff < tolerance, f"{kind}: prompt logprobs moved by up to {diff:.3f}"


def test_per_token_head_int8_is_closer_than_per_tensor_fp8(engine_runs):
    int8 = max_logprob_diff(engine_runs("llama-thin", kv_cache_dtype="int8_per_token_head"), engine_runs("llama-thin"))
    fp8 = max_logprob_diff(engine_runs("llama-thin", kv_cache_dtype="fp8"), engine_runs("llama-thin"))
    assert int8 < fp8


@pytest.mark.parametrize("kind", ["int8_per_token_head", "fp8"])
def test_8bit_cache_on_the_kernel_matches_the_pytorch_path(engine_runs, checkpoints, monkeypatch, kind):
    """The served 8-bit thin model runs on the compiled kernel, and gives the PyTorch path's tokens and logprobs.

    Counts the kernel's attention calls in each engine (in-process engine cores, see engines.py):
    the kernel engine makes them all, the one started with THINKEYS_ATTENTION_KERNEL=torch none.
    """
    from engines import run_engine

    from thinkeys.attention import kernels

    calls = {"n": 0}
    real = kernels.paged_attention

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "paged_attention", counted)
    on_kernel = run_engine(checkpoints["llama-thin"], ALL_PROMPTS, kv_cache_dtype=kind)
    assert calls["n"] > 0, "the 8-bit engine did not run the compiled kernel"
    calls["n"] = 0
    monkeypatch.setenv("THINKEYS_ATTENTION_KERNEL", "torch")
    on_torch = run_engine(checkpoints["llama-thin"], ALL_PROMPTS, kv_cache_dtype=kind)
    assert calls["n"] == 0, "THINKEYS_ATTENTION_KERNEL=torch still ran the kernel"
    assert_same(on_kernel, on_torch)
    assert on_kernel.num_blocks == on_torch.num_blocks == predicted_blocks(checkpoints["llama-thin"], kind)


# --- shared K=V checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_kv_is_exact_against_stock_vllm_with_v_equal_k(engine_runs, family):
    assert_same(engine_runs(f"{family}-shared"), engine_runs(f"{family}-vk"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_kv_matches_pytorch_reference(engine_runs, shared_kv_checkpoints, family):
    from thinkeys.reference import load_thin_model

    run = engine_runs(f"{family}-shared")
    model = load_thin_model(shared_kv_checkpoints[f"{family}-shared"], dtype=torch.float32).eval()
    for prompt in ALL_PROMPTS:
        c = run.completions[prompt]
        ids = torch.tensor([c.prompt_token_ids + c.token_ids])
        with torch.no_grad():
            logprobs = model(ids).logits.float().log_softmax(-1)[0]
        n = len(c.prompt_token_ids)
        ref = logprobs[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]]
        if c.prompt_logprobs:
            ref = torch.cat([logprobs[torch.arange(n - 1), ids[0, 1:n]], ref])
        diff = (torch.tensor(c.prompt_logprobs[1:] + c.logprobs) - ref).abs().max().item()
        assert diff < ATOL, f"{family}: vLLM vs reference logprobs differ by {diff:.2e} on {prompt[:30]!r}"


def test_shared_kv_reference_is_the_stock_model(shared_kv_checkpoints):
    """The PyTorch reference of a shared checkpoint is transformers' model with v_proj = k_proj."""
    from transformers import AutoModelForCausalLM

    from thinkeys.reference import load_thin_model

    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    for family in ("llama", "gpt2"):
        stock = AutoModelForCausalLM.from_pretrained(shared_kv_checkpoints[f"{family}-vk"], dtype=torch.float32).eval()
        shared = load_thin_model(shared_kv_checkpoints[f"{family}-shared"], dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(shared(ids).logits, stock(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind,gain", [(None, 2.0), ("fp8", 8.0), ("int8_per_token_head", 256 / 36)])
def test_shared_kv_capacity(engine_runs, shared_kv_checkpoints, kind, gain):
    """2x the stock blocks with the model's fp32 cache; an 8-bit cache of one vector on top of that."""
    kwargs = {} if kind is None else {"kv_cache_dtype": kind}
    run, stock = engine_runs("llama-shared", **kwargs), engine_runs("llama-vk")
    assert run.num_blocks == predicted_blocks(shared_kv_checkpoints["llama-shared"], kind or "auto")
    assert run.num_blocks / stock.num_blocks == pytest.approx(gain, rel=1e-4)


def test_shared_kv_8bit_stays_close(engine_runs):
    diff = max_logprob_diff(engine_runs("llama-shared", kv_cache_dtype="int8_per_token_head"), engine_runs("llama-vk"))
    assert diff < 0.05


def test_shared_kv_runs_on_the_kernel(engine_runs, shared_kv_checkpoints, monkeypatch):
    """Shared K=V slots are read in place by the rebuild kernel's shared_kv form (not the PyTorch path), 8-bit too."""
    from engines import run_engine

    from thinkeys.attention import rebuild_kernel

    formats = []
    real = rebuild_kernel.shared_kv_attention

    def spy(*args, **kwargs):
        formats.append(args[8] if len(args) > 8 else kwargs.get("cache_format", "plain"))
        return real(*args, **kwargs)

    monkeypatch.setattr(rebuild_kernel, "shared_kv_attention", spy)
    run = run_engine(shared_kv_checkpoints["llama-shared"], ALL_PROMPTS, kv_cache_dtype="int8_per_token_head")
    assert formats and set(formats) == {"int8_per_token_head"}, set(formats)
    monkeypatch.undo()
    assert max_logprob_diff(run, engine_runs("llama-vk")) < 0.05


# --- the converter ---------------------------------------------------------------------------


def test_shared_kv_checkpoint_format(shared_kv_checkpoints):
    from safetensors.torch import load_file

    thin = ThinKeyConfig.from_pretrained(shared_kv_checkpoints["llama-shared"])
    assert (thin.shared_kv, thin.rank, thin.head_dim, thin.rope.value, thin.rope_dims) == (True, 32, 32, "pairs", 32)
    state = load_file(shared_kv_checkpoints["llama-shared"] / "model.safetensors")
    assert torch.equal(state["model.layers.0.self_attn.v_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"])
    assert state["model.layers.0.self_attn.thin_rope_freqs"].shape == (2, 16)  # [KV heads, d/2]: the source's frequencies
    gpt2 = ThinKeyConfig.from_pretrained(shared_kv_checkpoints["gpt2-shared"])
    assert (gpt2.shared_kv, gpt2.rope.value) == (True, "none")
    with pytest.raises(ValueError, match="rank must equal head_dim"):
        ThinKeyConfig(rank=16, head_dim=32, rope="pairs", rope_dims=16, source_architecture="LlamaForCausalLM", shared_kv=True)


def test_convert_refuses_models_whose_values_are_not_keys(checkpoints, shared_kv_checkpoints, tmp_path, capsys):
    from thinkeys.cli import main
    from thinkeys.convert.shared_kv import convert_shared_kv

    with pytest.raises(ThinKeyError, match="layer 0: the value projection is not the key projection .*--rank R"):
        convert_shared_kv(checkpoints["llama"], tmp_path / "no")
    assert not (tmp_path / "no").exists()
    assert main(["convert", str(checkpoints["gpt2"]), str(tmp_path / "no"), "--shared-kv"]) == 2
    assert "the value projection is not the key projection" in capsys.readouterr().err
    assert main(["convert", str(shared_kv_checkpoints["llama-vk"]), str(tmp_path / "x"), "--shared-kv", "--rank", "8"]) == 2
    assert "leave out --rank" in capsys.readouterr().err
    assert main(["convert", str(shared_kv_checkpoints["llama-vk"]), str(tmp_path / "ok"), "--shared-kv"]) == 0
    assert ThinKeyConfig.from_pretrained(tmp_path / "ok").shared_kv


# --- served over HTTP ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_int8_server(shared_kv_checkpoints, tmp_path_factory):
    """The tiny shared K=V Llama served by ``thinkeys serve --kv-cache-dtype int8_per_token_head``."""
    from server import start_server

    log_dir = tmp_path_factory.mktemp("shared-int8-server")
    with start_server(
        shared_kv_checkpoints["llama-shared"], log_dir / "server.log", served_model_name="tiny-shared-int8",
        extra_args=["--kv-cache-dtype", "int8_per_token_head"],
    ) as served:
        yield served


def test_served_shared_kv_int8_savings_and_perplexity(shared_int8_server, shared_kv_checkpoints, tmp_path):
    import httpx

    from thinkeys.evaluate.server_backend import perplexity_server
    from thinkeys.evaluate.torch_backend import perplexity_torch

    with httpx.Client(base_url=shared_int8_server.base_url, timeout=60) as client:
        report = client.get("/v1/thinkeys/savings").json()
    assert report["shared_kv"] is True
    assert (report["kv_cache_dtype"], report["stock_kv_cache_dtype"]) == ("int8_per_token_head", "float32")
    # 2 layers x 2 KV heads: one 32-wide int8 vector + a float32 scale, vs key + value of 32 float32 each.
    assert report["bytes_per_token"] == {"thin": 2 * 2 * (32 + 4), "stock": 2 * 2 * 64 * 4}
    assert report["num_blocks"]["thin"] == report["kv_cache_memory_bytes"] // report["bytes_per_block"]["thin"]
    assert report["concurrency_gain"] == pytest.approx(256 / 36, rel=1e-3)

    text = tmp_path / "text.txt"
    text.write_text(" ".join(ALL_PROMPTS) * 3)
    served = perplexity_server(shared_int8_server.base_url, "tiny-shared-int8", text, window=64,
                               tokenizer=shared_kv_checkpoints["llama-shared"])
    reference = perplexity_torch(shared_kv_checkpoints["llama-vk"], text, window=64)
    # Same text, same windows: the int8 cache moves perplexity by well under 1%.
    assert served.tokens_scored == reference.tokens_scored
    assert served.ppl == pytest.approx(reference.ppl, rel=0.01)
