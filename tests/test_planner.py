"""`thinkeys plan`: presets, config paths, the paper's arithmetic, and clean errors."""

from __future__ import annotations

import json

import pytest

from thinkeys.cli import main
from thinkeys.planner import list_presets, make_plan

GiB = 1024**3


def plan_json(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_presets_are_there_and_load():
    presets = list_presets()
    assert {"llama-7b-mha", "mistral-7b"} <= set(presets)
    for name in presets:
        plan = make_plan(name, rank="d/4", kv_memory="1GiB", context="1K")
        assert plan.rank == plan.head_dim // 4
        assert plan.per_user_saved_fraction == pytest.approx(0.375)  # keys d/4: (d - d/4) / 2d


def test_paper_7b_mha_at_128k(capsys):
    out = plan_json(capsys, "llama-7b-mha", "--rank", "d/4", "--context", "128K", "--kv-memory", "80GiB")
    assert (out["num_layers"], out["num_kv_heads"], out["head_dim"], out["rank"]) == (32, 32, 128, 32)
    assert out["kv_cache_dtype"] == "float16"
    assert out["per_user_bytes"] == {"stock": 64 * GiB, "thin": 40 * GiB}
    assert out["per_user_saved_bytes"] == 24 * GiB  # 24 GiB = 25.8 GB
    assert round(out["per_user_saved_bytes"] / 1e9) == 26
    assert out["concurrency_gain"] == pytest.approx(1.6)  # 1 / (1 - 0.375)
    assert out["max_users"] == {"stock": 1, "thin": 2}


def test_table_output(capsys):
    assert main(["plan", "llama-7b-mha", "--rank", "32", "--context", "128K", "--kv-memory", "80GiB"]) == 0
    text = capsys.readouterr().out
    assert "rank 32 (r = d/4)" in text
    rows = {line.split("  ")[0]: line for line in text.splitlines() if "  " in line}
    assert rows["KV bytes per user"].split() == [
        *"KV bytes per user".split(),
        *"64.0 GiB (68.7 GB) 40.0 GiB (42.9 GB) 24.0 GiB (25.8 GB)".split(),
    ]
    assert rows["max concurrency"].split()[-3:] == ["1.25x", "2.00x", "1.60x"]
    assert rows["max users (whole)"].split()[-3:] == ["1", "2", "+1"]
    assert "note: context 131,072 is longer than the model's max_position_embeddings 4,096" in text


def test_mistral_gqa(capsys):
    out = plan_json(capsys, "mistral-7b", "--rank", "64", "--context", "32K", "--kv-memory", "80GiB")
    assert (out["num_query_heads"], out["num_kv_heads"], out["kv_cache_dtype"]) == (32, 8, "bfloat16")
    # 32 layers x 8 KV heads x (128 + 128) x 2 bytes = 128 KiB per token stock, 96 KiB thin.
    assert out["bytes_per_token"] == {"stock": 131_072, "thin": 98_304}
    assert out["per_user_bytes"] == {"stock": 4 * GiB, "thin": 3 * GiB}
    assert out["max_users"] == {"stock": 20, "thin": 26}
    assert out["capacity_tokens"]["stock"] == 40_960 * 16
    # The context defaults to the model's max_position_embeddings.
    assert plan_json(capsys, "mistral-7b", "--rank", "64", "--kv-memory", "80GiB")["context_tokens"] == 32_768


def test_kv_dtype_and_block_size(capsys):
    out = plan_json(capsys, "mistral-7b", "--rank", "64", "--context", "1000", "--kv-memory", "1GiB",
                    "--kv-dtype", "fp8", "--block-size", "128")
    assert (out["kv_cache_dtype"], out["stock_kv_cache_dtype"]) == ("fp8", "bfloat16")
    # The stock model keeps the model's bf16 cache: 32 x 8 x 256 x 2; thin fp8: 32 x 8 x (64 + 128) x 1.
    assert out["bytes_per_token"] == {"stock": 131_072, "thin": 49_152}
    # 1000 tokens hold cdiv(1000, 128) = 8 blocks of 128 tokens.
    assert out["per_user_bytes"]["thin"] == 8 * 128 * 49_152


def test_8bit_and_shared_kv_options(capsys):
    # SmolLM2-135M, r = d/4, fp8: (16 + 64) x 1 vs 2 x 64 x 2 bytes per token and head: 3.2x.
    args = ["smollm2-135m", "--context", "4096", "--kv-memory", "1GiB", "--block-size", "128"]
    fp8 = plan_json(capsys, *args, "--rank", "d/4", "--kv-dtype", "fp8")
    assert fp8["bytes_per_token"] == {"stock": 30 * 3 * 256, "thin": 30 * 3 * 80}
    assert fp8["concurrency_gain"] == pytest.approx(3.2, rel=0.01)
    int8 = plan_json(capsys, *args, "--rank", "d/4", "--kv-dtype", "int8_per_token_head")
    assert int8["bytes_per_token"]["thin"] == 30 * 3 * (80 + 8)  # a float32 scale per key and per value
    shared = plan_json(capsys, *args, "--shared-kv")
    assert shared["shared_kv"] and shared["bytes_per_token"] == {"stock": 30 * 3 * 256, "thin": 30 * 3 * 128}
    shared_fp8 = plan_json(capsys, *args, "--shared-kv", "--kv-dtype", "fp8")
    assert shared_fp8["bytes_per_token"]["thin"] == 30 * 3 * 64
    assert main(["plan", *args, "--shared-kv", "--rank", "16"]) == 2
    assert "leave --rank out with --shared-kv" in capsys.readouterr().err


def test_config_path_and_checkpoint_folder(tmp_path, capsys):
    config = {"architectures": ["GPT2LMHeadModel"], "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}
    (tmp_path / "config.json").write_text(json.dumps(config))
    by_file = plan_json(capsys, str(tmp_path / "config.json"), "--rank", "16", "--kv-memory", "1GiB")
    by_dir = plan_json(capsys, str(tmp_path), "--rank", "16", "--kv-memory", "1GiB")
    assert by_file["model"].endswith("config.json")
    assert {**by_file, "model": None} == {**by_dir, "model": None}
    assert by_file["context_tokens"] == 1024
    assert by_file["kv_cache_dtype"] == "bfloat16"  # no dtype in the config: vLLM's auto gives bf16
    assert any("names no dtype" in note for note in by_file["notes"])
    assert by_file["bytes_per_token"] == {"stock": 12 * 12 * 128 * 2, "thin": 12 * 12 * 80 * 2}


def test_thin_key_checkpoint_reads_its_rank(tmp_path, capsys):
    config = {
        "architectures": ["ThinKeyLlamaForCausalLM"],
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
        "max_position_embeddings": 8192, "torch_dtype": "bfloat16",
        "thin_keys": {"rank": 32, "head_dim": 64, "rope": "pairs", "rope_dims": 32,
                      "source_architecture": "LlamaForCausalLM"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = plan_json(capsys, str(tmp_path), "--kv-memory", "1GiB")
    assert out["rank"] == 32
    assert out["bytes_per_token"] == {"stock": 30 * 3 * 128 * 2, "thin": 30 * 3 * 96 * 2}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["no-such-model", "--rank", "32", "--kv-memory", "1GiB"], "'no-such-model' is neither a file nor a known preset (presets: "),
        (["llama-7b-mha", "--rank", "256", "--kv-memory", "1GiB"], "rank 256 is larger than head_dim 128"),
        (["llama-7b-mha", "--rank", "0", "--kv-memory", "1GiB"], "rank must be a positive number"),
        (["llama-7b-mha", "--rank", "d/3", "--kv-memory", "1GiB"], "d/N with N dividing head_dim 128"),
        (["llama-7b-mha", "--rank", "lots", "--kv-memory", "1GiB"], "write a whole number of key dims"),
        (["llama-7b-mha", "--rank", "32", "--kv-memory", "eighty"], "'eighty' is not a memory size"),
        (["llama-7b-mha", "--rank", "32", "--kv-memory", "1GiB", "--context", "long"], "'long' is not a token count"),
        (["llama-7b-mha", "--rank", "32", "--kv-memory", "1GiB", "--kv-dtype", "int3"], "'int3' is not one the accounting knows"),
        (["llama-7b-mha", "--kv-memory", "1GiB"], "is a stock model: say which key rank"),
        (["llama-7b-mha", "--rank", "32", "--kv-memory", "1GiB", "--block-size", "0"], "--block-size must be a positive"),
        (["--rank", "32", "--kv-memory", "1GiB"], "say which model to plan for"),
    ],
)
def test_bad_input_is_a_clean_error(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("thinkeys plan: error: ")
    assert message in err
    assert "Traceback" not in err


def test_unreadable_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["plan", str(tmp_path), "--rank", "8", "--kv-memory", "1GiB"]) == 2
    assert "not a readable JSON config" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["plan", str(tmp_path), "--rank", "8", "--kv-memory", "1GiB"]) == 2
    assert "no layer or attention-head count" in capsys.readouterr().err


