"""Bad requests get a 4xx with the reason, never a 5xx or a crash: hand-picked cases, then schemathesis.

Against the session's served thin-key tiny Llama (``thin_server``, max_model_len 512).

1. Hand-picked inputs the issue names (prompt beyond the context, negative / zero / absurd
   ``max_tokens``, malformed JSON, wrong types, unknown model) and their neighbours, each with the
   status and the words of the reason it must get.
2. Property-based fuzzing with schemathesis over the OpenAPI schema the server publishes, for our
   route (``GET /v1/thinkeys/savings``) and vLLM's ``POST /v1/completions`` and
   ``POST /v1/chat/completions``: schema-valid ("positive") and schema-violating ("negative")
   requests, ``MAX_EXAMPLES`` of each per operation, derandomized so a run is reproducible. The
   check is schemathesis' ``not_a_server_error``: no 5xx. Generated requests that would make the
   tiny model generate for long have their token counts capped (``_cap_cost``); absurd counts are
   covered by the hand-picked cases instead.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import httpx
import pytest

from robustness import idle, record, wait_until

pytestmark = pytest.mark.engine

MAX_EXAMPLES = 25
#: Request fields that multiply generation work; fuzzed values above this are capped to keep the run short.
COSTLY_FIELDS = ("max_tokens", "max_completion_tokens", "min_tokens", "n", "best_of", "num_logprobs")
COST_CAP = 16
#: 4xx texts that are really an unexpected Python exception turned into a 400 (reported, not hidden).
PYTHON_ERROR = re.compile(r"object is not|has no attribute|NoneType|KeyError|IndexError|unhashable|Traceback")


def _cases(name: str) -> dict[str, tuple[str, dict | bytes, int, tuple[str, ...]]]:
    """case -> (path, JSON body or raw bytes, expected status, words the reason must contain)."""
    completion = {"model": name, "prompt": "hello there", "max_tokens": 4}
    chat = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    long_text = "the quick brown fox jumps over the lazy dog " * 200  # ~1,800 tokens > 512
    return {
        "prompt longer than the context": ("/v1/completions", {**completion, "prompt": long_text}, 400, ("maximum context length",)),
        "chat longer than the context": ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": long_text}]}, 400, ("maximum context length",)),
        "prompt token ids beyond the context": ("/v1/completions", {**completion, "prompt": [5] * 600}, 400, ("context length",)),
        "max_tokens negative": ("/v1/completions", {**completion, "max_tokens": -1}, 400, ("max_tokens must be at least 1",)),
        "max_tokens zero": ("/v1/completions", {**completion, "max_tokens": 0}, 400, ("max_tokens must be at least 1",)),
        "max_tokens 10^9": ("/v1/completions", {**completion, "max_tokens": 10**9}, 400, ("cannot be greater than max_model_len",)),
        "max_tokens 2^70 (beyond int64)": ("/v1/completions", {**completion, "max_tokens": 2**70}, 400, ("max_tokens",)),
        "chat max_completion_tokens negative": ("/v1/chat/completions", {**chat, "max_completion_tokens": -5}, 400, ("at least 1",)),
        "chat max_tokens 10^9": ("/v1/chat/completions", {**chat, "max_tokens": 10**9}, 400, ("cannot be greater than max_model_len",)),
        "malformed JSON (completions)": ("/v1/completions", b'{"model": "x", "prompt": "hi",', 400, ("JSON decode error",)),
        "malformed JSON (chat)": ("/v1/chat/completions", b'{"model": "x", "messages": [', 400, ("JSON decode error",)),
        "empty body": ("/v1/completions", b"", 400, ("Field required",)),
        "JSON array instead of object": ("/v1/completions", b"[1, 2]", 400, ("valid dictionary",)),
        "invalid UTF-8": ("/v1/completions", b'{"model": "x", "prompt": "\xff\xfe"}', 400, ("parsing the body",)),
        "JSON nested 100,000 deep": ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, ("parsing the body",)),
        "max_tokens a string": ("/v1/completions", {**completion, "max_tokens": "ten"}, 400, ("max_tokens", "valid integer")),
        "max_tokens a fraction": ("/v1/completions", {**completion, "max_tokens": 3.5}, 400, ("max_tokens", "fractional")),
        "prompt a number": ("/v1/completions", {**completion, "prompt": 123}, 400, ("body.prompt",)),
        "prompt null": ("/v1/completions", {**completion, "prompt": None}, 400, ("prompt",)),
        "prompt empty": ("/v1/completions", {**completion, "prompt": ""}, 400, ("non-empty",)),
        "prompt token id out of vocabulary": ("/v1/completions", {**completion, "prompt": [999_999]}, 400, ("out of vocabulary",)),
        "prompt token id negative": ("/v1/completions", {**completion, "prompt": [-1, 5]}, 400, ("greater than or equal to 0",)),
        "messages a string": ("/v1/chat/completions", {**chat, "messages": "hi"}, 400, ("body.messages", "valid list")),
        "messages empty": ("/v1/chat/completions", {**chat, "messages": []}, 400, ("empty conversation",)),
        # vLLM's message union admits openai_harmony's Message shape; the chat template then fails on it.
        # A 400 (not a 5xx), but with a Python exception's text as the reason: see the report.
        "harmony-shaped chat message": ("/v1/chat/completions", {**chat, "messages": [{"author": {"role": "user"}, "content": [{"type": "text", "text": "hi"}]}]}, 400, ()),
        "image to a text-only model": ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, ("not a multimodal model",)),
        "temperature negative": ("/v1/completions", {**completion, "temperature": -1}, 400, ("temperature must be non-negative",)),
        "temperature a string": ("/v1/completions", {**completion, "temperature": "hot"}, 400, ("temperature", "valid number")),
        "top_p above 1": ("/v1/completions", {**completion, "top_p": 2}, 400, ("top_p must be in (0, 1]",)),
        "n zero": ("/v1/completions", {**completion, "n": 0}, 400, ("n must be at least 1",)),
        "n a million": ("/v1/completions", {**completion, "n": 10**6}, 400, ("n must be at most",)),
        "logprobs 1000": ("/v1/completions", {**completion, "logprobs": 1000}, 400, ("greater than max allowed",)),
        "logit_bias out of vocabulary": ("/v1/completions", {**completion, "logit_bias": {"999999": 5}}, 400, ("out-of-vocab",)),
        "seed beyond int64": ("/v1/completions", {**completion, "seed": 2**70}, 400, ("seed",)),
        "1000 stop strings": ("/v1/completions", {**completion, "stop": ["x"] * 1000}, 400, ("body.stop",)),
        "truncate_prompt_tokens beyond the context": ("/v1/completions", {**completion, "truncate_prompt_tokens": 10_000}, 400, ("truncate_prompt_tokens",)),
        "stream_options without stream": ("/v1/completions", {**completion, "stream_options": {"include_usage": True}}, 400, ("stream=True",)),
        "unknown model (completions)": ("/v1/completions", {**completion, "model": "no-such-model"}, 404, ("does not exist",)),
        "unknown model (chat)": ("/v1/chat/completions", {**chat, "model": "no-such-model"}, 404, ("does not exist",)),
    }  # fmt: skip


def test_hand_picked_bad_requests_get_a_4xx_with_the_reason(thin_server):
    cases = _cases(thin_server.served_model_name)
    answers = {}
    with httpx.Client(base_url=thin_server.base_url, timeout=120) as client:
        for case, (path, body, status, words) in cases.items():
            if isinstance(body, bytes):
                response = client.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                response = client.post(path, json=body)
            payload = response.json()
            message = payload["error"]["message"] if "error" in payload else str(payload.get("detail"))
            answers[case] = {"path": path, "status": response.status_code, "reason": " ".join(message.split())[:160]}
            assert response.status_code == status, f"{case}: {response.status_code} {response.text[:300]}"
            for word in words:
                assert word in message, f"{case}: {word!r} not in {message!r}"
            assert client.get("/health").status_code == 200, f"unhealthy after {case}"
        # Wrong method / path on our route: FastAPI's 405 / 404, not a crash.
        answers["POST to the savings route"] = {"path": "/v1/thinkeys/savings", "status": client.post("/v1/thinkeys/savings", json={}).status_code}
        assert answers["POST to the savings route"]["status"] == 405
        assert client.get("/v1/thinkeys/savings", params={"junk": "1" * 1000}).status_code == 200
        assert wait_until(lambda: idle(client), timeout=30)
    record("bad_requests", cases=answers)


def _cap_cost(case) -> None:
    """Cap generation-cost fields of a generated body (an over-cap count would only make the tiny model run long)."""
    if isinstance(case.body, dict):
        for field in COSTLY_FIELDS:
            value = case.body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > COST_CAP:
                case.body[field] = COST_CAP


def _reason(response: httpx.Response) -> str:
    """A 4xx answer's message, shortened to its first words (vLLM's or FastAPI's error shape)."""
    try:
        payload = response.json()
    except ValueError:
        return response.text[:60]
    error = payload.get("error") if isinstance(payload, dict) else None
    message = error.get("message", "") if isinstance(error, dict) else str(payload.get("detail") if isinstance(payload, dict) else payload)
    # A pydantic validation list ("{'type': ..., 'loc': 'body.x', 'msg': '...'}"): keep the first field and complaint.
    validation = re.search(r"'loc': '([^']*)', 'msg': '([^']*)'", message)
    if validation:
        message = f"{validation[1]}: {validation[2]}"
    return " ".join(message.split())[:80]


