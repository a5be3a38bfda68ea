"""``thinkeys serve`` picks the model dtype for the host's CPU when ``--dtype`` is not given.

The decision (bf16 where the CPU multiplies bf16 natively, fp32 elsewhere), the probes it reads
(torch's own CPU detection, which vLLM's CPU kernels use too), the command line it builds (an
explicit ``--dtype`` or a ``--config`` file wins), and a real server started without ``--dtype``
running in the chosen dtype.
"""

from __future__ import annotations

import pytest
import torch

from thinkeys.cli import main as thinkeys_main
from thinkeys.server.serve import CpuFeatures, best_cpu_dtype, host_cpu_features


@pytest.mark.parametrize(
    "features,dtype",
    [
        (CpuFeatures(amx_bf16=True, avx512_bf16=True, capability="AVX512"), "bfloat16"),  # Sapphire Rapids and later
        (CpuFeatures(amx_bf16=False, avx512_bf16=True, capability="AVX512"), "bfloat16"),  # Cooper Lake, Zen 4
        (CpuFeatures(amx_bf16=False, avx512_bf16=False, capability="AVX512"), "float32"),  # Skylake-SP
        (CpuFeatures(amx_bf16=False, avx512_bf16=False, capability="AVX2"), "float32"),  # Zen 2/3 EPYC
    ],
)
def test_decision(features, dtype):
    chosen, why = best_cpu_dtype(features)
    assert chosen == dtype and why


def test_probes_are_torchs_cpu_detection():
    """The private torch probes the decision reads exist in the pinned torch (vLLM's CPU backend calls them too)."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        assert isinstance(getattr(torch.cpu, name)(), bool), name
    features = host_cpu_features()
    assert features.amx_bf16 == torch.cpu._is_amx_tile_supported()
    assert features.avx512_bf16 == torch.cpu._is_avx512_bf16_supported()
    assert features.capability == torch.backends.cpu.get_cpu_capability()


def _printed_command(capsys, checkpoint, *flags) -> tuple[list[str], str]:
    assert thinkeys_main(["serve", str(checkpoint), "--print-command", *flags]) == 0
    out = capsys.readouterr()
    return out.out.split(), out.err


def test_command_gets_the_host_dtype_unless_given(checkpoints, capsys):
    expected, _ = best_cpu_dtype(host_cpu_features())
    cmd, err = _printed_command(capsys, checkpoints["llama-thin"])
    assert cmd[cmd.index("--dtype") + 1] == expected
    assert f"thinkeys serve: --dtype {expected} for this CPU (" in err and err.count("--dtype") == 2  # one line
    for given in (["--dtype", "float16"], ["--dtype=float16"], ["--config", "serve.yaml"]):
        cmd, err = _printed_command(capsys, checkpoints["llama-thin"], *given)
        assert sum(a.startswith("--dtype") for a in cmd) == (0 if given[0] == "--config" else 1), given
        assert "for this CPU" not in err


@pytest.mark.engine
def test_served_engine_runs_in_the_chosen_dtype(checkpoints, tmp_path):
    """A tiny float32 checkpoint served without --dtype: the engine (and so its KV cache) uses the host's choice."""
    import httpx
    from server import start_server

    expected, _ = best_cpu_dtype(host_cpu_features())
    log = tmp_path / "server.log"
    with start_server(checkpoints["llama-thin"], log, served_model_name="tiny-host-dtype", dtype=None) as served:
        with httpx.Client(base_url=served.base_url, timeout=60) as client:
            report = client.get("/v1/thinkeys/savings").json()
    assert report["kv_cache_dtype"] == expected  # the cache follows the model dtype ("auto")
    text = log.read_text(errors="replace")
    assert f"thinkeys serve: --dtype {expected} for this CPU" in text
    assert f"dtype=torch.{expected}" in text  # vLLM's own engine config line
