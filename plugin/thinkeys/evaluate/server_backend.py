"""Perplexity through a running OpenAI-compatible vLLM server, from prompt logprobs.

Each window goes to ``POST /v1/completions`` as a list of token ids (so the server tokenizes
nothing and sees exactly the ids the PyTorch path scores) with ``max_tokens: 1`` and vLLM's extra
field ``prompt_logprobs: 0``. vLLM answers (``entrypoints/openai/completion/protocol.py``,
``CompletionResponseChoice.prompt_logprobs``) with one entry per prompt position: ``None`` for the
first token (nothing to condition on), then ``{token_id: {"logprob", "rank", "decoded_token"}}``
which always contains the prompt token itself (plus the top-k, none with k = 0). A logprob of
``-inf`` comes back clamped to ``-9999.0``. ``return_token_ids: true`` makes the server echo the
prompt ids, which are checked against what was sent.

The text is tokenized either with a local tokenizer (``--tokenizer``) or by the server's own
``POST /tokenize`` (``add_special_tokens: false``), i.e. with the tokenizer the served model uses.
Windows are sent concurrently so the engine batches them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from thinkeys.checkpoint import ThinKeyError
from thinkeys.evaluate.perplexity import PerplexityResult, WindowScorer, evaluate_windows, read_text


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    """The fields of vLLM's ``CompletionResponse`` that perplexity needs."""

    choices: list[CompletionChoice]


def base_url(server: str) -> str:
    """``http://host:port`` from what a user may type (with or without a trailing ``/v1``)."""
    url = server.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ThinKeyError(f"--server {server!r}: give a URL such as http://127.0.0.1:8000")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def completion_request(served_model: str, window: list[int]) -> dict[str, Any]:
    """The ``/v1/completions`` body that returns the logprob of every prompt token of ``window``."""
    return {
        "model": served_model,
        "prompt": window,
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": 0,
        "return_token_ids": True,
    }


def window_nll_from_response(window: list[int], payload: Any) -> float:
    """Sum of ``-logprob`` of tokens 1..n-1 of ``window`` from a ``/v1/completions`` response body."""
    try:
        response = CompletionResponse.model_validate(payload)
    except ValidationError as exc:
        raise ThinKeyError(f"the server's completion response is not in vLLM's format ({exc.error_count()} problem(s): {exc.errors()[0]['msg']})") from None
    if len(response.choices) != 1:
        raise ThinKeyError(f"expected 1 completion choice, the server returned {len(response.choices)}")
    choice = response.choices[0]
    if choice.prompt_token_ids is not None and choice.prompt_token_ids != window:
        raise ThinKeyError("the server echoed different prompt token ids than were sent (it re-tokenized the prompt?)")
    entries = choice.prompt_logprobs
    if entries is None:
        raise ThinKeyError("the server returned no prompt_logprobs: it must be vLLM (the field is a vLLM extension)")
    if len(entries) != len(window):
        raise ThinKeyError(f"the server returned {len(entries)} prompt logprobs for a {len(window)}-token prompt")
    nll = 0.0
    for pos in range(1, len(window)):
        entry = entries[pos]
        if entry is None or window[pos] not in entry:
            raise ThinKeyError(f"prompt logprobs lack the prompt token {window[pos]} at position {pos}")
        nll -= entry[window[pos]].logprob
    return nll


class ServerClient:
    """A small synchronous client for the three vLLM routes perplexity uses."""

    def __init__(self, server: str, served_model: str, *, timeout: float = 600.0) -> None:
        try:
            import httpx
        except ImportError:
            raise ThinKeyError("the server backend needs httpx: `pip install httpx`") from None
        self.url = base_url(server)
        self.served_model = served_model
        self._httpx = httpx
        self._client = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "ServerClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, method: str, route: str, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, route, **kwargs)
        except self._httpx.TransportError as exc:
            raise ThinKeyError(
                f"cannot reach the server at {self.url} ({exc.__class__.__name__}: {exc}); is it running "
                "(`thinkeys serve MODEL`) and is --server the right host:port?"
            ) from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("error", {}).get("message") or response.text
            except ValueError:
                detail = response.text
            raise ThinKeyError(f"{method} {self.url}{route} failed with HTTP {response.status_code}: {str(detail)[:500]}")
        return response.json()

    def max_model_len(self) -> int | None:
        """The served model's context length; an error naming the served models if ours is not one."""
        cards = self._request("GET", "/v1/models").get("data", [])
        for card in cards:
            if card.get("id") == self.served_model:
                return card.get("max_model_len")
        names = ", ".join(repr(c.get("id")) for c in cards) or "none"
        raise ThinKeyError(f"the server at {self.url} does not serve {self.served_model!r} (it serves {names}); fix --served-model")

    def tokenize(self, text: str) -> list[int]:
        body = {"model": self.served_model, "prompt": text, "add_special_tokens": False}
        return list(self._request("POST", "/tokenize", json=body)["tokens"])

    def window_nll(self, window: list[int]) -> float:
        payload = self._request("POST", "/v1/completions", json=completion_request(self.served_model, window))
        return window_nll_from_response(window, payload)


def perplexity_server(
    server: str,
    served_model: str,
    text_path: str | Path,
    *,
    window: int = 512,
    max_tokens: int | None = None,
    tokenizer: str | Path | None = None,
    workers: int = 4,
    timeout: float = 600.0,
) -> PerplexityResult:
    """Perplexity of a served model on a text file (same windows and result as :func:`perplexity_torch`)."""
    text = read_text(text_path)
    with ServerClient(server, served_model, timeout=timeout) as client:
        max_len = client.max_model_len()
        if max_len is not None and window + 1 > max_len:
            raise ThinKeyError(f"--window {window} does not fit the served model's context ({max_len} tokens, one is generated): use --window {max_len - 1} or less")
        if tokenizer is not None:
            from thinkeys.evaluate.torch_backend import load_tokenizer, tokenize_text

            token_ids = tokenize_text(load_tokenizer(tokenizer), text)
        else:
            token_ids = client.tokenize(text)
        scorer: WindowScorer = client.window_nll
        return evaluate_windows(
            token_ids,
            scorer,
            backend="server",
            model=served_model,
            server=client.url,
            text_path=text_path,
            window=window,
            max_tokens=max_tokens,
            workers=workers,
        )
