"""The container suite (``make deploy-test``): deploy/ built and run on a real Docker engine.

Not part of ``make test`` (tests/conftest.py leaves this folder out unless it is named). Session
fixtures prepare the machine once (see harness.py): the engine (started here, and stopped at the end,
when none runs), the stand-in base images, the CPU image built from this checkout by ``docker compose
build``, and the model and text folders mounted into the containers. Each test runs its own Compose
project (``-p thinkeys-dt-<name>``, so a user's ``vllm-thinkeys`` project is never touched) on a free
port published on 127.0.0.1, and removes it with ``down --volumes``; leftovers of a killed run are
removed at the start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

ROOT = harness.ROOT
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
SCALE_FILE = DEPLOY / "docker-compose.scale.yml"
PROJECT_PREFIX = "thinkeys-dt-"
IMAGE = "vllm-thinkeys:cpu"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Captured before any test runs: a developer's THINKEYS_* settings pick the folders, never the services.
_MODELS_DIR = os.environ.get("THINKEYS_MODELS_DIR")
_DATA_DIR = os.environ.get("THINKEYS_DATA_DIR")


# Greedy answers of the single-container server (test_2), which the two-node deployment (test_6) must reproduce.
REFERENCE_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Thin keys and full values"]
REFERENCE: dict[str, "GreedyAnswer"] = {}  # the single-container server's greedy answers (test_2), by prompt
SERVED_MODEL_NAME = "smollm2-thin"  # THINKEYS_SERVED_MODEL_NAME's default


@dataclass
class GreedyAnswer:
    tokens: list[str]  # the greedy continuation, token by token
    top: list[dict[str, float]]  # at each step, the TOP_LOGPROBS most likely tokens and their logprobs


TOP_LOGPROBS = 5


def greedy_answer(base_url: str, prompt: str, max_tokens: int = 24) -> GreedyAnswer:
    """The greedy continuation of ``prompt`` with each step's top choices (vLLM's completion logprobs)."""
    response = httpx.post(f"{base_url}/v1/completions", timeout=300, json={
        "model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "logprobs": TOP_LOGPROBS, "ignore_eos": True,
    })  # fmt: skip
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == max_tokens
    return GreedyAnswer(logprobs["tokens"], logprobs["top_logprobs"])


def assert_same_greedy(got: GreedyAnswer, want: GreedyAnswer, what: str) -> None:
    """Greedy answers of one model served two ways (e.g. one container vs two pipeline stages), compared as vLLM's
    own tests do (tests/models/utils.py: check_logprobs_close): the tokens agree up to the first difference, and
    there each side's token is among the other's top choices (a near tie that bf16 rounding decides); after it
    the continuations may differ."""
    for i, (a, b) in enumerate(zip(got.tokens, want.tokens)):
        if a == b:
            continue
        assert a in want.top[i] and b in got.top[i], (
            f"{what}: token {i} is {a!r} where the reference has {b!r}, and not a near tie: "
            f"ours {got.top[i]}, reference {want.top[i]}"
        )
        return


# Figures the tests record (build and start-up times, what a stopped client saw), printed at the end of the run.
FIGURES: dict[str, object] = {}


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.write_sep("-", "deploy figures")
        for key, value in FIGURES.items():
            terminalreporter.write_line(f"{key}: {value}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THINKEYS_", "VLLM_CPU_OMP", "COMPOSE_"))}
    return {**env, **overrides}


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([harness.docker_bin(), *args], capture_output=True, text=True, check=check, timeout=timeout)


TEST_LABEL = "org.thinkeys.deploy-test"  # on containers and networks a test makes without Compose


def remove_leftovers() -> None:
    """Containers, networks and volumes of earlier runs' test projects (a killed run cannot clean up)."""
    for container in docker("ps", "-aq", "--filter", f"label={TEST_LABEL}", check=False).stdout.split():
        docker("rm", "-f", "-v", container, check=False)
    for network in docker("network", "ls", "-q", "--filter", f"label={TEST_LABEL}", check=False).stdout.split():
        docker("network", "rm", network, check=False)
    label = '{{index .Labels "com.docker.compose.project"}}'
    for kind, ls in (("container", ["ps", "-a"]), ("network", ["network", "ls"]), ("volume", ["volume", "ls"])):
        for item in docker(*ls, "-q", "--filter", "label=com.docker.compose.project", check=False).stdout.split():
            fmt = label.replace(".Labels", ".Config.Labels") if kind == "container" else label
            if docker(kind, "inspect", "--format", fmt, item, check=False).stdout.strip().startswith(PROJECT_PREFIX):
                docker(kind, "rm", *(["-f"] if kind == "container" else []), item, check=False)


