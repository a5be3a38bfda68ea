"""Bad checkpoints and settings at load time: `thinkeys serve` refuses with ONE line naming the file and field, exit 2.

Every case breaks a copy of the session's converted tiny thin Llama (r = 8) in one way. The
checks run before vLLM is started, so no engine is needed: a case that slipped through would start
a real server, which the subprocess cases catch by timing out instead of exiting 2 at once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from robustness import record
from thinkeys.checkpoint import ThinKeyError
from thinkeys.checkpoint_check import check_checkpoint_files
from thinkeys.cli import main as thinkeys_main

WEIGHTS = "model.safetensors"
FREQS = "model.layers.1.self_attn.thin_rope_freqs"


def _edit_config(folder: Path, edit: Callable[[dict], None]) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def _truncate(folder: Path, keep: int | None = None, drop: int = 0) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[:keep] if keep is not None else data[: len(data) - drop])


def _drop(key: str) -> Callable[[dict], None]:
    return lambda c: c["thin_keys"].pop(key)


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda c: c["thin_keys"].__setitem__(key, value)


#: case -> (how the checkpoint is broken, what the one line must name: file, then field / reason)
CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "rank larger than the weights": (
        lambda f: _edit_config(f, _set("rank", 16)),
        (WEIGHTS, "q_proj.weight has shape [32, 128]", "thin_keys.rank = 16 implies [64, 128]"),
    ),
    "rank smaller than the weights": (
        lambda f: _edit_config(f, lambda c: c["thin_keys"].update(rank=4, rope_dims=4)),
        (WEIGHTS, "q_proj.weight", "thin_keys.rank = 4"),
    ),
    "rank beyond head_dim": (
        lambda f: _edit_config(f, _set("rank", 64)),
        ("config.json", "thin_keys", "rank 64 is larger than head_dim 32"),
    ),
    "RoPE strategy missing": (
        lambda f: _edit_config(f, _drop("rope")),
        ("config.json", "rope: Field required"),
    ),
    "RoPE strategy unknown": (
        lambda f: _edit_config(f, _set("rope", "yarn")),
        ("config.json", "rope: Input should be", "'pairs'"),
    ),
    "RoPE 'none' on a RoPE checkpoint": (
        lambda f: _edit_config(f, lambda c: c["thin_keys"].update(rope="none", rope_dims=0)),
        (WEIGHTS, "thin_rope_freqs", "thin_keys.rope is 'none'"),
    ),
    "no thin_keys.rank": (
        lambda f: _edit_config(f, _drop("rank")),
        ("config.json", "rank: Field required"),
    ),
    "unknown thin_keys field": (
        lambda f: _edit_config(f, _set("rnak", 8)),
        ("config.json", "rnak: Extra inputs are not permitted"),
    ),
    "architecture of another family": (
        lambda f: _edit_config(f, lambda c: c.__setitem__("architectures", ["ThinKeyGPT2LMHeadModel"])),
        ("config.json", "architectures", "ThinKeyLlamaForCausalLM"),
    ),
    "head_dim disagrees": (
        lambda f: _edit_config(f, _set("head_dim", 16)),
        ("config.json", "thin_keys.head_dim is 16", "head_dim is 32"),
    ),
    "config.json not JSON": (
        lambda f: (f / "config.json").write_text('{"architectures": ['),
        ("config.json", "not valid JSON"),
    ),
    "safetensors truncated (data)": (
        lambda f: _truncate(f, drop=1000),
        (WEIGHTS, "truncated"),
    ),
    "safetensors truncated (header)": (
        lambda f: _truncate(f, keep=100),
        (WEIGHTS, "truncated"),
    ),
    "safetensors empty": (
        lambda f: _truncate(f, keep=0),
        (WEIGHTS, "truncated"),
    ),
    "frequency table too short": (
        lambda f: _edit_tensors(f, lambda t: t.__setitem__(FREQS, t[FREQS][:, :3].contiguous())),
        (WEIGHTS, f"{FREQS} has shape [2, 3]", "thin_keys.rope_dims = 8 implies [2, 4]"),
    ),
    "frequency table too long": (
        lambda f: _edit_tensors(f, lambda t: t.__setitem__(FREQS, torch.cat([t[FREQS], t[FREQS]], 1))),
        (WEIGHTS, f"{FREQS} has shape [2, 8]", "implies [2, 4]"),
    ),
    "frequency table missing": (
        lambda f: _edit_tensors(f, lambda t: t.pop(FREQS)),
        (f"tensor {FREQS} is missing", "thin_keys.rope_dims"),
    ),
    "frequency table NaN": (
        lambda f: _edit_tensors(f, lambda t: t[FREQS].__setitem__((0, 1), float("nan"))),
        (WEIGHTS, FREQS, "holds nan"),
    ),
    "frequency table float16": (
        lambda f: _edit_tensors(f, lambda t: t.__setitem__(FREQS, t[FREQS].half())),
        (WEIGHTS, FREQS, "dtype F16"),
    ),
    "key projection missing": (
        lambda f: _edit_tensors(f, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight")),
        ("model.layers.0.self_attn.k_proj.weight is missing", "thin_keys.rank"),
    ),
    "weights only as pickle": (
        lambda f: (torch.save(load_file(f / WEIGHTS), f / "pytorch_model.bin"), (f / WEIGHTS).unlink()),
        ("no *.safetensors weights", "pytorch_model.bin"),
    ),
}


@pytest.fixture
def broken(checkpoints, tmp_path) -> Callable[[str], Path]:
    def make(case: str) -> Path:
        folder = tmp_path / case.replace(" ", "-").replace("'", "")
        shutil.copytree(checkpoints["llama-thin"], folder)
        CASES[case][0](folder)
        return folder

    return make


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{stderr}"
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_serve_refuses_a_broken_checkpoint_with_one_line(case, broken, capsys):
    folder = broken(case)
    # --print-command: a check that let the model through prints the command instead of exec'ing vLLM here.
    code = thinkeys_main(["serve", str(folder), "--print-command"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith("thinkeys serve: error: ")
    for part in CASES[case][1]:
        assert part in line, f"{part!r} not in {line!r}"
    assert str(folder) in line, "the line names the file"
    message = line.removeprefix("thinkeys serve: error: ").replace(str(folder), "CKPT")
    record("bad_checkpoints", case=case, exit_code=code, message=message)


def test_the_intact_checkpoint_passes(checkpoints):
    assert check_checkpoint_files(checkpoints["llama-thin"]).rank == 8
    assert check_checkpoint_files(checkpoints["qwen2-thin"]).rank == 8  # q/k biases
    assert check_checkpoint_files(checkpoints["gpt2-thin"]).rank == 8  # fused Conv1D c_attn, no RoPE


def test_gpt2_checkpoint_rank_mismatch_names_c_attn(checkpoints, tmp_path):
    folder = shutil.copytree(checkpoints["gpt2-thin"], tmp_path / "gpt2")
    _edit_config(folder, _set("rank", 16))
    with pytest.raises(ThinKeyError, match=r"c_attn\.weight has shape \[128, 192\] but thin_keys\.rank = 16 implies \[128, 256\]"):
        check_checkpoint_files(folder)


def _serve(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real `thinkeys serve` process; a check that let the model through would start vLLM and time out."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "thinkeys.cli", "serve", *args, "--host", "127.0.0.1", "--port", "1"],
        capture_output=True, text=True, env=full_env, timeout=120,
    )  # fmt: skip


def test_the_process_exits_2_with_one_line_and_no_traceback(broken):
    folder = broken("frequency table too short")
    done = _serve([str(folder)])
    assert done.returncode == 2
    line = _one_line(done.stderr)
    assert f"{folder / WEIGHTS}: {FREQS} has shape [2, 3]" in line
    assert "Traceback" not in done.stderr + done.stdout


def test_pickle_weights_are_refused_unless_allowed(checkpoints, tmp_path, capsys):
    """A stock model folder with only pytorch_model.bin: refused; with --allow-pickle it goes on to vLLM."""
    folder = shutil.copytree(checkpoints["llama"], tmp_path / "stock-bin")
    torch.save(load_file(folder / WEIGHTS), folder / "pytorch_model.bin")
    (folder / WEIGHTS).unlink()
    assert thinkeys_main(["serve", str(folder), "--print-command"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{folder / 'pytorch_model.bin'}: pickle-based weights" in line and "--allow-pickle" in line
    message = line.removeprefix("thinkeys serve: error: ").replace(str(folder), "CKPT")
    record("bad_checkpoints", case="stock model with only pytorch_model.bin", exit_code=2, message=message)
    assert thinkeys_main(["serve", str(folder), "--allow-pickle", "--print-command"]) == 0
    out = capsys.readouterr().out
    assert f"--model {folder}" in out


def test_bad_kv_budget_variable_is_one_line(checkpoints, capsys, monkeypatch):
    """An empty or fractional VLLM_CPU_KVCACHE_SPACE makes vLLM's workers die with int('') deep in a traceback."""
    for value in ("", "0.5"):
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", value)
        assert thinkeys_main(["serve", str(checkpoints["llama-thin"]), "--print-command"]) == 2
        line = _one_line(capsys.readouterr().err)
        assert f"VLLM_CPU_KVCACHE_SPACE={value!r} is not a whole number of GiB" in line
        record("bad_checkpoints", case=f"VLLM_CPU_KVCACHE_SPACE={value!r}", exit_code=2, message=line.removeprefix("thinkeys serve: error: "))


