"""The plain-PyTorch thin-key reference model: exact at full rank, trainable q/k, cache, strict loading, saving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_gpt2, make_tiny_llama, make_tiny_qwen2
from transformers import AutoModelForCausalLM

from thinkeys.checkpoint import ThinKeyError
from thinkeys.convert.convert import convert_checkpoint
from thinkeys.reference import ThinAttention, ThinGPT2Attention, load_thin_model, save_thin_model, thin_qk_parameters

SOURCES = {
    "llama-gqa": lambda d: make_tiny_llama(d, heads=4, kv_heads=2),
    "llama-tied": lambda d: make_tiny_llama(d, heads=6, kv_heads=2, hidden=192, tie_word_embeddings=True, seed=2),
    "mistral": lambda d: make_tiny_llama(d, arch="MistralForCausalLM", heads=8, kv_heads=2, hidden=256, seed=1),
    "qwen2-biases": lambda d: make_tiny_qwen2(d),
    "gpt2": lambda d: make_tiny_gpt2(d),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {name: build(root / name) for name, build in SOURCES.items()}


@pytest.fixture(scope="module")
def full_rank(sources, tmp_path_factory) -> dict[str, Path]:
    """Every source converted at r = head_dim ('pairs' for RoPE models, 'none' for GPT-2): the identity."""
    root = tmp_path_factory.mktemp("full")
    return {name: convert_checkpoint(src, root / name, 32, progress=False) for name, src in sources.items()}


@pytest.fixture(scope="module")
def thin16(sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("r16")
    return {name: convert_checkpoint(sources[name], root / name, 16, progress=False) for name in ("llama-gqa", "gpt2")}


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 40 tokens, the second left-padded by 7 (its mask is 0 there)."""
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_full_rank_reference_equals_the_source_model(name, sources, full_rank):
    ids, mask = batch()
    source = AutoModelForCausalLM.from_pretrained(sources[name], dtype=torch.float32).eval()
    thin = load_thin_model(full_rank[name])
    assert any(isinstance(m, (ThinAttention, ThinGPT2Attention)) for m in thin.modules())
    with torch.no_grad():
        expected = source(ids, attention_mask=mask).logits
        got = thin(ids, attention_mask=mask).logits
    valid = mask.bool()  # padded positions' logits are meaningless in both models
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_gradients_reach_only_what_is_trained_and_a_step_lowers_the_loss(name, thin16):
    model = load_thin_model(thin16[name]).train()
    trained = thin_qk_parameters(model)
    assert len(trained) == {"llama-gqa": 2 * 2, "gpt2": 2 * 4}[name]  # layers x (q, k) x (weight [, bias])
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    ids, _ = batch()
    optimizer = torch.optim.SGD(trained, lr=0.05)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    optimizer.step()
    with torch.no_grad():
        assert model(ids, labels=ids).loss < loss.detach()


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_incremental_decoding_with_thin_cache_matches_a_full_forward(name, thin16):
    model = load_thin_model(thin16[name])
    ids, _ = batch()
    ids = ids[:1]
    with torch.no_grad():
        full = model(ids).logits  # [1, 40, V]
        out = model(ids[:, :30], use_cache=True)
        steps = [out.logits[:, -1]]
        cache = out.past_key_values
        for t in range(30, 40):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    assert cache.layers[0].keys.shape[-1] == 16 and cache.layers[0].values.shape[-1] == 32  # thin keys cached
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 29:], atol=1e-4, rtol=0)


def test_bfloat16_keeps_rope_frequencies_in_float32(thin16):
    model = load_thin_model(thin16["llama-gqa"], dtype=torch.bfloat16)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.dtype == torch.bfloat16
    assert attn.thin_rope_freqs.dtype == torch.float32
    stored = load_file(thin16["llama-gqa"] / "model.safetensors")["model.layers.0.self_attn.thin_rope_freqs"]
    assert torch.equal(attn.thin_rope_freqs, stored)
    ids, _ = batch()
    with torch.no_grad():
        low = model(ids).logits.float()
        high = load_thin_model(thin16["llama-gqa"])(ids).logits
    assert (low - high).abs().max() < 0.1


def _copy_with(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_strict_loading_names_what_is_wrong(thin16, sources, tmp_path):
    good = thin16["llama-gqa"]
    extra = _copy_with(good, tmp_path / "extra", lambda s: s.update(stray=torch.zeros(3)))
    with pytest.raises(ThinKeyError, match="tensor\\(s\\) the thin model does not have: stray"):
        load_thin_model(extra)

    missing = _copy_with(good, tmp_path / "missing", lambda s: s.pop("model.layers.1.self_attn.thin_rope_freqs"))
    with pytest.raises(ThinKeyError, match="missing from the checkpoint: model.layers.1.self_attn.thin_rope_freqs"):
        load_thin_model(missing)

    wrong_rank = tmp_path / "rank"
    shutil.copytree(good, wrong_rank)
    config = json.loads((wrong_rank / "config.json").read_text())
    config["thin_keys"]["rank"] = config["thin_keys"]["rope_dims"] = 8
    (wrong_rank / "config.json").write_text(json.dumps(config))
    with pytest.raises(ThinKeyError, match=r"[qk]_proj.weight has shape \[\d+, 128\], but config.json \(thin_keys rank 8\) implies"):
        load_thin_model(wrong_rank)

    with pytest.raises(ThinKeyError, match="no 'thin_keys' field; this is not a thin-key checkpoint"):
        load_thin_model(sources["llama-gqa"])


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_save_round_trip_keeps_names_layout_and_values(name, thin16, tmp_path):
    model = load_thin_model(thin16[name])
    with torch.no_grad():
        thin_qk_parameters(model)[0].add_(0.01)  # as if fine-tuned
    dst = save_thin_model(model, tmp_path / "tuned", source=thin16[name])
    saved, original = load_file(dst / "model.safetensors"), load_file(thin16[name] / "model.safetensors")
    assert set(saved) == set(original)  # GPT-2: tied lm_head not duplicated, c_attn fused again
    assert all(saved[n].shape == original[n].shape for n in saved)
    assert json.loads((dst / "config.json").read_text())["thin_keys"] == json.loads((thin16[name] / "config.json").read_text())["thin_keys"]
    assert (dst / "tokenizer.json").is_file()
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(load_thin_model(dst)(ids).logits, model(ids).logits, atol=0, rtol=0)
        assert not torch.allclose(load_thin_model(thin16[name])(ids).logits, model(ids).logits)
