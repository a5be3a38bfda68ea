"""Shipped recovered weights (thinkeys.recovered), chat fidelity scoring and the held-out text readers.

Tiny random models built here; a "recovered" checkpoint is simulated by perturbing a conversion's
thin q/k weights (what recovery changes), so the delta must carry exactly those tensors.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_llama

from thinkeys import hf_io
from thinkeys.checkpoint import ThinKeyError
from thinkeys.cli import main as thinkeys_main
from thinkeys.convert.convert import convert_checkpoint
from thinkeys.evaluate.chat import chat_fidelity, loops
from thinkeys.heldout import read_ztext
from thinkeys.recovered import apply_delta, make_delta, read_manifest


@pytest.fixture(scope="module")
def recovered(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recovered")
    base = make_tiny_llama(root / "base", tie_word_embeddings=True)
    thin = convert_checkpoint(base, root / "thin", 8, rope="pairs", progress=False)
    state = hf_io.load_state_dict(thin)
    gen = torch.Generator().manual_seed(0)
    for name in [n for n in state if n.endswith(("q_proj.weight", "k_proj.weight"))]:
        state[name] = state[name] + 0.01 * torch.randn(state[name].shape, generator=gen).to(state[name].dtype)
    save_file(state, thin / "model.safetensors")
    return {"base": base, "thin": thin, "root": root}


def _make(recovered: dict[str, Path], out: Path) -> None:
    make_delta(recovered["thin"], recovered["base"], out, license="Apache-2.0 (test)", regenerate="pytest",
               figures={"ppl": 1.0}, base_model="tiny llama")


def test_delta_holds_only_what_recovery_changed_and_rebuilds_the_checkpoint_exactly(recovered, tmp_path):
    delta = tmp_path / "d" / "tiny.safetensors"
    _make(recovered, delta)
    names = set(load_file(delta))
    assert names and all(n.endswith(("q_proj.weight", "k_proj.weight", "thin_rope_freqs")) for n in names), names
    manifest = read_manifest(delta)
    assert manifest.delta_sha256 == hf_io.sha256_file(delta) and manifest.thin_keys["rank"] == 8
    assert sorted(p.name for p in delta.parent.iterdir()) == ["tiny.json", "tiny.safetensors"]  # no temp files left

    out = tmp_path / "rebuilt"
    assert thinkeys_main(["recovered", "apply", str(delta), "--base", str(recovered["base"]), "--out", str(out)]) == 0
    want, got = hf_io.load_state_dict(recovered["thin"]), hf_io.load_state_dict(out)
    assert set(want) == set(got)
    assert all(torch.equal(want[n], got[n]) for n in want)
    cfg_want = json.loads((recovered["thin"] / "config.json").read_text())
    cfg_got = json.loads((out / "config.json").read_text())
    assert cfg_got["thin_keys"] == cfg_want["thin_keys"] and cfg_got["architectures"] == cfg_want["architectures"]
    assert (out / "tokenizer.json").is_file()


def test_a_damaged_delta_or_another_base_is_refused_and_nothing_is_written(recovered, tmp_path, capsys):
    delta = tmp_path / "tiny.safetensors"
    _make(recovered, delta)
    other = make_tiny_llama(tmp_path / "other", seed=1, tie_word_embeddings=True)
    with pytest.raises(ThinKeyError, match="not the base model"):
        apply_delta(delta, other, tmp_path / "out1")
    assert not (tmp_path / "out1").exists()

    raw = bytearray(delta.read_bytes())
    raw[-1] ^= 0xFF
    delta.write_bytes(bytes(raw))
    assert thinkeys_main(["recovered", "apply", str(delta), "--base", str(recovered["base"]), "--out", str(tmp_path / "out2")]) == 2
    assert "does not match its manifest" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()

    delta.with_suffix(".json").unlink()
    with pytest.raises(ThinKeyError, match="manifest .* is missing"):
        apply_delta(delta, recovered["base"], tmp_path / "out3")


def test_low_rank_delta_stores_factors_of_the_query_change_and_rebuilds_it(recovered, tmp_path):
    """--low-rank K: a rebuild checkpoint whose d-wide q_proj changed by a rank-K update ships that change as
    two thin factors; apply rebuilds the checkpoint (to float rounding); a checkpoint without such a tensor is refused."""
    thin = convert_checkpoint(recovered["base"], tmp_path / "rebuild", 8, rope="rebuild", progress=False)
    state = hf_io.load_state_dict(thin)
    gen = torch.Generator().manual_seed(1)
    queries = [n for n in state if n.endswith("q_proj.weight")]
    for name in queries:
        out_f, in_f = state[name].shape
        state[name] = state[name] + 0.01 * torch.randn(out_f, 2, generator=gen) @ torch.randn(2, in_f, generator=gen)
    save_file(state, thin / "model.safetensors")
    delta = tmp_path / "d" / "low.safetensors"
    make_delta(thin, recovered["base"], delta, license="Apache-2.0 (test)", regenerate="pytest", low_rank=2)
    stored = load_file(delta)
    assert not any(n in stored for n in queries)
    assert all(stored[n + ".low_rank_u"].shape == (state[n].shape[0], 2) for n in queries)
    assert all(stored[n + ".low_rank_v"].shape == (2, state[n].shape[1]) for n in queries)
    manifest = read_manifest(delta)
    assert manifest.low_rank == 2 and manifest.low_rank_kept > 0.999999

    out = tmp_path / "rebuilt"
    assert thinkeys_main(["recovered", "apply", str(delta), "--base", str(recovered["base"]), "--out", str(out)]) == 0
    got = hf_io.load_state_dict(out)
    assert set(got) == set(state)
    for name, want in state.items():
        if name in queries:
            torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got[name], want), name

    other = make_tiny_llama(tmp_path / "other", seed=1, tie_word_embeddings=True)
    with pytest.raises(ThinKeyError, match="not the base model"):  # the factored tensors' base is checked too
        apply_delta(delta, other, tmp_path / "out2")
    with pytest.raises(ThinKeyError, match="no changed tensor .* keeps its base shape"):
        make_delta(recovered["thin"], recovered["base"], tmp_path / "e" / "x.safetensors", license="x", regenerate="x",
                   low_rank=2)
    assert not (tmp_path / "e" / "x.safetensors").exists()


def test_the_shipped_deltas_match_their_manifests():
    from thinkeys.recovered import DEFAULT_DELTA, SHIPPED_DIR, shipped_delta

    assert shipped_delta("r32-rebuild") == DEFAULT_DELTA and DEFAULT_DELTA.is_file()
    for delta in sorted(SHIPPED_DIR.glob("*.safetensors")):
        manifest = read_manifest(delta)
        assert hf_io.sha256_file(delta) == manifest.delta_sha256, delta
        assert manifest.delta_bytes < 20e6 and "Apache-2.0" in manifest.license
        assert manifest.regenerate.startswith("make recover-default")
        rank, rope = manifest.thin_keys["rank"], manifest.thin_keys["rope"]
        assert delta.name.endswith(f"-r{rank}-{rope}.safetensors") and shipped_delta(f"r{rank}-{rope}") == delta
        assert set(manifest.figures["ppl"]) == {"wiki", "kjv", "fortunes"}  # measured on held-out text
    with pytest.raises(ThinKeyError, match="no shipped recovered weights named 'r8-svd'"):
        shipped_delta("r8-svd")


def test_chat_fidelity_of_a_model_on_its_own_greedy_answers(recovered, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thinkeys.chat_data import render_prompt

    base = recovered["base"]
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    refs = tmp_path / "eval.jsonl"
    with open(refs, "w") as f:
        for prompt in ("hello there", "what is the time"):
            ids = render_prompt(tok, prompt)
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
            f.write(json.dumps({"prompt": prompt, "answer_ids": out[0, len(ids):].tolist()}) + "\n")
    own = chat_fidelity(base, refs, max_new_tokens=12)
    assert own.top1 == 1.0 and own.prompts == 2 and own.answer_tokens > 0  # greedy answers are its own argmax
    # the engine's greedy answers (default) are transformers' greedy answers
    by_torch = chat_fidelity(base, refs, max_new_tokens=12, generator="torch")
    assert [a.greedy for a in own.answers] == [a.greedy for a in by_torch.answers]
    assert [a.greedy_loops for a in own.answers] == [a.greedy_loops for a in by_torch.answers]
    other = chat_fidelity(recovered["thin"], refs, generate=False)
    assert other.top1 < 1.0 and other.loops is None and other.answer_ppl > 1.0  # a different model disagrees somewhere


def test_loop_detection():
    assert loops([1, 2, 3, 4, 5, 6] * 3)
    assert not loops(list(range(40)))
    assert not loops([1, 2, 3, 4, 5, 6] * 2)


def test_ztext_reader_joins_blocks_and_strips_markup(tmp_path):
    blocks = [b'<verse osisID="Acts.1.1">The former treatise <w lemma="x">have</w> I made , O Theophilus :</verse>',
              b"<verse>And the second .</verse>"]
    index, blob = b"", b""
    for raw in blocks:
        packed = zlib.compress(raw)
        index += struct.pack("<III", len(blob), len(packed), len(raw))
        blob += packed
    (tmp_path / "nt.bzs").write_bytes(index)
    (tmp_path / "nt.bzz").write_bytes(blob)
    assert read_ztext(tmp_path) == "The former treatise have I made, O Theophilus: And the second."