# --- vLLM flags checked on vLLM's own parse (python -m thinkeys.server.serve) ----------------------


def _vllm_args(*flags: str):
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", *flags])


def test_weights_are_safetensors_only_unless_allowed(monkeypatch):
    from thinkeys.checkpoint import ThinKeyError
    from thinkeys.server.serve import check_server_args

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    args = _vllm_args("--host", "127.0.0.1")
    assert check_server_args(args, allow_pickle=False, require_api_key=False) == []
    assert args.load_format == "safetensors", "vLLM's 'auto' would fall back to pytorch_model.bin"
    for spelling in (["--load-format", "pt"], ["--load_format=npcache"]):
        with pytest.raises(ThinKeyError, match=r"--load-format (pt|npcache) may read pickle-based weights.*--allow-pickle"):
            check_server_args(_vllm_args(*spelling), allow_pickle=False, require_api_key=False)
    allowed = _vllm_args("--load-format", "pt")
    check_server_args(allowed, allow_pickle=True, require_api_key=False)
    assert allowed.load_format == "pt"
    kept = _vllm_args("--load-format", "fastsafetensors")
    check_server_args(kept, allow_pickle=False, require_api_key=False)
    assert kept.load_format == "fastsafetensors"


def test_api_key_rules(monkeypatch):
    from thinkeys.checkpoint import ThinKeyError
    from thinkeys.server.serve import check_server_args

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    # Beyond loopback without a key: a warning, or a refusal with --require-api-key.
    for host in ([], ["--host", "0.0.0.0"], ["--host", "10.1.2.3"], ["--host", "::"]):
        [warning] = check_server_args(_vllm_args(*host), allow_pickle=False, require_api_key=False)
        assert "without an API key" in warning
        with pytest.raises(ThinKeyError, match="--require-api-key: no API key"):
            check_server_args(_vllm_args(*host), allow_pickle=False, require_api_key=True)
    for host in ("127.0.0.1", "localhost", "::1"):
        assert check_server_args(_vllm_args("--host", host), allow_pickle=False, require_api_key=False) == []
    assert check_server_args(_vllm_args("--host", "0.0.0.0", "--api-key", "k"), allow_pickle=False, require_api_key=True) == []
    monkeypatch.setenv("VLLM_API_KEY", "k")
    assert check_server_args(_vllm_args("--host", "0.0.0.0"), allow_pickle=False, require_api_key=True) == []


def test_byte_budget_flag_wins_over_the_gib_variable(monkeypatch):
    from thinkeys.server.serve import check_server_args

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    warnings = check_server_args(_vllm_args("--host", "127.0.0.1", "--kv-cache-memory-bytes", "64M"), allow_pickle=False, require_api_key=False)
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ and "ignoring VLLM_CPU_KVCACHE_SPACE" in warnings[0]


@pytest.mark.timeout(300)
def test_server_process_refuses_without_api_key_in_one_line(checkpoints):
    """End to end through vLLM's own main: the check runs on its parse, before any engine starts."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "thinkeys.cli", "serve", str(checkpoints["llama-thin"]), "--host", "0.0.0.0",
         "--port", "1", "--require-api-key"],
        capture_output=True, text=True, env=env, timeout=280,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["thinkeys serve: error: --require-api-key: no API key for host 0.0.0.0; set VLLM_API_KEY (or pass --api-key KEY)"], done.stderr
    record("bad_checkpoints", case="--host 0.0.0.0 --require-api-key without a key", exit_code=2, message=errors[0].removeprefix("thinkeys serve: error: "))
