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
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from starlette.datastructures import State

from thinkeys.server.metrics import get_metrics
from thinkeys.server.savings import RunningRequest, SavingsReport, ServerSavings

#: Path of the savings endpoint.
SAVINGS_PATH = "/v1/thinkeys/savings"
#: Attribute of ``app.state`` holding the :class:`SavingsSource`.
STATE_KEY = "thinkeys_savings"

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


class ThinKeysEndpoint:
    """vLLM endpoint plugin (entry point ``thinkeys_savings``)."""

    name = "thinkeys_savings"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client: Any | None, state: State, args: Namespace) -> None:
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
