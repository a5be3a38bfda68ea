"""Data-aware conversion strategies: calibration statistics, the joint q/k low-rank fit, calibrated
``pairs``, ``mixed`` (kept rotary pairs + unrotated low-rank part) and the PyTorch-only rebuild-at-read
variants: exactness where the maths says exact, the format they write, and refusals.

Tiny random-weight Llama models and a few paragraphs of text written at test time; the plugin serving
any of these checkpoints is the primitive covered by tests/test_engine.py (frequency-0 slots are
ordinary rotary slots that do not turn).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import _TRAINING_TEXT, make_tiny_llama, make_tiny_qwen2
from transformers import AutoModelForCausalLM

from thinkeys.checkpoint import RopeStrategy, ThinKeyConfig, ThinKeyError, rope_freqs_name
from thinkeys.cli import main as thinkeys_main
from thinkeys.convert.calibration import Calibration, collect_calibration, qk_moments, token_windows
from thinkeys.convert.convert import PROVENANCE_KEY, convert_checkpoint
from thinkeys.convert.families import Geometry, LlamaLayout
from thinkeys.convert.mixed import plan_head
from thinkeys.convert.rebuild import REBUILD_KINDS, rebuild_model
from thinkeys.convert.weighted import joint_lowrank
from thinkeys.reference import load_thin_model
from thinkeys.rope import default_inv_freq

HEAD_DIM = 32


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "tune.txt"
    path.write_text(_TRAINING_TEXT * 6)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {
        # theta 1e6 at head dim 32: the slowest pairs turn < 1 rad over 2048 tokens, so 'mixed' has an unrotated part
        "llama": make_tiny_llama(root / "llama", rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        "qwen2": make_tiny_qwen2(root / "qwen2"),
    }


@pytest.fixture(scope="module")
def calibrations(sources, text) -> dict[str, Calibration]:
    return {name: collect_calibration(src, text, tokens=256, window=64, progress=False) for name, src in sources.items()}


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(11))


def source_logits(src: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits


def thin_logits(dst: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_thin_model(dst)(ids).logits


# --- calibration ---------------------------------------------------------------------------------


def test_calibration_moments_match_a_direct_computation(sources, calibrations, text, tmp_path):
    """The stored moments are those of the real attention inputs, and q/k moments follow from them exactly."""
    src = sources["llama"]
    cal = calibrations["llama"]
    assert cal.tokens == 256 and cal.num_layers == 2
    # recompute layer 1's attention inputs directly with a hook
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(src)(text.read_text(), add_special_tokens=False)["input_ids"]
    windows = token_windows(ids, 64, 4)
    seen = []
    model.model.layers[1].self_attn.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"][0]), with_kwargs=True)
    with torch.no_grad():
        for row in windows:
            model(input_ids=row[None])
    x = torch.cat(seen).double()  # [256, D]
    torch.testing.assert_close(cal.mean[1], x.mean(0))
    torch.testing.assert_close(cal.moment[1], x.T @ x / len(x))

    geo = Geometry.from_config(model.config)
    state = dict(model.state_dict())
    qk = LlamaLayout(geo, state).read(state, 1)
    m = qk_moments(qk, cal.mean[1], cal.moment[1])
    k = (x @ qk.k_weight.double().reshape(-1, geo.hidden).T).reshape(len(x), geo.num_kv_heads, HEAD_DIM)
    q = (x @ qk.q_weight.double().reshape(-1, geo.hidden).T).reshape(len(x), geo.num_heads, HEAD_DIM)
    torch.testing.assert_close(m.k_mean, k.mean(0))
    torch.testing.assert_close(m.k_moment, torch.einsum("tgd,tge->gde", k, k) / len(x))
    group = geo.num_heads // geo.num_kv_heads
    q_mom = torch.einsum("thd,the->hde", q, q).reshape(geo.num_kv_heads, group, HEAD_DIM, HEAD_DIM).sum(1) / len(x)
    torch.testing.assert_close(m.q_moment, q_mom)

    saved = Calibration.load(cal.save(tmp_path / "cal.safetensors"))
    torch.testing.assert_close(saved.moment, cal.moment)
    assert saved.describe() == cal.describe()


def test_token_windows_are_spread_over_the_text_and_refuse_too_little():
    ids = list(range(1000))
    w = token_windows(ids, 100, 4)
    assert w[:, 0].tolist() == [0, 300, 600, 900]
    assert sorted(token_windows(ids, 100, None, seed=1)[:, 0].tolist()) == list(range(0, 1000, 100))
    with pytest.raises(ThinKeyError, match="only 1,000 tokens"):
        token_windows(ids, 100, 11)


# --- the joint low-rank fit -------------------------------------------------------------------------


def test_joint_lowrank_is_exact_at_full_rank_and_its_residual_is_the_real_error():
    gen = torch.Generator().manual_seed(0)
    n, samples = 12, 200_000
    mix_q = torch.randn(n, n, generator=gen, dtype=torch.float64) * torch.logspace(0, -1.5, n, dtype=torch.float64)
    mix_k = torch.randn(n, n, generator=gen, dtype=torch.float64) * torch.logspace(0, -1, n, dtype=torch.float64)
    q = torch.randn(samples, n, generator=gen, dtype=torch.float64) @ mix_q.T
    k = torch.randn(samples, n, generator=gen, dtype=torch.float64) @ mix_k.T
    sq, sk = q.T @ q / samples, k.T @ k / samples

    full = joint_lowrank(sq, sk, n)
    torch.testing.assert_close(full.a.T @ full.b, torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)

    rank = 4
    fit = joint_lowrank(sq, sk, rank)
    k2 = torch.randn(samples, n, generator=gen, dtype=torch.float64) @ mix_k.T  # keys of other tokens
    err = ((q * k2).sum(-1) - ((q @ fit.a.T) * (k2 @ fit.b.T)).sum(-1)).pow(2).mean()
    assert abs(float(err) / fit.residual() - 1) < 0.05
    # and it beats the plain SVD of the key side alone (same rank), which ignores the queries
    u = torch.linalg.eigh(sk).eigenvectors.flip(-1)[:, :rank]
    err_pca = ((q * k2).sum(-1) - ((q @ u) * (k2 @ u)).sum(-1)).pow(2).mean()
    assert err < err_pca


def test_plan_head_covers_every_pair_once_and_keeps_everything_at_full_rank():
    d = HEAD_DIM
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(d, 3 * d, generator=gen, dtype=torch.float64), torch.randn(d, 3 * d, generator=gen, dtype=torch.float64)
    sq, sk = a @ a.T, b @ b.T
    inv_freq = default_inv_freq(d, 1e6).double()
    for rank in (4, 8, 16):
        plan = plan_head(sq, sk, sk, inv_freq, rank, nope_context=2048)
        covered = [j for band in plan.bands for j in band.pairs] + plan.unrotated.pairs + plan.dropped
        assert sorted(covered) == list(range(d // 2))
        assert 2 * plan.slots_used + plan.unrotated_rank <= rank
        for band in plan.bands:  # a shared slot turns at a frequency inside its pairs' range
            assert float(inv_freq[band.pairs].min()) <= band.freq <= float(inv_freq[band.pairs].max())
        assert 0 < plan.estimated_error < plan.estimated_total
    full = plan_head(sq, sk, sk, inv_freq, d, nope_context=2048)
    assert full.rotary == list(range(d // 2)) and full.estimated_error < 1e-9 * full.estimated_total
    calibrated_pairs = plan_head(sq, sk, sk, inv_freq, 8, nope_context=None)
    assert len(calibrated_pairs.rotary) == 4 and not calibrated_pairs.unrotated.pairs


def test_complex_band_fit_is_the_real_error_and_realises_as_real_rows():
    """A band's complex rank-c fit predicts its logit error, and its real rows compute the same slot values."""
    from thinkeys.convert.mixed import _realise, complex_lowrank, complex_moment

    gen = torch.Generator().manual_seed(0)
    d, half, samples, pairs = 16, 8, 100_000, [1, 2, 3]
    q = torch.randn(samples, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64).T
    k = torch.randn(samples, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64).T
    fit = complex_lowrank(complex_moment(q.T @ q / samples, pairs), complex_moment(k.T @ k / samples, pairs))
    z_q = torch.complex(q[:, pairs], q[:, [j + half for j in pairs]])
    z_k = torch.complex(k[:, pairs], k[:, [j + half for j in pairs]]).roll(1, 0)  # keys of other tokens
    true = (z_q * z_k.conj()).sum(-1)
    for c in (1, 2, 3):
        approx = sum((z_q @ fit.p[:, s]) * (z_k @ fit.r[:, s]).conj() for s in range(c))
        err = float((true - approx).abs().pow(2).mean())
        assert err < 1e-9 * float(true.abs().pow(2).mean()) if c == 3 else abs(err / fit.residual(c) - 1) < 0.05
    re, im = _realise(fit.p[:, 0], pairs, half, d)
    torch.testing.assert_close(torch.complex(q @ re, q @ im), z_q @ fit.p[:, 0])


