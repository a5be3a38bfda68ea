"""thinkeys convert: exactness where the maths says exact, truncation behaviour, the output folder, refusals.

Logits are compared between the source model (transformers) and the converted checkpoint run
through the plain-PyTorch reference (thinkeys.reference), on tiny random-weight models.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_gpt2, make_tiny_llama, make_tiny_qwen2
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from thinkeys import hf_io
from thinkeys.checkpoint import SUPPORTED_SOURCES, RopeStrategy, ThinKeyConfig, ThinKeyError, rope_freqs_name
from thinkeys.cli import main as thinkeys_main
from thinkeys.convert.convert import convert_checkpoint
from thinkeys.reference import load_thin_model
from thinkeys.rope import default_inv_freq

HEAD_DIM = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {
        "llama": make_tiny_llama(root / "llama"),
        "qwen2": make_tiny_qwen2(root / "qwen2"),
        "gpt2": make_tiny_gpt2(root / "gpt2"),
    }


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(7))


def logits_of_source(src: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def logits_of_thin(dst: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_thin_model(dst)(ids).logits


def leftovers(parent: Path, name: str) -> list[str]:
    """The destination and any temporary folder a conversion to ``parent / name`` may have left."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


# --- exactness and truncation ----------------------------------------------------------------


def test_gpt2_svd_is_exact_at_full_rank_and_error_shrinks_with_rank(models, input_ids, tmp_path):
    expected = logits_of_source(models["gpt2"], input_ids)
    errors = {}
    for rank in (4, 8, 16, 24, 32):
        dst = convert_checkpoint(models["gpt2"], tmp_path / f"r{rank}", rank, progress=False)
        assert ThinKeyConfig.from_pretrained(dst).rope == RopeStrategy.NONE
        errors[rank] = (logits_of_thin(dst, input_ids) - expected).abs().mean().item()
    ranks = sorted(errors)
    assert all(errors[a] > errors[b] for a, b in zip(ranks, ranks[1:])), errors
    assert errors[4] > 1e-2, errors  # truncation really changes the model
    assert errors[32] < 1e-5, errors


