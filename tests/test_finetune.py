"""thinkeys finetune: it recovers (loss falls within a few steps), trains only the thin q/k, resumes to
the same result as an uninterrupted run, and an interrupted run (Ctrl-C or SIGTERM) leaves no DST.

Tiny random-weight Llama teacher, converted at r = 8 of 32 with data-free pairs (a large, real gap to
recover), trained on a few windows of text written at test time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import _TRAINING_TEXT, make_tiny_gpt2, make_tiny_llama

from thinkeys.checkpoint import ThinKeyError
from thinkeys.convert.convert import convert_checkpoint
from thinkeys.loadtest.servers import own_process_group
from thinkeys.reference import load_thin_model
from thinkeys.train import finetune as finetune_module
from thinkeys.train.finetune import default_work_dir, finetune

#: Small but real: 2 layers x 30 layer-wise steps, then end-to-end steps cycling 3 times over the
#: text's 32-token windows (so the loss on the very same windows can be compared across epochs).
FAST = dict(window=32, layerwise_windows=4, layerwise_steps=30, layerwise_batch=2, layerwise_lr=3e-3, e2e_lr=3e-3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("finetune")
    teacher = make_tiny_llama(root / "teacher")
    student = convert_checkpoint(teacher, root / "student", 8, rope="pairs", progress=False)
    text = root / "tune.txt"
    text.write_text(_TRAINING_TEXT)
    windows = len(AutoTokenizer.from_pretrained(teacher)(_TRAINING_TEXT, add_special_tokens=False)["input_ids"]) // 32
    return {"teacher": teacher, "student": student, "text": text, "root": root, "windows": windows}


def run(setup, dst: Path, **kw):
    options = {**FAST, "e2e_steps": 3 * setup["windows"], **kw}
    return finetune(setup["student"], dst, teacher=setup["teacher"], text=setup["text"], progress=False, **options)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    dst = setup["root"] / "tuned"
    return run(setup, dst), dst


def test_finetune_reduces_the_loss_within_a_few_steps(setup, uninterrupted):
    report, dst = uninterrupted
    assert len(report.layerwise_error) == 2
    for before, after in report.layerwise_error:
        assert after < 0.8 * before, report.layerwise_error  # every layer's attention output moved toward the original
    log = [json.loads(line) for line in (Path(report.work_dir) / "log.jsonl").read_text().splitlines()]
    e2e = [r for r in log if r["stage"] == "e2e"]
    n = setup["windows"]
    assert [r["step"] for r in e2e] == list(range(3 * n))
    assert all(r["kl"] is not None and r["ce_teacher"] is not None for r in e2e)
    first, last = sum(r["kl"] for r in e2e[:n]), sum(r["kl"] for r in e2e[2 * n :])  # the same n windows, epochs 1 and 3
    assert last < 0.85 * first, (first, last)
    assert report.tokens == {"layerwise": 4 * 32, "e2e": 3 * n * 31}
    # the work folder keeps the log and a summary; the heavy state is gone once DST is written
    assert {p.name for p in Path(report.work_dir).iterdir()} == {"config.json", "log.jsonl", "summary.json"}


def test_only_thin_qk_change_and_dst_is_a_normal_thin_checkpoint(setup, uninterrupted):
    _, dst = uninterrupted
    src_state = load_file(setup["student"] / "model.safetensors")
    dst_state = load_file(dst / "model.safetensors")
    assert set(src_state) == set(dst_state)
    changed = {n for n in src_state if not torch.equal(src_state[n], dst_state[n])}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qk"}
    assert json.loads((dst / "config.json").read_text())["thin_keys"] == json.loads((setup["student"] / "config.json").read_text())["thin_keys"]
    load_thin_model(dst)  # strict load: every tensor present with its shape


def test_train_freqs_also_moves_the_rope_tables(setup, tmp_path):
    dst = tmp_path / "freqs"
    run(setup, dst, layerwise_steps=5, e2e_steps=3, train_freqs=True, freq_lr=1e-2, work_dir=tmp_path / "work")
    src_state, dst_state = load_file(setup["student"] / "model.safetensors"), load_file(dst / "model.safetensors")
    changed = {n for n in src_state if not torch.equal(src_state[n], dst_state[n])}
    assert {n for n in changed if "thin_rope_freqs" in n} == {f"model.layers.{i}.self_attn.thin_rope_freqs" for i in range(2)}
    assert all(("q_proj" in n or "k_proj" in n or "thin_rope_freqs" in n) for n in changed)
    assert dst_state["model.layers.0.self_attn.thin_rope_freqs"].dtype == torch.float32


def test_bfloat16_activation_store_halves_memory_and_fits_as_well(setup, uninterrupted, tmp_path):
    """--layerwise-store bfloat16 keeps the teacher's activations in half the memory; the fit (float32) lands
    where the float32 store's does, up to bf16 rounding of its inputs."""
    from transformers import AutoModelForCausalLM

    from thinkeys.train.layerwise import capture_teacher

    teacher = AutoModelForCausalLM.from_pretrained(setup["teacher"], dtype=torch.float32).eval()
    windows = torch.randint(0, teacher.config.vocab_size, (2, 32))
    full = capture_teacher(teacher, windows, progress=False)
    half = capture_teacher(teacher, windows, progress=False, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in half.inputs + half.outputs)
    assert half.inputs[0].element_size() * 2 == full.inputs[0].element_size()
    torch.testing.assert_close(half.outputs[1].float(), full.outputs[1], rtol=1e-2, atol=1e-2)

    report, _ = uninterrupted
    bf16 = run(setup, tmp_path / "bf16", e2e_steps=0, layerwise_store="bfloat16", work_dir=tmp_path / "work")
    for (before, after), (before32, after32) in zip(bf16.layerwise_error, report.layerwise_error):
        assert before == pytest.approx(before32, rel=0.02) and after == pytest.approx(after32, rel=0.1, abs=1e-3)


