"""Thin HTTP handlers: parse, call the serving layer, return JSON or an event stream.

Handlers raise typed errors and never build error bodies (server/errors.py does). The app's state
(`AppState`) says whether the model is loaded; until it is, everything but liveness, version and the
docs answers 503.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

import vlmserve
from vlmserve.config import ServerConfig
from vlmserve.errors import EngineDeadError, ServerBusyError
from vlmserve.inputs.assets import ASSET_REFERENCES_HEADER
from vlmserve.metrics.prometheus import CONTENT_TYPE as METRICS_CONTENT_TYPE
from vlmserve.metrics.prometheus import MetricsExporter
from vlmserve.protocol import openai as api
from vlmserve.server.serving_chat import ChatCompletionService
from vlmserve.server.sse import EventStreamResponse, cancel_on_disconnect

if TYPE_CHECKING:
    from vlmserve.bootstrap import ModelServer

# what an HTTP client sees for a request whose client went away (nobody reads it; nginx's code)
CLIENT_CLOSED_REQUEST = 499
LOADING_RETRY_AFTER_S = 5


@dataclass(slots=True)
class AppState:
    """What the handlers need to know about the server's life: set by the app's lifespan."""

    config: ServerConfig
    model_server: ModelServer | None = None
    chat: ChatCompletionService | None = None
    load_failed: bool = False
    # set by the watchdog once the engine stopped: the process is on its way out
    engine_died: bool = False
    # set when shutdown begins (SIGTERM): readiness and new requests get 503, in-flight ones go on
    is_draining: bool = False
    metrics: MetricsExporter = field(default_factory=MetricsExporter)

    def require_model_server(self) -> ModelServer:
        """The loaded model server, or ServerBusyError/EngineDeadError (503) saying why there is none."""
        if self.load_failed:
            raise ServerBusyError("the model failed to load; the server is shutting down")
        if self.is_draining:
            raise ServerBusyError("the server is shutting down; retry later", retry_after=5)
        if self.model_server is None:
            raise ServerBusyError(
                "the model is still loading; retry later", retry_after=LOADING_RETRY_AFTER_S
            )
        if not self.model_server.engine.is_running:
            raise EngineDeadError("the engine has stopped after an error; the server needs a restart")
        return self.model_server

    def require_chat(self) -> ChatCompletionService:
        self.require_model_server()
        assert self.chat is not None
        return self.chat


router = APIRouter()


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.vlmserve
    return state


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": api.ErrorResponse} for status in (400, 404, 415, 422, 500, 503)
}


@router.get("/v1/health/live", response_model=api.HealthResponse)
async def health_live() -> api.HealthResponse:
    return api.HealthResponse(object="readyhealth.response", message="Service is live.")


@router.get("/v1/health/ready", response_model=api.HealthResponse, responses={503: _ERRORS[503]})
async def health_ready(request: Request) -> api.HealthResponse:
    _state(request).require_model_server()
    return api.HealthResponse(object="health.response", message="Service is ready.")


@router.get(
    "/v1/metrics",
    response_class=Response,
    responses={200: {"content": {METRICS_CONTENT_TYPE: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    """Prometheus text format: NIM's (vLLM's) serving metrics and the image pipeline's."""
    return Response(_state(request).metrics.render(), media_type=METRICS_CONTENT_TYPE)


@router.get("/v1/models", response_model=api.ModelList, responses={503: _ERRORS[503]})
async def list_models(request: Request) -> api.ModelList:
    server = _state(request).require_model_server()
    name = server.served_model_name
    permission = api.ModelPermission(id=f"modelperm-{uuid.uuid4().hex}", created=server.created)
    card = api.ModelCard(
        id=name,
        created=server.created,
        root=name,
        max_model_len=server.max_model_len,
        permission=[permission],
    )
    return api.ModelList(data=[card])


@router.get("/v1/version")
async def version() -> dict[str, str]:
    return {"release": vlmserve.__version__, "api": vlmserve.API_VERSION}


@router.get("/v1/metadata", responses={503: _ERRORS[503]})
async def metadata(request: Request) -> dict[str, Any]:
    state = _state(request)
    server = state.require_model_server()
    config = state.config
    return _jsonable(
        {
            "served_model_name": server.served_model_name,
            "max_model_len": server.max_model_len,
            "created": server.created,
            **server.metadata,
            "limits": {
                "max_messages": api.MAX_MESSAGES,
                "max_tokens": api.MAX_TOKENS_LIMIT,
                "default_max_tokens": api.DEFAULT_MAX_TOKENS,
                "max_n": api.MAX_N,
                "max_top_logprobs": api.MAX_TOP_LOGPROBS,
                "max_images_per_prompt": config.max_images_per_prompt,
                # the budget in force (bootstrap resolves --max-tiles 0 to the checkpoint's own)
                "max_tiles": server.metadata.get("max_tiles", config.max_tiles),
                "image_max_bytes": config.image_max_bytes,
                "image_max_pixels": config.image_max_pixels,
                "image_fetch_timeout": config.image_fetch_timeout,
            },
            "release": vlmserve.__version__,
            "api": vlmserve.API_VERSION,
        }
    )


def _jsonable(value: Any) -> Any:
    """`value` with anything JSON cannot hold (paths, torch dtypes) turned into its str()."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={
        200: {
            "model": api.ChatCompletionResponse,
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "JSON, or server-sent ChatCompletionChunk events when stream is true",
        },
        **{status: body for status, body in _ERRORS.items() if status != 500},
    },
)
async def create_chat_completion(body: api.ChatCompletionRequest, raw_request: Request) -> Response:
    service = _state(raw_request).require_chat()
    references = raw_request.headers.get(ASSET_REFERENCES_HEADER)
    run = await cancel_on_disconnect(service.start(body, asset_references=references), raw_request)
    if run is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if body.stream:
        return EventStreamResponse(service.stream(run))
    response = await cancel_on_disconnect(service.collect(run), raw_request)
    if response is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(response.model_dump(mode="json"))
