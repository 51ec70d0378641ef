"""End-to-end fixtures: real `vlmserve serve` subprocesses on 127.0.0.1 over a tiny checkpoint, the
official `openai` SDK pointed at them, and a local image host (http.server in a thread, 127.0.0.1 only).

Servers run torch on one thread: on a shared 2-core machine, two intra-op threads per server thrash
(a request of a few ms can take seconds) while the tiny model gains nothing from them.

- `server`: the tiny Nemotron-VL checkpoint under the seed's model id, image URLs on loopback allowed,
  fetch timeout 1.5 s, at most 4,000,000 pixels per image. Its readiness statuses seen during start-up
  are kept (`ready_statuses`, `loading_response`) for the "503 while loading" check.
- `strict_server`: the same checkpoint with the default image URL policy (private addresses refused)
  and --max-model-len 64. Started together with `server` when a collected test asks for it, so the
  two start-ups overlap.
- `image_host`: serves test images; records every request path it got.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import httpx
import openai
import pytest

from tests.e2e.helpers import demo_picture_png, gif_bytes, jpeg_bytes, png_bytes
from vlmserve.demo.shapes import Scene, Shape

STRICT_MAX_MODEL_LEN = 64
# how long the image host's /slow paths wait before answering (the server's fetch timeout is 1.5 s)
SLOW_RESPONSE_S = 8.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    process: subprocess.Popen
    log_path: Path
    log_file: IO[str] | None = None
    # /v1/health/ready statuses seen by wait_ready, in order (transport failures are not recorded)
    ready_statuses: list[int] = field(default_factory=list)
    # the first non-200 readiness answer: (status, headers, JSON body)
    loading_response: tuple[int, dict[str, str], Any] | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return True
            time.sleep(0.05)
        return False


def start_server(args: list[str], log_path: Path, *, env: dict[str, str] | None = None) -> RunningServer:
    port = free_port()
    cmd = [sys.executable, "-m", "vlmserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    log = log_path.open("w")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return RunningServer(f"http://127.0.0.1:{port}", process, log_path, log)


def wait_ready(server: RunningServer, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            response = httpx.get(server.base_url + "/v1/health/ready", timeout=2)
        except httpx.TransportError:
            pass
        else:
            server.ready_statuses.append(response.status_code)
            if response.status_code == 200:
                return
            if server.loading_response is None:
                try:
                    body = response.json()
                except ValueError:
                    body = response.text
                server.loading_response = (response.status_code, dict(response.headers), body)
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout} s:\n{server.log()}")


def stop_server(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    if server.log_file is not None:
        server.log_file.close()


@pytest.fixture(scope="session")
def served_model_name() -> str:
    return "nvidia/llama-3.1-nemotron-nano-vl-8b-v1"


class _Launcher:
    """Starts each named server once per session and stops them all at the end."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._servers: dict[str, RunningServer] = {}

    def start(self, name: str, args: list[str]) -> RunningServer:
        if name not in self._servers:
            self._servers[name] = start_server(args, self._tmp.mktemp(name) / "server.log")
        return self._servers[name]

    def stop_all(self) -> None:
        for running in self._servers.values():
            stop_server(running)


@pytest.fixture(scope="session")
def _launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Launcher]:
    launcher = _Launcher(tmp_path_factory)
    try:
        yield launcher
    finally:
        launcher.stop_all()


def _main_args(checkpoint: Path, served_model_name: str) -> list[str]:
    return [
        *("--model", str(checkpoint)),
        *("--served-model-name", served_model_name),
        *("--dtype", "float32"),
        *("--num-threads", "1"),
        "--allow-private-image-urls",
        *("--image-fetch-timeout", "1.5"),
        *("--image-max-pixels", "4000000"),
    ]


def _strict_args(checkpoint: Path, served_model_name: str) -> list[str]:
    return [
        *("--model", str(checkpoint)),
        *("--served-model-name", served_model_name),
        *("--dtype", "float32"),
        *("--num-threads", "1"),
        *("--max-model-len", str(STRICT_MAX_MODEL_LEN)),
    ]


@pytest.fixture(scope="session")
def server(
    request: pytest.FixtureRequest, _launcher: _Launcher, tiny_checkpoint_dir: Path, served_model_name: str
) -> RunningServer:
    """The tiny Nemotron-VL checkpoint served under the seed's model id, image URLs on loopback allowed."""
    running = _launcher.start("server", _main_args(tiny_checkpoint_dir, served_model_name))
    if any("strict_server" in getattr(item, "fixturenames", ()) for item in request.session.items):
        _launcher.start("strict-server", _strict_args(tiny_checkpoint_dir, served_model_name))
    wait_ready(running)
    return running


@pytest.fixture(scope="session")
def strict_server(_launcher: _Launcher, tiny_checkpoint_dir: Path, served_model_name: str) -> RunningServer:
    """The same checkpoint with the default image URL policy (loopback refused) and a 64-token context."""
    running = _launcher.start("strict-server", _strict_args(tiny_checkpoint_dir, served_model_name))
    wait_ready(running)
    return running


@pytest.fixture(scope="session")
def sdk(server: RunningServer) -> openai.OpenAI:
    """The official SDK on `server`; no retries, so each test sees exactly one answer per call."""
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def strict_sdk(strict_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=strict_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


# ------------------------------------------------------------------------------------------ image host


# a demo-model picture (tests/e2e/test_default_model_e2e.py): two shapes on a plain background
DEMO_PICTURE_PNG = demo_picture_png(
    Scene(320, 240, (Shape("green", "triangle", "top left"), Shape("orange", "circle", "bottom right")))
)


@dataclass
class ImageHost:
    base_url: str
    # every path requested, in order (appended from the handler threads)
    requests: list[str]
    port: int

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def requested(self, path: str) -> bool:
        return any(seen.split("?", 1)[0] == path for seen in list(self.requests))


@pytest.fixture(scope="session")
def image_host() -> Iterator[ImageHost]:
    """A local image server on 127.0.0.1: /red.png (64x64), /wide.png (128x64), /photo.jpg (64x64),
    /anim.gif, /not-image.png (text), /slow.png (answers after SLOW_RESPONSE_S), anything else 404."""
    bodies: dict[str, tuple[str, bytes]] = {
        "/red.png": ("image/png", png_bytes(64, 64)),
        "/wide.png": ("image/png", png_bytes(128, 64)),
        "/photo.jpg": ("image/jpeg", jpeg_bytes(64, 64)),
        "/anim.gif": ("image/gif", gif_bytes(16, 16)),
        "/not-image.png": ("image/png", b"this is plain text, not an image"),
        "/shapes.png": ("image/png", DEMO_PICTURE_PNG),
    }
    requests: list[str] = []
    stopping = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            path = self.path.split("?", 1)[0]
            if path.startswith("/slow"):
                stopping.wait(SLOW_RESPONSE_S)
                path = "/red.png"
            if path not in bodies:
                self.send_error(404, "no such image")
                return
            media_type, body = bodies[path]
            try:
                self.send_response(200)
                self.send_header("Content-Type", media_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the server gave up on a slow answer
                pass

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="e2e-image-host", daemon=True)
    thread.start()
    port = httpd.server_address[1]
    try:
        yield ImageHost(f"http://127.0.0.1:{port}", requests, port)
    finally:
        stopping.set()
        httpd.shutdown()
        httpd.server_close()
