"""Start ``thinkeys serve`` as a real subprocess on a free loopback port, and stop it afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from thinkeys.loadtest.servers import own_process_group

STARTUP_TIMEOUT_S = 600  # ~1 min on an idle 2-core machine; far more under load


@dataclass
class ServedModel:
    base_url: str  # e.g. http://127.0.0.1:PORT
    model_dir: Path
    served_model_name: str
    log_path: Path
    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_server(model_dir: Path, log_path: Path, *, served_model_name: str, kv_cache_gib: float = 1, extra_args: list[str] | None = None, env: dict | None = None):
    port = free_port()
    cmd = [
        sys.executable, "-m", "thinkeys.cli", "serve", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", served_model_name,
        "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
        *(extra_args or []),
    ]
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), **(env or {})}
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # a real server, as users run it
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, **own_process_group())
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield ServedModel(base_url, Path(model_dir), served_model_name, log_path, proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
