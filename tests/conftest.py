"""Session-wide fixtures: tiny checkpoints, their thin-key conversions, engine runs and one HTTP server.

Engines are costly (seconds each in-process, ~1 min for a served model on 2 cores), so each is
started once per session and its results shared by every test that needs them.
"""

from __future__ import annotations

import os

# Must precede any vLLM import: keep engine cores in-process (fast start, see engines.py).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from engines import LONG_PROMPT, PREFIX_PROMPTS, SHORT_PROMPTS, run_engine  # noqa: E402
from server import ServedModel, start_server  # noqa: E402
from tiny_models import make_tiny_gpt2, make_tiny_llama, make_tiny_qwen2  # noqa: E402

FAMILIES = {"llama": make_tiny_llama, "qwen2": make_tiny_qwen2, "gpt2": make_tiny_gpt2}
HEAD_DIM = 32  # of every tiny model
THIN_RANK = 8  # r < d for reference and capacity tests
ALL_PROMPTS = SHORT_PROMPTS + [LONG_PROMPT] + PREFIX_PROMPTS


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """``{family}`` (source), ``{family}-full`` (r = d) and ``{family}-thin`` (r = 8) folders."""
    from thinkeys.convert.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    out: dict[str, Path] = {}
    for family, make in FAMILIES.items():
        src = make(root / family)
        out[family] = src
        out[f"{family}-full"] = convert_checkpoint(src, root / f"{family}-full", HEAD_DIM)
        out[f"{family}-thin"] = convert_checkpoint(src, root / f"{family}-thin", THIN_RANK)
    return out


@pytest.fixture(scope="session")
def engine_runs(checkpoints):
    """``engine_runs(name)``: the (cached) run of every test prompt on checkpoint ``name``."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = run_engine(checkpoints[name], ALL_PROMPTS)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def thin_server(checkpoints, tmp_path_factory) -> ServedModel:
    """A thin-key tiny Llama (r = 8) served by ``thinkeys serve`` over HTTP for the whole session."""
    log_dir = tmp_path_factory.mktemp("server")
    with start_server(checkpoints["llama-thin"], log_dir / "server.log", served_model_name="tiny-thin") as served:
        yield served
