"""SSRF, the whole list in one place: every URL that leads to loopback, private, link-local or cloud
metadata addresses is refused with a 400 before anything is fetched, including a public-looking name
whose server redirects to loopback.

Traffic never leaves 127.0.0.1: names resolve through a fake resolver, and the redirect case runs a
real HTTP server on loopback behind a transport that sends the "public" address's connections there
(and refuses to connect anywhere else).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from vlmserve.config import ServerConfig
from vlmserve.errors import ImageLoadError
from vlmserve.inputs import media
from vlmserve.inputs.media import fetch_image

PUBLIC_LOOKING = "203.0.113.7"  # stands for a public address; is_public_address is told it is one
POLICY = ServerConfig(allow_private_image_urls=False, image_fetch_timeout=2.0)


class _Refuse(httpx.AsyncBaseTransport):
    """A transport that must never be used: any connection attempt is a test failure."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts.append(str(request.url))
        raise AssertionError(f"tried to connect to {request.url}")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/a.png",
        "http://127.8.9.10/a.png",
        "http://[::1]/a.png",
        "http://10.0.0.1/a.png",
        "http://10.255.255.254/a.png",
        "http://172.16.0.1/a.png",
        "http://172.31.255.1/a.png",
        "http://192.168.0.1/a.png",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://localhost:8000/v1/metrics",
        "http://LOCALHOST./a.png",
    ],
)
async def test_private_destinations_are_400_and_never_fetched(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host.lower().rstrip(".") == "localhost":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        address = ipaddress.ip_address(host)  # a literal resolves to itself; no other name is asked
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (str(address), port))]

    monkeypatch.setattr(media.socket, "getaddrinfo", getaddrinfo)
    transport = _Refuse()
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(ImageLoadError) as exc_info:
            await fetch_image(url, client=client, config=POLICY)
    assert exc_info.value.status == 400
    assert transport.attempts == []


@pytest.fixture
def loopback_server() -> Iterator[tuple[int, list[str]]]:
    """A real server on 127.0.0.1: /start.png redirects to http://127.0.0.1:<port>/secret.png."""
    requested: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            if self.path == "/start.png":
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/secret.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_error(404)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], requested
    finally:
        server.shutdown()
        server.server_close()


class _ToLoopback(httpx.AsyncBaseTransport):
    """Sends connections for PUBLIC_LOOKING to 127.0.0.1 (the real server); refuses any other host."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.hosts: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.hosts.append(request.url.host)
        if request.url.host != PUBLIC_LOOKING:
            raise AssertionError(f"tried to connect to {request.url}")
        request.url = request.url.copy_with(host="127.0.0.1")
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_public_name_redirecting_to_loopback_is_refused(
    loopback_server: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, requested = loopback_server

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        address = PUBLIC_LOOKING if host == "images.example" else host
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    real_check = media.is_public_address
    monkeypatch.setattr(media.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(media, "is_public_address", lambda a: a == PUBLIC_LOOKING or real_check(a))
    transport = _ToLoopback()
    async with httpx.AsyncClient(transport=transport, follow_redirects=False) as client:
        with pytest.raises(ImageLoadError, match=r"refused address 127\.0\.0\.1") as exc_info:
            await fetch_image(f"http://images.example:{port}/start.png", client=client, config=POLICY)
    assert exc_info.value.status == 400
    assert requested == ["/start.png"]  # the first hop was served; the loopback target never was
    assert transport.hosts == [PUBLIC_LOOKING]


async def test_redirect_to_a_name_resolving_to_loopback_is_refused(
    loopback_server: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, with the Location naming localhost instead of an IP literal."""
    port, requested = loopback_server

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        address = {"images.example": PUBLIC_LOOKING, "localhost": "127.0.0.1"}.get(host, host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    real_check = media.is_public_address
    monkeypatch.setattr(media.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(media, "is_public_address", lambda a: a == PUBLIC_LOOKING or real_check(a))
    transport = _ToLoopback()

    class _Redirect(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await transport.handle_async_request(request)
            await response.aread()
            with contextlib.suppress(KeyError):
                location = response.headers["location"].replace("127.0.0.1", "localhost")
                response.headers["location"] = location
            return response

    async with httpx.AsyncClient(transport=_Redirect(), follow_redirects=False) as client:
        with pytest.raises(ImageLoadError, match="refused address") as exc_info:
            await fetch_image(f"http://images.example:{port}/start.png", client=client, config=POLICY)
    assert exc_info.value.status == 400
    assert requested == ["/start.png"]
