"""``thinkeys loadtest`` against real servers: a stock and a thin-key tiny Llama at the same KV budget.

Both servers are started once for the module by the same code ``compare`` uses to start its own
(:func:`thinkeys.loadtest.servers.start_servers`), with a KV budget of 768 KiB:

* stock (head dim 32, fp32): 2 layers x 2 KV heads x (32 + 32) x 4 B = 1,024 B per token, so
  6 blocks of 128 tokens; vLLM keeps one back, so 5 requests of <= 128 tokens fit at once;
* thin r = 8: 2 x 2 x (8 + 32) x 4 B = 640 B per token, 9 blocks, 8 requests at once: 1.6x.

Each request is ~16 prompt + 96 generated tokens (one block), so the ramp 5, 6, 8, 9 must show the
stock server queueing from 6 users and the thin one from 9, as read from vLLM's own ``/metrics``.
Each user sends 5 requests one after another, so a queue that forms lasts the whole step (about five
request lifetimes) rather than one: on a fast machine a request of 96 tokens takes ~0.5 s, and a
queue that lasted only that long could fall between two ``/metrics`` samples.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from thinkeys.checkpoint import ThinKeyError
from thinkeys.cli import main
from thinkeys.loadtest.ramp import Workload, run_step, build_prompts, wait_until_idle
from thinkeys.loadtest.report import LoadTestReport
from thinkeys.loadtest.server_metrics import parse_metrics, PREEMPTIONS, RUNNING, WAITING, KV_USAGE
from thinkeys.loadtest.servers import Launch, free_port, own_process_group, run_servers, start_servers
from thinkeys.loadtest.target import discover, normalize_base_url

KV_BUDGET = "768K"
STOCK_USERS, THIN_USERS = 5, 8  # requests of one block each that fit at once (see the module docstring)
SERVER_ARGS = ["--enforce-eager", "--dtype", "float32"]
WORKLOAD_ARGS = ["--prompt-len", "16", "--output-len", "96", "--no-progress"]


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    """``{"stock": url, "thin": url}``: tiny Llama stock and thin r = 8, same KV budget, for the module."""
    log_dir = tmp_path_factory.mktemp("loadtest-servers")
    models = [("stock", str(checkpoints["llama"])), ("thin", str(checkpoints["llama-thin"]))]
    with start_servers(models, kv_cache_memory=KV_BUDGET, max_model_len=512, extra_args=SERVER_ARGS, log_dir=log_dir) as started:
        yield {s.label: s.base_url for s in started}


# --- without a server -------------------------------------------------------------------------


def test_metrics_parser_reads_vllm_families_from_real_exposition_text():
    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    running = Gauge(RUNNING, "running", labels, registry=registry)
    waiting = Gauge(WAITING, "waiting", labels, registry=registry)
    preempt = Counter(PREEMPTIONS, "preemptions", labels, registry=registry)
    usage = Gauge(KV_USAGE, "usage", labels, registry=registry)
    for engine, (r, w, p, u) in {"0": (3, 1, 2, 0.5), "1": (4, 0, 5, 0.25)}.items():
        running.labels("m", engine).set(r)
        waiting.labels("m", engine).set(w)
        preempt.labels("m", engine).inc(p)
        usage.labels("m", engine).set(u)
    parsed = parse_metrics(generate_latest(registry).decode())
    # summed over engines; the counter's _created sample is not counted; usage is averaged
    assert parsed == {RUNNING: 7, WAITING: 1, PREEMPTIONS: 7, KV_USAGE: 0.375}


def test_servers_lead_their_own_process_group_in_the_clients_session():
    # killpg must reach vLLM's engine processes, yet a new session (= a new scheduler autogroup)
    # let a busy server starve its own client for seconds on 2 cores: see own_process_group.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], **own_process_group())
    try:
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
        assert os.getsid(child.pid) == os.getsid(0)
    finally:
        child.kill()
        child.wait()


def test_a_server_that_dies_or_never_gets_healthy_is_named_and_stopped(tmp_path):
    def launch(label: str, code: str) -> Launch:
        return Launch(label, "m", [sys.executable, "-c", code], dict(os.environ), free_port(), tmp_path / f"{label}.log")

    with pytest.raises(ThinKeyError, match=r"(?s)server 'dies' \(m\) exited with code 3 before it was healthy.*out of memory"):
        with run_servers([launch("dies", "import sys; print('out of memory'); sys.exit(3)")]):
            pass
    pid_file = tmp_path / "pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    with pytest.raises(ThinKeyError, match=r"server\(s\) \['mute'\] not healthy after 2 s"):
        with run_servers([launch("mute", sleeper)], startup_timeout_s=2):
            pass
    with pytest.raises(ProcessLookupError):  # stopped on the way out
        os.kill(int(pid_file.read_text()), 0)


def test_urls_are_normalized_and_non_urls_refused():
    assert normalize_base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert normalize_base_url(" https://example.test/api/v1 ") == "https://example.test/api"
    for bad in ("127.0.0.1:8000", "ftp://host", "http://"):
        with pytest.raises(ThinKeyError, match="not a server URL"):
            normalize_base_url(bad)


def test_bad_workloads_and_compare_inputs_fail_with_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["loadtest", "run", "--users", "0,2"])
    assert "every user count must be >= 1" in capsys.readouterr().err
    assert main(["loadtest", "run", "--users", "1", "--time-limit", "0", "--out", str(tmp_path)]) == 2
    assert "time_limit_s" in capsys.readouterr().err
    assert main(["loadtest", "compare", "--stock", str(tmp_path / "nope"), "--thin", "http://127.0.0.1:9", "--out", str(tmp_path)]) == 2
    assert "no such model folder" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "a refused run must not leave files"


def test_compare_needs_an_explicit_kv_budget_to_start_servers(checkpoints, capsys, tmp_path):
    code = main(["loadtest", "compare", "--stock", str(checkpoints["llama"]), "--thin", str(checkpoints["llama-thin"]), "--out", str(tmp_path)])
    assert code == 2
    assert "needs --kv-cache-memory" in capsys.readouterr().err


def test_unreachable_server_is_a_clear_error(capsys, tmp_path):
    from thinkeys.loadtest.servers import free_port

    assert main(["loadtest", "run", "--url", f"http://127.0.0.1:{free_port()}", "--users", "1", "--out", str(tmp_path)]) == 2
    assert "did not answer" in capsys.readouterr().err


# --- against the two servers ------------------------------------------------------------------



@pytest.mark.engine
def test_compare_thin_keys_hold_1_6x_the_users_before_queueing(servers, tmp_path, capsys):
    code = main([
        "loadtest", "compare", "--stock", servers["stock"], "--thin", servers["thin"],
        "--users", f"{STOCK_USERS},{STOCK_USERS + 1},{THIN_USERS},{THIN_USERS + 1}", "--requests-per-user", "5",
        "--metrics-interval", "0.05", "--time-limit", "120", "--out", str(tmp_path), "--name", "tiny", *WORKLOAD_ARGS,
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    report = LoadTestReport.model_validate_json((tmp_path / "tiny.json").read_text())
    stock, thin = report.results
    assert (stock.target.label, thin.target.label) == ("stock", "thin")
    assert (stock.target.kv_cache_blocks, thin.target.kv_cache_blocks) == (6, 9)
    assert thin.target.thin_keys["rank"] == 8 and stock.target.thin_keys is None
    for result in report.results:
        for step in result.steps:
            assert step.completed == step.requests and step.failed == step.cancelled == step.not_sent == 0
            assert step.output_tokens == step.requests * 96
    # the headline: largest N with no request waiting, read from vLLM's /metrics
    assert stock.max_users_without_queue == STOCK_USERS
    assert thin.max_users_without_queue == THIN_USERS
    assert thin.max_users_without_queue / stock.max_users_without_queue == pytest.approx(1.6)
    by_n = {s.users: s for s in stock.steps}
    assert by_n[STOCK_USERS + 1].server.max_waiting >= 1 and by_n[STOCK_USERS + 1].server.max_running == STOCK_USERS
    assert by_n[THIN_USERS + 1].server.max_running == STOCK_USERS  # stock never runs more than fits
    by_n = {s.users: s for s in thin.steps}
    assert by_n[THIN_USERS].server.max_running == THIN_USERS and by_n[THIN_USERS].server.max_waiting == 0
    assert by_n[THIN_USERS + 1].server.max_waiting >= 1
    # side-by-side table on stdout and in the .md; a real PNG
    assert "| N users | stock: out tok/s" in out and "thin: running / waiting max" in out
    assert f"largest N with no request waiting: {THIN_USERS} (1.60x stock)" in out
    assert (tmp_path / "tiny.md").read_text().count("\n| ") >= 5
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # `report` redraws from the JSON alone
    (tmp_path / "tiny.png").unlink()
    assert main(["loadtest", "report", str(tmp_path / "tiny.json")]) == 0
    assert (tmp_path / "tiny.png").exists()


@pytest.mark.engine
def test_run_reports_latencies_throughput_and_server_queue(servers, tmp_path):
    # 6 requests per user: the queue gauges are sampled every 0.25 s, and on a quiet machine a step of 2 requests
    # per user (about half a second) once fell between samples (max_running 0 with 3 users; session 8).
    code = main([
        "loadtest", "run", "--url", servers["thin"] + "/v1", "--users", "1,3", "--requests-per-user", "6",
        "--out", str(tmp_path), *WORKLOAD_ARGS,
    ])  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "loadtest.json").read_text())
    (result,) = data["results"]
    assert result["target"]["model"] == "thin" and "api_key" not in result["target"]
    for step in result["steps"]:
        assert step["completed"] == step["requests"] == 6 * step["users"]
        assert step["output_tok_s"] > 0 and step["duration_s"] > 0
        for latency in ("ttft_ms", "tpot_ms", "e2e_ms"):
            assert 0 < step[latency]["p50"] <= step[latency]["p95"]
        assert step["server"]["samples"] >= 2 and step["server"]["max_running"] >= 1
        assert step["server"]["queued"] is False
    assert data["workload"]["users"] == [1, 3]


@pytest.mark.engine
def test_time_limit_cuts_a_step_short_and_counts_what_did_not_finish(servers, checkpoints):
    # each request generates 480 tokens (over 2 s at the tiny model's ~200 tok/s per request on
    # these machines), so both users' first requests are still streaming when the 0.4 s limit hits
    workload = Workload(users=[2], requests_per_user=50, prompt_len=16, output_len=480, time_limit_s=0.4)

    async def go():
        async with aiohttp.ClientSession() as session:
            target = await discover(session, servers["stock"])
        prompts = build_prompts(target.tokenizer, workload)
        step = await run_step(target, workload, 2, prompts, progress=False)
        async with aiohttp.ClientSession() as session:
            idle = await wait_until_idle(session, target, 20)
        return step, idle

    step, idle = asyncio.run(go())
    assert step.hit_time_limit
    # the step ends at the limit rather than running its 100 requests (> 100 s); the slack covers
    # closing the streams on a busy 2-core machine
    assert workload.time_limit_s <= step.duration_s < workload.time_limit_s + 8.0
    assert step.completed + step.failed + step.cancelled + step.not_sent == step.requests == 100
    assert step.cancelled >= 1 and step.not_sent >= 98 - step.completed
    assert idle, "requests cut off by the time limit must be aborted on the server"


@pytest.mark.engine
def test_chat_api(servers, tmp_path):
    assert main(["loadtest", "run", "--url", servers["thin"], "--api", "chat", "--users", "2", "--requests-per-user", "1",
                 "--out", str(tmp_path), *WORKLOAD_ARGS]) == 0  # fmt: skip
    (step,) = json.loads((tmp_path / "loadtest.json").read_text())["results"][0]["steps"]
    assert step["completed"] == 2 and step["output_tokens"] == 2 * 96


def test_a_stream_that_ends_short_counts_as_failed():
    """vLLM ends an aborted stream with a last event and [DONE], which `vllm bench serve`'s request function
    takes for a success; every load-test request ignores EOS, so fewer tokens than asked means it was cut."""
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput

    from thinkeys.loadtest.ramp import _fail_if_cut_short

    whole = RequestFuncOutput(success=True, output_tokens=8, ttft=0.1, itl=[0.1] * 7)
    usage_short = RequestFuncOutput(success=True, output_tokens=3, ttft=0.1, itl=[0.1] * 2)
    no_usage_short = RequestFuncOutput(success=True, output_tokens=0, ttft=0.1, itl=[0.1] * 4)
    failed = RequestFuncOutput(success=False, error="connection reset")
    for output in (whole, usage_short, no_usage_short, failed):
        _fail_if_cut_short(output, 8)
    assert whole.success and not usage_short.success and not no_usage_short.success and not failed.success
    assert usage_short.error == "the stream ended after 3 of 8 tokens (aborted by the server)"
    assert no_usage_short.error.startswith("the stream ended after 5 of 8") and failed.error == "connection reset"