def test_resume_after_interruptions_gives_the_uninterrupted_result(setup, uninterrupted, tmp_path, monkeypatch):
    """Interrupt once in the layer-wise stage and once in the end-to-end stage; the resumed run matches."""
    dst = tmp_path / "resumed"
    real_fit, real_step = finetune_module.fit_layer, finetune_module.distill_step
    calls = {"fit": 0, "step": 0}

    def fit_then_interrupt(*args, **kwargs):
        calls["fit"] += 1
        if calls["fit"] == 2:  # during layer 1: layer 0 is done and saved
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    def step_then_interrupt(*args, **kwargs):
        calls["step"] += 1
        if calls["step"] == 4:  # after 3 end-to-end steps
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "fit_layer", fit_then_interrupt)
    monkeypatch.setattr(finetune_module, "distill_step", step_then_interrupt)
    work = default_work_dir(dst)
    with pytest.raises(KeyboardInterrupt):
        run(setup, dst)
    assert not dst.exists() and (work / "state.pt").is_file()
    with pytest.raises(KeyboardInterrupt):
        run(setup, dst)  # resumes at layer 1, finishes it, then stops at end-to-end step 3
    assert not dst.exists()
    assert torch.load(work / "state.pt", weights_only=False)["e2e_step"] == 3
    monkeypatch.undo()
    report = run(setup, dst)
    assert report.e2e_steps == 3 * setup["windows"]
    stages = [(r["stage"], r.get("layer", r.get("step"))) for r in map(json.loads, (work / "log.jsonl").read_text().splitlines())]
    assert stages == [("layerwise", 0), ("layerwise", 1)] + [("e2e", i) for i in range(3 * setup["windows"])]  # nothing done twice

    expected = load_file(uninterrupted[1] / "model.safetensors")
    for name, tensor in load_file(dst / "model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=1e-5, msg=name)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".resumed.tmp")]


def test_sigterm_stops_cleanly_without_dst(setup, tmp_path):
    dst = tmp_path / "killed"
    work = default_work_dir(dst)
    cmd = [
        sys.executable, "-m", "thinkeys.cli", "finetune", str(setup["student"]), str(dst),
        "--teacher", str(setup["teacher"]), "--text", str(setup["text"]),
        "--window", "32", "--layerwise-steps", "0", "--e2e-steps", "100000",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **own_process_group())
    try:
        deadline = time.monotonic() + 240
        while not ((work / "log.jsonl").is_file() and (work / "log.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no training step logged in time"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert "state saved" in out and "interrupted" in out
    assert not dst.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".killed.tmp")]
    assert torch.load(work / "state.pt", weights_only=False)["e2e_step"] >= 2


def test_refusals(setup, tmp_path):
    common = dict(teacher=setup["teacher"], text=setup["text"], progress=False, **FAST)
    with pytest.raises(ThinKeyError, match="is a thin-key checkpoint; the teacher is the original"):
        finetune(setup["student"], tmp_path / "a", **{**common, "teacher": setup["student"]})
    other = make_tiny_llama(tmp_path / "other", hidden=64, heads=2, kv_heads=1)
    with pytest.raises(ThinKeyError, match="hidden_size 64 differs"):
        finetune(setup["student"], tmp_path / "b", **{**common, "teacher": other})
    corpus = tmp_path / "wiki"
    corpus.mkdir()
    (corpus / "eval.txt").write_text(setup["text"].read_text())
    import hashlib

    sha = hashlib.sha256((corpus / "eval.txt").read_bytes()).hexdigest()
    (corpus / "manifest.json").write_text(json.dumps({"splits": {"tune": {"file": "tune.txt", "sha256": "x"}, "eval": {"file": "eval.txt", "sha256": sha}}}))
    with pytest.raises(ThinKeyError, match="held-out 'eval' split"):
        finetune(setup["student"], tmp_path / "c", **{**common, "text": corpus / "eval.txt"})
    with pytest.raises(ThinKeyError, match="nothing to do"):
        finetune(setup["student"], tmp_path / "d", **{**common, "layerwise_steps": 0, "e2e_steps": None})
    (tmp_path / "exists").mkdir()
    with pytest.raises(ThinKeyError, match="already exists"):
        finetune(setup["student"], tmp_path / "exists", **common)
    gpt2 = convert_checkpoint(make_tiny_gpt2(tmp_path / "gpt2"), tmp_path / "gpt2-thin", 8, progress=False)
    with pytest.raises(ThinKeyError, match="supports Llama-family"):
        finetune(gpt2, tmp_path / "e", **{**common, "teacher": tmp_path / "gpt2"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "gpt2", "gpt2-thin", "other", "wiki"]


def test_rebuild_at_read_recovers_its_latent_key_projection_and_expansion(setup, tmp_path):
    """rope: rebuild keeps the source's queries: recovery trains only k_proj (the cached latent) and the
    thin_rebuild expansion, layer-wise and end-to-end, and the result loads as a rebuild checkpoint."""
    student = convert_checkpoint(setup["teacher"], tmp_path / "rebuild", 8, rope="rebuild", progress=False)
    dst = tmp_path / "rebuild-tuned"
    report = finetune(student, dst, teacher=setup["teacher"], text=setup["text"], progress=False,
                      **{**FAST, "e2e_steps": 2 * setup["windows"]})
    for before, after in report.layerwise_error:
        assert after < before, report.layerwise_error
    src_state, dst_state = load_file(student / "model.safetensors"), load_file(dst / "model.safetensors")
    changed = {n for n in src_state if not torch.equal(src_state[n], dst_state[n])}
    assert changed == {f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in ("k_proj.weight", "thin_rebuild")}
    assert json.loads((dst / "config.json").read_text())["thin_keys"]["rope"] == "rebuild"
    load_thin_model(dst)


def test_rebuild_recovery_with_train_queries_also_trains_the_source_query(setup, tmp_path):
    """--train-queries: a rebuild checkpoint's d-wide q_proj trains with the latent k_proj and the expansion, fits
    each layer's attention output better than without it, and the result is still a rebuild checkpoint."""
    student = convert_checkpoint(setup["teacher"], tmp_path / "rebuild", 8, rope="rebuild", progress=False)
    options = {**FAST, "e2e_steps": setup["windows"]}
    plain = finetune(student, tmp_path / "plain", teacher=setup["teacher"], text=setup["text"], progress=False, **options)
    with_q = finetune(student, tmp_path / "with-q", teacher=setup["teacher"], text=setup["text"], progress=False,
                      train_queries=True, **options)
    src_state, dst_state = load_file(student / "model.safetensors"), load_file(tmp_path / "with-q" / "model.safetensors")
    changed = {n for n in src_state if not torch.equal(src_state[n], dst_state[n])}
    assert changed == {f"model.layers.{i}.self_attn.{t}" for i in range(2)
                       for t in ("q_proj.weight", "k_proj.weight", "thin_rebuild")}
    assert dst_state["model.layers.0.self_attn.q_proj.weight"].shape == src_state["model.layers.0.self_attn.q_proj.weight"].shape
    assert sum(a for _, a in with_q.layerwise_error) < sum(a for _, a in plain.layerwise_error)
    assert json.loads((tmp_path / "with-q" / "config.json").read_text())["thin_keys"]["rope"] == "rebuild"
    load_thin_model(tmp_path / "with-q")


def test_low_rank_query_change_is_rank_k_and_continues_across_stages(setup, tmp_path):
    """--query-rank K: the trained query weights differ from the teacher's by a rank-K change (up to the
    checkpoint's rounding), a second stage that starts from the first continues that change (still rank K,
    not 2K)."""
    student = convert_checkpoint(setup["teacher"], tmp_path / "rebuild", 8, rope="rebuild", progress=False)
    options = {**FAST, "e2e_steps": setup["windows"]}
    low = finetune(student, tmp_path / "low", teacher=setup["teacher"], text=setup["text"], progress=False,
                   train_queries=True, query_rank=2, **{**options, "e2e_steps": None})
    assert low.settings.query_rank == 2
    again = finetune(tmp_path / "low", tmp_path / "again", teacher=setup["teacher"], text=setup["text"], progress=False,
                     train_queries=True, query_rank=2, **{**options, "layerwise_steps": 0})
    assert again.e2e_steps == setup["windows"]
    teacher = load_file(setup["teacher"] / "model.safetensors")
    for dst in ("low", "again"):
        state = load_file(tmp_path / dst / "model.safetensors")
        for i in range(2):
            name = f"model.layers.{i}.self_attn.q_proj.weight"
            change = state[name].double() - teacher[name].double()
            s = torch.linalg.svdvals(change)
            assert s[1] > 0 and s[2] < 1e-6 * s[0], (dst, i, s[:4])  # the tiny teacher is float32: exact rank 2
        assert "model.layers.0.self_attn.q_proj.parametrizations.weight.original" not in state
    assert not torch.equal(load_file(tmp_path / "low" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"],
                           load_file(tmp_path / "again" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"])
    load_thin_model(tmp_path / "again")
    with pytest.raises(ThinKeyError, match="--query-rank needs --train-queries"):
        finetune(student, tmp_path / "bad", teacher=setup["teacher"], text=setup["text"], progress=False,
                 query_rank=2, **options)
    with pytest.raises(ThinKeyError, match="no rebuild-at-read layer"):
        finetune(setup["student"], tmp_path / "bad", teacher=setup["teacher"], text=setup["text"], progress=False,
                 train_queries=True, query_rank=2, **options)
    assert not (tmp_path / "bad").exists()


def test_qwen3_recovery_trains_the_post_norm_maps(tmp_path):
    """Qwen3 keeps its d-wide q/k projections and norms: recovery trains thin_q_map / thin_k_map only."""
    from tiny_models import make_tiny_qwen3

    teacher = make_tiny_qwen3(tmp_path / "qwen3")
    student = convert_checkpoint(teacher, tmp_path / "qwen3-thin", 8, rope="pairs", progress=False)
    text = tmp_path / "tune.txt"
    text.write_text(_TRAINING_TEXT)
    dst = tmp_path / "qwen3-tuned"
    report = finetune(student, dst, teacher=teacher, text=text, progress=False, **{**FAST, "e2e_steps": 6})
    for before, after in report.layerwise_error:
        assert after < before, report.layerwise_error
    src_state, dst_state = load_file(student / "model.safetensors"), load_file(dst / "model.safetensors")
    changed = {n for n in src_state if not torch.equal(src_state[n], dst_state[n])}
    assert changed == {f"model.layers.{i}.self_attn.thin_{m}_map" for i in range(2) for m in "qk"}
    load_thin_model(dst)


def test_qwen3_rebuild_recovery_trains_the_key_map_and_its_expansion(tmp_path):
    """Qwen3 rebuild-at-read: the normalised query is the source's; the latent map and the expansion train."""
    from tiny_models import make_tiny_qwen3

    teacher = make_tiny_qwen3(tmp_path / "qwen3")
    student = convert_checkpoint(teacher, tmp_path / "qwen3-thin", 8, rope="rebuild", progress=False)
    text = tmp_path / "tune.txt"
    text.write_text(_TRAINING_TEXT)
    dst = tmp_path / "qwen3-tuned"
    report = finetune(student, dst, teacher=teacher, text=text, progress=False, **{**FAST, "e2e_steps": 6})
    for before, after in report.layerwise_error:
        assert after < before, report.layerwise_error
    src_state, dst_state = load_file(student / "model.safetensors"), load_file(dst / "model.safetensors")
    changed = {n for n in src_state if not torch.equal(src_state[n], dst_state[n])}
    assert changed == {f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in ("thin_k_map", "thin_rebuild")}
    load_thin_model(dst)
