"""The FastAPI app factory and its lifespan: HTTP first, the model loads behind it.

`create_app()` starts serving at once (liveness 200, readiness and chat 503) and runs the blocking
`load(config)` on a daemon thread. When it returns, the model server is installed and readiness turns
200. When it raises, the error is logged and the process is made to exit non-zero: a server that
cannot load its model must not answer 503 forever. Once loaded, a watchdog polls the engine: if it
stopped (`is_running` False), readiness is already 503 and the process is made to exit non-zero too,
so that an orchestrator restarts it. On shutdown the model server is closed.
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
from vlmserve.server.middleware import install_middleware
from vlmserve.server.openapi import install_openapi
from vlmserve.server.routes import AppState, router
from vlmserve.server.routes_assets import router as assets_router
from vlmserve.server.routes_tokenize import router as tokenize_router
from vlmserve.server.serving_chat import ChatCompletionService

if TYPE_CHECKING:
    from vlmserve.bootstrap import ModelServer

logger = logging.getLogger(__name__)

T = TypeVar("T")
LoadFn = Callable[[ServerConfig], "ModelServer"]
LoadFailureFn = Callable[[BaseException], None]
# how often the watchdog looks at the engine
WATCHDOG_INTERVAL_S = 0.5


def create_app(
    config: ServerConfig, load: LoadFn, *, on_load_failure: LoadFailureFn | None = None
) -> FastAPI:
    """The HTTP app for `config`; `load` builds the model server and may take minutes.

    `on_load_failure` is called (on the event loop) when the server cannot go on: after a failed load,
    or once the watchdog saw the engine stop, each logged first (`state.load_failed` or
    `state.engine_died` says which). It must make the process stop. The default sends SIGTERM to this
    process, which uvicorn turns into a shutdown and then re-raises, so the exit status is non-zero.
    `vlmserve serve` asks uvicorn to stop instead and exits with status 1.
    """
    state = AppState(config=config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        on_failure = on_load_failure or _terminate_process
        loader = asyncio.create_task(_load(state, load, on_failure))
        watchdog = asyncio.create_task(_watch_engine(state, loader, on_failure))
        try:
            yield
        finally:
            state.is_draining = True
            for task in (watchdog, loader):
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
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
    install_middleware(app, config)
    app.include_router(router)
    app.include_router(assets_router)
    app.include_router(tokenize_router)
    install_openapi(app, config)
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
    state.metrics.attach(model_server, model_server.served_model_name)
    state.model_server = model_server
    state.chat = ChatCompletionService(model_server, log_prompts=not state.config.disable_log_requests)
    logger.info(
        "model %s loaded in %.1f s (max_model_len %d); the server is ready",
        model_server.served_model_name,
        time.monotonic() - started,
        model_server.max_model_len,
    )


async def _watch_engine(state: AppState, loader: asyncio.Task[None], on_failure: LoadFailureFn) -> None:
    """After the load, polls the engine; once it stopped, logs why and calls `on_failure` (once)."""
    await asyncio.wait({loader})
    while state.model_server is not None and not state.is_draining:
        engine = state.model_server.engine
        if not engine.is_running:
            reason = getattr(getattr(engine, "core", None), "dead_reason", None) or "the engine stopped"
            state.engine_died = True
            logger.critical("the engine cannot go on (%s): readiness is 503, exiting", reason)
            on_failure(RuntimeError(reason))
            return
        await asyncio.sleep(WATCHDOG_INTERVAL_S)


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
