"""Client faults: users who vanish mid-stream or never read; their KV is freed and other users never notice.

Against the session's served thin-key tiny Llama (``thin_server``). Three well-behaved users stream
greedy completions while five faulty clients hit the same server at the same time:

* ``mid-stream``: reads a few chunks of a long stream, then closes the connection;
* ``before-first-token``: gets the response headers of a stream and closes at once;
* ``gives-up``: a non-streaming request whose client times out after 0.3 s and goes away;
* ``never-reads``: sends a long streaming request on a socket with a 4 KiB receive buffer and
  never reads a byte, keeping the connection open;
* ``half-request``: sends headers announcing a body and only part of it, and waits.

Afterwards, with the silent sockets still open, vLLM's ``vllm:kv_cache_usage_perc`` must be back
to 0, nothing running or waiting, our ``/v1/thinkeys/savings`` must list no active user, the three
clients that left must have been aborted (vLLM counts only the four others as finished, and
generated a fraction of their tokens), and every good user's text must be exactly what it got when
it ran alone.
"""

from __future__ import annotations

import asyncio
import json
import socket
from urllib.parse import urlsplit

import httpx
import pytest

from robustness import finished, idle, metric, metrics, record, wait_until

pytestmark = pytest.mark.engine

GOOD_USERS = 3
GOOD_TOKENS = 96


def _raw_socket(base_url: str, *, receive_buffer: int | None = None) -> socket.socket:
    parts = urlsplit(base_url)
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((parts.hostname, parts.port))
    return sock


def _http_request(base_url: str, path: str, body: bytes, *, content_length: int | None = None) -> bytes:
    host = urlsplit(base_url).netloc
    length = len(body) if content_length is None else content_length
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    return head.encode() + body


async def _good_user(base_url: str, body: dict) -> dict:
    text, finish, usage = [], None, None
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[len("data: "):])
                    for choice in chunk.get("choices") or []:
                        text.append(choice["text"])
                        finish = choice.get("finish_reason") or finish
                    usage = chunk.get("usage") or usage
    return {"text": "".join(text), "finish_reason": finish, "usage": usage}


async def _mid_stream(base_url: str, body: dict) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            response.raise_for_status()
            chunks = 0
            async for line in response.aiter_lines():
                chunks += line.startswith("data: ")
                if chunks == 3:
                    break
    return "read 3 chunks, closed the connection"


async def _before_first_token(base_url: str, body: dict) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            response.raise_for_status()
    return "got the headers, closed the connection"


async def _gives_up(base_url: str, body: dict) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(300, read=0.3)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/completions", json=body)
    return "timed out after 0.3 s, closed the connection"


@pytest.mark.timeout(600)
def test_faulty_clients_free_their_kv_and_spare_other_users(thin_server):
    base, name = thin_server.base_url, thin_server.served_model_name
    with httpx.Client(base_url=base, timeout=120) as client:
        assert wait_until(lambda: idle(client), timeout=60), "the shared server is busy before the test"
        max_len = client.post("/tokenize", json={"model": name, "prompt": "x"}).json()["max_model_len"]
        good = [
            {"model": name, "prompt": f"Good user {i}: once upon a time there was a little model", "max_tokens": GOOD_TOKENS,
             "temperature": 0, "ignore_eos": True}
            for i in range(GOOD_USERS)
        ]  # fmt: skip
        # What each good user gets when it has the server to itself.
        alone = [client.post("/v1/completions", json=body).json()["choices"][0]["text"] for body in good]
        fault_prompt = "A faulty client asks for a very long story about the weather"
        fault_tokens = max_len - client.post("/tokenize", json={"model": name, "prompt": fault_prompt}).json()["count"]
        fault = {"model": name, "prompt": fault_prompt, "max_tokens": fault_tokens, "ignore_eos": True}
        before = finished(client)
        generated_before = metric(client, "vllm:generation_tokens_total")

        # Silent clients first: they hold their sockets open for the whole test.
        never_reads = _raw_socket(base, receive_buffer=4096)
        never_reads.sendall(_http_request(base, "/v1/completions", json.dumps({**fault, "stream": True}).encode()))
        half_request = _raw_socket(base)
        half_request.sendall(_http_request(base, "/v1/completions", b'{"model": "', content_length=1000))

        async def together():
            return await asyncio.gather(
                *(_good_user(base, {**body, "stream": True, "stream_options": {"include_usage": True}}) for body in good),
                _mid_stream(base, fault), _before_first_token(base, fault), _gives_up(base, fault),
            )  # fmt: skip

        results = asyncio.run(together())
        streamed, faults = results[:GOOD_USERS], results[GOOD_USERS:]

        # With the two silent sockets still open: nothing running, no KV in use, nobody listed.
        assert wait_until(lambda: idle(client), timeout=120), f"KV not freed: {metrics(client)}"
        savings = client.get("/v1/thinkeys/savings").json()
        after = finished(client)
        generated = metric(client, "vllm:generation_tokens_total") - generated_before
        assert client.get("/health").status_code == 200
        never_reads.close()
        half_request.close()
        assert client.get("/health").status_code == 200
        assert wait_until(lambda: idle(client), timeout=30)

    delta = {reason: after.get(reason, 0) - before.get(reason, 0) for reason in after}
    identical = [s["text"] == a for s, a in zip(streamed, alone)]
    # Tokens generated for the three clients that left (the others ran exactly to max_tokens).
    departed_tokens = generated - GOOD_USERS * GOOD_TOKENS - fault_tokens
    record(
        "client_faults",
        faults={"mid-stream": faults[0], "before-first-token": faults[1], "gives-up": faults[2],
                "never-reads": "sent a stream request on a 4 KiB receive buffer, never read, kept the socket open",
                "half-request": "sent headers and 11 of 1000 body bytes, kept the socket open"},
        departed_tokens=int(departed_tokens), departed_tokens_if_not_aborted=3 * fault_tokens, engine_errors=delta.get("error", 0), kv_usage_after=0.0,
        active_users_after=len(savings["active_users"]), good_users=GOOD_USERS,
        good_users_identical=sum(identical), good_users_complete=sum(s["finish_reason"] == "length" for s in streamed),
    )  # fmt: skip
    assert savings["active_users"] == [] and savings["active_totals"]["kv_bytes"] == 0
    # Finished: the good users and the never-reading client (generated to the end into its socket
    # buffers); the three that went away were aborted by vLLM: not finished, not running, and only a
    # fraction of their tokens generated. (vLLM 0.32 does not count frontend aborts in
    # vllm:request_success_total{finished_reason="abort"}.)
    assert delta.get("length", 0) == GOOD_USERS + 1, delta
    assert sum(delta.values()) == GOOD_USERS + 1 and delta.get("error", 0) == 0, delta
    assert 0 <= departed_tokens < 1.5 * fault_tokens, (departed_tokens, fault_tokens)
    for s in streamed:
        assert s["finish_reason"] == "length" and s["usage"]["completion_tokens"] == GOOD_TOKENS
    assert all(identical), [(s["text"], a) for s, a in zip(streamed, alone)]
