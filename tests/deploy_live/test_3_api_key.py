"""Issue 13, point 3: published beyond loopback, the service needs THINKEYS_API_KEY.

Without it the container refuses to start with one clear line per attempt and stops after its
restart policy's tries (``on-failure:5``), instead of restarting for ever. With it, requests without
the key get 401 and with it 200. The port is published on every interface (0.0.0.0, as a user
would), and the tests reach it only through 127.0.0.1.
"""

from __future__ import annotations

import secrets
import time

import httpx

from conftest import docker

ERROR = "thinkeys serve: error: --require-api-key: no API key"
KEY = secrets.token_hex(16)
# Started with the other deployments at the beginning of the session (conftest.Deployments): the refused
# tries run while the other servers start. The keyed server's KV budget is small: it only answers a few requests.
DEPLOYMENTS = {
    "refused": {"THINKEYS_BIND_ADDRESS": "0.0.0.0"},
    "keyed": {"THINKEYS_BIND_ADDRESS": "0.0.0.0", "THINKEYS_API_KEY": KEY, "THINKEYS_KV_CACHE_MEMORY": "256M"},
}


def test_beyond_loopback_without_a_key_it_refuses_once_per_try_and_stops(deployments):
    project = deployments.get("refused")
    t0 = time.monotonic()
    while True:
        state = project.state()
        if state["Status"] == "exited" and not state["Restarting"]:
            # the policy's last try is over when no restart follows within the backoff
            time.sleep(5)
            state = project.state()
            if state["Status"] == "exited":
                break
        assert time.monotonic() - t0 < 1200, f"still restarting after 20 min: {state}"
        time.sleep(2)
    assert state["ExitCode"] == 2 and project.restart_count() == 5  # on-failure:5, then stopped for good
    logs = project.logs()
    errors = [line for line in logs.splitlines() if "error" in line.lower()]
    # one line per try (the first and 5 restarts), the same clear line, and no traceback
    assert errors == [errors[0]] * 6 and errors[0].startswith(ERROR), logs[-4000:]
    assert "set VLLM_API_KEY" in errors[0] and "Traceback" not in logs
    time.sleep(10)
    assert project.restart_count() == 5 and project.state()["Status"] == "exited"
    deployments.down("refused")


def test_beyond_loopback_with_a_key_requests_need_it(deployments):
    key = KEY
    project = deployments.get("keyed")
    project.wait_healthy(timeout_s=1500)
    url = f"{project.base_url}/v1/completions"
    body = {"model": "smollm2-thin", "prompt": "Hello", "max_tokens": 2}
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
    ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{project.base_url}/v1/thinkeys/savings", timeout=30).status_code == 401
    assert httpx.get(f"{project.base_url}/health", timeout=30).status_code == 200  # the healthcheck's path stays open
    # the key is on no command line (`ps` in the container shows none of it)
    top = docker("top", project.container(), "-o", "pid,args").stdout
    assert key not in top and "thinkeys.server.serve" in top
    deployments.down("keyed")
