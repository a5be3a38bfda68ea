"""Concurrent simulated users against one server, ramped over a list of user counts.

A *user* is a closed loop: send a request, read the streamed answer to its end, send the next one,
``requests_per_user`` times. ``N`` users therefore keep up to ``N`` requests in the server at once,
which is how chat traffic loads a server (unlike an open-loop request rate, where the queue grows
without bound once the server falls behind). Each step of the ramp runs ``N`` users, then waits for
the server to drain before the next ``N``.

What comes from vLLM rather than being written here:

* the requests (``vllm.benchmarks.lib.endpoint_request_func``: the streaming completions / chat
  clients of ``vllm bench serve``, which time TTFT and every inter-token gap),
* the prompts (``vllm.benchmarks.datasets.RandomDataset``: token-exact synthetic prompts, each
  different, so no two requests share a prefix-cache block),
* the per-step statistics (``vllm.benchmarks.serve.calculate_metrics``: TTFT, TPOT, ITL, E2E
  percentiles and throughputs, defined exactly as ``vllm bench serve`` reports them).

What ``vllm bench serve`` lacks and is written here: closed-loop users, a hard time limit per step
(requests still in flight are cancelled and counted, never silently dropped), the ramp with a
drain between steps, and the server-side queue numbers sampled from ``/metrics`` while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import time
from typing import Literal

import aiohttp
from pydantic import BaseModel, Field, model_validator
from tqdm.auto import tqdm

from thinkeys.checkpoint import ThinKeyError
from thinkeys.loadtest.server_metrics import MetricsSampler, MetricsSample, QueueSummary, scrape, RUNNING, WAITING
from thinkeys.loadtest.target import Target

Api = Literal["completions", "chat"]
PERCENTILES = [50.0, 95.0]


class Workload(BaseModel):
    """What every user sends, how the ramp goes, and the bounds on it."""

    users: list[int] = Field(description="user counts N of the ramp, in order")
    requests_per_user: int = Field(2, ge=1)
    prompt_len: int = Field(256, ge=2, description="prompt tokens per request")
    output_len: int = Field(128, ge=1, description="generated tokens per request (EOS ignored)")
    api: Api = "completions"
    time_limit_s: float = Field(120.0, gt=0, description="hard limit per step")
    seed: int = 0
    metrics_interval_s: float = Field(0.25, gt=0)
    drain_timeout_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "Workload":
        if not self.users or any(n < 1 for n in self.users):
            raise ValueError(f"users {self.users}: give one or more user counts >= 1, e.g. 1,2,4,8")
        return self

    @property
    def total_requests(self) -> int:
        return sum(self.users) * self.requests_per_user

    @property
    def max_seconds(self) -> float:
        """Upper bound on the ramp's wall time (steps plus drains), not counting the start-up checks."""
        return len(self.users) * (self.time_limit_s + self.drain_timeout_s)


class Latency(BaseModel):
    mean: float
    p50: float
    p95: float


class StepResult(BaseModel):
    """One ramp step: N users, what the client measured and what the server reported."""

    users: int
    requests: int  # planned: N * requests_per_user
    completed: int
    failed: int
    cancelled: int  # in flight when the time limit hit
    not_sent: int  # never sent because the time limit had passed
    hit_time_limit: bool
    duration_s: float
    output_tokens: int
    output_tok_s: float
    total_tok_s: float
    request_s: float
    ttft_ms: Latency
    tpot_ms: Latency
    e2e_ms: Latency
    server: QueueSummary
    errors: list[str] = Field(default_factory=list, description="first few distinct error messages")
    timeline: list[MetricsSample] = Field(default_factory=list, description="the /metrics samples of the step")


def build_prompts(tokenizer_path: str, workload: Workload):
    """``workload.total_requests + 1`` distinct token-exact prompts (vLLM's RandomDataset), in ramp order.

    The extra last one is for :func:`check_target`, so that no measured request hits its cached prefix.
    """
    from vllm.benchmarks.datasets import RandomDataset
    from vllm.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(tokenizer_path)
    with contextlib.redirect_stdout(io.StringIO()):
        return RandomDataset(random_seed=workload.seed).sample(
            tokenizer=tokenizer,
            num_requests=workload.total_requests + 1,
            input_len=workload.prompt_len,
            output_len=workload.output_len,
        )


