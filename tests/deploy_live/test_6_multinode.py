"""Issue 13, point 6: beyond one machine. Two containers on a private Docker network serve one model as two nodes.

What vLLM's CPU build (0.32) can do across machines, found by running it:

* **Ray: refused.** ``--distributed-executor-backend ray`` on the CPU build fails before any worker starts with
  ``ValueError: current platform cpu does not support ray.`` (``vllm/v1/executor/ray_utils.py``,
  ``initialize_ray_cluster``: the CPU platform has no ``ray_device_key``; each Ray worker checks it again in
  ``get_node_and_physical_gpu_ids``). Not tested here; deploy/README says what remains.
* **vLLM's own multi-node mode: works.** The multiprocessing executor spans nodes with ``--nnodes 2
  --node-rank R --master-addr HEAD``: node 0 runs the API server, the engine and pipeline stage 0, node 1
  runs ``--headless`` (engine workers only) with stage 1, and torch.distributed (gloo) carries the
  activations between them. That is what this test runs, as deploy/README's "Several machines" recipe says,
  with the private network standing in for the hosts' network.
* Tensor parallelism is not an option for this model: SmolLM2-135M has 9 query heads and 3 KV heads, which
  do not split in two. Pipeline parallelism (``--pipeline-parallel-size 2``: layers 0-14 on node 0, 15-29 on
  node 1) is. On CPU it needs the compiled mode (vLLM's default): with ``--enforce-eager`` the CPU model
  runner skips the warm-up that allocates the buffer of the activations a later stage receives, and stage
  1 fails its first step (``assert self.intermediate_tensors is not None``, gpu_model_runner.py), on one
  machine as on two.

What must hold: the greedy tokens equal the single-container server's (test_2, same prompts), and
``/v1/thinkeys/savings`` reports the whole model (30 layers, every layer's bytes per token), with the KV
memory of both stages: 2 x 512 MiB here, so its blocks and capacity equal the single server's at 1 GiB.

Each container is one "host": the image, the model folder mounted read-only at the same path, its own
conversion cache (each node applies the shipped recovered weights itself, so both serve the same
checkpoint path), and its own cores (``VLLM_CPU_OMP_THREADS_BIND``: 0 and 1; on real hosts ``auto``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
import pytest

from conftest import (
    FIGURES, IMAGE, PROJECT_PREFIX, REFERENCE, REFERENCE_PROMPTS, SERVED_MODEL_NAME, TEST_LABEL, docker, free_port,
    GreedyAnswer, assert_same_greedy, container_running, greedy_answer, server_healthy,
)  # fmt: skip

NAME = PROJECT_PREFIX + "multinode"
STAGE_KV = "512M"
# SmolLM2-135M-Instruct: 30 layers, 3 KV heads, head_dim 64; the default serves r = 32 keys (rebuild).
LAYERS, KV_HEADS, HEAD_DIM, RANK = 30, 3, 64, 32
GiB = 1024**3


def node_args(rank: int) -> list[str]:
    """deploy/README's settings of node ``rank`` (``THINKEYS_EXTRA_ARGS``): the same flags on every node, plus its rank."""
    flags = f"--pipeline-parallel-size 2 --nnodes 2 --node-rank {rank} --master-addr {NAME}-node0"
    return ["-e", f"THINKEYS_EXTRA_ARGS={flags}{' --headless' if rank else ''}"]


@dataclass
class Cluster:
    port: int
    nodes: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self, node: int) -> str:
        out = docker("logs", self.nodes[node], check=False)
        return out.stdout + out.stderr

    def running(self, node: int) -> bool:
        return container_running(self.nodes[node])

    def down(self) -> None:
        for node in self.nodes:
            docker("rm", "-f", "-v", node, check=False, timeout=300)  # -v: each node's conversion-cache volume
        docker("network", "rm", NAME, check=False)


def start_cluster(model_dirs) -> Cluster:
    """Two nodes on a private network: ``docker run`` of the image on each, as on two hosts."""
    models, data = model_dirs
    docker("network", "create", "--label", TEST_LABEL, NAME)
    cluster = Cluster(port=free_port())
    for rank in (1, 0):  # the worker node first: node 0's engine waits for it
        publish = ["-p", f"127.0.0.1:{cluster.port}:8000"] if rank == 0 else []
        container = docker(
            "run", "-d", "--name", f"{NAME}-node{rank}", "--network", NAME, "--label", TEST_LABEL, "--shm-size", "2g",
            "--mount", f"type=bind,source={models},target=/models,readonly",
            "--mount", f"type=bind,source={data},target=/data,readonly",
            "-e", f"THINKEYS_KV_CACHE_MEMORY={STAGE_KV}", "-e", f"VLLM_CPU_OMP_THREADS_BIND={rank}",
            *node_args(rank), *publish, IMAGE,
        ).stdout.strip()  # fmt: skip
        cluster.nodes.insert(0, container) if rank == 0 else cluster.nodes.append(container)
    return cluster


