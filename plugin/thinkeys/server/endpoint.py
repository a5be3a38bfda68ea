"""The ``thinkeys_savings`` vLLM endpoint plugin: ``GET /v1/thinkeys/savings``, gauges, start-up log line.

vLLM 0.32 loads ``vllm.endpoint_plugins`` entry points in the API server only when they are named
in ``VLLM_PLUGINS`` (``thinkeys serve`` names it). ``attach_router`` runs in ``build_app``;
``init_state`` runs in ``init_app_state`` once the engine is up, when the frontend's
``VllmConfig`` already holds the engine's block count and capacity, so that is where the
figures are fixed, logged and published as gauges.

Running requests are read from ``AsyncLLM.output_processor.request_states``, the frontend's own
table of unfinished requests (vLLM 0.32 internals; :func:`running_requests` is the one place that
touches them). A request leaves it when it finishes or is aborted, which is what vLLM does when a
streaming client disconnects.

API keys: vLLM's ``--api-key`` / ``VLLM_API_KEY`` middleware guards only paths under ``/v1``,
``/v2``, ``/inference`` and ``/cohere``, so the savings route (under ``/v1``) needs the key exactly
as vLLM's own routes do, while ``/invocations`` (the same completions without ``/v1``),
``/tokenize``, ``/detokenize``, ``/load`` and the elastic-scaling routes stay open to anyone.
:class:`ApiKeyGuard` closes that gap: with a key configured, every path except the health, metrics
and schema paths in :data:`PUBLIC_PATHS` needs it, checked by vLLM's own token comparison.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from starlette.datastructures import Headers, State
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from thinkeys.server.metrics import get_metrics
from thinkeys.server.savings import RunningRequest, SavingsReport, ServerSavings

#: Path of the savings endpoint.
SAVINGS_PATH = "/v1/thinkeys/savings"
#: Attribute of ``app.state`` holding the :class:`SavingsSource`.
STATE_KEY = "thinkeys_savings"
#: Attribute of ``app.state`` holding the API-key verifier (None: the server has no key).
AUTH_STATE_KEY = "thinkeys_api_key_verifier"
#: Paths that answer without the API key: health checks (container and load-balancer probes),
#: Prometheus scrapes (vLLM leaves /metrics open too) and the API schema and its viewers.
PUBLIC_PATHS = frozenset({"/health", "/ping", "/metrics", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})

router = APIRouter(tags=["thinkeys"])


def _logger():
    from vllm.logger import init_logger

    # Under "vllm." so the line goes through vLLM's handler and format, next to its own lines.
    return init_logger("vllm.thinkeys.savings")


def running_requests(engine_client: Any) -> list[RunningRequest]:
    """Unfinished requests of this API server with their prompt and generated token counts."""
    processor = getattr(engine_client, "output_processor", None)
    if processor is None:
        return []
    requests = []
    # The output handler runs on this event loop, so the table does not change while we read it.
    for state in list(processor.request_states.values()):
        detokenizer = state.detokenizer
        requests.append(
            RunningRequest(
                request_id=state.external_req_id,
                prompt_tokens=state.prompt_len,
                output_tokens=detokenizer.num_output_tokens() if detokenizer is not None else 0,
            )
        )
    return requests


class SavingsSource:
    """Per-app state: the server's static savings and where its running requests are."""

    def __init__(self, savings: ServerSavings, engine_client: Any) -> None:
        self.savings = savings
        self.engine_client = engine_client

    def running(self) -> list[RunningRequest]:
        return running_requests(self.engine_client)

    def report(self) -> SavingsReport:
        return self.savings.report(self.running())


@router.get(
    SAVINGS_PATH,
    response_model=SavingsReport,
    summary="KV-cache savings of thin keys",
    description=(
        "KV bytes per token and capacity of this server's thin-key cache against the stock layout in the "
        "same KV memory, max concurrency at max_model_len, and the KV every running request occupies and saves."
    ),
)
async def get_savings(raw_request: Request) -> SavingsReport:
    source: SavingsSource | None = getattr(raw_request.app.state, STATE_KEY, None)
    if source is None:
        raise HTTPException(status_code=503, detail="thin-key savings are not available: this server has no engine")
    return source.report()


def api_keys(args: Namespace) -> list[str]:
    """The keys vLLM's server demands, by its own rule: ``--api-key`` values, else ``VLLM_API_KEY``."""
    from vllm import envs

    return [key for key in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if key]


class ApiKeyGuard:
    """ASGI middleware: when the server has API keys, every path outside PUBLIC_PATHS needs one.

    The keys are known only in ``init_state`` (after the app is built), so they are read from
    ``app.state`` per request; the comparison is vLLM's (``AuthenticationMiddleware.verify_token``:
    ``Authorization: Bearer <key>``, constant-time), and a refusal is the same 401 vLLM sends.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("method") != "OPTIONS":
            verifier = getattr(scope["app"].state, AUTH_STATE_KEY, None) if "app" in scope else None
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if verifier is not None and path not in PUBLIC_PATHS and not verifier.verify_token(Headers(scope=scope)):
                await JSONResponse(content={"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ThinKeysEndpoint:
    """vLLM endpoint plugin (entry point ``thinkeys_savings``)."""

    name = "thinkeys_savings"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        app.add_middleware(ApiKeyGuard)

    async def init_state(self, engine_client: Any | None, state: State, args: Namespace) -> None:
        from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

        keys = api_keys(args)
        setattr(state, AUTH_STATE_KEY, AuthenticationMiddleware(app=None, tokens=keys) if keys else None)
        if engine_client is None:  # vLLM's render-only server: no engine, no KV cache
            return
        logger = _logger()
        savings, warnings = ServerSavings.from_vllm_config(engine_client.vllm_config)
        source = SavingsSource(savings, engine_client)
        setattr(state, STATE_KEY, source)
        logger.info(savings.startup_line())
        if not hasattr(engine_client, "output_processor"):
            warnings.append(
                f"{type(engine_client).__name__} has no output_processor: {SAVINGS_PATH} cannot list running requests"
            )
        warnings += get_metrics().publish(savings, lambda: savings.active(source.running())[1])
        for warning in warnings:
            logger.warning(warning)
