"""Operations against real servers on 127.0.0.1: oversized bodies and a PNG bomb refused with flat
memory, a mixed soak with aborts (all KV blocks free at the end, RSS steady), metrics, SIGTERM
during a stream (the stream completes, exit 0), and TLS with client certificates (MTLS)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import ssl
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import ImageHost, RunningServer, start_server, stop_server, wait_ready
from tests.e2e.helpers import MODEL, check_error_body, data_url, png_bytes, user_text, user_with_images


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def metric_values(base_url: str) -> dict[str, float]:
    """{sample name (+ {finished_reason} when it has one): value} of GET /v1/metrics."""
    text = httpx.get(base_url + "/v1/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            reason = sample.labels.get("finished_reason")
            values[sample.name + (f"{{{reason}}}" if reason else "")] = sample.value
    return values


def png_bomb(side: int) -> bytes:
    """A valid grayscale PNG of side x side black pixels: side^2 bytes decoded, about side^2 / 1000 sent."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------- memory limits


def test_huge_body_and_png_bomb_are_refused_with_flat_memory(server: RunningServer) -> None:
    url = server.base_url + "/v1/chat/completions"
    httpx.post(url, json={"model": MODEL, "messages": user_text(), "max_tokens": 2}, timeout=30)
    before = rss_bytes(server.process.pid)
    body = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * 50_000_000 + b'"}]}'
    started = time.monotonic()
    response = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    check_error_body(response, 413, "limit")
    bomb = png_bomb(12_000)  # 144 megapixels, 144 MB decoded, ~140 KB sent
    assert len(bomb) < 500_000
    for _ in range(3):
        response = httpx.post(
            url,
            json={"model": MODEL, "messages": user_with_images(data_url(bomb)), "max_tokens": 2},
            timeout=30,
        )
        check_error_body(response, 400, "pixels")
    after = rss_bytes(server.process.pid)
    print(
        f"\n50 MB body -> 413, PNG bomb x3 -> 400 in {time.monotonic() - started:.2f} s; "
        f"server RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB"
    )
    assert after - before < 16 * 2**20


# ----------------------------------------------------------------------------------------------- soak


async def _one(client: httpx.AsyncClient, kind: str, image_url: str, png_url: str) -> str:
    messages = {
        "text": user_text(),
        "image": user_with_images(png_url),
        "url": user_with_images(image_url),
    }
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0}
    if kind in ("text", "image", "url"):
        response = await client.post("/v1/chat/completions", json={**body, "messages": messages[kind]})
        assert response.status_code == 200, response.text
        return "ok"
    stream_body = {**body, "messages": messages["image" if kind == "abort" else "text"], "stream": True}
    if kind == "abort":
        stream_body["max_tokens"] = 200
        stream_body["nvext"] = {"ignore_eos": True}
    async with client.stream("POST", "/v1/chat/completions", json=stream_body) as response:
        assert response.status_code == 200
        lines = []
        async for line in response.aiter_lines():
            lines.append(line)
            if kind == "abort" and len(lines) >= 3:
                return "aborted"  # leaving the block closes the connection mid-stream
    assert "data: [DONE]" in lines, lines[-3:]
    return "ok"