DEPLOYMENTS = {"multinode": {"start": start_cluster}}


@pytest.fixture(scope="module")
def cluster(deployments):
    cluster = deployments.get("multinode")
    try:
        t0 = time.monotonic()
        while not server_healthy(cluster.nodes[0]):
            for node in (0, 1):
                assert cluster.running(node), f"node {node} stopped:\n{cluster.logs(node)[-5000:]}"
            assert time.monotonic() - t0 < 1500, f"node 0 not healthy after 1500 s:\n{cluster.logs(0)[-5000:]}"
            time.sleep(1)
        FIGURES["two nodes: docker run to node 0 healthy, s"] = round(deployments.since_start("multinode"), 1)
        yield cluster
    finally:
        deployments.down("multinode")


@pytest.fixture(scope="module")
def reference(deployments) -> dict[str, GreedyAnswer]:
    """test_2's single-container answers; when test_2 did not run, a single-container server of our own."""
    if not all(prompt in REFERENCE for prompt in REFERENCE_PROMPTS):
        project = deployments.start("serve")
        deployments.get("serve")
        project.wait_healthy(timeout_s=1500)
        for prompt in REFERENCE_PROMPTS:
            REFERENCE[prompt] = greedy_answer(project.base_url, prompt)
        deployments.down("serve")
    return REFERENCE


def test_two_containers_serve_one_model_as_two_pipeline_stages(cluster):
    node0, node1 = cluster.logs(0), cluster.logs(1)
    # node 1 runs only workers (vLLM's headless multiproc executor) with the second stage; node 0 the first
    assert "headless multiproc executor" in node1, node1[-3000:]
    assert "world_size=2 rank=1" in node1 and "world_size=2 rank=0" in node0
    assert "Worker_PP1" in node1 and "Worker_PP0" in node0
    # each node applied the shipped recovered weights to its own copy, at the same path
    for log in (node0, node1):
        assert "applying recovered weights" in log
    models = httpx.get(f"{cluster.base_url}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == [SERVED_MODEL_NAME]
    # only node 0 listens for requests
    assert docker("port", cluster.nodes[1], check=False).stdout.strip() == ""


def test_greedy_tokens_equal_the_single_container_ones(cluster, reference):
    for prompt in REFERENCE_PROMPTS:
        assert_same_greedy(greedy_answer(cluster.base_url, prompt), reference[prompt], prompt)


def test_savings_report_the_whole_model(cluster):
    report = httpx.get(f"{cluster.base_url}/v1/thinkeys/savings", timeout=30).json()
    # all 30 layers, not stage 0's 15
    assert (report["rank"], report["head_dim"], report["num_layers"], report["num_kv_heads"]) == (RANK, HEAD_DIM, LAYERS, KV_HEADS)
    dtype_bytes = report["bytes_per_token"]["stock"] // (LAYERS * KV_HEADS * 2 * HEAD_DIM)
    assert report["bytes_per_token"]["thin"] == LAYERS * KV_HEADS * (RANK + HEAD_DIM) * dtype_bytes
    # both stages' budgets: 2 x 512 MiB, which holds exactly the blocks the engine allocated (a block spans both stages)
    assert report["kv_cache_memory_bytes"] == GiB and report["kv_cache_memory_source"] == "configured"
    assert report["num_blocks"]["thin"] == GiB // (report["block_size"] * report["bytes_per_token"]["thin"])
    metrics = httpx.get(f"{cluster.base_url}/metrics", timeout=30).text
    line = next(line for line in metrics.splitlines() if line.startswith("vllm:cache_config_info{"))
    assert f'num_gpu_blocks="{report["num_blocks"]["thin"]}"' in line
    assert report["num_blocks"]["thin"] > report["num_blocks"]["stock"]
    FIGURES["two nodes: savings"] = {k: report[k] for k in ("num_layers", "kv_cache_memory_bytes", "num_blocks", "capacity_tokens")}
