"""Start ``thinkeys serve`` as a real subprocess on a free loopback port, and stop it afterwards.

A thin wrapper over :func:`thinkeys.loadtest.servers.run_servers` (the launcher the load test uses)
with the tests' defaults: float32, max_model_len 512, eager mode, a KV budget in whole GiB.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from thinkeys.loadtest.servers import Launch, free_port, run_servers, serve_env, server_command

STARTUP_TIMEOUT_S = 600  # ~1 min on an idle 2-core machine; far more under load


@dataclass
class ServedModel:
    base_url: str  # e.g. http://127.0.0.1:PORT
    model_dir: Path
    served_model_name: str
    log_path: Path


def server_launch(
    model_dir: Path, log_path: Path, *, served_model_name: str, kv_cache_gib: float = 1,
    extra_args: list[str] | None = None, env: dict | None = None, dtype: str | None = "float32",
) -> Launch:  # fmt: skip
    """The ``thinkeys serve`` launch of ``model_dir`` with the tests' defaults (``dtype`` None: the host's choice)."""
    port = free_port()
    dtype_args = ["--dtype", dtype] if dtype else []
    cmd = server_command(str(model_dir), port=port, served_model_name=served_model_name, max_model_len=512,
                         extra_args=[*dtype_args, "--enforce-eager", *(extra_args or [])])  # fmt: skip
    full_env = serve_env(VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib), **(env or {}))
    return Launch(served_model_name, str(model_dir), cmd, full_env, port, log_path)


@contextlib.contextmanager
def start_servers(specs: list[dict]) -> Iterator[list[ServedModel]]:
    """Serve every ``server_launch(**spec)`` at once (start-ups overlap); stop all on exit."""
    with run_servers([server_launch(**spec) for spec in specs], startup_timeout_s=STARTUP_TIMEOUT_S) as servers:
        yield [ServedModel(s.base_url, Path(s.model), s.label, s.log_path) for s in servers]


@contextlib.contextmanager
def start_server(model_dir: Path, log_path: Path, **options) -> Iterator[ServedModel]:
    """Serve one model (``options`` as for :func:`server_launch`); stop it on exit."""
    with start_servers([dict(model_dir=model_dir, log_path=log_path, **options)]) as (served,):
        yield served
