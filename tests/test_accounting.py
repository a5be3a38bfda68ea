"""KV accounting against hand-computed numbers, and against vLLM's own capacity code."""

from __future__ import annotations

import pytest

from thinkeys.accounting import (
    KVFootprint,
    compare,
    format_bytes,
    format_bytes_both,
    geometry_from_config,
    make_geometry,
    parse_bytes,
    parse_tokens,
    resolve_kv_dtype,
)
from thinkeys.checkpoint import ThinKeyError

GiB = 1024**3


def footprint(*, layers, heads, kv_heads, d, r, dtype, block_size=16, shared_kv=False) -> KVFootprint:
    geometry = make_geometry(
        num_layers=layers, num_query_heads=heads, num_kv_heads=kv_heads, head_dim=d, key_dim=r, shared_kv=shared_kv
    )
    return KVFootprint(geometry=geometry, kv_dtype=resolve_kv_dtype(dtype), block_size=block_size)


def test_mha_fp16_paper_arithmetic():
    # 7B MHA: 32 layers x 32 KV heads x (128 + 128) dims x 2 bytes = 512 KiB per token stock;
    # keys at r = 32: 32 x 32 x (32 + 128) x 2 = 320 KiB per token.
    thin = footprint(layers=32, heads=32, kv_heads=32, d=128, r=32, dtype="float16")
    assert thin.bytes_per_token == 32 * 32 * 160 * 2 == 327_680
    assert thin.page_size_bytes == 16 * 32 * 160 * 2
    assert thin.bytes_per_block == 32 * 16 * 32 * 160 * 2 == 5_242_880
    c = compare(thin, kv_memory_bytes=80 * GiB, context_tokens=128 * 1024)
    assert c.stock_footprint.bytes_per_token == 524_288
    assert c.stock.bytes_per_user == 64 * GiB  # the paper: 64 GiB of KV per user at 128K
    assert c.thin.bytes_per_user == 40 * GiB
    assert c.per_user_saved_bytes == 24 * GiB == 25_769_803_776  # "~25 GB"
    # 80 GiB: 85899345920 // 8388608 = 10240 stock blocks, // 5242880 = 16384 thin blocks;
    # a 128K request holds 131072 / 16 = 8192 blocks.
    assert (c.stock.num_blocks, c.thin.num_blocks) == (10_240, 16_384)
    assert c.stock.blocks_per_request == c.thin.blocks_per_request == 8192
    assert (c.stock.max_concurrency, c.thin.max_concurrency) == (1.25, 2.0)
    assert (c.stock.max_users, c.thin.max_users) == (1, 2)
    assert (c.stock.capacity_tokens, c.thin.capacity_tokens) == (163_840, 262_144)
    assert c.concurrency_gain == pytest.approx(1.6)
    assert c.bytes_per_token_ratio == pytest.approx(1.6)


def test_gqa_bf16():
    # Mistral-7B: 8 KV heads for 32 query heads; only KV heads are cached.
    thin = footprint(layers=32, heads=32, kv_heads=8, d=128, r=64, dtype="bfloat16")
    assert thin.bytes_per_token == 32 * 8 * (64 + 128) * 2 == 98_304
    c = compare(thin, kv_memory_bytes=80 * GiB, context_tokens=32 * 1024)
    assert c.stock_footprint.bytes_per_token == 32 * 8 * 256 * 2 == 131_072
    assert c.stock.bytes_per_user == 32768 * 131_072 == 4 * GiB
    assert c.per_user_saved_bytes == GiB
    # 85899345920 // (16 * 131072) = 40960 stock blocks; // (16 * 98304) = 54613 thin blocks;
    # 2048 blocks per 32K request.
    assert (c.stock.num_blocks, c.thin.num_blocks) == (40_960, 54_613)
    assert (c.stock.max_users, c.thin.max_users) == (20, 26)
    assert c.thin.max_concurrency == 54_613 / 2048
    assert c.concurrency_gain == pytest.approx(54_613 / 40_960)