def _zero_dropped_pairs(src: Path, dst: Path, kept: list[list[int]], heads: int, kv_heads: int) -> None:
    """Copy ``src`` to ``dst`` with the q/k rows (and biases) of every rotary pair not in ``kept[g]`` zeroed."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    half, group = HEAD_DIM // 2, heads // kv_heads
    for name in [n for n in state if n.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"))]:
        t = state[name].clone()
        n_heads = heads if ".q_proj." in name else kv_heads
        t = t.view(n_heads, HEAD_DIM, *t.shape[1:])
        for h in range(n_heads):
            g = h // group if ".q_proj." in name else h
            dropped = [p for p in range(half) if p not in kept[g]]
            t[h, dropped] = 0
            t[h, [p + half for p in dropped]] = 0
        state[name] = t.reshape(-1, *t.shape[2:])
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})


def test_pairs_below_full_rank_is_exact_when_the_dropped_pairs_are_zero(models, input_ids, tmp_path):
    # Qwen2: GQA (4 query heads on 2 KV heads) with q/k/v biases; each KV head keeps different pairs.
    kept = [[0, 2, 3, 7, 8, 11, 14, 15], [1, 4, 5, 6, 9, 10, 12, 13]]
    src = tmp_path / "qwen2-sparse"
    _zero_dropped_pairs(models["qwen2"], src, kept, heads=4, kv_heads=2)
    dst = convert_checkpoint(src, tmp_path / "thin", 16, rope="pairs", progress=False)

    freqs = load_file(dst / "model.safetensors")[rope_freqs_name("model.layers.0")]
    inv_freq = default_inv_freq(HEAD_DIM, 10000.0)
    assert torch.equal(freqs, torch.stack([inv_freq[k] for k in kept]))  # original frequencies, per KV head
    torch.testing.assert_close(logits_of_thin(dst, input_ids), logits_of_source(src, input_ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
    ids=["linear", "llama3"],
)
def test_rope_scaling_is_carried_exactly(rope_parameters, input_ids, tmp_path):
    src = make_tiny_llama(tmp_path / "src", layers=1, rope_parameters=rope_parameters)
    dst = convert_checkpoint(src, tmp_path / "thin", HEAD_DIM, progress=False)
    freqs = load_file(dst / "model.safetensors")[rope_freqs_name("model.layers.0")]
    assert not torch.allclose(freqs[0], default_inv_freq(HEAD_DIM, rope_parameters["rope_theta"]))  # scaled
    torch.testing.assert_close(logits_of_thin(dst, input_ids), logits_of_source(src, input_ids), atol=1e-4, rtol=0)


def test_svd_rope_uses_the_first_base_frequencies_and_is_approximate(models, input_ids, tmp_path):
    dst = convert_checkpoint(models["llama"], tmp_path / "thin", 16, rope="svd", progress=False)
    thin = ThinKeyConfig.from_pretrained(dst)
    assert (thin.rope, thin.rank, thin.rope_dims) == (RopeStrategy.SVD, 16, 16)
    freqs = load_file(dst / "model.safetensors")[rope_freqs_name("model.layers.1")]
    assert torch.equal(freqs, default_inv_freq(HEAD_DIM, 10000.0)[:8].expand(2, -1))
    error = (logits_of_thin(dst, input_ids) - logits_of_source(models["llama"], input_ids)).abs().max()
    assert 1e-3 < error < 50  # a working model, not the source


# --- the output folder -----------------------------------------------------------------------


def test_converted_folder_is_a_complete_hf_checkpoint(models, tmp_path):
    dst = convert_checkpoint(models["qwen2"], tmp_path / "thin", 8, dtype="bfloat16", progress=False)
    config = AutoConfig.from_pretrained(dst)
    thin = ThinKeyConfig.from_hf_config(config)
    assert config.architectures == [SUPPORTED_SOURCES["Qwen2ForCausalLM"].thin_architecture]
    assert (thin.rank, thin.head_dim, thin.rope, thin.rope_dims) == (8, HEAD_DIM, RopeStrategy.PAIRS, 8)
    raw = json.loads((dst / "config.json").read_text())
    assert raw["head_dim"] == HEAD_DIM and raw["dtype"] == "bfloat16"

    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    assert (dst / "generation_config.json").is_file()

    state = load_file(dst / "model.safetensors")
    source = load_file(models["qwen2"] / "model.safetensors")
    assert set(state) == set(source) | {rope_freqs_name(f"model.layers.{i}") for i in range(2)}
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 8, 128)
    assert state["model.layers.0.self_attn.k_proj.bias"].shape == (2 * 8,)
    assert state["model.layers.0.self_attn.v_proj.weight"].shape == (2 * HEAD_DIM, 128)
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert state[rope_freqs_name("model.layers.0")].dtype == torch.float32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_gpt2_keeps_the_fused_conv1d_layout(models, tmp_path):
    dst = convert_checkpoint(models["gpt2"], tmp_path / "thin", 8, progress=False)
    state = load_file(dst / "model.safetensors")
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (128, 4 * 8 + 4 * 8 + 4 * HEAD_DIM)
    assert state["transformer.h.0.attn.c_attn.bias"].shape == (4 * 8 + 4 * 8 + 4 * HEAD_DIM,)
    assert not [n for n in state if n.endswith("thin_rope_freqs")]
    source = load_file(models["gpt2"] / "model.safetensors")
    assert torch.equal(state["transformer.h.1.attn.c_attn.weight"][:, 64:], source["transformer.h.1.attn.c_attn.weight"][:, 256:])


def test_force_replaces_an_existing_destination(models, tmp_path):
    dst = tmp_path / "thin"
    convert_checkpoint(models["llama"], dst, 16, progress=False)
    convert_checkpoint(models["llama"], dst, 8, force=True, progress=False)
    assert ThinKeyConfig.from_pretrained(dst).rank == 8
    assert leftovers(tmp_path, "thin") == ["thin"]


def test_cli_prints_a_summary(models, tmp_path, capsys):
    assert thinkeys_main(["convert", str(models["llama"]), str(tmp_path / "thin"), "--rank", "16", "--rope", "pairs"]) == 0
    out = capsys.readouterr().out
    assert "ThinKeyLlamaForCausalLM" in out and "keys are 16 wide instead of 32" in out
    assert "KV cache per token: 1,024 -> 768 bytes" in out  # 2 layers x 2 KV heads x (32 + 32 | 16 + 32) x 4 bytes


# --- refusals --------------------------------------------------------------------------------


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


REFUSALS = {
    "rank zero": (lambda m, t: (m["llama"], {"rank": 0}), "rank 0 is out of range: choose 1 <= rank <= head_dim (32)"),
    "rank above head_dim": (lambda m, t: (m["llama"], {"rank": 33}), "rank 33 is out of range"),
    "odd rank with rope": (lambda m, t: (m["qwen2"], {"rank": 15}), "rank 15 is odd"),
    "odd rank with svd rope": (lambda m, t: (m["llama"], {"rank": 9, "rope": "svd"}), "rank 9 is odd"),
    "rope on gpt2": (lambda m, t: (m["gpt2"], {"rank": 8, "rope": "svd"}), "has no rotary embedding"),
    "pairs on gpt2": (lambda m, t: (m["gpt2"], {"rank": 8, "rope": "pairs"}), "has no rotary embedding"),
    "none on llama": (lambda m, t: (m["llama"], {"rank": 8, "rope": "none"}), "uses RoPE: choose --rope pairs"),
    "bad dtype": (lambda m, t: (m["llama"], {"rank": 8, "dtype": "float64"}), "--dtype 'float64' is not one of"),
    "unsupported architecture": (
        lambda m, t: (_edit_config(m["llama"], t / "falcon", architectures=["FalconForCausalLM"]), {"rank": 8}),
        "is not supported; supported: GPT2LMHeadModel, Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
    ),
    "mistral sliding window": (
        lambda m, t: (_edit_config(m["llama"], t / "msw", architectures=["MistralForCausalLM"], sliding_window=64), {"rank": 8}),
        "MistralForCausalLM with sliding-window layers is not supported",
    ),
    "yarn rope": (
        lambda m, t: (
            _edit_config(m["llama"], t / "yarn", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
            {"rank": 8},
        ),
        "an attention factor != 1",
    ),
    "dynamic rope": (
        lambda m, t: (
            _edit_config(m["llama"], t / "dyn", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
            {"rank": 8},
        ),
        "rope_type 'dynamic' changes its frequencies",
    ),
    "quantized": (
        lambda m, t: (_edit_config(m["llama"], t / "q", quantization_config={"quant_method": "gptq"}), {"rank": 8}),
        "quantized checkpoints cannot be factored",
    ),
    "missing config": (lambda m, t: (t / "empty", {"rank": 8}), "config.json: missing"),
    "missing weights": (lambda m, t: (_without(m["llama"], t / "now", "model.safetensors"), {"rank": 8}), "no weights found"),
    "missing tokenizer": (lambda m, t: (_without(m["llama"], t / "notok", "tokenizer.json"), {"rank": 8}), "no tokenizer"),
    "destination inside source": (lambda m, t: (m["llama"], {"rank": 8, "dst": m["llama"] / "thin"}), "must be a separate folder"),
}


def _without(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    (dst / name).unlink()
    return dst


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_problem_and_leave_nothing(case, models, tmp_path):
    (tmp_path / "empty").mkdir()
    make_case, message = REFUSALS[case]
    src, kwargs = make_case(models, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dst = kwargs.pop("dst", out / "thin")
    with pytest.raises(ThinKeyError, match=re.escape(message)):
        convert_checkpoint(src, dst, progress=False, **kwargs)
    assert not Path(dst).exists()
    assert leftovers(out, "thin") == []


def test_already_converted_input_is_refused(models, tmp_path):
    thin = convert_checkpoint(models["llama"], tmp_path / "thin", 16, progress=False)
    with pytest.raises(ThinKeyError, match="already a thin-key checkpoint"):
        convert_checkpoint(thin, tmp_path / "again", 8, progress=False)
    assert leftovers(tmp_path, "again") == []


def test_existing_destination_is_refused_and_kept(models, tmp_path):
    dst = tmp_path / "thin"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ThinKeyError, match="already exists; choose another destination or pass --force"):
        convert_checkpoint(models["llama"], dst, 8, progress=False)
    assert (dst / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path, "thin") == ["thin"]


def test_a_failure_while_writing_leaves_no_destination(models, tmp_path, monkeypatch):
    def disk_full(state, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_io, "save_state_dict", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(models["llama"], tmp_path / "thin", 8, progress=False)
    assert leftovers(tmp_path, "thin") == []


def test_cli_reports_refusals_in_one_line(models, tmp_path, capsys):
    code = thinkeys_main(["convert", str(models["gpt2"]), str(tmp_path / "thin"), "--rank", "64"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "thinkeys convert: error: rank 64 is out of range: choose 1 <= rank <= head_dim (32)"
    assert not (tmp_path / "thin").exists()
