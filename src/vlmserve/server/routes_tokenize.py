"""HTTP handlers of /tokenize, /detokenize (vLLM's shapes) and /v1/chat/completions/render.

Thin, like server/routes.py: parse, call server/serving_tokenize.py, return JSON. Each request gets
a TokenizeService over the loaded model server (503 while loading, as chat completions).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response

from vlmserve.inputs.assets import ASSET_REFERENCES_HEADER
from vlmserve.protocol import openai as api
from vlmserve.server.routes import CLIENT_CLOSED_REQUEST, AppState
from vlmserve.server.serving_tokenize import TokenizeService
from vlmserve.server.sse import cancel_on_disconnect

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": api.ErrorResponse} for status in (400, 404, 415, 422, 503)
}


def _service(request: Request) -> TokenizeService:
    state: AppState = request.app.state.vlmserve
    return TokenizeService(state.require_model_server())


@router.post("/tokenize", response_model=api.TokenizeResponse, responses=_ERRORS)
async def tokenize(body: Annotated[api.TokenizeRequest, Body()], raw_request: Request) -> Response:
    """Token ids of a prompt (`prompt`) or of chat messages (`messages`, rendered and with images
    expanded exactly as chat completions do)."""
    service = _service(raw_request)
    references = raw_request.headers.get(ASSET_REFERENCES_HEADER)
    response = await cancel_on_disconnect(service.tokenize(body, asset_references=references), raw_request)
    if response is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(response.model_dump(mode="json"))


@router.post("/detokenize", response_model=api.DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: api.DetokenizeRequest, raw_request: Request) -> api.DetokenizeResponse:
    return _service(raw_request).detokenize(body)


@router.post("/v1/chat/completions/render", response_model=api.RenderResponse, responses=_ERRORS)
async def render_chat_completion(body: api.ChatCompletionRequest, raw_request: Request) -> Response:
    """The prompt a chat completion request would run (text with image tokens written out, token ids,
    image tiles and tokens), checked by the same rules; nothing is generated."""
    service = _service(raw_request)
    references = raw_request.headers.get(ASSET_REFERENCES_HEADER)
    response = await cancel_on_disconnect(service.render(body, asset_references=references), raw_request)
    if response is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(response.model_dump(mode="json"))
