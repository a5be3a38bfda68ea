"""Issue 13, point 5: the scale-out override's replicas behind nginx share a load test; one stops mid-run.

The README's command (``docker compose -f deploy/docker-compose.yml -f deploy/docker-compose.scale.yml up -d``,
``THINKEYS_REPLICAS=2``) with nginx from its stand-in image (Debian's nginx package, built by the harness as
the other base images are). ``thinkeys loadtest run`` goes through the balancer's loopback port and samples
every replica's ``/metrics`` (``--metrics-url`` per replica, as the README says). While it runs, one replica
is stopped (``docker stop``). What must hold:

* both replicas served requests of the run (nginx spread them);
* no request that had not started on the stopped replica is lost: every request sent after the stop
  was served by the other one (nginx's ``proxy_next_upstream`` takes a request whose connection to the
  stopped replica fails to the next replica: nothing of it has been sent, so it is not run twice);
* the run's failed-request count, which the load test reports, is at most the number of requests that
  were in flight on the stopped replica when it stopped (nginx's access log, which names the replica of
  each request, with its start and end).

Both replicas run with ``--enforce-eager`` (``THINKEYS_EXTRA_ARGS``): they start faster on the 2-core
machine, and speed is not what this shows.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import COMPOSE_FILE, DEFAULT_MODEL, FIGURES, SCALE_FILE, container_ip, docker, wait_http

REPLICAS = 2
# 16 requests per user: the stop comes after the first USERS are done, so ~60 are still to be sent; docker stop
# can take its whole 10 s grace while the survivor serves on, and a shorter run (8 per user) once ended before the
# stop returned (CI, stop 16), leaving nothing sent after it to check.
USERS, REQUESTS_PER_USER, PROMPT_LEN, OUTPUT_LEN = 4, 16, 32, 32
DEPLOYMENTS = {
    "scale": {
        "files": (COMPOSE_FILE, SCALE_FILE),
        "THINKEYS_REPLICAS": str(REPLICAS),
        "THINKEYS_KV_CACHE_MEMORY": "256M",
        "THINKEYS_EXTRA_ARGS": "--enforce-eager",
    }
}
LOG_LINE = re.compile(
    r'"(?P<method>\S+) (?P<path>\S+) [^"]*" (?P<status>\d+) \d+ upstream="(?P<upstream>[^"]*)" '
    r'upstream_status="(?P<upstream_status>[^"]*)" request_time=(?P<request_time>[\d.]+) end=(?P<end>[\d.]+)'
)


@pytest.fixture(scope="module")
def scaled(deployments):
    project = deployments.get("scale")  # `up -d` returns once the replicas are healthy and nginx started
    try:
        replicas = project.containers("thinkeys")
        assert len(replicas) == REPLICAS, replicas
        for replica in replicas:
            project.wait_healthy(timeout_s=1500, container=replica)
        assert wait_http(f"{project.base_url}/health", timeout_s=60).status_code == 200  # through nginx
        FIGURES["scale: up -d to both replicas and nginx answering, s"] = round(deployments.since_start("scale"), 1)
        yield project
    finally:
        deployments.down("scale")


def _requests_logged(project) -> list[dict]:
    """nginx's access log (deploy/nginx.conf's `thinkeys` format): one entry per request, with the replicas it went to."""
    entries = []
    for line in project.logs("lb").splitlines():
        m = LOG_LINE.search(line)
        if m and m["path"] == "/v1/completions":
            end = float(m["end"])
            upstreams = [u.strip() for u in m["upstream"].split(",")]
            entries.append({"status": int(m["status"]), "upstreams": upstreams, "upstream_status": m["upstream_status"],
                            "start": end - float(m["request_time"]), "end": end})  # fmt: skip
    return entries


def _running(ip: str) -> float:
    text = httpx.get(f"http://{ip}:8000/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^vllm:num_requests_(?:running|waiting)\{[^}]*\} ([\d.e+]+)$", text, re.M))


@pytest.fixture(scope="module")
def load_run(scaled, model_dirs, tmp_path_factory):
    """The load test through nginx, with one replica stopped while it runs."""
    models, _ = model_dirs
    replicas = scaled.containers("thinkeys")
    ips = {replica: container_ip(replica) for replica in replicas}
    out = tmp_path_factory.mktemp("scale-loadtest")
    cmd = [
        str(Path(sys.executable).parent / "thinkeys"), "loadtest", "run", "--url", scaled.base_url,
        *[arg for ip in ips.values() for arg in ("--metrics-url", f"http://{ip}:8000/metrics")],
        "--tokenizer", str(models / DEFAULT_MODEL), "--users", str(USERS), "--requests-per-user", str(REQUESTS_PER_USER),
        "--prompt-len", str(PROMPT_LEN), "--output-len", str(OUTPUT_LEN), "--time-limit", "400", "--drain-timeout", "30",
        "--out", str(out), "--name", "scale", "--no-progress",
    ]  # fmt: skip
    t_run = time.time()
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=False)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(run.stdout), daemon=True)
    reader.start()
    # Stop a replica once both are busy and the run is well under way (some requests done, many still to send).
    stopped, in_flight_metrics = replicas[-1], None
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and run.poll() is None:
        done = [e for e in _requests_logged(scaled) if e["start"] >= t_run]
        busy = {r: _running(ip) for r, ip in ips.items()}
        if len(done) >= USERS and all(busy.values()):
            in_flight_metrics = busy[stopped]
            break
        time.sleep(0.5)
    assert in_flight_metrics is not None, f"the load never reached both replicas: {''.join(output)[-3000:]}"
    t_stop = time.time()
    docker("stop", "--time", "10", stopped)  # the entrypoint passes SIGTERM on to vLLM's server
    t_stopped = time.time()
    FIGURES["scale: docker stop of a replica (10 s grace), s"] = round(t_stopped - t_stop, 1)
    assert run.wait(timeout=600) == 0, "".join(output)[-4000:]
    FIGURES["scale: load test ended, s after the stop returned"] = round(time.time() - t_stopped, 1)
    reader.join(10)
    report = json.loads((out / "scale.json").read_text())
    (step,) = report["results"][0]["steps"]
    entries = [e for e in _requests_logged(scaled) if e["start"] >= t_run - 1]
    return {
        "step": step, "entries": entries, "ips": ips, "stopped": stopped, "t_stop": t_stop, "t_stopped": t_stopped,
        "in_flight_metrics": in_flight_metrics, "output": "".join(output), "scaled": scaled,
    }  # fmt: skip


def test_replicas_behind_nginx_share_the_load_test(load_run):
    step, ips = load_run["step"], load_run["ips"]
    by_replica = {replica: 0 for replica in ips}
    for entry in load_run["entries"]:
        if entry["end"] < load_run["t_stop"]:
            for replica, ip in ips.items():
                by_replica[replica] += entry["upstreams"][-1] == f"{ip}:8000"
    assert all(by_replica.values()), f"requests per replica before the stop: {by_replica}"
    # everything the run planned was sent and ended, as completed or failed (none cut off by the time limit)
    assert step["requests"] == USERS * REQUESTS_PER_USER
    assert step["completed"] + step["failed"] == step["requests"] and step["cancelled"] == step["not_sent"] == 0, step
    # both replicas' queues were sampled (the /metrics of each, summed)
    assert step["server"]["max_running"] >= 2 and step["server"]["samples"] > 0


def test_stopping_a_replica_mid_run_loses_only_what_was_running_on_it(load_run):
    step, ips, stopped = load_run["step"], load_run["ips"], load_run["stopped"]
    stopped_addr = f"{ips[stopped]}:8000"
    t_stop, t_stopped = load_run["t_stop"], load_run["t_stopped"]
    entries = load_run["entries"]
    # In flight on the stopped replica: sent to it (its last upstream) before the stop returned, open when it began.
    in_flight = [e for e in entries if e["upstreams"][-1] == stopped_addr and e["start"] <= t_stopped and e["end"] >= t_stop]
    assert step["failed"] <= len(in_flight), (step["failed"], in_flight, step["errors"])
    # Every request nginx received after the stop had returned went to the surviving replica and was served;
    # those that first tried the stopped one were passed on (its address, then the other's, in the log).
    after = [e for e in entries if e["start"] > t_stopped]
    assert after, "no request was sent after the stop: the run ended too early to show anything"
    assert all(e["status"] == 200 and e["upstreams"][-1] != stopped_addr for e in after), after
    retried = [e for e in entries if len(e["upstreams"]) > 1 and e["upstreams"][0] == stopped_addr]
    assert all(e["status"] == 200 for e in retried), retried
    # the client's own count: everything but the failed ones completed
    assert step["completed"] == step["requests"] - step["failed"]
    FIGURES["scale: replica stopped mid-run"] = {
        "requests": step["requests"], "completed": step["completed"], "failed (load test)": step["failed"],
        "in flight on the stopped replica (nginx log)": len(in_flight),
        "running+waiting on it just before the stop (/metrics)": load_run["in_flight_metrics"],
        "sent after the stop": len(after), "passed on from the stopped replica (proxy_next_upstream)": len(retried),
        "errors": step["errors"],
    }  # fmt: skip