# --- converted checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("rope", ["pairs", "mixed"])
def test_calibrated_strategies_are_exact_at_full_rank(name, rope, sources, calibrations, input_ids, tmp_path):
    dst = convert_checkpoint(sources[name], tmp_path / "thin", HEAD_DIM, rope=rope, calibration=calibrations[name], progress=False)
    torch.testing.assert_close(thin_logits(dst, input_ids), source_logits(sources[name], input_ids), atol=2e-5, rtol=1e-4)


def test_mixed_checkpoint_layout_and_provenance(sources, calibrations, input_ids, tmp_path):
    rank = 16
    dst = convert_checkpoint(sources["llama"], tmp_path / "mixed", rank, rope="mixed", calibration=calibrations["llama"], progress=False)
    thin = ThinKeyConfig.from_pretrained(dst)
    assert (thin.rope, thin.rank, thin.rope_dims) == (RopeStrategy.MIXED, rank, rank)
    config = json.loads((dst / "config.json").read_text())
    prov = config[PROVENANCE_KEY]
    assert prov["strategy"] == "mixed" and prov["calibration"]["tokens"] == 256 and prov["nope_context"] == 2048
    assert prov["per_head_mean"]["unrotated_dims"] > 0  # theta 1e6: slow pairs exist and are used
    state = load_file(dst / "model.safetensors")
    base = default_inv_freq(HEAD_DIM, 1e6)
    tables = torch.stack([state[rope_freqs_name(f"model.layers.{i}")] for i in range(2)])  # [L, Hkv, r/2]
    assert tables.shape == (2, 2, rank // 2)
    turning = tables[tables > 0]
    assert ((turning >= base.min() * (1 - 1e-6)) & (turning <= base.max() * (1 + 1e-6))).all()  # slots turn within the source's range
    assert (tables == 0).any()  # and the unrotated slots carry frequency 0
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (2 * rank, 128)
    # a working approximation: closer to the source than the same model with its q/k zeroed (uniform attention)
    expected = source_logits(sources["llama"], input_ids)
    err = (thin_logits(dst, input_ids) - expected).pow(2).mean()
    blind = load_thin_model(dst)
    with torch.no_grad():
        for name, p in blind.named_parameters():
            if ".q_proj." in name or ".k_proj." in name:
                p.zero_()
        err_blind = (blind(input_ids).logits - expected).pow(2).mean()
    assert err < 0.8 * err_blind, (err, err_blind)


def _structured_llama(dst: Path) -> Path:
    """A tiny Llama whose keys/queries live in 2 fast pairs plus a rank-2 mix of the 6 slowest pairs.

    That is the structure ``mixed`` is built for (real models concentrate key energy similarly): at
    r = 8 (4 slots) it fits exactly, while keeping whole pairs must drop some of the slow ones.
    """
    from safetensors.torch import save_file

    src = make_tiny_llama(dst, layers=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, seed=5)
    state = load_file(src / "model.safetensors")
    gen = torch.Generator().manual_seed(5)
    half = HEAD_DIM // 2
    fast, slow = [0, 1], list(range(half - 6, half))
    for name, heads in (("q_proj", 4), ("k_proj", 2)):
        w = state[f"model.layers.0.self_attn.{name}.weight"].reshape(heads, HEAD_DIM, -1)
        keep = torch.zeros_like(w)
        for dims in (fast, [j + half for j in fast]):
            keep[:, dims] = w[:, dims]
        slow_dims = slow + [j + half for j in slow]
        basis = torch.randn(2, w.shape[-1], generator=gen) * 0.3  # rank 2 across the 12 slow dims
        keep[:, slow_dims] = torch.randn(heads, len(slow_dims), 2, generator=gen) @ basis
        state[f"model.layers.0.self_attn.{name}.weight"] = keep.reshape(heads * HEAD_DIM, -1).contiguous()
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    return src


def test_mixed_beats_kept_pairs_where_key_energy_is_in_slow_low_rank_directions(text, input_ids, tmp_path):
    src = _structured_llama(tmp_path / "structured")
    cal = collect_calibration(src, text, tokens=256, window=64, progress=False)
    expected = source_logits(src, input_ids)
    errors = {}
    for rope, calibration in (("pairs", None), ("pairs", cal), ("mixed", cal)):
        dst = convert_checkpoint(src, tmp_path / f"{rope}-{calibration is not None}", 8, rope=rope, calibration=calibration, progress=False)
        errors[(rope, calibration is not None)] = float((thin_logits(dst, input_ids) - expected).pow(2).mean())
    assert errors[("mixed", True)] < 0.1 * min(errors[("pairs", False)], errors[("pairs", True)]), errors


@pytest.mark.parametrize("kind", REBUILD_KINDS)
def test_rebuild_models_are_the_source_at_full_rank_and_approximate_below(kind, sources, calibrations, input_ids):
    src, cal = sources["llama"], calibrations["llama"]
    expected = source_logits(src, input_ids)
    with torch.no_grad():
        full = rebuild_model(src, HEAD_DIM, kind, cal)(input_ids).logits
        low = rebuild_model(src, 4, kind, cal)(input_ids).logits
    torch.testing.assert_close(full, expected, atol=2e-5, rtol=1e-4)
    assert (low - expected).abs().max() > 1e-2


# --- refusals ----------------------------------------------------------------------------------------


def test_refusals_leave_nothing_behind(sources, calibrations, text, tmp_path):
    src = sources["llama"]
    with pytest.raises(ThinKeyError, match="--rope mixed is fitted to real activations: give --calibration"):
        convert_checkpoint(src, tmp_path / "a", 16, rope="mixed", progress=False)
    with pytest.raises(ThinKeyError, match="--calibration applies to --rope pairs, mixed or rebuild, not 'svd'"):
        convert_checkpoint(src, tmp_path / "b", 16, rope="svd", calibration=calibrations["llama"], progress=False)
    with pytest.raises(ThinKeyError, match="no such text file"):
        convert_checkpoint(src, tmp_path / "c", 16, rope="mixed", calibration=tmp_path / "missing.txt", progress=False)
    other = collect_calibration(sources["qwen2"], text, tokens=64, window=64, progress=False)
    other.mean, other.moment = other.mean[:1], other.moment[:1]
    with pytest.raises(ThinKeyError, match="calibration statistics have 1 layers"):
        convert_checkpoint(src, tmp_path / "d", 16, rope="mixed", calibration=other, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_mixed_with_calibration_text(sources, text, tmp_path, capsys):
    dst = tmp_path / "thin"
    code = thinkeys_main([
        "convert", str(sources["qwen2"]), str(dst), "--rank", "16", "--rope", "mixed",
        "--calibration", str(text), "--calibration-tokens", "128", "--nope-context", "64",
    ])
    assert code == 0
    assert "RoPE strategy 'mixed'" in capsys.readouterr().out
    assert json.loads((dst / "config.json").read_text())[PROVENANCE_KEY]["calibration"]["tokens"] == 128
    assert thinkeys_main(["convert", str(sources["qwen2"]), str(tmp_path / "x"), "--rank", "16", "--rope", "mixed"]) == 2
