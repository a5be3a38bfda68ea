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


def pytest_ignore_collect(collection_path, config):
    """tests/deploy_live (``make deploy-test``: containers on a Docker engine, 15-25 min) runs only when named."""
    if collection_path.name == "deploy_live" and collection_path.parent == Path(__file__).parent:
        return not any("deploy_live" in str(arg) for arg in config.args)
    return None


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
def shared_kv_checkpoints(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """``{family}-vk``: the tiny source with v_proj := k_proj (a stock model vLLM serves as is), and
    ``{family}-shared``: its shared K=V checkpoint, for llama (RoPE) and gpt2 (no RoPE)."""
    from thinkeys.convert.shared_kv import convert_shared_kv, tie_value_to_key

    root = tmp_path_factory.mktemp("shared-kv")
    out: dict[str, Path] = {}
    for family in ("llama", "gpt2"):
        out[f"{family}-vk"] = tie_value_to_key(checkpoints[family], root / f"{family}-vk")
        out[f"{family}-shared"] = convert_shared_kv(out[f"{family}-vk"], root / f"{family}-shared").dst
    return out


@pytest.fixture(scope="session")
def rebuild_checkpoints(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Rebuild-at-read conversions of the tiny Llama and Qwen2: ``{family}-rebuild-full`` (r = d, svd, data-free)
    and ``{family}-rebuild`` (r = 8, joint fit to calibration statistics of the tiny models' training text)."""
    from tiny_models import _TRAINING_TEXT

    from thinkeys.convert.calibration import collect_calibration
    from thinkeys.convert.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("rebuild")
    text = root / "tune.txt"
    text.write_text(_TRAINING_TEXT * 6)
    out: dict[str, Path] = {}
    for family in ("llama", "qwen2"):
        src = checkpoints[family]
        cal = collect_calibration(src, text, tokens=256, window=64, progress=False)
        out[f"{family}-rebuild-full"] = convert_checkpoint(src, root / f"{family}-rebuild-full", HEAD_DIM, rope="rebuild", progress=False)
        out[f"{family}-rebuild"] = convert_checkpoint(src, root / f"{family}-rebuild", THIN_RANK, rope="rebuild", calibration=cal, progress=False)
    return out


@pytest.fixture(scope="session")
def engine_runs(checkpoints, request):
    """``engine_runs(name, **engine_kwargs)``: the (cached) run of every test prompt on checkpoint ``name``.

    ``name`` is a key of ``checkpoints`` or, when it is not one, of ``rebuild_checkpoints`` /
    ``shared_kv_checkpoints`` (built on first use); ``engine_kwargs`` go to ``vllm.LLM`` (e.g.
    ``kv_cache_dtype="fp8"``).
    """
    cache = {}

    def get(name: str, **engine_kwargs):
        key = (name, tuple(sorted(engine_kwargs.items())))
        if key not in cache:
            if name in checkpoints:
                path = checkpoints[name]
            elif "-rebuild" in name:
                path = request.getfixturevalue("rebuild_checkpoints")[name]
            else:
                path = request.getfixturevalue("shared_kv_checkpoints")[name]
            cache[key] = run_engine(path, ALL_PROMPTS, **engine_kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def thin_server(checkpoints, tmp_path_factory) -> ServedModel:
    """A thin-key tiny Llama (r = 8) served by ``thinkeys serve`` over HTTP for the whole session."""
    log_dir = tmp_path_factory.mktemp("server")
    with start_server(checkpoints["llama-thin"], log_dir / "server.log", served_model_name="tiny-thin") as served:
        yield served