@dataclass
class Project:
    """One Compose project of deploy/docker-compose.yml, run with the README's commands."""

    name: str
    env: dict[str, str]
    port: int
    files: tuple[Path, ...] = (COMPOSE_FILE,)  # -f of each, in order (the scale override after the base file)

    def command(self, *args: str) -> list[str]:
        # --env-file /dev/null: a developer's deploy/.env must not change what the test runs
        files = [arg for f in self.files for arg in ("-f", str(f))]
        return [*harness.compose_command(), "-p", self.name, "--env-file", os.devnull, *files, *args]

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(*args), capture_output=True, text=True, env=self.env, timeout=timeout, cwd=ROOT)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def container(self, service: str = "thinkeys") -> str:
        ids = self.containers(service)
        assert len(ids) == 1, f"expected one {service} container, got {ids}"
        return ids[0]

    def containers(self, service: str = "thinkeys") -> list[str]:
        return sorted(self.compose("ps", "-a", "-q", service).stdout.split())

    def state(self, service: str = "thinkeys") -> dict:
        return json.loads(docker("inspect", "--format", "{{json .State}}", self.container(service)).stdout)

    def restart_count(self, service: str = "thinkeys") -> int:
        return int(docker("inspect", "--format", "{{.RestartCount}}", self.container(service)).stdout)

    def logs(self, service: str = "thinkeys") -> str:
        return self.compose("logs", "--no-color", "--no-log-prefix", service, check=False).stdout

    def wait_healthy(self, timeout_s: float = 600, service: str = "thinkeys", container: str | None = None) -> float:
        """Seconds until the server answers /health (the container must stay up meanwhile).

        The server itself is asked, over the project's network (the host reaches a container's address on
        a bridge network the test's project created), every second: Docker's healthcheck polls every 15 s,
        so waiting for it to say "healthy" adds up to 15 s to every start. Docker's own status is checked
        by the tests that are about it.
        """
        t0 = time.monotonic()
        container = container or self.container(service)
        while time.monotonic() - t0 < timeout_s:
            state = json.loads(docker("inspect", "--format", "{{json .State}}", container).stdout)
            if state["Status"] in ("exited", "dead"):
                raise AssertionError(f"container stopped ({state}); logs:\n{self.logs(service)[-4000:]}")
            if state["Status"] == "running" and server_healthy(container):
                return time.monotonic() - t0
            time.sleep(1)
        raise AssertionError(f"not healthy after {timeout_s:.0f} s: {self.state(service)}; logs:\n{self.logs(service)[-4000:]}")

    def wait_docker_healthy(self, timeout_s: float = 60, service: str = "thinkeys") -> float:
        """Seconds until Docker's healthcheck reports healthy (what `docker compose ps` shows)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if (self.state(service).get("Health") or {}).get("Status") == "healthy":
                return time.monotonic() - t0
            time.sleep(1)
        raise AssertionError(f"Docker's healthcheck not healthy after {timeout_s:.0f} s: {self.state(service)}")

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", check=False, timeout=300)


@pytest.fixture(scope="session")
def engine():
    eng = harness.ensure_engine()
    FIGURES["engine"] = f"started here in {eng.started_s:.1f} s" if eng.process else "already running"
    remove_leftovers()
    yield eng
    remove_leftovers()
    harness.stop_engine(eng)


@pytest.fixture(scope="session")
def base_images(engine) -> dict[str, str]:
    t0 = time.monotonic()
    images = harness.ensure_base_images()
    FIGURES["base images"] = f"{images} in {time.monotonic() - t0:.1f} s"
    return images


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(models, data) for THINKEYS_MODELS_DIR / THINKEYS_DATA_DIR: the developer's, the checkout's
    (where `thinkeys fetch` / `make fetch` put them) or a cached folder fetched here with `thinkeys fetch`."""
    candidates = []
    if _MODELS_DIR and _DATA_DIR:
        candidates.append((Path(_MODELS_DIR), Path(_DATA_DIR)))
    candidates += [(ROOT / "models", ROOT / "data"), (harness.CACHE / "models", harness.CACHE / "data")]
    for models, data in candidates:
        if (models / DEFAULT_MODEL / "config.json").is_file() and (data / "wiki" / "tune.txt").is_file():
            return models.resolve(), data.resolve()
    models, data = candidates[-1]
    thinkeys = Path(sys.executable).parent / "thinkeys"
    subprocess.run([str(thinkeys), "fetch", "--models-dir", str(models), "--data-dir", str(data)], check=True, timeout=900)
    return models.resolve(), data.resolve()