@pytest.mark.timeout(900)
def test_schemathesis_finds_no_server_error(thin_server):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{thin_server.base_url}/openapi.json").include(
        path_regex=r"^/v1/(thinkeys/savings|completions|chat/completions)$"
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert sorted(op.label for op in operations) == [
        "GET /v1/thinkeys/savings", "POST /v1/chat/completions", "POST /v1/completions",
    ]  # fmt: skip
    statuses: dict[str, Counter] = {}
    reasons: dict[str, Counter] = {}  # the first words of each 4xx answer, to see what the fuzzer hit
    python_errors: dict[str, dict[str, str]] = {}  # 4xx answers that are a Python exception's text -> a request
    server_errors: list[dict] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            tally = statuses.setdefault(f"{operation.label} ({mode.value})", Counter())
            why = reasons.setdefault(f"{operation.label} ({mode.value})", Counter())

            @settings(
                max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
            )  # fmt: skip
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case) -> None:
                _cap_cost(case)
                try:
                    response = case.call(base_url=thin_server.base_url, timeout=120)
                except Exception as exc:  # the connection broke: as bad as a 5xx
                    tally["no response"] += 1
                    server_errors.append({"request": case.as_curl_command(), "response": repr(exc)})
                    return
                tally[response.status_code] += 1
                if 400 <= response.status_code < 500:
                    reason = _reason(response)
                    why[reason] += 1
                    if PYTHON_ERROR.search(reason):
                        python_errors.setdefault(operation.label, {}).setdefault(reason, case.as_curl_command())
                if response.status_code >= 500:
                    server_errors.append({"request": case.as_curl_command(), "response": f"{response.status_code} {response.text[:500]}"})

            try:
                fuzz()
            except Unsatisfiable:
                # An operation without parameters or body (GET /v1/thinkeys/savings) has nothing to violate.
                assert mode == GenerationMode.NEGATIVE and not tally, operation.label
                statuses.pop(f"{operation.label} ({mode.value})")
                reasons.pop(f"{operation.label} ({mode.value})")
    with httpx.Client(base_url=thin_server.base_url, timeout=60) as client:
        assert client.get("/health").status_code == 200
        assert wait_until(lambda: idle(client), timeout=60)
    tried = sum(sum(t.values()) for t in statuses.values())
    record(
        "schemathesis", version=schemathesis.__version__ if hasattr(schemathesis, "__version__") else "4",
        max_examples=MAX_EXAMPLES, cases=tried, server_errors=len(server_errors), failures=server_errors[:10],
        by_operation={op: dict(sorted((str(k), v) for k, v in t.items())) for op, t in statuses.items()},
        top_reasons={op: dict(r.most_common(4)) for op, r in reasons.items() if r}, python_errors=python_errors,
    )  # fmt: skip
    print(json.dumps({op: dict(t) for op, t in statuses.items()}, default=str))
    assert tried >= 2 * MAX_EXAMPLES
    assert not server_errors, json.dumps(server_errors, indent=1)[:4000]
