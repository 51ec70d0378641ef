"""fetch_image against a real HTTP server on 127.0.0.1 (private URLs allowed), and its refusals.

Only 127.0.0.1 ever receives traffic: every test with other addresses uses httpx.MockTransport
(no sockets) and fails if a request reaches it when none should.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.unit.inputs.helpers import encode_image
from vlmserve.config import ServerConfig
from vlmserve.errors import ImageLoadError
from vlmserve.inputs import media
from vlmserve.inputs.media import check_image_url, create_fetch_client, fetch_image, is_public_address

PNG = encode_image(Image.new("RGB", (8, 8), (1, 2, 3)))
MAX_BYTES = 100_000


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path
        if path == "/image.png":
            self._send(200, PNG)
        elif path == "/slow":
            time.sleep(2.0)
            self._send(200, PNG)
        elif path.startswith("/redirect/"):
            remaining = int(path.rsplit("/", 1)[1])
            self.send_response(302)
            self.send_header("Location", f"/redirect/{remaining - 1}" if remaining > 1 else "/image.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/big":
            self._stream_big(declare_length=False)
        elif path == "/big-declared":
            self._stream_big(declare_length=True)
        else:
            self._send(404, b"not found")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream_big(self, *, declare_length: bool) -> None:
        self.send_response(200)
        if declare_length:
            self.send_header("Content-Length", str(MAX_BYTES * 50))
        self.end_headers()
        try:
            for _ in range(50):
                self.wfile.write(b"\x00" * MAX_BYTES)
        except OSError:
            pass  # the client stopped reading, as it should

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _config(**overrides: Any) -> ServerConfig:
    settings: dict[str, Any] = {
        "allow_private_image_urls": True, "image_fetch_timeout": 0.5, "image_fetch_max_redirects": 3,
        "image_max_bytes": MAX_BYTES,
    }
    return ServerConfig(**(settings | overrides))


@pytest.fixture()
async def loopback_client() -> AsyncIterator[httpx.AsyncClient]:
    client = create_fetch_client(_config())
    yield client
    await client.aclose()


async def _fetch(url: str, client: httpx.AsyncClient, **overrides: Any) -> bytes:
    return await fetch_image(url, client=client, config=_config(**overrides))


async def test_fetches_an_image(server_url: str, loopback_client: httpx.AsyncClient) -> None:
    assert await _fetch(f"{server_url}/image.png", loopback_client) == PNG


async def test_404_names_url_and_status(server_url: str, loopback_client: httpx.AsyncClient) -> None:
    with pytest.raises(ImageLoadError, match=r"missing\.png.*HTTP 404"):
        await _fetch(f"{server_url}/missing.png", loopback_client)


async def test_timeout(server_url: str) -> None:
    config = _config(image_fetch_timeout=0.3)
    async with create_fetch_client(config) as client:
        started = time.monotonic()
        with pytest.raises(ImageLoadError, match="timed out"):
            await fetch_image(f"{server_url}/slow", client=client, config=config)
    assert time.monotonic() - started < 1.5


async def test_redirects_up_to_the_limit(server_url: str, loopback_client: httpx.AsyncClient) -> None:
    assert await _fetch(f"{server_url}/redirect/3", loopback_client) == PNG
    with pytest.raises(ImageLoadError, match="too many redirects"):
        await _fetch(f"{server_url}/redirect/4", loopback_client)
    with pytest.raises(ImageLoadError, match="too many redirects"):
        await _fetch(f"{server_url}/redirect/1", loopback_client, image_fetch_max_redirects=0)


@pytest.mark.parametrize("path", ["/big", "/big-declared"])
async def test_byte_cap(server_url: str, loopback_client: httpx.AsyncClient, path: str) -> None:
    with pytest.raises(ImageLoadError, match="too large"):
        await _fetch(f"{server_url}{path}", loopback_client)


async def test_loopback_refused_when_private_urls_are_not_allowed(server_url: str) -> None:
    config = _config(allow_private_image_urls=False)
    async with create_fetch_client(config) as client:
        with pytest.raises(ImageLoadError, match=r"refused address 127\.0\.0\.1"):
            await fetch_image(f"{server_url}/image.png", client=client, config=config)


# ------------------------------------------------------------------------- no traffic past this line


class _Recorder:
    """A MockTransport handler: records requests, answers with `responses` (or fails if there are none)."""

    def __init__(self, *responses: httpx.Response) -> None:
        self.requests: list[httpx.Request] = []
        self.responses = list(responses)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if not self.responses:
            raise AssertionError(f"no request should have been sent, got {request.url}")
        return self.responses.pop(0)


class _Body(httpx.AsyncByteStream):
    """A streamed body, as from the network (a bytes body would be read eagerly by httpx)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data