def build_env() -> dict[str, str]:
    """The compose client's environment for a build on this machine.

    The Dockerfiles start with ``# syntax=docker/dockerfile:1``, which makes BuildKit pull its
    Dockerfile frontend from a registry; where none can be reached (and Debian's engine has no buildx),
    the classic builder builds the same Dockerfile (it reads the directive as a comment, and the
    repository's root .dockerignore, equal to the per-Dockerfile one BuildKit reads).
    THINKEYS_DEPLOY_BUILDKIT=1 builds with BuildKit instead.
    """
    env = clean_env()
    env["DOCKER_BUILDKIT"] = "1" if os.environ.get("THINKEYS_DEPLOY_BUILDKIT") == "1" else "0"
    return env


@pytest.fixture(scope="session")
def cpu_image(base_images) -> dict:
    """`docker compose -f deploy/docker-compose.yml build` of the CPU image from this checkout."""
    t0 = time.monotonic()
    cmd = [*harness.compose_command(), "--env-file", os.devnull, "-f", str(COMPOSE_FILE), "build", "thinkeys"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=build_env(), cwd=ROOT, timeout=1800)
    assert result.returncode == 0, f"image build failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    info = json.loads(docker("image", "inspect", IMAGE).stdout)[0]
    FIGURES["image build (docker compose build), s"] = round(time.monotonic() - t0, 1)
    return {"inspect": info, "build_log": result.stdout + result.stderr}


def new_project(name: str, model_dirs: tuple[Path, Path], **settings: str) -> Project:
    """A project named thinkeys-dt-<name> on a free loopback port (unless THINKEYS_PORT is given)."""
    models, data = model_dirs
    port = int(settings.pop("THINKEYS_PORT", free_port()))
    env = clean_env(THINKEYS_MODELS_DIR=str(models), THINKEYS_DATA_DIR=str(data), THINKEYS_PORT=str(port), **settings)
    env["DOCKER_BUILDKIT"] = build_env()["DOCKER_BUILDKIT"]
    return Project(PROJECT_PREFIX + name, env, port)


@pytest.fixture
def project_factory(engine, cpu_image, model_dirs, request):
    """Makes Compose projects with the given settings; each is taken down (volumes too) after the test."""
    made: list[Project] = []

    def make(**settings: str) -> Project:
        name = f"{request.node.name.lower().replace('_', '-')[:40]}-{len(made)}"
        made.append(new_project(name, model_dirs, **settings))
        return made[-1]

    yield make
    for project in made:
        project.down()


def container_ip(container: str) -> str:
    """The container's address on its (first) network: reachable from the host on a bridge network."""
    ips = docker("inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", container).stdout.split()
    assert ips, f"{container} has no network address"
    return ips[0]