def _request_func(api: Api):
    from vllm.benchmarks.lib.endpoint_request_func import ASYNC_REQUEST_FUNCS

    return ASYNC_REQUEST_FUNCS["openai-chat" if api == "chat" else "openai"]


def _api_url(target: Target, api: Api) -> str:
    return f"{target.base_url}/v1/{'chat/completions' if api == 'chat' else 'completions'}"


def _request_input(target: Target, workload: Workload, sample):
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncInput

    return RequestFuncInput(
        prompt=sample.prompt,
        api_url=_api_url(target, workload.api),
        prompt_len=sample.prompt_len,
        output_len=workload.output_len,
        model=target.model,
        ignore_eos=True,  # every request generates exactly output_len tokens: a fixed KV footprint
        extra_headers=target.headers(),
    )


async def check_target(session: aiohttp.ClientSession, target: Target, workload: Workload, prompt) -> None:
    """One short request before the ramp (not counted): the endpoint works and the model is loaded."""
    from dataclasses import replace

    func = _request_func(workload.api)
    probe = replace(_request_input(target, workload, prompt), output_len=2)
    output = await asyncio.wait_for(func(request_func_input=probe, session=session), timeout=workload.time_limit_s)
    if not output.success:
        raise ThinKeyError(f"{probe.api_url}: the first request failed: {output.error.strip().splitlines()[-1] if output.error else 'no tokens'}")


async def wait_until_idle(session: aiohttp.ClientSession, target: Target, timeout_s: float) -> bool:
    """Wait until the server reports no running and no waiting request (True), or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            values = await scrape(session, target.metrics_urls, target.headers())
            if values[RUNNING] == 0 and values[WAITING] == 0:
                return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.25)


class _UserState:
    def __init__(self) -> None:
        self.outputs: list = []  # RequestFuncOutput of every request that came back
        self.in_flight = False  # True while a request is out: if the step is cancelled then, it was cut off


async def _user(state: _UserState, func, inputs: list, session: aiohttp.ClientSession, deadline: float, pbar) -> None:
    for request in inputs:
        if time.perf_counter() >= deadline:
            return
        state.in_flight = True
        state.outputs.append(await func(request_func_input=request, session=session, pbar=pbar))
        state.in_flight = False


def _fail_if_cut_short(output, output_len: int) -> None:
    """A request that streamed fewer than ``output_len`` tokens was cut short: count it as failed.

    Every request ignores EOS, so a whole answer has exactly ``output_len`` tokens. vLLM ends a stream it
    aborts (its server stopping, a replica behind a balancer going away) with a final event and ``[DONE]``,
    which ``vllm bench serve``'s request function counts as a success once a first token has come.
    """
    if not output.success:
        return
    got = output.output_tokens or (len(output.itl) + 1 if output.ttft else 0)  # the usage figure, else the chunks
    if got < output_len:
        output.success = False
        output.error = f"the stream ended after {got} of {output_len} tokens (aborted by the server)"


def _latency(values) -> Latency:
    mean, pcts = values
    by_p = dict(pcts)
    return Latency(mean=float(mean), p50=float(by_p[50.0]), p95=float(by_p[95.0]))


@contextlib.contextmanager
def _frozen_heap():
    """Keep the garbage collector's full passes off the clock while a step runs.

    In a process that has imported vLLM, torch and transformers (a test session, or any caller
    holding models) a full collection walks millions of objects and stops the event loop for
    most of a second: users then miss the time limit, the sampler misses samples, and latencies
    grow. ``gc.freeze()`` moves everything alive now out of the collector's reach, so collections
    during the step only look at what the step allocates.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def run_step(target: Target, workload: Workload, users: int, samples: list, *, progress: bool = True) -> StepResult:
    """``users`` closed-loop users, ``workload.requests_per_user`` requests each, within the time limit."""
    with _frozen_heap():
        return await _run_step(target, workload, users, samples, progress=progress)


