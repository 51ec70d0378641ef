"""The error taxonomy: typed exceptions raised anywhere below the HTTP layer.

Each carries the HTTP status it maps to and the request field it concerns. Only
`server/errors.py` turns them into responses; nothing here imports FastAPI.
"""

from __future__ import annotations


class VLMServeError(Exception):
    """Base of every error a request can end with. `status` is the HTTP status code."""

    status: int = 500
    error_type: str = "InternalServerError"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(VLMServeError):
    """A request that parses but cannot be served (400)."""

    status = 400
    error_type = "BadRequestError"


class ValidationError(VLMServeError):
    """A field out of range, of the wrong type, or a broken role order (422)."""

    status = 422
    error_type = "UnprocessableEntityError"


class ImageLoadError(InvalidRequestError):
    """An image that could not be fetched, decoded or accepted (400)."""


class UnsupportedMediaTypeError(VLMServeError):
    """An image in a format other than PNG or JPEG (415)."""

    status = 415
    error_type = "UnsupportedMediaTypeError"


class ContextLengthExceededError(InvalidRequestError):
    """Prompt tokens plus max_tokens exceed the model's context length (400)."""


class ModelNotFoundError(VLMServeError):
    """The request names a model this server does not serve (404)."""

    status = 404
    error_type = "NotFoundError"


class PayloadTooLargeError(VLMServeError):
    """The request body is over the configured limit (413)."""

    status = 413
    error_type = "PayloadTooLargeError"


class ServerBusyError(VLMServeError):
    """The server is not ready, draining, or its queue is full (503, with Retry-After)."""

    status = 503
    error_type = "ServiceUnavailableError"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(VLMServeError):
    """The engine loop stopped after an unrecoverable error (503)."""

    status = 503
    error_type = "ServiceUnavailableError"


class RequestFailedError(VLMServeError):
    """The engine failed this request through a bug (500); other requests go on."""

    status = 500
    error_type = "InternalServerError"


class ModelLoadError(Exception):
    """A checkpoint directory that cannot be loaded: the message names the file and the reason."""
