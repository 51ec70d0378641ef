"""The FastAPI app factory and its lifespan: HTTP first, the model loads behind it.

`create_app()` starts serving at once (liveness 200, readiness and chat 503) and runs the blocking
`load(config)` on a daemon thread. When it returns, the model server is installed and readiness turns
200. When it raises, the error is logged and the process is made to exit non-zero: a server that
cannot load its model must not answer 503 forever. On shutdown the model server is closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, TypeVar

from fastapi import FastAPI

import vlmserve
from vlmserve.config import ServerConfig
from vlmserve.server.errors import install_error_handlers
from vlmserve.server.routes import AppState, router
from vlmserve.server.serving_chat import ChatCompletionService

if TYPE_CHECKING:
    from vlmserve.bootstrap import ModelServer

logger = logging.getLogger(__name__)

T = TypeVar("T")
LoadFn = Callable[[ServerConfig], "ModelServer"]
LoadFailureFn = Callable[[BaseException], None]


def create_app(
    config: ServerConfig, load: LoadFn, *, on_load_failure: LoadFailureFn | None = None
) -> FastAPI:
    """The HTTP app for `config`; `load` builds the model server and may take minutes.

    `on_load_failure` is called (on the event loop) after a failed load has been logged; it must make
    the process stop. The default sends SIGTERM to this process, which uvicorn turns into a shutdown
    and then re-raises, so the exit status is non-zero. `vlmserve serve` asks uvicorn to stop instead
    and exits with status 1.
    """
    state = AppState(config=config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load(state, load, on_load_failure or _terminate_process))
        try:
            yield
        finally:
            state.is_draining = True
            loader.cancel()
            with suppress(asyncio.CancelledError):
                await loader
            if state.model_server is not None:
                logger.info("closing the model server")
                await state.model_server.aclose()

    app = FastAPI(
        title="vlmserve",
        version=vlmserve.__version__,
        summary="NVIDIA NIM for VLMs API: OpenAI-compatible chat completions with images",
        lifespan=lifespan,
    )
    app.state.vlmserve = state
    install_error_handlers(app)
    app.include_router(router)
    return app


async def _load(state: AppState, load: LoadFn, on_failure: LoadFailureFn) -> None:
    model = state.config.model or "the default model"
    logger.info("loading %s; HTTP is up, readiness is 503 until it is loaded", model)
    started = time.monotonic()
    try:
        model_server = await _run_in_daemon_thread(load, state.config)
    except Exception as exc:
        state.load_failed = True
        logger.critical("loading the model failed, exiting: %s: %s", type(exc).__name__, exc, exc_info=exc)
        on_failure(exc)
        return
    state.model_server = model_server
    state.chat = ChatCompletionService(model_server)
    logger.info(
        "model %s loaded in %.1f s (max_model_len %d); the server is ready",
        model_server.served_model_name,
        time.monotonic() - started,
        model_server.max_model_len,
    )


async def _run_in_daemon_thread(fn: Callable[[ServerConfig], T], config: ServerConfig) -> T:
    """`fn(config)` on a daemon thread: unlike asyncio.to_thread, a shutdown during a long load does
    not wait for the load to finish."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = fn(config)
        except BaseException as exc:  # SystemExit in a loader must not escape as itself into the loop
            error = exc if isinstance(exc, Exception) else RuntimeError(f"the loader stopped: {exc!r}")
            outcome: tuple[T | None, BaseException | None] = (None, error)
        else:
            outcome = (result, None)
        with suppress(RuntimeError):  # the loop closed while we were loading
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name="vlmserve-load", daemon=True).start()
    return await future


def _terminate_process(exc: BaseException) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
