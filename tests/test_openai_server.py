"""A thin-key model served by `thinkeys serve` answers the official `openai` client end to end."""

import httpx
import pytest
from openai import OpenAI

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def client(thin_server):
    return OpenAI(base_url=f"{thin_server.base_url}/v1", api_key="unused", timeout=120)


def test_models_lists_the_served_thin_model(client, thin_server):
    models = client.models.list()
    assert [m.id for m in models.data] == [thin_server.served_model_name]


def test_completion(client, thin_server):
    out = client.completions.create(model=thin_server.served_model_name, prompt="The quick brown fox", max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens >= 3
    again = client.completions.create(model=thin_server.served_model_name, prompt="The quick brown fox", max_tokens=8, temperature=0)
    assert again.choices[0].text == out.choices[0].text  # greedy is deterministic


def test_chat_completion(client, thin_server):
    out = client.chat.completions.create(
        model=thin_server.served_model_name,
        messages=[{"role": "user", "content": "Good morning! How are you today?"}],
        max_tokens=8,
        temperature=0,
    )
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens >= 1


def test_chat_streaming_matches_non_streaming(client, thin_server):
    kwargs = dict(
        model=thin_server.served_model_name,
        messages=[{"role": "user", "content": "Tell me about the market."}],
        max_tokens=12,
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2
    assert streamed == whole


def test_completion_streaming(client, thin_server):
    stream = client.completions.create(model=thin_server.served_model_name, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert len(pieces) >= 2


def test_unknown_model_is_a_404_not_a_crash(thin_server):
    r = httpx.post(f"{thin_server.base_url}/v1/completions", json={"model": "nope", "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 404
    assert httpx.get(f"{thin_server.base_url}/health", timeout=10).status_code == 200