def _ok(data: bytes = PNG, **headers: str) -> httpx.Response:
    return httpx.Response(200, headers=headers, stream=_Body(data))


def _mock_client(recorder: _Recorder) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(recorder), follow_redirects=False)


def _fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """Resolve names from `answers` (a list per lookup: each lookup pops the next set)."""
    lookups: list[str] = []

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        lookups.append(host)
        with contextlib.suppress(ValueError):
            answers.setdefault(host, [str(ipaddress.ip_address(host))])  # literals resolve to themselves
        family = socket.AF_INET6 if ":" in answers[host][0] else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, port)) for address in answers[host]]

    monkeypatch.setattr(media.socket, "getaddrinfo", getaddrinfo)
    return lookups


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.png",
        "http://[::1]/a.png",
        "http://10.0.0.1/a.png",
        "http://172.16.0.1/a.png",
        "http://192.168.1.1/a.png",
        "http://169.254.169.254/latest/meta-data",
        "http://localhost/a.png",
        "http://0.0.0.0/a.png",
        "http://[::ffff:127.0.0.1]/a.png",
        "https://100.64.0.1/a.png",
    ],
)
async def test_private_addresses_refused_without_connecting(url: str) -> None:
    recorder = _Recorder()
    async with _mock_client(recorder) as client:
        with pytest.raises(ImageLoadError, match="refused address"):
            await fetch_image(url, client=client, config=_config(allow_private_image_urls=False))
    assert recorder.requests == []


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "gopher://x/", "//x/a.png"])
async def test_other_schemes_refused(url: str) -> None:
    recorder = _Recorder()
    async with _mock_client(recorder) as client:
        with pytest.raises(ImageLoadError, match="scheme"):
            await fetch_image(url, client=client, config=_config(allow_private_image_urls=True))
    assert recorder.requests == []


async def test_any_private_address_of_a_name_refuses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {"mixed.example": ["93.184.216.34", "10.1.2.3"]})
    recorder = _Recorder()
    async with _mock_client(recorder) as client:
        with pytest.raises(ImageLoadError, match=r"refused address 10\.1\.2\.3"):
            await fetch_image("http://mixed.example/a.png", client=client,
                              config=_config(allow_private_image_urls=False))
    assert recorder.requests == []


async def test_connects_to_the_checked_address_with_the_real_host(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = _fake_dns(monkeypatch, {"images.example": ["93.184.216.34"]})
    recorder = _Recorder(_ok())
    async with _mock_client(recorder) as client:
        body = await fetch_image("https://images.example:8443/a.png?x=1", client=client,
                                 config=_config(allow_private_image_urls=False))
    assert body == PNG
    assert lookups == ["images.example"]
    (request,) = recorder.requests
    assert request.url.host == "93.184.216.34" and request.url.port == 8443 and request.url.query == b"x=1"
    assert request.headers["host"] == "images.example:8443"
    assert request.extensions["sni_hostname"] == "images.example"


async def test_every_redirect_hop_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {"images.example": ["93.184.216.34"]})
    recorder = _Recorder(httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/"}))
    async with _mock_client(recorder) as client:
        with pytest.raises(ImageLoadError, match=r"refused address 169\.254\.169\.254"):
            await fetch_image("http://images.example/a.png", client=client,
                              config=_config(allow_private_image_urls=False))
    assert len(recorder.requests) == 1


async def test_relative_redirect_keeps_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {"images.example": ["93.184.216.34"]})
    recorder = _Recorder(httpx.Response(301, headers={"Location": "/b.png"}), _ok())
    async with _mock_client(recorder) as client:
        assert await fetch_image("http://images.example/a.png", client=client,
                                 config=_config(allow_private_image_urls=False)) == PNG
    assert [r.url.path for r in recorder.requests] == ["/a.png", "/b.png"]
    assert recorder.requests[1].headers["host"] == "images.example"


async def test_long_url_is_truncated_in_the_message() -> None:
    url = "http://10.0.0.1/" + "a" * 500
    async with _mock_client(_Recorder()) as client:
        with pytest.raises(ImageLoadError) as info:
            await fetch_image(url, client=client, config=_config(allow_private_image_urls=False))
    assert "..." in info.value.message and len(info.value.message) < 300


