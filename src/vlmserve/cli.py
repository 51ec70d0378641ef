"""Command line: `vlmserve serve [flags]`: argparse built from ServerConfig's fields -> config -> uvicorn.

Each field of ServerConfig is one flag (`max_images_per_prompt` -> `--max-images-per-prompt`) and the
environment variables its metadata names; a flag beats an environment variable, which beats the
default. No serving logic lives here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import ssl as stdlib_ssl
import threading
import types
import typing
from collections.abc import Callable, Generator, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from vlmserve import __version__
from vlmserve.config import ConfigError, ServerConfig
from vlmserve.logs import configure_logging
from vlmserve.server.app import create_app
from vlmserve.server.routes import AppState

if TYPE_CHECKING:
    from vlmserve.bootstrap import ModelServer

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `vlmserve` parser and its `serve` subparser (returned to report config errors on it)."""
    parser = argparse.ArgumentParser(
        prog="vlmserve", description="Inference server for vision-language models."
    )
    parser.add_argument("--version", action="version", version=f"vlmserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="Serve a model over the NIM for VLMs HTTP API.",
        description="Serve a model over the NIM for VLMs HTTP API. Precedence: flag > environment > default.",
    )
    hints = typing.get_type_hints(ServerConfig)
    for f in dataclasses.fields(ServerConfig):
        kind = _base_type(hints[f.name])
        env = ", ".join(f.metadata.get("env", ())) or "none"
        # SUPPRESS: a flag not given leaves no attribute, so the environment can fill it in
        options: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f"{f.metadata['help']} [env: {env}] (default: {f.default})",
        }
        if kind is bool:
            serve.add_argument(f"--{_flag(f.name)}", action=argparse.BooleanOptionalAction, **options)
            continue
        choices = f.metadata.get("choices") or ()
        metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
        serve.add_argument(f"--{_flag(f.name)}", type=str, metavar=metavar, **options)
    return parser, serve


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerConfig:
    """ServerConfig from parsed flags (only those given are in `args`) and `environ`."""
    hints = typing.get_type_hints(ServerConfig)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServerConfig):
        kind, optional, choices = (
            _base_type(hints[f.name]),
            _is_optional(hints[f.name]),
            f.metadata.get("choices", ()),
        )
        if hasattr(args, f.name):
            raw, source = getattr(args, f.name), f"--{_flag(f.name)}"
            values[f.name] = raw if isinstance(raw, bool) else _parse(raw, kind, optional, choices, source)
            continue
        for name in f.metadata.get("env", ()):
            if environ.get(name, "") != "":
                values[f.name] = _parse(environ[name], kind, optional, choices, name)
                break
    return ServerConfig(**values)


class _Server(uvicorn.Server):
    """uvicorn's server, with a graceful SIGTERM/SIGINT: the app starts draining at once (readiness and
    new requests 503), uvicorn stops accepting and waits up to --shutdown-grace-seconds for the
    requests in flight, and the process then exits with our status, not by re-raising the signal."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.app_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            logging.getLogger(__name__).info(
                "signal %d: draining; in-flight requests get %.0f s to finish",
                sig,
                self.app_state.config.shutdown_grace_seconds,
            )
        self.app_state.is_draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def uvicorn_config(config: ServerConfig, app: Any) -> uvicorn.Config:
    """uvicorn's settings for `config`: address, TLS/mTLS, the shutdown grace period."""
    ssl: dict[str, Any] = {}
    if config.ssl_mode != "DISABLED":
        ssl = {"ssl_keyfile": config.ssl_key_path, "ssl_certfile": config.ssl_certs_path}
        if config.ssl_ca_certs_path:
            ssl["ssl_ca_certs"] = config.ssl_ca_certs_path
        if config.ssl_mode == "MTLS":
            ssl["ssl_cert_reqs"] = stdlib_ssl.CERT_REQUIRED
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level.lower(),
        log_config=None,
        timeout_graceful_shutdown=config.shutdown_grace_seconds,
        **ssl,
    )


def run_server(config: ServerConfig, load: Callable[[ServerConfig], ModelServer]) -> int:
    """Serve until shutdown; 1 when the model failed to load or the engine died, else 0."""
    server: uvicorn.Server | None = None

    def stop_on_failure(exc: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(config, load, on_load_failure=stop_on_failure)
    state = app.state.vlmserve
    server = _Server(uvicorn_config(config, app), state)
    server.run()
    return 1 if state.load_failed or state.engine_died else 0


def main(argv: Sequence[str] | None = None) -> None:
    parser, serve = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, os.environ)
    except ConfigError as exc:
        serve.error(str(exc))
    configure_logging(config.log_level, jsonl=config.jsonl_logging)
    from vlmserve.bootstrap import load_model_server  # torch and the model code load only to serve

    raise SystemExit(run_server(config, load_model_server))


def _parse(raw: str, kind: Any, optional: bool, choices: Sequence[str], source: str) -> Any:
    if optional and raw.strip().lower() in ("", "none"):
        return None
    if kind is bool:
        if raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ConfigError(f"{source} must be 1, 0, true or false, got {raw!r}")
    if typing.get_origin(kind) in (tuple, list):
        items = [item.strip() for item in raw.split(",") if item.strip()]
        return tuple(items) if typing.get_origin(kind) is tuple else items
    if kind is str:
        # choices match case-insensitively (NIM_LOG_LEVEL=info)
        return next((choice for choice in choices if choice.lower() == raw.lower()), raw)
    try:
        return kind(raw)
    except (TypeError, ValueError):
        expected = {int: "an integer", float: "a number"}.get(kind, getattr(kind, "__name__", str(kind)))
        raise ConfigError(f"{source} must be {expected}, got {raw!r}") from None


def _base_type(hint: Any) -> Any:
    if _is_optional(hint):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _flag(name: str) -> str:
    return name.replace("_", "-")


if __name__ == "__main__":
    main()
