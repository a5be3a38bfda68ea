"""Issue 13, points 2 and 4: `docker compose up` serves the default model; then faults.

One deployment for the module, started as deploy/README says (``docker compose -f
deploy/docker-compose.yml up -d``, the model and text folders mounted read-only), reached only
through its port published on 127.0.0.1. The tests run in file order: serving first, then the
faults (the engine killed inside the container, a request in flight during ``stop``, ``down``).
"""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest

from conftest import DEFAULT_MODEL, FIGURES, REFERENCE, REFERENCE_PROMPTS, docker, greedy_answer

MODEL_NAME = "smollm2-thin"  # THINKEYS_SERVED_MODEL_NAME's default
# SmolLM2-135M-Instruct: 30 layers, 3 KV heads, head_dim 64; the default serves r = 32 keys (rebuild).
LAYERS, KV_HEADS, HEAD_DIM, RANK = 30, 3, 64, 32
GiB = 1024**3


DEPLOYMENTS = {"serve": {}}  # the README's `up -d` with the default settings (started with the others: conftest.Deployments)


@pytest.fixture(scope="module")
def served(deployments):
    project = deployments.get("serve")
    try:
        project.wait_healthy(timeout_s=1500)
        FIGURES["compose up -d to healthy (/health; test_3's deployments starting alongside), s"] = round(deployments.since_start("serve"), 1)
        yield project
    finally:
        deployments.down("serve")


def client(project) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{project.base_url}/v1", api_key="unused", timeout=120, max_retries=0)


def test_compose_up_turns_healthy_with_the_default_model_mounted_read_only(served):
    served.wait_docker_healthy(timeout_s=60)  # the healthcheck polls every 15 s
    ps = json.loads(served.compose("ps", "--format", "json").stdout.splitlines()[0])
    assert ps["Health"] == "healthy" and ps["State"] == "running"
    # published on loopback only, at the port the test chose
    (port,) = [p for p in ps["Publishers"] if p["TargetPort"] == 8000]
    assert (port["URL"], port["PublishedPort"]) == ("127.0.0.1", served.port)
    mounts = {m["Destination"]: m for m in json.loads(docker("inspect", "--format", "{{json .Mounts}}", served.container()).stdout)}
    assert mounts["/models"]["RW"] is False and mounts["/data"]["RW"] is False
    assert mounts["/var/cache/thinkeys"]["Type"] == "volume" and mounts["/var/cache/thinkeys"]["RW"] is True
    logs = served.logs()
    # the default: the shipped recovered r = 32 rebuild weights applied to the mounted base model
    assert f"applying recovered weights" in logs and f"/models/{DEFAULT_MODEL}" in logs, logs[-3000:]
    # the server runs as the image's unprivileged user
    top = docker("top", served.container(), "-o", "pid,uid,args").stdout.splitlines()[1:]  # docker top needs the pid column
    assert top and all(line.split()[1] == "10001" for line in top), top


def test_openai_client_gets_a_completion_a_chat_answer_and_a_stream(served):
    c = client(served)
    assert [m.id for m in c.models.list().data] == [MODEL_NAME]
    completion = c.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert completion.usage.completion_tokens == 8 and completion.choices[0].text.strip()
    chat = c.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0
    )
    answer = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and answer.strip()
    assert "paris" in answer.lower(), answer  # the recovered default answers this one
    pieces = []
    stream = c.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Count from one to five."}], max_tokens=16, temperature=0, stream=True
    )
    finish = None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len([p for p in pieces if p]) >= 4 and finish in ("stop", "length"), pieces


def test_greedy_answers_of_the_single_container_server(served):
    for prompt in REFERENCE_PROMPTS:
        REFERENCE[prompt] = greedy_answer(served.base_url, prompt)
    assert REFERENCE[REFERENCE_PROMPTS[0]].tokens[:3] != ["", "", ""]


def test_savings_and_metrics_answer_and_the_engine_caches_thin_keys(served):
    savings = httpx.get(f"{served.base_url}/v1/thinkeys/savings", timeout=30)
    assert savings.status_code == 200
    report = savings.json()
    assert report["model"] == MODEL_NAME and report["thin_keys"] is True
    assert (report["rank"], report["head_dim"], report["num_layers"], report["num_kv_heads"]) == (RANK, HEAD_DIM, LAYERS, KV_HEADS)
    dtype_bytes = report["bytes_per_token"]["stock"] // (LAYERS * KV_HEADS * 2 * HEAD_DIM)
    assert report["bytes_per_token"] == {"thin": LAYERS * KV_HEADS * (RANK + HEAD_DIM) * dtype_bytes, "stock": LAYERS * KV_HEADS * 2 * HEAD_DIM * dtype_bytes}
    # THINKEYS_KV_CACHE_MEMORY's default (1G), configured
    assert report["kv_cache_memory_bytes"] == GiB and report["kv_cache_memory_source"] == "configured"
    block_bytes = report["block_size"] * report["bytes_per_token"]["thin"]
    assert report["num_blocks"]["thin"] == GiB // block_bytes

    metrics = httpx.get(f"{served.base_url}/metrics", timeout=30)
    assert metrics.status_code == 200
    # the engine's own figure: vLLM's cache_config_info, which the savings report must equal
    info = re.search(r"^vllm:cache_config_info\{(.*)\}", metrics.text, re.M)
    assert info, metrics.text[:2000]
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info.group(1)))
    assert int(labels["num_gpu_blocks"]) == report["num_blocks"]["thin"] > report["num_blocks"]["stock"]
    assert int(labels["block_size"]) == report["block_size"]
    assert report["capacity_tokens"]["thin"] == report["num_blocks"]["thin"] * report["block_size"]


