"""Start local servers, wait until they are healthy, and always stop them.

:func:`start_servers` is what ``thinkeys loadtest compare`` uses: one real ``thinkeys serve``
subprocess per checkpoint (the same command users and the container run), bound to 127.0.0.1 on
a free port, all with the same KV-cache budget (``--kv-cache-memory-bytes``) and vLLM flags; only
the checkpoint differs. :func:`run_servers` is the general launcher under it (also used by the
tests and scripts for any server command): each process leads its own process group, so stopping
it also stops vLLM's engine-core and worker processes (see :func:`own_process_group`).

On the CPU build ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB) would override ``--kv-cache-memory-bytes``
(vLLM's CPU platform applies it after argument parsing), so it is removed from the servers'
environment: the byte budget given here is the one in force, and it can be smaller than 1 GiB.
"""

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
from typing import Iterator

import httpx

from thinkeys.checkpoint import ThinKeyError

HOST = "127.0.0.1"


def own_process_group() -> dict:
    """``Popen`` arguments that make the child lead a new process group in *this* session.

    ``os.killpg`` on the child then stops it and the engine-core and worker processes vLLM starts.
    Not ``start_new_session=True``: a new session is also a new scheduler autogroup on Linux, and on
    2-core machines (kernel 6.18, EEVDF) a served vLLM's autogroup, whose engine core spins on
    ``sched_yield`` while its worker computes, kept the client's processes off the CPU for 1-3 s at
    a time (measured with /proc/PID/schedstat run delays): load-test clocks, metric samplers and
    client timeouts all stalled. In the client's own session the scheduler shares fairly.
    """
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}  # pragma: no cover - Python 3.10


@dataclass
class LocalServer:
    label: str
    model: str
    base_url: str
    log_path: Path
    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command(
    model: str, *, port: int, served_model_name: str, max_model_len: int,
    kv_cache_memory: str | None = None, extra_args: list[str] = (),
) -> list[str]:  # fmt: skip
    """``thinkeys serve MODEL`` on ``HOST:port``; without ``kv_cache_memory`` the environment's budget holds."""
    kv_budget = ["--kv-cache-memory-bytes", str(kv_cache_memory)] if kv_cache_memory is not None else []
    return [
        sys.executable, "-m", "thinkeys.cli", "serve", str(model),
        "--host", HOST, "--port", str(port),
        "--served-model-name", served_model_name,
        *kv_budget,
        "--max-model-len", str(max_model_len),
        *extra_args,
    ]  # fmt: skip


def stop_all(procs: list[subprocess.Popen], grace_s: float = 30) -> None:
    """SIGTERM every server's process group at once, SIGKILL what is left after ``grace_s``.

    vLLM shuts down cleanly on SIGTERM once it is up; a server still compiling may ignore it,
    hence the hard kill. Whole groups are signalled: engine-core and worker processes go too.
    """
    alive = [p for p in procs if p.poll() is None]
    for proc in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in alive:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        # the leader may be gone while its engine core / workers are not: kill the group regardless
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@dataclass
class Launch:
    """One server process to start: its command, environment, port and log file."""

    label: str
    model: str
    command: list[str]
    env: dict[str, str]
    port: int
    log_path: Path


@contextlib.contextmanager
def run_servers(launches: list[Launch], *, startup_timeout_s: float = 900) -> Iterator[list[LocalServer]]:
    """Start every launch at once (their start-ups overlap), wait until all answer ``/health``, stop all on exit.

    A server that exits or stays unhealthy past ``startup_timeout_s`` raises :class:`ThinKeyError`
    naming it and quoting the end of its log; every process group started is stopped either way.
    """
    servers: list[LocalServer] = []
    logs = []
    try:
        for launch in launches:
            launch.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(launch.log_path, "w")
            logs.append(log)
            proc = subprocess.Popen(
                launch.command, stdout=log, stderr=subprocess.STDOUT, env=launch.env, **own_process_group()
            )
            servers.append(LocalServer(launch.label, launch.model, f"http://{HOST}:{launch.port}", launch.log_path, proc))
        deadline = time.monotonic() + startup_timeout_s
        waiting = list(servers)
        while waiting:
            for server in list(waiting):
                if server.process.poll() is not None:
                    raise ThinKeyError(
                        f"server {server.label!r} ({server.model}) exited with code {server.process.returncode} "
                        f"before it was healthy; its log ({server.log_path}) ends with:\n{_tail(server.log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                        waiting.remove(server)
            if waiting and time.monotonic() > deadline:
                raise ThinKeyError(
                    f"server(s) {[s.label for s in waiting]} not healthy after {startup_timeout_s:.0f} s; "
                    f"see {waiting[0].log_path}:\n{_tail(waiting[0].log_path)}"
                )
            if waiting:
                time.sleep(1)
        yield servers
    finally:
        stop_all([server.process for server in servers])
        for log in logs:
            log.close()


def serve_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a real server: multiprocess engine (as users run it) plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    return {**env, **overrides}


@contextlib.contextmanager
def start_servers(
    models: list[tuple[str, str]],
    *,
    kv_cache_memory: str,
    max_model_len: int,
    extra_args: list[str],
    log_dir: Path,
    startup_timeout_s: float = 900,
) -> Iterator[list[LocalServer]]:
    """Start one ``thinkeys serve`` per ``(label, model)`` with the same KV budget and flags; stop all on exit."""
    env = serve_env()
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override --kv-cache-memory-bytes (module docstring)
    launches = []
    for label, model in models:
        port = free_port()
        cmd = server_command(model, port=port, served_model_name=label, kv_cache_memory=kv_cache_memory,
                             max_model_len=max_model_len, extra_args=extra_args)  # fmt: skip
        launches.append(Launch(label, model, cmd, env, port, log_dir / f"server-{label}.log"))
    with run_servers(launches, startup_timeout_s=startup_timeout_s) as servers:
        yield servers
