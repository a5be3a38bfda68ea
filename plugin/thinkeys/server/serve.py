"""``thinkeys serve MODEL [any vLLM server flag]``: vLLM's OpenAI-compatible server with our plugins on.

What it adds to ``python -m vllm.entrypoints.openai.api_server``:

* ``VLLM_PLUGINS`` names our general plugin (architectures + attention backend) and our endpoint
  plugin (``/v1/thinkeys/savings`` and metrics), appended to whatever the user already allows.
  vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them.
* A thin-key checkpoint is validated before vLLM starts, so a broken one fails with one line.
* On CPU, a KV-cache budget: without ``VLLM_CPU_KVCACHE_SPACE`` or ``--kv-cache-memory-bytes``
  vLLM asks for 92% of the NUMA node and refuses to start when anything else holds memory.
* It avoids the ``vllm`` console script, which crashes under the ``vllm-cpu`` distribution name.

The server process replaces this one (``os.execv``), so signals reach vLLM directly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from thinkeys.checkpoint import ThinKeyConfig, ThinKeyError, is_thin_key_config

PASSTHROUGH = True  # unknown flags go to vLLM unchanged
GENERAL_PLUGIN = "thinkeys"
ENDPOINT_PLUGIN = "thinkeys_savings"
DEFAULT_CPU_KV_CACHE_GIB = 4


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder (a thin-key checkpoint, or any model vLLM serves)")
    parser.add_argument(
        "--print-command",
        action="store_true",
        help="print the environment and command that would run, and exit",
    )
    parser.epilog = "Every other flag is passed to vLLM's OpenAI server (see its --help)."


def plugin_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment with our plugins appended to ``VLLM_PLUGINS``."""
    env = dict(os.environ if environ is None else environ)
    allowed = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    for name in (GENERAL_PLUGIN, ENDPOINT_PLUGIN):
        if name not in allowed:
            allowed.append(name)
    env["VLLM_PLUGINS"] = ",".join(allowed)
    return env


def _validate_model(model: str) -> None:
    path = Path(model)
    if not path.exists():
        if "/" in model and not model.startswith((".", "/")):
            return  # a hub id: vLLM resolves it (offline machines will say so themselves)
        raise ThinKeyError(f"{model}: no such model folder")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ThinKeyError(f"{config_path}: missing; a model folder needs a config.json")
    import json

    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ThinKeyError(f"{config_path}: not valid JSON ({exc})") from None
    if is_thin_key_config(config):
        ThinKeyConfig.from_hf_config(config, where=str(config_path))
        from thinkeys.checkpoint_check import check_checkpoint_files

        check_checkpoint_files(path)


def server_command(model: str, passthrough: list[str]) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *passthrough]


def run(args: argparse.Namespace) -> int:
    _validate_model(args.model)
    env = plugin_env()
    passthrough = list(args.passthrough)
    if (
        not any(flag.startswith("--kv-cache-memory-bytes") for flag in passthrough)
        and "VLLM_CPU_KVCACHE_SPACE" not in env
        and _is_cpu_build()
    ):
        env["VLLM_CPU_KVCACHE_SPACE"] = str(DEFAULT_CPU_KV_CACHE_GIB)
        print(
            f"thinkeys serve: VLLM_CPU_KVCACHE_SPACE not set; using {DEFAULT_CPU_KV_CACHE_GIB} GiB of KV cache",
            file=sys.stderr,
        )
    cmd = server_command(args.model, passthrough)
    if args.print_command:
        print(f"VLLM_PLUGINS={env['VLLM_PLUGINS']} " + " ".join(cmd))
        return 0
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


def _is_cpu_build() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
        return True
    except PackageNotFoundError:
        return False