FIND_ENGINE = """
import os
for pid in sorted(int(p) for p in os.listdir('/proc') if p.isdigit()):
    try:
        cmd = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ').replace(b'\\n', b' ').decode().strip()
        comm = open(f'/proc/{pid}/comm').read().strip()
    except OSError:
        continue
    print(pid, comm, cmd, sep='\\t')
"""


def _processes(project) -> list[tuple[int, str, str]]:
    out = docker("exec", project.container(), "python", "-c", FIND_ENGINE).stdout
    return [(int(pid), comm, cmd) for pid, comm, cmd in (line.split("\t", 2) for line in out.splitlines())]


def test_killing_the_engine_restarts_the_container_under_its_policy_and_it_serves_again(served):
    before = served.restart_count()
    started = served.state()["StartedAt"]
    processes = _processes(served)
    engines = [pid for pid, comm, cmd in processes if "EngineCore" in comm or "EngineCore" in cmd]
    assert len(engines) == 1, processes
    # SIGKILL vLLM's engine-core process inside the container (it runs as the same user): no chance to clean up
    docker("exec", served.container(), "bash", "-c", f"kill -9 {engines[0]}")
    t0 = time.monotonic()
    while served.state()["StartedAt"] == started:
        assert time.monotonic() - t0 < 120, f"the container did not exit after its engine was killed: {served.state()}"
        time.sleep(1)
    assert served.restart_count() == before + 1
    served.wait_healthy(timeout_s=1200)
    c = client(served)
    out = c.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4
    FIGURES["engine killed: container restarted and healthy again, s"] = round(time.monotonic() - t0, 1)


def test_a_request_in_flight_during_compose_stop_ends_with_an_error_not_a_hang(served):
    got: dict = {}

    def stream() -> None:
        chunks = 0
        try:
            with httpx.stream(
                "POST", f"{served.base_url}/v1/completions", timeout=httpx.Timeout(30, read=300),
                json={"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 1800, "ignore_eos": True, "stream": True},
            ) as response:  # fmt: skip
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunks += 1
                        got["streaming"] = True
                        got["last"] = json.loads(line[len("data: "):])
                    if line == "data: [DONE]":
                        got["done"] = True
            got["outcome"] = "ended"
        except httpx.TimeoutException as exc:
            got["outcome"] = f"timeout: {exc!r}"
        except httpx.TransportError as exc:
            got["outcome"] = f"error: {type(exc).__name__}"
        got["chunks"] = chunks
        got["t_end"] = time.monotonic()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not got.get("streaming"):
        assert time.monotonic() - t0 < 120 and thread.is_alive(), f"the request did not start streaming: {got}"
        time.sleep(0.2)
    t_stop = time.monotonic()
    served.compose("stop", "--timeout", "20")
    stop_s = time.monotonic() - t_stop
    thread.join(60)
    assert not thread.is_alive(), "the client still hangs 60 s after `docker compose stop` returned"
    # cut short, and the client is told: the transport failed, the stream closed without its final [DONE],
    # or (vLLM's graceful shutdown) its last event says the request was aborted or failed
    last = got.get("last") or {}
    told = "error" in last or any(c.get("finish_reason") in ("abort", "error") for c in last.get("choices", []))
    assert got["outcome"].startswith("error") or (got["outcome"] == "ended" and (not got.get("done") or told)), got
    assert got["chunks"] < 1800 and got["t_end"] - t_stop < stop_s + 30, got
    assert served.state()["Status"] == "exited"
    FIGURES["compose stop with a stream in flight"] = {
        "stop_s": round(stop_s, 1), "outcome": got["outcome"], "chunks": got["chunks"], "done": got.get("done", False),
        "last_event": {k: last[k] for k in ("error",) if k in last} or [c.get("finish_reason") for c in last.get("choices", [])],
    }  # fmt: skip


def test_compose_down_leaves_no_container_or_network(served):
    label = f"label=com.docker.compose.project={served.name}"
    assert docker("ps", "-aq", "--filter", label).stdout.split(), "the stopped container is there before down"
    served.compose("down")
    assert docker("ps", "-aq", "--filter", label).stdout.split() == []
    assert docker("network", "ls", "-q", "--filter", label).stdout.split() == []
    # the conversion cache is a named volume: kept by a plain `down` (the next `up` reuses it), gone with --volumes
    assert docker("volume", "ls", "-q", "--filter", label).stdout.split() == [f"{served.name}_thinkeys-cache"]
    served.compose("down", "--volumes")
    assert docker("volume", "ls", "-q", "--filter", label).stdout.split() == []