async def _run_step(target: Target, workload: Workload, users: int, samples: list, *, progress: bool) -> StepResult:
    from vllm.benchmarks.serve import calculate_metrics

    func = _request_func(workload.api)
    per_user = workload.requests_per_user
    inputs = [
        [_request_input(target, workload, sample) for sample in samples[u * per_user : (u + 1) * per_user]]
        for u in range(users)
    ]
    connector = aiohttp.TCPConnector(limit=users + 4, force_close=False)
    timeout = aiohttp.ClientTimeout(total=workload.time_limit_s + 30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        states = [_UserState() for _ in range(users)]
        pbar = tqdm(total=users * per_user, desc=f"{target.label}: {users} users", unit="req", disable=not progress, leave=False)
        async with MetricsSampler(target.metrics_urls, interval=workload.metrics_interval_s, headers=target.headers()) as sampler:
            start = time.perf_counter()
            deadline = start + workload.time_limit_s
            tasks = [asyncio.create_task(_user(s, func, reqs, session, deadline, pbar)) for s, reqs in zip(states, inputs)]
            _, pending = await asyncio.wait(tasks, timeout=workload.time_limit_s)
            for task in pending:
                task.cancel()  # closes the stream; vLLM aborts the request
            await asyncio.gather(*pending, return_exceptions=True)
            outputs = [o for s in states for o in s.outputs]
            ends = [o.start_time + o.latency for o in outputs if o.success]
            duration = (max(ends) if ends and not pending else time.perf_counter()) - start
        pbar.close()
    for output in outputs:
        _fail_if_cut_short(output, workload.output_len)
    cancelled = sum(s.in_flight for s in states)
    not_sent = sum(len(reqs) - len(s.outputs) - s.in_flight for s, reqs in zip(states, inputs))
    with contextlib.redirect_stdout(io.StringIO()):  # calculate_metrics prints a summary of its own
        metrics, _ = calculate_metrics(
            input_requests=[],
            outputs=outputs,
            dur_s=max(duration, 1e-9),
            tokenizer=None,
            selected_percentiles=PERCENTILES,
            goodput_config_dict={},
        )
    errors = []
    for o in outputs:
        if not o.success:
            line = (o.error or "unknown error").strip().splitlines()[-1][:300]
            if line not in errors:
                errors.append(line)
    return StepResult(
        users=users,
        requests=users * per_user,
        completed=metrics.completed,
        failed=metrics.failed,
        cancelled=cancelled,
        not_sent=not_sent,
        hit_time_limit=bool(pending) or not_sent > 0,  # cut off in flight, or users stopped sending at the limit
        duration_s=duration,
        output_tokens=metrics.total_output,
        output_tok_s=metrics.output_throughput,
        total_tok_s=metrics.total_token_throughput,
        request_s=metrics.request_throughput,
        ttft_ms=_latency((metrics.mean_ttft_ms, metrics.percentiles_ttft_ms)),
        tpot_ms=_latency((metrics.mean_tpot_ms, metrics.percentiles_tpot_ms)),
        e2e_ms=_latency((metrics.mean_e2el_ms, metrics.percentiles_e2el_ms)),
        server=sampler.summary(),
        errors=errors[:5],
        timeline=sampler.samples,
    )


async def run_ramp(target: Target, workload: Workload, *, progress: bool = True) -> list[StepResult]:
    """Every step of ``workload.users`` against ``target``, one after the other, with a drain between."""
    samples = build_prompts(target.tokenizer, workload)
    async with aiohttp.ClientSession(trust_env=False) as session:
        await check_target(session, target, workload, samples[-1])
    results: list[StepResult] = []
    offset = 0
    for users in workload.users:
        async with aiohttp.ClientSession(trust_env=False) as session:
            if not await wait_until_idle(session, target, workload.drain_timeout_s):
                tqdm.write(f"{target.label}: server still busy after {workload.drain_timeout_s:.0f} s; starting {users} users anyway")
        step_samples = samples[offset : offset + users * workload.requests_per_user]
        offset += users * workload.requests_per_user
        result = await run_step(target, workload, users, step_samples, progress=progress)
        results.append(result)
        if progress:
            tqdm.write(
                f"{target.label}: {users:>3} users  {result.completed}/{result.requests} done"
                f"  {result.output_tok_s:7.1f} out tok/s  running<={result.server.max_running:g}"
                f"  waiting<={result.server.max_waiting:g}  preempted {result.server.preemptions:g}"
            )
    return results
