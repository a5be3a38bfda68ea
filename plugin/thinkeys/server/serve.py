"""``thinkeys serve MODEL [any vLLM server flag]``: vLLM's OpenAI-compatible server with our plugins on.

What it adds to ``python -m vllm.entrypoints.openai.api_server``:

* ``VLLM_PLUGINS`` names our general plugin (architectures + attention backend) and our endpoint
  plugin (``/v1/thinkeys/savings`` and metrics), appended to whatever the user already allows.
  vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them.
* The model folder is checked before vLLM starts (:mod:`thinkeys.checkpoint_check` for a thin-key
  checkpoint: config fields against weight shapes, frequency tables, truncated files), so a broken
  checkpoint fails with one line naming the file and the field and exit code 2, instead of a
  traceback from an engine worker.
* Weights are read from safetensors only. ``pytorch_model.bin`` and other pickle-based files can run
  code when loaded, so a folder that has only those is refused, vLLM's ``--load-format auto`` (which
  falls back to them) becomes ``safetensors``, and a pickle-reading ``--load-format`` is refused,
  unless ``--allow-pickle`` says the user trusts the files.
* ``--require-api-key`` refuses to start without an API key (``--api-key`` or ``VLLM_API_KEY``), for
  deployments that publish the port beyond loopback; without it, a server listening on a
  non-loopback address with no key logs a warning.
* On CPU, a KV-cache budget: without ``VLLM_CPU_KVCACHE_SPACE`` or ``--kv-cache-memory-bytes``
  vLLM asks for 92% of the NUMA node and refuses to start when anything else holds memory. When both
  are given, the explicit byte flag wins (vLLM's CPU platform would silently let the variable win).
* On CPU, the model dtype for the host when ``--dtype`` is not given (:func:`best_cpu_dtype`,
  decided at run time from the CPU's features and logged in one line): ``bfloat16`` where the CPU
  multiplies bf16 natively (AMX or AVX512-BF16: oneDNN's bf16 GEMMs), ``float32`` elsewhere (on
  plain AVX2 vLLM's bf16 matmuls are emulated: prefill ran 1.4x faster in fp32; see README "Speed").
  vLLM's own ``auto`` would take the checkpoint's dtype (bf16 for most models) on every host.
* It avoids the ``vllm`` console script, which crashes under the ``vllm-cpu`` distribution name.

Two steps, one process: :func:`run` checks what it can without importing vLLM, then replaces
itself (``os.execve``, so signals reach vLLM directly) with ``python -m thinkeys.server.serve``,
which is vLLM's own server ``main`` with :func:`check_server_args` run on the arguments exactly as
vLLM parsed them (its parser accepts ``--config`` files, ``--x=y``, underscores, ...).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from thinkeys.checkpoint import ThinKeyConfig, ThinKeyError, is_thin_key_config

PASSTHROUGH = True  # unknown flags go to vLLM unchanged
GENERAL_PLUGIN = "thinkeys"
ENDPOINT_PLUGIN = "thinkeys_savings"
DEFAULT_CPU_KV_CACHE_GIB = 4
#: How ``run`` tells the server process (``python -m thinkeys.server.serve``) about its own flags.
ALLOW_PICKLE_ENV = "THINKEYS_ALLOW_PICKLE"
REQUIRE_API_KEY_ENV = "THINKEYS_REQUIRE_API_KEY"
KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"
#: vLLM load formats that read nothing but safetensors files (or no files: ``dummy``).
SAFETENSORS_LOAD_FORMATS = frozenset({"safetensors", "fastsafetensors", "instanttensor", "mistral", "dummy"})
#: Weight files that are Python pickles (``torch.load``): loading one can execute code.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder (a thin-key checkpoint, or any model vLLM serves)")
    parser.add_argument(
        "--print-command",
        action="store_true",
        help="print the environment and command that would run, and exit",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load pickle-based weights (pytorch_model.bin, *.pt): only for files you trust, "
        "since unpickling can run code. Default: safetensors only",
    )
    parser.add_argument(
        "--require-api-key",
        action="store_true",
        help="refuse to start without an API key (--api-key or VLLM_API_KEY); "
        "for servers reachable beyond loopback",
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


def pickle_weight_files(folder: Path) -> list[str]:
    return sorted({p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern)})


def _validate_model(model: str, *, allow_pickle: bool = False) -> None:
    """Check a local model folder before vLLM starts; raises ThinKeyError (one line) when it cannot be served."""
    path = Path(model)
    if not path.exists():
        if "/" in model and not model.startswith((".", "/")):
            return  # a hub id: vLLM resolves it (offline machines will say so themselves)
        raise ThinKeyError(f"{model}: no such model folder")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ThinKeyError(f"{config_path}: missing; a model folder needs a config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ThinKeyError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ThinKeyError(f"{config_path}: not a JSON object; a model config maps field names to values")
    if is_thin_key_config(config):
        ThinKeyConfig.from_hf_config(config, where=str(config_path))
        from thinkeys.checkpoint_check import check_checkpoint_files

        check_checkpoint_files(path)  # safetensors only: the converter never writes anything else
    elif not allow_pickle and not any(path.glob("*.safetensors")):
        pickles = pickle_weight_files(path)
        if pickles:
            raise ThinKeyError(
                f"{path / pickles[0]}: pickle-based weights (loading them can run code) and no *.safetensors; "
                "convert them to safetensors, or pass --allow-pickle if you trust the files"
            )


def _check_kv_space_env(env: dict[str, str]) -> None:
    value = env.get(KV_SPACE_ENV)
    if value is not None and not value.strip().isdigit():
        raise ThinKeyError(
            f"{KV_SPACE_ENV}={value!r} is not a whole number of GiB; set e.g. {KV_SPACE_ENV}=1, "
            "or unset it and pass --kv-cache-memory-bytes (e.g. 512M)"
        )


@dataclass(frozen=True)
class CpuFeatures:
    """What decides the CPU default dtype (see :func:`host_cpu_features`)."""

    amx_bf16: bool
    avx512_bf16: bool
    capability: str  # torch's ATen dispatch level, e.g. AVX2, AVX512 (informational)


def host_cpu_features() -> CpuFeatures:
    """This host's features, from torch's own CPU detection (the checks vLLM's CPU kernels make)."""
    import torch

    def probe(name: str) -> bool:
        try:
            return bool(getattr(torch.cpu, name)())
        except Exception:  # noqa: BLE001 - missing in other torch builds: treat as absent
            return False

    return CpuFeatures(
        amx_bf16=probe("_is_amx_tile_supported"),
        avx512_bf16=probe("_is_avx512_bf16_supported"),
        capability=str(torch.backends.cpu.get_cpu_capability()),
    )


def best_cpu_dtype(features: CpuFeatures) -> tuple[str, str]:
    """The model dtype to serve with on this CPU, and why (one phrase)."""
    if features.amx_bf16:
        return "bfloat16", "AMX: native bf16 matrix tiles"
    if features.avx512_bf16:
        return "bfloat16", "AVX512-BF16: native bf16 dot products"
    return "float32", f"{features.capability} without native bf16: bf16 matmuls are emulated, fp32 is faster"


def _has_flag(passthrough: list[str], flag: str) -> bool:
    under = flag.replace("-", "_").replace("__", "--", 1)
    return any(a == f or a.startswith(f + "=") for a in passthrough for f in (flag, under))


def server_command(model: str, passthrough: list[str]) -> list[str]:
    return [sys.executable, "-m", "thinkeys.server.serve", "--model", model, *passthrough]


def run(args: argparse.Namespace) -> int:
    _validate_model(args.model, allow_pickle=args.allow_pickle)
    env = plugin_env()
    _check_kv_space_env(env)
    passthrough = list(args.passthrough)
    if (
        not any(flag.startswith(("--kv-cache-memory-bytes", "--kv_cache_memory_bytes")) for flag in passthrough)
        and KV_SPACE_ENV not in env
        and _is_cpu_build()
    ):
        env[KV_SPACE_ENV] = str(DEFAULT_CPU_KV_CACHE_GIB)
        print(
            f"thinkeys serve: {KV_SPACE_ENV} not set; using {DEFAULT_CPU_KV_CACHE_GIB} GiB of KV cache",
            file=sys.stderr,
        )
    if not _has_flag(passthrough, "--dtype") and not _has_flag(passthrough, "--config") and _is_cpu_build():
        dtype, why = best_cpu_dtype(host_cpu_features())
        passthrough += ["--dtype", dtype]
        print(f"thinkeys serve: --dtype {dtype} for this CPU ({why}); pass --dtype to override", file=sys.stderr)
    for flag, name in ((args.allow_pickle, ALLOW_PICKLE_ENV), (args.require_api_key, REQUIRE_API_KEY_ENV)):
        if flag:
            env[name] = "1"
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


# --- the server process: vLLM's main with our checks on its parsed arguments -------------------------


def is_loopback(host: str | None) -> bool:
    """Whether ``--host`` listens on loopback only (unset or empty means every interface)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def check_server_args(args: argparse.Namespace, *, allow_pickle: bool, require_api_key: bool) -> list[str]:
    """Apply the load-format, API-key and KV-budget rules to vLLM's parsed args (may edit them); returns warnings."""
    from thinkeys.server.endpoint import api_keys

    warnings: list[str] = []
    load_format = str(args.load_format)
    if not allow_pickle:
        if load_format == "auto":
            model = Path(args.model)
            # vLLM's "auto" picks Mistral's consolidated format when it is there, else falls back to *.bin.
            args.load_format = "mistral" if model.is_dir() and any(model.glob("consolidated*.safetensors")) else "safetensors"
        elif load_format not in SAFETENSORS_LOAD_FORMATS:
            raise ThinKeyError(
                f"--load-format {load_format} may read pickle-based weights (loading them can run code); use "
                f"one of {', '.join(sorted(SAFETENSORS_LOAD_FORMATS))}, or pass --allow-pickle if you trust the files"
            )
    if not api_keys(args):
        where = f"unix socket {args.uds}" if getattr(args, "uds", None) else f"host {args.host or '0.0.0.0 (all interfaces)'}"
        if require_api_key:
            raise ThinKeyError(
                f"--require-api-key: no API key for {where}; set VLLM_API_KEY (or pass --api-key KEY)"
            )
        if not getattr(args, "uds", None) and not is_loopback(args.host):
            warnings.append(
                f"listening on {where} without an API key: anyone who reaches the port can use the model; "
                "set VLLM_API_KEY, or bind --host 127.0.0.1"
            )
    if getattr(args, "kv_cache_memory_bytes", None) is not None and os.environ.get(KV_SPACE_ENV):
        # vLLM's CPU platform applies the legacy variable after argument parsing, overriding the flag.
        del os.environ[KV_SPACE_ENV]
        warnings.append(f"--kv-cache-memory-bytes {args.kv_cache_memory_bytes} given: ignoring {KV_SPACE_ENV}")
    return warnings


def run_headless_node() -> int:
    """``--headless``: a node of a multi-node deployment that runs only engine workers, no API server.

    vLLM's own multi-node mode (``--nnodes N --node-rank R --master-addr HEAD``, multiprocessing executor):
    node 0 runs the API server and the engine with its share of the workers, every other node runs
    ``--headless`` with its ``--node-rank``. It is ``vllm serve --headless``, which the ``vllm`` console
    script cannot start under the ``vllm-cpu`` distribution name; the workers load the plugin by its entry point.
    """
    from vllm.entrypoints.cli.serve import run_headless
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    args = make_arg_parser(FlexibleArgumentParser(description="thinkeys serve --headless")).parse_args()
    if args.api_server_count:
        print("thinkeys serve: error: --api-server-count cannot be used with --headless", file=sys.stderr)
        return 2
    args.api_server_count = 0
    run_headless(args)
    return 0


def main() -> int:
    """``python -m thinkeys.server.serve [vLLM server flags]``: what :func:`run` execs."""
    if "--headless" in sys.argv[1:]:
        return run_headless_node()
    from vllm.entrypoints.launchers import cli_args
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.logger import init_logger

    logger = init_logger("vllm.thinkeys.serve")
    vllm_validate = cli_args.validate_parsed_serve_args

    def validate(args: argparse.Namespace) -> None:
        for warning in check_server_args(
            args,
            allow_pickle=os.environ.get(ALLOW_PICKLE_ENV) == "1",
            require_api_key=os.environ.get(REQUIRE_API_KEY_ENV) == "1",
        ):
            logger.warning(warning)
        vllm_validate(args)

    # vLLM's main imports this name when it runs, after parsing and before any engine starts.
    cli_args.validate_parsed_serve_args = validate
    try:
        entry.main()
    except ThinKeyError as exc:
        print(f"thinkeys serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
