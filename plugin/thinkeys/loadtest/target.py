"""The server a load test talks to: its URL, the model it serves, the tokenizer for the prompts, its KV size.

A load test only ever targets the URL it is given (the default is loopback); nothing here scans or
guesses addresses. What the server is serving is asked from the server itself (``GET /v1/models``),
and its KV-cache size from ``vllm:cache_config_info`` on ``/metrics``, so a report says what was
measured rather than what was intended.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, Field

from thinkeys.checkpoint import CONFIG_KEY, ThinKeyError
from thinkeys.loadtest.server_metrics import fetch_text, parse_cache_info

DEFAULT_URL = "http://127.0.0.1:8000"


class Target(BaseModel):
    """One OpenAI-compatible server under test."""

    label: str
    base_url: str  # http://host:port, no trailing /v1
    model: str  # the served model name requests use
    root: str | None = None  # the model path the server loaded (vLLM's /v1/models "root")
    tokenizer: str  # local folder the prompts are built with
    metrics_urls: list[str]
    thin_keys: dict | None = None  # the checkpoint's thin_keys fields when ``root`` is readable here
    kv_cache_blocks: int | None = None
    block_size: int | None = None
    api_key: str | None = Field(default=None, exclude=True)  # never written to reports

    @property
    def kv_cache_tokens(self) -> int | None:
        if self.kv_cache_blocks is None or self.block_size is None:
            return None
        return self.kv_cache_blocks * self.block_size

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def normalize_base_url(url: str) -> str:
    """``http://host:port`` from what a user typed (``.../v1`` and trailing slashes are dropped)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ThinKeyError(f"{url!r} is not a server URL: give one like http://127.0.0.1:8000")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def _thin_keys_of(root: str | None) -> dict | None:
    if not root:
        return None
    config = Path(root) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get(CONFIG_KEY)


async def discover(
    session: aiohttp.ClientSession,
    url: str,
    *,
    label: str | None = None,
    model: str | None = None,
    tokenizer: str | None = None,
    api_key: str | None = None,
    metrics_urls: list[str] | None = None,
) -> Target:
    """Ask the server at ``url`` what it serves; fail with one clear line if it does not answer."""
    base = normalize_base_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with session.get(f"{base}/v1/models", headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as response:
            if response.status == 401:
                raise ThinKeyError(f"{base}: 401 Unauthorized; pass the server's key with --api-key (or OPENAI_API_KEY)")
            response.raise_for_status()
            listing = await response.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ThinKeyError(f"{base}/v1/models did not answer ({exc.__class__.__name__}: {exc}); is the server up?") from None
    served = listing.get("data") or []
    if not served:
        raise ThinKeyError(f"{base}/v1/models lists no model")
    entry = served[0] if model is None else next((m for m in served if m.get("id") == model), None)
    if entry is None:
        raise ThinKeyError(f"{base} does not serve {model!r}; it serves {[m.get('id') for m in served]}")
    root = entry.get("root")
    if tokenizer is None:
        if not root or not Path(root).is_dir():
            raise ThinKeyError(
                f"{base} serves {entry['id']!r} from {root!r}, which is not a folder on this machine: "
                "pass --tokenizer with a local copy of the model's tokenizer"
            )
        tokenizer = root
    metrics_urls = [normalize_base_url(u) + "/metrics" if not u.rstrip("/").endswith("/metrics") else u for u in (metrics_urls or [base])]
    cache = {}
    try:
        cache = parse_cache_info(await fetch_text(session, metrics_urls[0], headers))
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ThinKeyError(f"{metrics_urls[0]} did not answer ({exc}); the load test needs vLLM's /metrics") from None
    return Target(
        label=label or entry["id"],
        base_url=base,
        model=entry["id"],
        root=root,
        tokenizer=str(tokenizer),
        metrics_urls=metrics_urls,
        thin_keys=_thin_keys_of(root),
        kv_cache_blocks=int(cache["num_gpu_blocks"]) if cache.get("num_gpu_blocks") not in (None, "None") else None,
        block_size=int(cache["block_size"]) if cache.get("block_size") not in (None, "None") else None,
        api_key=api_key,
    )