@pytest.mark.parametrize(
    ("dtype", "element_bytes"),
    [("float32", 4), ("float", 4), ("float16", 2), ("half", 2), ("bfloat16", 2), ("fp8", 1), ("fp8_e5m2", 1)],
)
def test_dtypes(dtype, element_bytes):
    # 2 layers x 4 KV heads x (16 + 64) dims = 640 elements per token.
    thin = footprint(layers=2, heads=8, kv_heads=4, d=64, r=16, dtype=dtype)
    assert thin.kv_dtype.element_bytes == element_bytes
    assert thin.bytes_per_token == 640 * element_bytes
    # The stock model keeps the model's dtype (here named explicitly; the geometry names none).
    model = resolve_kv_dtype("float32" if element_bytes == 4 else "bfloat16")
    stock = compare(thin, kv_memory_bytes=GiB, context_tokens=64, stock_kv_dtype=model).stock_footprint
    assert stock.bytes_per_token == 1024 * model.element_bytes


def test_8bit_caches_against_the_stock_model_at_its_dtype():
    # SmolLM2-135M (30 layers, 3 KV heads, d = 64, bf16) at r = d/4: (16 + 64) x 1 byte vs 2 x 64 x 2.
    geometry = make_geometry(num_layers=30, num_query_heads=9, num_kv_heads=3, head_dim=64, key_dim=16, model_dtype="bfloat16")
    fp8 = KVFootprint(geometry=geometry, kv_dtype=resolve_kv_dtype("fp8"), block_size=128)
    c = compare(fp8, kv_memory_bytes=GiB, context_tokens=4096)
    assert c.stock_footprint.kv_dtype.name == "bfloat16"
    assert (fp8.bytes_per_token, c.stock_footprint.bytes_per_token) == (30 * 3 * 80, 30 * 3 * 256)
    assert c.bytes_per_token_ratio == 3.2
    # Per-token-head int8 keeps a float32 scale after the key and after the value: 8 bytes per token and head,
    # as vLLM's per-token-head page (TritonAttentionBackend.customize_spec) and the thin-key backend's.
    int8 = fp8.model_copy(update={"kv_dtype": resolve_kv_dtype("int8_per_token_head")})
    assert int8.bytes_per_token_per_layer == 3 * (80 + 8)
    # Shared K=V: one d-wide vector (and one scale) per token and head.
    shared = KVFootprint(
        geometry=geometry.model_copy(update={"key_dim": 64, "shared_kv": True}),
        kv_dtype=resolve_kv_dtype("int8_per_token_head"),
        block_size=128,
    )
    assert shared.bytes_per_token_per_layer == 3 * (64 + 4)
    shared_fp8 = shared.model_copy(update={"kv_dtype": resolve_kv_dtype("fp8")})
    assert compare(shared_fp8, kv_memory_bytes=GiB, context_tokens=4096).bytes_per_token_ratio == 4.0
    # Without a model dtype there is no stock dtype to compare an 8-bit cache with.
    unnamed = fp8.model_copy(update={"geometry": geometry.model_copy(update={"model_dtype": None})})
    with pytest.raises(ThinKeyError, match="needs the model's dtype"):
        compare(unnamed, kv_memory_bytes=GiB, context_tokens=4096)


def test_auto_dtype_follows_the_model():
    assert resolve_kv_dtype("auto", "bfloat16").name == "bfloat16"
    assert resolve_kv_dtype("auto", "torch.float16").name == "float16"  # str(torch.float16)
    with pytest.raises(ThinKeyError, match="needs the model's dtype"):
        resolve_kv_dtype("auto", None)
    with pytest.raises(ThinKeyError, match="'int4_per_token_head' is not one the accounting knows"):
        resolve_kv_dtype("int4_per_token_head")


