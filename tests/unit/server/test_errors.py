"""server/errors.py: every error class to its status and body; validation messages; the 500 catch-all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.unit.server.helpers import FakeModelServer, assert_error
from vlmserve.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    ImageLoadError,
    InvalidRequestError,
    ModelNotFoundError,
    PayloadTooLargeError,
    RequestFailedError,
    ServerBusyError,
    UnsupportedMediaTypeError,
    ValidationError,
    VLMServeError,
)
from vlmserve.server.errors import error_payload, error_response, format_validation_errors


@pytest.mark.parametrize(
    ("error", "status", "error_type"),
    [
        (InvalidRequestError("x", param="p"), 400, "BadRequestError"),
        (ImageLoadError("x", param="p"), 400, "BadRequestError"),
        (ContextLengthExceededError("x", param="p"), 400, "BadRequestError"),
        (ModelNotFoundError("x", param="p"), 404, "NotFoundError"),
        (PayloadTooLargeError("x", param="p"), 413, "PayloadTooLargeError"),
        (UnsupportedMediaTypeError("x", param="p"), 415, "UnsupportedMediaTypeError"),
        (ValidationError("x", param="p"), 422, "UnprocessableEntityError"),
        (RequestFailedError("x", param="p"), 500, "InternalServerError"),
        (EngineDeadError("x", param="p"), 503, "ServiceUnavailableError"),
    ],
)
def test_typed_errors_map_to_their_status(error: VLMServeError, status: int, error_type: str) -> None:
    assert error_payload(error) == (
        status,
        {"error": {"message": "x", "type": error_type, "param": "p", "code": status}},
    )


def test_busy_error_adds_retry_after() -> None:
    response = error_response(ServerBusyError("full", retry_after=7))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert "retry-after" not in error_response(EngineDeadError("dead")).headers


def test_unexpected_errors_are_500_without_details(caplog: pytest.LogCaptureFixture) -> None:
    status, body = error_payload(KeyError("secret"))
    assert status == 500
    assert "secret" not in body["error"]["message"]
    assert body["error"]["type"] == "InternalServerError"
    assert "KeyError" in caplog.text  # logged with its traceback


@pytest.mark.parametrize(
    ("errors", "message", "param"),
    [
        (
            [{"loc": ("body", "messages", 1, "role"), "msg": "Input should be 'user'"}],
            "messages.1.role: Input should be 'user'",
            "messages.1.role",
        ),
        (
            [{"loc": ("body", "messages"), "msg": "Value error, messages.3.role: must alternate"}],
            "messages.3.role: must alternate",
            "messages.3.role",
        ),
        (
            [
                {"loc": ("body", "messages", 0, "content", "content:parts", 1, "part:image_url", "image_url"),
                 "msg": "Field required"},
            ],
            "messages.0.content.1.image_url: Field required",
            "messages.0.content.1.image_url",
        ),
        (
            [{"loc": ("body", "stop", "str"), "msg": "bad"}, {"loc": ("body", "stop", "list"), "msg": "bad"}],
            "stop: bad",
            "stop",
        ),
        (
            [{"loc": ("body",), "msg": "Value error, top_logprobs: needs logprobs"}],
            "top_logprobs: needs logprobs",
            "top_logprobs",
        ),
        (
            [{"type": "json_invalid", "loc": ("body", 5), "msg": "JSON error", "ctx": {"error": "bad"}}],
            "the request body is not valid JSON: bad (at character 5)",
            None,
        ),
        ([], "invalid request", None),
    ],
)  # fmt: skip
def test_validation_messages_name_the_path(
    errors: list[dict[str, Any]], message: str, param: str | None
) -> None:
    assert format_validation_errors(errors) == (message, param)


async def test_a_bug_is_500_and_the_server_goes_on(
    make_client: Callable[..., Any], model_server: FakeModelServer
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("secret")

    model_server.preprocessor.prepare = broken  # type: ignore[method-assign]
    async with make_client(lambda config: model_server) as client:
        response = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        assert_error(response, 500, "internal server error")
        assert "secret" not in response.text
        assert (await client.get("/v1/health/ready")).status_code == 200


async def test_unhandled_exception_in_a_route_is_500_in_error_shape(
    make_client: Callable[..., Any], model_server: FakeModelServer
) -> None:
    async with make_client(lambda config: model_server) as client:
        app = client.app  # type: ignore[attr-defined]

        @app.get("/boom")
        async def boom() -> None:
            raise RuntimeError("secret")

        response = await client.get("/boom")
        assert_error(response, 500, "internal server error")
        assert "secret" not in response.text