def container_running(container: str) -> bool:
    """Whether Docker reports the container running (False once it exited, or if it is gone)."""
    return docker("inspect", "--format", "{{.State.Running}}", container, check=False).stdout.strip() == "true"


def server_healthy(container: str, port: int = 8000) -> bool:
    try:
        ip = container_ip(container)
        return httpx.get(f"http://{ip}:{port}/health", timeout=5).status_code == 200
    except (httpx.TransportError, AssertionError, subprocess.CalledProcessError):
        return False


class Deployments:
    """The Compose projects (and other containers) the selected test modules run, each started ahead of its module.

    Each test module lists what it runs in a module-level ``DEPLOYMENTS = {key: settings}`` (settings as for
    :func:`new_project`, plus ``files``; or ``start``, a function that starts something else). The modules'
    deployments are started in file order, ``AHEAD`` modules ahead of the one running: while a module's tests
    run, the next module's servers start (a served model spends much of its start in one process, and the
    refused starts of test_3 are mostly waiting), without every server of the suite in memory at once.
    A module takes its deployment with :meth:`get`, which waits for ``up -d`` to return.
    """

    AHEAD = int(os.environ.get("THINKEYS_DEPLOY_AHEAD", "1"))

    def __init__(self, model_dirs: tuple[Path, Path], plan: list[dict[str, dict]]) -> None:
        self.model_dirs = model_dirs
        self.plan = plan  # one {key: settings} per module, in file order
        self.projects: dict[str, Project] = {}
        self.started: dict[str, tuple[subprocess.Popen | None, float]] = {}

    def start(self, key: str, files: tuple[Path, ...] = (COMPOSE_FILE,), start=None, **settings: str) -> Project:
        """``start``, when given, starts something other than a Compose project: ``start(model_dirs)`` returns
        an object with ``down()``, taken as it is by :meth:`get`."""
        if key in self.projects:
            return self.projects[key]
        if start is not None:
            self.projects[key] = start(self.model_dirs)
            self.started[key] = (None, time.monotonic())
            return self.projects[key]
        project = new_project(key, self.model_dirs, **settings)
        project.files = files
        self.projects[key] = project
        process = subprocess.Popen(project.command("up", "-d"), env=project.env, cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        self.started[key] = (process, time.monotonic())
        return project

    def start_ahead(self, key: str | None = None) -> None:
        """Start the deployments of the module that runs ``key`` (the first module when None) and of the next AHEAD."""
        index = next((i for i, group in enumerate(self.plan) if key in group), 0)
        for group in self.plan[: index + 1 + self.AHEAD]:
            for name, settings in group.items():
                if name not in self.started:
                    self.start(name, **settings)

    def get(self, key: str, timeout_s: float = 1500) -> Project:
        """The deployment, once its ``up -d`` has returned (it must have succeeded)."""
        self.start_ahead(key)
        process, _ = self.started[key]
        if process is None:
            return self.projects[key]
        out, _ = process.communicate(timeout=timeout_s)
        assert process.returncode == 0, f"{key}: up -d failed ({process.returncode}):\n{out[-4000:]}"
        return self.projects[key]

    def since_start(self, key: str) -> float:
        return time.monotonic() - self.started[key][1]

    def down(self, key: str) -> None:
        if key in self.projects:
            process, _ = self.started[key]
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
            self.projects.pop(key).down()


@pytest.fixture(scope="session")
def deployments(engine, cpu_image, model_dirs, request):
    modules = sorted({item.module for item in request.session.items}, key=lambda m: m.__name__)
    plan = [getattr(m, "DEPLOYMENTS") for m in modules if getattr(m, "DEPLOYMENTS", None)]
    registry = Deployments(model_dirs, plan)
    registry.start_ahead()
    yield registry
    for key in list(registry.projects):
        registry.down(key)


def wait_http(url: str, timeout_s: float = 60, **kw) -> httpx.Response:
    t0 = time.monotonic()
    while True:
        try:
            return httpx.get(url, timeout=10, **kw)
        except httpx.TransportError:
            if time.monotonic() - t0 > timeout_s:
                raise
            time.sleep(1)