def test_gemma3_sliding_layers_counted_as_vllms_hybrid_manager_allocates_them():
    """Gemma 3 270M, bf16, block 128, 32K context, 1 GiB, 2,048 tokens in flight, worked by hand from vLLM's rules:
    15 sliding + 3 full layers -> 6 groups of 3 layers; a block is 3 pages; a request holds 256 blocks in the full
    group and cdiv(min(511 + 2048, 32768), 128) + 1 = 21 in each of the 5 sliding groups = 361 blocks."""
    stock_page, thin_page = 128 * 1 * (256 + 256) * 2, 128 * 1 * (64 + 256) * 2
    plan = make_plan("gemma-3-270m", rank=64, kv_memory="1GiB", context="32K", block_size=128, max_in_flight_tokens=2048)
    assert (plan.per_user_bytes.stock, plan.per_user_bytes.thin) == (361 * 3 * stock_page, 361 * 3 * thin_page)
    assert plan.max_concurrency.stock == (2**30 // (3 * stock_page)) / 361
    assert plan.max_concurrency.thin == (2**30 // (3 * thin_page)) / 361
    assert any("15 of 18 layers attend within 512 tokens" in note for note in plan.notes)
    every_layer = make_plan(
        "gemma-3-270m", rank=64, kv_memory="1GiB", context="32K", block_size=128, hybrid_kv_cache_manager=False
    )
    assert every_layer.per_user_bytes.stock == 256 * 18 * stock_page  # --disable-hybrid-kv-cache-manager: all layers full
    assert every_layer.max_concurrency.stock == (2**30 // (18 * stock_page)) / 256
