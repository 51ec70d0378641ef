"""HTTP handlers of /v1/assets: upload, look up and delete image assets.

The self-hosted counterpart of NIM's hosted NVCF asset flow. `POST /v1/assets` takes the image as the
raw body (Content-Type image/png, image/jpeg or application/octet-stream) or as the `file` field of a
multipart/form-data body, and answers 201 with the asset; a chat request then names it as
`data:image/png;asset_id,<id>` and lists the id in its NVCF-INPUT-ASSET-REFERENCES header. Limits
(size, time to live, total memory) are the store's (inputs/assets.py), from the configuration.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from vlmserve.errors import InvalidRequestError, PayloadTooLargeError, VLMServeError
from vlmserve.inputs.assets import Asset, AssetStore
from vlmserve.protocol import openai as api
from vlmserve.server.routes import AppState

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": api.ErrorResponse} for status in (400, 404, 413, 415, 503)
}
# the multipart field that carries the image (as curl -F file=@picture.png sends it)
FILE_FIELD = "file"


class AssetNotFoundError(VLMServeError):
    """No asset by that id: never uploaded, deleted, or gone (404)."""

    status = 404
    error_type = "NotFoundError"


def _store(request: Request) -> AssetStore:
    state: AppState = request.app.state.vlmserve
    return state.require_model_server().preprocessor.assets


def _asset_object(asset: Asset) -> api.AssetObject:
    return api.AssetObject(
        id=asset.id,
        bytes=asset.size,
        content_type=asset.content_type,
        created_at=int(asset.created),
        expires_at=int(asset.expires),
    )


@router.post(
    "/v1/assets",
    status_code=201,
    response_model=api.AssetObject,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
                        "required": [FILE_FIELD],
                    }
                },
            },
        }
    },
)
async def upload_asset(request: Request) -> api.AssetObject:
    """Store a PNG or JPEG image; 413 over the asset size limit, 415 for anything but PNG or JPEG."""
    store = _store(request)
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() == "multipart/form-data":
        data, declared = await _read_multipart(request, store.max_asset_bytes)
    else:
        data, declared = await _read_body(request, store.max_asset_bytes), content_type
    return _asset_object(store.put(data, declared))


@router.get("/v1/assets/{asset_id}", response_model=api.AssetObject, responses=_ERRORS)
async def get_asset(asset_id: str, request: Request) -> api.AssetObject:
    store = _store(request)
    asset = store.get(asset_id)
    if asset is None:
        raise AssetNotFoundError(f"asset {asset_id!r} {store.why_missing(asset_id)}", param="asset_id")
    return _asset_object(asset)


@router.delete("/v1/assets/{asset_id}", response_model=api.AssetDeleted, responses=_ERRORS)
async def delete_asset(asset_id: str, request: Request) -> api.AssetDeleted:
    store = _store(request)
    if not store.delete(asset_id):
        raise AssetNotFoundError(f"asset {asset_id!r} {store.why_missing(asset_id)}", param="asset_id")
    return api.AssetDeleted(id=asset_id.strip().lower())


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"asset is more than the limit of {limit} bytes")


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused (413) as soon as it is known to be over `limit`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_multipart(request: Request, limit: int) -> tuple[bytes, str | None]:
    """The bytes and declared type of the `file` field (the body as a whole is capped by the
    server's request body limit; python-multipart spools large files to disk)."""
    async with request.form(max_files=1, max_fields=16) as form:
        upload = form.get(FILE_FIELD)
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError(
                f"a multipart/form-data upload needs the image in a file field named {FILE_FIELD!r}",
                param=FILE_FIELD,
            )
        if upload.size is not None and upload.size > limit:
            raise _too_large(limit)
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise _too_large(limit)
        return data, upload.content_type
