"""The server under test: the benchmark checkpoint (ensure_smolvlm), starting vlmserve or a peer command
on a free 127.0.0.1 port, waiting for readiness, and stopping it."""

from __future__ import annotations

import argparse
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_smolvlm(cache_dir: Path, seed: int) -> Path:
    """The seeded random-weight SmolVLM-256M checkpoint, written once into cache_dir."""
    out = cache_dir / f"smolvlm-256m-random-seed{seed}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    print(f"writing {out} (tools/make_smolvlm_checkpoint.py) ...", flush=True)
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_smolvlm_checkpoint.py"), str(out), "--seed", str(seed)],
        check=True,
    )
    return out


@dataclass
class Server:
    command: list[str]
    base_url: str
    process: subprocess.Popen
    log_path: Path
    started_at: float
    ready_after_s: float | None = None


def start_server(args: argparse.Namespace, log_path: Path) -> Server:
    port = free_port()
    if args.peer_cmd:
        command = shlex.split(args.peer_cmd.format(port=port, model=args.model or ""))
    else:
        command = [sys.executable, "-m", "vlmserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if args.model_dir is not None:
            command += ["--model", str(args.model_dir)]
        command += ["--dtype", args.dtype, "--max-tiles", str(args.max_tiles)]
        if args.num_threads is not None:
            command += ["--num-threads", str(args.num_threads)]
        command += shlex.split(args.server_args or "")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w")
    print("starting:", shlex.join(command), flush=True)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(command, f"http://127.0.0.1:{port}", process, log_path, time.monotonic())


def wait_ready(server: Server, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}; log: {server.log_path}")
        try:
            if httpx.get(server.base_url + path, timeout=2).status_code == 200:
                server.ready_after_s = round(time.monotonic() - server.started_at, 1)
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout} s; log: {server.log_path}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
