"""Fixtures for the HTTP layer tests: a fake model server, an httpx client on an app with its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.unit.server.helpers import FakeEngine, FakeModelServer, LoadFailures, wait_until_ready
from vlmserve.config import ServerConfig
from vlmserve.server.app import create_app


@pytest.fixture
def model_server() -> FakeModelServer:
    return FakeModelServer()


@pytest.fixture
def engine(model_server: FakeModelServer) -> FakeEngine:
    return model_server.engine


@pytest.fixture
def load_failures() -> LoadFailures:
    return LoadFailures()


@pytest.fixture
def make_client(
    load_failures: LoadFailures,
) -> Callable[..., Any]:
    """An async context manager factory: an httpx client on a fresh app whose lifespan runs."""

    @asynccontextmanager
    async def factory(
        load: Callable[[ServerConfig], Any], *, wait_ready: bool = True, config: ServerConfig | None = None
    ) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(config or ServerConfig(), load, on_load_failure=load_failures)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                client.app = app  # type: ignore[attr-defined]
                if wait_ready:
                    await wait_until_ready(client)
                yield client

    return factory


@pytest.fixture
async def client(
    make_client: Callable[..., Any], model_server: FakeModelServer
) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(lambda config: model_server) as client:
        yield client