def test_soak_mixed_requests(server: RunningServer, image_host: ImageHost) -> None:
    kinds = ["text", "image", "url", "stream", "abort"]
    png_url = data_url(png_bytes(64, 64))
    image_url = image_host.url("/red.png")

    async def run(num_requests: int, offset: int) -> list[str]:
        semaphore = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:

            async def limited(i: int) -> str:
                async with semaphore:
                    return await _one(client, kinds[(i + offset) % len(kinds)], image_url, png_url)

            return await asyncio.gather(*(limited(i) for i in range(num_requests)))

    asyncio.run(run(40, 0))  # warm-up
    rss_before = rss_bytes(server.process.pid)
    started = time.monotonic()
    results = asyncio.run(run(300, 1))
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 10
    while True:
        values = metric_values(server.base_url)
        idle = values["num_requests_running"] == 0 and values["num_requests_waiting"] == 0
        if (idle and values["gpu_cache_usage_perc"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    rss_after = rss_bytes(server.process.pid)
    growth = (rss_after - rss_before) / rss_before
    print(
        f"\nsoak: {len(results)} requests ({results.count('aborted')} aborted) at concurrency 8 in "
        f"{elapsed:.1f} s; KV usage {values['gpu_cache_usage_perc']}; RSS {rss_before / 2**20:.1f} -> "
        f"{rss_after / 2**20:.1f} MiB ({growth:+.1%})"
    )
    assert results.count("aborted") == 60 and results.count("ok") == 240
    assert values["gpu_cache_usage_perc"] == 0 and values["num_requests_running"] == 0
    assert values["request_finish_total{abort}"] >= 60
    assert values["images_processed_total"] > 0 and values["vision_encoder_seconds_total"] > 0
    # the same image in every request: decoded and tiled once, then taken from the front end's cache
    assert values["image_input_cache_hits_total"] > 0
    assert values["time_to_first_token_seconds_count"] > 0
    assert growth < 0.10


# ------------------------------------------------------------------------------------- own servers


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, made by openssl."""
    d = tmp_path_factory.mktemp("tls")
    paths = {
        name: d / f"{name}.pem" for name in ("ca", "ca-key", "server", "server-key", "client", "client-key")
    }
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        str(paths["ca-key"]),
        "-out",
        str(paths["ca"]),
    )
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        csr = d / f"{name}.csr"
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(paths[f"{name}-key"]),
            "-out",
            str(csr),
        )
        ext = d / f"{name}.ext"
        ext.write_text(extension + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(paths["ca"]),
            "-CAkey",
            str(paths["ca-key"]),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            str(paths[name]),
        )
    return paths


@pytest.fixture(scope="module")
def own_servers(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint_dir: Path, certificates: dict[str, Path]
) -> Iterator[dict[str, RunningServer]]:
    """Two servers started together: `drain` (to be sent SIGTERM) and `mtls` (NIM_SSL_MODE=MTLS)."""
    common = [
        "--model",
        str(tiny_checkpoint_dir),
        "--served-model-name",
        MODEL,
        "--dtype",
        "float32",
        "--num-threads",
        "1",
    ]
    servers = {
        "drain": start_server(
            [*common, "--shutdown-grace-seconds", "20"], tmp_path_factory.mktemp("drain") / "server.log"
        ),
        "mtls": start_server(
            common,
            tmp_path_factory.mktemp("mtls") / "server.log",
            env={
                "NIM_SSL_MODE": "MTLS",
                "NIM_SSL_KEY_PATH": str(certificates["server-key"]),
                "NIM_SSL_CERTS_PATH": str(certificates["server"]),
                "NIM_SSL_CA_CERTS_PATH": str(certificates["ca"]),
            },
        ),
    }
    servers["mtls"].base_url = servers["mtls"].base_url.replace("http://", "https://")
    try:
        yield servers
    finally:
        for running in servers.values():
            stop_server(running)


def test_sigterm_during_a_stream_lets_it_finish_then_exits_0(own_servers: dict[str, RunningServer]) -> None:
    server = own_servers["drain"]
    wait_ready(server)
    body = {
        "model": MODEL,
        "messages": user_text(),
        "max_tokens": 300,
        "stream": True,
        "nvext": {"ignore_eos": True},
        "temperature": 0,
    }
    events = []
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line:
                events.append(line)
                break
        server.process.send_signal(signal.SIGTERM)
        events.extend(line for line in lines if line)
    assert events[-1] == "data: [DONE]"
    finish = [
        json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1] if json.loads(e[6:])["choices"]
    ]
    assert finish[-1] == "length"
    assert server.process.wait(30) == 0, server.log()[-2000:]
    assert "draining" in server.log()
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(server.base_url + "/v1/health/live", timeout=2)


def test_mtls_requires_a_client_certificate(
    own_servers: dict[str, RunningServer], certificates: dict[str, Path]
) -> None:
    server = own_servers["mtls"]
    with_cert = ssl.create_default_context(cafile=str(certificates["ca"]))
    with_cert.load_cert_chain(str(certificates["client"]), str(certificates["client-key"]))
    deadline = time.monotonic() + 300
    while True:  # wait_ready speaks plain HTTP; poll over TLS here
        assert server.process.poll() is None, server.log()
        try:
            if (
                httpx.get(server.base_url + "/v1/health/ready", verify=with_cert, timeout=2).status_code
                == 200
            ):
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    response = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": user_text(), "max_tokens": 3},
        verify=with_cert,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    without_cert = ssl.create_default_context(cafile=str(certificates["ca"]))
    with pytest.raises(httpx.TransportError):
        httpx.get(server.base_url + "/v1/health/ready", verify=without_cert, timeout=5).raise_for_status()
    with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port
        httpx.get(server.base_url.replace("https://", "http://") + "/v1/health/live", timeout=5)
    with pytest.raises(httpx.ConnectError):  # the server's certificate is checked against the CA
        httpx.get(server.base_url + "/v1/health/live", timeout=5)