async def test_compressed_response_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {"images.example": ["93.184.216.34"]})
    response = _ok(b"\x1f\x8b", **{"Content-Encoding": "gzip"})
    async with _mock_client(_Recorder(response)) as client:
        with pytest.raises(ImageLoadError, match="encoded"):
            await fetch_image("http://images.example/a.png", client=client,
                              config=_config(allow_private_image_urls=False))


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True), ("2606:4700:4700::1111", True), ("127.0.0.2", False), ("::1", False),
        ("10.9.9.9", False), ("172.31.255.255", False), ("192.168.0.1", False), ("169.254.1.1", False),
        ("fe80::1", False), ("fc00::1", False), ("224.0.0.251", False), ("ff02::1", False),
        ("0.0.0.0", False), ("::", False), ("240.0.0.1", False), ("100.64.0.1", False),
        ("::ffff:10.0.0.1", False), ("2002:7f00:1::1", False), ("255.255.255.255", False),
        # multicast, unspecified, reserved and "this network"
        ("239.255.255.250", False), ("ff0e::1", False), ("0.1.2.3", False), ("::ffff:0.0.0.0", False),
        ("198.18.0.1", False), ("192.0.0.1", False), ("192.0.2.1", False), ("fec0::1", False),
        # IPv4 embedded in IPv6: mapped, 6to4, Teredo (server 8.8.8.8, client 10.0.0.1), NAT64
        ("::ffff:127.0.0.1", False), ("::ffff:93.184.216.34", False), ("2002:c0a8:101::1", False),
        ("2001:0:808:808:0:0:f5ff:fffe", False), ("64:ff9b::a00:1", False), ("64:ff9b::7f00:1", False),
        ("fe80::1%eth0", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public


async def test_slow_dns_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_getaddrinfo(*args: Any, **kwargs: Any) -> list[Any]:
        time.sleep(1.0)
        return []

    monkeypatch.setattr(media.socket, "getaddrinfo", slow_getaddrinfo)
    async with _mock_client(_Recorder()) as client:
        with pytest.raises(ImageLoadError, match="timed out resolving"):
            await fetch_image("http://slow.example/a.png", client=client,
                              config=_config(image_fetch_timeout=0.2))


@pytest.mark.parametrize(
    "address", ["224.0.0.1", "0.0.0.0", "240.0.0.1", "::ffff:127.0.0.1", "2002:a00:1::1",
                "2001:0:808:808:0:0:f5ff:fffe", "::", "ff02::1"],
)
async def test_names_resolving_to_refused_addresses(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    lookups = _fake_dns(monkeypatch, {"sneaky.example": [address]})
    recorder = _Recorder()
    async with _mock_client(recorder) as client:
        with pytest.raises(ImageLoadError, match=f"refused address {re.escape(address)}"):
            await fetch_image("http://sneaky.example/a.png", client=client,
                              config=_config(allow_private_image_urls=False))
    assert lookups == ["sneaky.example"] and recorder.requests == []


@pytest.mark.parametrize(
    ("host", "address"),
    [("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("127.1", "127.0.0.1"),
     ("017700000001", "127.0.0.1"), ("0", "0.0.0.0")],
)
async def test_numeric_host_spellings_are_checked_as_resolved(
    monkeypatch: pytest.MonkeyPatch, host: str, address: str
) -> None:
    real_getaddrinfo = socket.getaddrinfo

    def numeric_only(name: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        # AI_NUMERICHOST: the C library parses the number itself and never asks a DNS server
        return real_getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)

    monkeypatch.setattr(media.socket, "getaddrinfo", numeric_only)
    recorder = _Recorder()
    async with _mock_client(recorder) as client:
        with pytest.raises(ImageLoadError, match=f"refused address {re.escape(address)}"):
            await fetch_image(f"http://{host}/a.png", client=client,
                              config=_config(allow_private_image_urls=False))
    assert recorder.requests == []


async def test_redirect_to_a_name_is_resolved_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = _fake_dns(monkeypatch, {"images.example": ["93.184.216.34"], "internal.example": ["10.0.0.5"]})
    recorder = _Recorder(httpx.Response(302, headers={"Location": "http://internal.example/x.png"}))
    async with _mock_client(recorder) as client:
        with pytest.raises(ImageLoadError, match=r"internal\.example.*refused address 10\.0\.0\.5"):
            await fetch_image("http://images.example/a.png", client=client,
                              config=_config(allow_private_image_urls=False))
    assert lookups == ["images.example", "internal.example"] and len(recorder.requests) == 1


# ---------------------------------------------------------------------------------------- allowed domains


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://example.com/a.png", True),
        ("https://EXAMPLE.com./a.png", True),
        ("https://cdn.example.com/a.png", False),
        ("https://img.cdn.example.org/a.png", True),
        ("https://cdn.example.org/a.png", True),
        ("https://example.org/a.png", False),  # *. does not match the bare domain
        ("https://badexample.org/a.png", False),
        ("https://example.org.evil.com/a.png", False),
        ("https://bücher.de/a.png", True),
        ("https://xn--bcher-kva.de/a.png", True),
        ("http://93.184.216.34/a.png", True),
        ("http://[2606:4700:4700::1111]/a.png", True),
        ("http://93.184.216.35/a.png", False),
    ],
)
def test_allowed_domains(url: str, allowed: bool) -> None:
    config = _config(image_url_allowed_domains=(
        "example.com", "*.example.org", "bücher.de", "93.184.216.34", "2606:4700:4700::1111"
    ))
    if allowed:
        assert check_image_url(url, config).host
    else:
        with pytest.raises(ImageLoadError, match="is not one of the allowed image domains") as info:
            check_image_url(url, config)
        assert repr(httpx.URL(url).host) in info.value.message


def test_no_allowed_domains_means_any() -> None:
    assert check_image_url("https://anything.example/a.png", _config()).host == "anything.example"


async def test_allowlist_refuses_before_resolving(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = _fake_dns(monkeypatch, {})
    recorder = _Recorder()
    async with _mock_client(recorder) as client:
        with pytest.raises(ImageLoadError, match=r"'other\.example' is not one of the allowed"):
            await fetch_image("http://other.example/a.png", client=client,
                              config=_config(image_url_allowed_domains=("images.example",)))
    assert lookups == [] and recorder.requests == []


async def test_allowlist_applies_to_every_redirect(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = _fake_dns(monkeypatch, {"images.example": ["93.184.216.34"]})
    recorder = _Recorder(httpx.Response(302, headers={"Location": "https://elsewhere.example/a.png"}))
    config = _config(allow_private_image_urls=False, image_url_allowed_domains=("images.example",))
    async with _mock_client(recorder) as client:
        with pytest.raises(ImageLoadError, match=r"'elsewhere\.example' is not one of the allowed"):
            await fetch_image("http://images.example/a.png", client=client, config=config)
    assert lookups == ["images.example"] and len(recorder.requests) == 1


# ------------------------------------------------------------------------------------------ total time


class _Drip(httpx.AsyncByteStream):
    """A body that arrives a few bytes at a time, each chunk well within any read timeout."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(100):
            await asyncio.sleep(0.05)
            yield b"\x00" * 10


async def test_total_time_cap_stops_a_slow_drip(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {"images.example": ["93.184.216.34"]})
    recorder = _Recorder(httpx.Response(200, stream=_Drip()))
    config = _config(allow_private_image_urls=False, image_fetch_timeout=5.0, image_fetch_total_timeout=0.3)
    started = time.monotonic()
    async with _mock_client(recorder) as client:
        with pytest.raises(ImageLoadError, match=r"images\.example/a\.png: took longer than 0\.3 s"):
            await fetch_image("http://images.example/a.png", client=client, config=config)
    assert time.monotonic() - started < 1.0


async def test_total_time_cap_covers_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_getaddrinfo(*args: Any, **kwargs: Any) -> list[Any]:
        time.sleep(0.5)
        return []

    monkeypatch.setattr(media.socket, "getaddrinfo", slow_getaddrinfo)
    config = _config(image_fetch_timeout=5.0, image_fetch_total_timeout=0.1)
    async with _mock_client(_Recorder()) as client:
        with pytest.raises(ImageLoadError, match=r"took longer than 0\.1 s"):
            await fetch_image("http://slow.example/a.png", client=client, config=config)


async def test_a_cancel_during_dns_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel that lands just as the DNS lookup finishes must still cancel (asyncio.wait_for in
    Python 3.11 returned the lookup's result instead, and the fetch went on to download the image).

    The cancel is sent 0..7 loop iterations after the lookup thread ends, to hit every step of the
    handover from the thread back to the fetch; a fetch that finished before the cancel is skipped.
    """
    num_checked = 0
    for iterations in range(8):
        lookup_done = threading.Event()

        def getaddrinfo(host: str, port: int, *args: Any, _done: threading.Event = lookup_done,
                        **kwargs: Any) -> list[Any]:
            _done.set()
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

        monkeypatch.setattr(media.socket, "getaddrinfo", getaddrinfo)
        async with httpx.AsyncClient(transport=httpx.MockTransport(lambda request: _ok())) as client:
            task = asyncio.ensure_future(fetch_image("http://images.example/a.png", client=client,
                                                     config=_config(allow_private_image_urls=False)))
            while not lookup_done.wait(0.001):
                await asyncio.sleep(0)
            time.sleep(0.01)  # the thread's result is now queued on the loop
            for _ in range(iterations):
                await asyncio.sleep(0)
            if task.done():
                continue
            num_checked += 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert num_checked >= 2
