"""The OpenAPI document also describes what the middleware answers before any route runs: 413 for a
request body over --max-request-body-bytes (every operation that takes a body) and, with --api-key,
401 plus the bearer security scheme on every path that is not exempt."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from vlmserve.config import ServerConfig

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
_SCHEME = "bearerAuth"


def install_openapi(app: FastAPI, config: ServerConfig) -> None:
    """Wraps app.openapi so the generated document (built once, then cached) gets those responses."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            add_middleware_responses(generate(), config)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_middleware_responses(schema: dict[str, Any], config: ServerConfig) -> None:
    """Adds the 413 and (with an API key) 401 responses and security requirements in place."""
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if "requestBody" in operation:
                responses.setdefault(
                    "413",
                    {"description": "The request body is over --max-request-body-bytes", "content": _ERROR},
                )
            if config.api_key and path not in config.api_key_exempt_paths:
                responses.setdefault(
                    "401", {"description": "Missing or invalid API key (--api-key)", "content": _ERROR}
                )
                operation["security"] = [{_SCHEME: []}]
    if config.api_key:
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[_SCHEME] = {"type": "http", "scheme": "bearer"}