def test_block_rounding():
    # fp32, 2 layers x 4 KV heads x (16 + 64) x 4 bytes = 2560 bytes per token, 40960 per 16-token block.
    thin = footprint(layers=2, heads=4, kv_heads=4, d=64, r=16, dtype="float32")
    assert thin.bytes_per_block == 40_960
    assert thin.blocks_for_tokens(1) == 1
    assert thin.blocks_for_tokens(16) == 1
    assert thin.blocks_for_tokens(17) == 2
    assert thin.bytes_for_tokens(17) == 2 * 40_960
    assert thin.bytes_for_tokens(0) == 0
    # 1 MiB holds 1048576 // 40960 = 25 blocks (24576 bytes left over). A 100-token request holds
    # cdiv(100, 16) = 7 blocks, so 25 / 7 = 3.57 requests; vLLM reports int(25 / 7 * 100) = 357
    # tokens, not 25 * 16 = 400.
    cap = thin.capacity(1024 * 1024, 100)
    assert cap.num_blocks == 25
    assert cap.blocks_per_request == 7
    assert cap.max_concurrency == 25 / 7
    assert cap.capacity_tokens == 357
    assert cap.max_users == 3
    assert cap.bytes_per_user == 7 * 40_960
    # When the block size divides the context, capacity is num_blocks * block_size.
    assert thin.capacity(1024 * 1024, 128).capacity_tokens == 25 * 16


def test_engine_block_count_overrides_the_formula():
    thin = footprint(layers=2, heads=4, kv_heads=4, d=64, r=16, dtype="float32")
    c = compare(thin, kv_memory_bytes=1024 * 1024, context_tokens=128, thin_num_blocks=20)
    assert c.thin.num_blocks == 20
    assert c.thin.capacity_tokens == 320
    assert c.stock.num_blocks == 1024 * 1024 // (16 * 2 * 4 * 128 * 4)  # 16 stock blocks
    assert c.concurrency_gain == pytest.approx(20 / 16)


def test_shared_kv_caches_one_vector():
    shared = footprint(layers=2, heads=4, kv_heads=2, d=64, r=64, dtype="bfloat16", shared_kv=True)
    assert shared.bytes_per_token == 2 * 2 * 64 * 2
    assert compare(shared, kv_memory_bytes=GiB, context_tokens=128).bytes_per_token_ratio == 2.0
    with pytest.raises(ThinKeyError, match="shared K=V"):
        make_geometry(num_layers=2, num_query_heads=4, num_kv_heads=2, head_dim=64, key_dim=16, shared_kv=True)


def test_bad_geometry():
    with pytest.raises(ThinKeyError, match="rank 200 is larger than head_dim 128"):
        make_geometry(num_layers=2, num_query_heads=4, num_kv_heads=2, head_dim=128, key_dim=200)
    with pytest.raises(ThinKeyError, match="6 query heads cannot be split into 4 KV groups"):
        make_geometry(num_layers=2, num_query_heads=6, num_kv_heads=4, head_dim=128, key_dim=32)
    with pytest.raises(ThinKeyError, match="num_layers"):
        make_geometry(num_layers=0, num_query_heads=4, num_kv_heads=2, head_dim=128, key_dim=32)


def test_geometry_from_hf_dict_and_pretrained_config():
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}
    g = geometry_from_config(gpt2, rank=16)
    assert (g.num_layers, g.num_query_heads, g.num_kv_heads, g.head_dim, g.rank) == (12, 12, 12, 64, 16)
    assert g.max_position_embeddings == 1024 and g.model_dtype is None and g.name == "GPT2LMHeadModel"
    assert geometry_from_config(gpt2).is_stock

    from transformers import LlamaConfig, Qwen2Config

    llama = LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30, dtype="bfloat16"
    )
    g = geometry_from_config(llama, rank=32)
    assert (g.num_layers, g.num_query_heads, g.num_kv_heads, g.head_dim, g.rank) == (30, 9, 3, 64, 32)
    assert g.model_dtype == "bfloat16"
    # Qwen2 configs carry a sliding_window they only use with use_sliding_window=True.
    assert geometry_from_config(Qwen2Config(use_sliding_window=False, sliding_window=4096)).sliding_window is None
    mistral = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256, "sliding_window": 4096}
    assert geometry_from_config(mistral).sliding_window == 4096


def test_geometry_from_thin_key_checkpoint_config():
    thin = {
        "architectures": ["ThinKeyLlamaForCausalLM"],
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 256,
        "head_dim": 64,
        "torch_dtype": "bfloat16",
        "thin_keys": {
            "rank": 16,
            "head_dim": 64,
            "rope": "pairs",
            "rope_dims": 16,
            "source_architecture": "LlamaForCausalLM",
        },
    }
    g = geometry_from_config(thin)
    assert (g.rank, g.head_dim, g.num_kv_heads, g.model_dtype) == (16, 64, 2, "bfloat16")
    assert geometry_from_config(thin, rank=16) == g
    with pytest.raises(ThinKeyError, match="thin-key checkpoint of rank 16"):
        geometry_from_config(thin, rank=32)
    bad = {**thin, "thin_keys": {**thin["thin_keys"], "rank": 128}}
    with pytest.raises(ThinKeyError, match="invalid 'thin_keys'"):
        geometry_from_config(bad)


def test_units():
    assert parse_bytes("80GiB") == 80 * GiB
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5 GiB") == 3 * GiB // 2
    assert parse_tokens("128K") == 131_072
    assert parse_tokens("4096") == 4096
    assert parse_tokens("1M") == 1024 * 1024
    for bad in ("lots", "-1GiB", "GiB"):
        with pytest.raises(ThinKeyError, match="is not a memory size"):
            parse_bytes(bad)
    for bad in ("12x", "", "0", "K", "-5"):
        with pytest.raises(ThinKeyError, match="is not a token count"):
            parse_tokens(bad)
    assert format_bytes(24 * GiB) == "24.0 GiB"
    assert format_bytes_both(24 * GiB) == "24.0 GiB (25.8 GB)"
    assert format_bytes(-2048) == "-2.0 KiB"


# --- the same figures from vLLM's own capacity code --------------------------------------------


@pytest.fixture(scope="module")
def vllm_config_factory(tmp_path_factory):
    """Real VllmConfigs (no engine) for a tiny Llama config written to disk."""
    pytest.importorskip("vllm")
    from transformers import LlamaConfig
    from vllm.config import CacheConfig, ModelConfig, VllmConfig

    model_dir = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        intermediate_size=512,
        vocab_size=1000,
        max_position_embeddings=4096,
        dtype="bfloat16",
    ).save_pretrained(model_dir)

    def make(max_model_len: int, block_size: int) -> VllmConfig:
        model_config = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, max_model_len=max_model_len)
        config = VllmConfig(model_config=model_config, cache_config=CacheConfig(block_size=block_size))
        config.cache_config.kv_cache_layout = "LBHNC"  # what the engine core resolves on CPU
        return config

    return make


@pytest.mark.parametrize(
    ("rank", "block_size", "max_model_len", "memory"),
    [(16, 16, 1000, GiB), (64, 16, 1000, GiB), (32, 128, 4096, 3 * GiB // 7), (8, 128, 300, 12_345_678)],
)
def test_matches_vllm_capacity_code(vllm_config_factory, rank, block_size, max_model_len, memory):
    import torch
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity, get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec

    vllm_config = vllm_config_factory(max_model_len, block_size)
    # What a thin-key attention layer registers: keys of width r, values of width d.
    spec = FullAttentionSpec(
        block_size=block_size, num_kv_heads=2, head_size=rank, head_size_v=64, dtype=torch.bfloat16
    )
    groups = [KVCacheGroupSpec(layer_names=[f"model.layers.{i}.self_attn.attn" for i in range(3)], kv_cache_spec=spec)]
    kv_cache_config = get_kv_cache_config_from_groups(vllm_config, groups, memory)
    tokens, concurrency = get_kv_cache_capacity(vllm_config, kv_cache_config)

    thin = KVFootprint(
        geometry=make_geometry(num_layers=3, num_query_heads=4, num_kv_heads=2, head_dim=64, key_dim=rank),
        kv_dtype=resolve_kv_dtype("bfloat16"),
        block_size=block_size,
    )
    assert thin.page_size_bytes == spec.page_size_bytes
    assert thin.bytes_for_tokens(max_model_len) == 3 * spec.max_memory_usage_bytes(vllm_config)
    cap = thin.capacity(memory, max_model_len)
    assert cap.num_blocks == kv_cache_config.num_blocks
    assert cap.capacity_tokens == tokens
    assert cap.max_concurrency == concurrency
