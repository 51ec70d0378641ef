"""Operations settings: NIM's environment names, start-up validation with clear messages, and the
uvicorn options they turn into (TLS, MTLS, the shutdown grace period)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from vlmserve.cli import build_parser, config_from_args, uvicorn_config
from vlmserve.config import ConfigError, ServerConfig


def from_env(**environ: str) -> ServerConfig:
    parser, _ = build_parser()
    return config_from_args(parser.parse_args(["serve"]), environ)


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for name in ("key", "cert", "ca"):
        path = tmp_path / f"{name}.pem"
        path.write_text("not checked here\n")
        paths[name] = str(path)
    return paths


def test_nim_environment_names() -> None:
    config = from_env(
        NIM_JSONL_LOGGING="1",
        NIM_DISABLE_LOG_REQUESTS="0",
        NIM_API_KEY="k",
        NIM_CORS_ALLOW_ORIGINS="https://a.example, https://b.example",
        NIM_CORS_ALLOW_CREDENTIALS="true",
        NIM_CORS_ALLOW_METHODS="GET,POST",
        NIM_CORS_ALLOW_HEADERS="authorization",
        NIM_LOG_LEVEL="debug",
    )
    assert config.jsonl_logging and not config.disable_log_requests and config.api_key == "k"
    assert config.cors_allow_origins == ("https://a.example", "https://b.example")
    assert config.cors_allow_credentials and config.cors_allow_methods == ("GET", "POST")
    assert config.cors_allow_headers == ("authorization",) and config.log_level == "DEBUG"
    assert from_env(VLMSERVE_API_KEY="v").api_key == "v"


def test_defaults_keep_prompts_out_and_everything_open() -> None:
    config = ServerConfig()
    assert config.disable_log_requests and config.api_key is None and config.cors_allow_origins == ()
    assert config.ssl_mode == "DISABLED" and config.shutdown_grace_seconds == 30


def test_ssl_mode_parses_case_insensitively(pem_files: dict[str, str]) -> None:
    config = from_env(
        NIM_SSL_MODE="tls", NIM_SSL_KEY_PATH=pem_files["key"], NIM_SSL_CERTS_PATH=pem_files["cert"]
    )
    assert config.ssl_mode == "TLS"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ssl_mode": "TLS"}, "ssl_mode TLS needs ssl_key_path (--ssl-key-path, NIM_SSL_KEY_PATH)"),
        ({"ssl_mode": "TLS", "ssl_key_path": "KEY"}, "needs ssl_certs_path"),
        ({"ssl_mode": "MTLS", "ssl_key_path": "KEY", "ssl_certs_path": "CERT"}, "needs ssl_ca_certs_path"),
        (
            {"ssl_mode": "TLS", "ssl_key_path": "/nonexistent/key.pem", "ssl_certs_path": "CERT"},
            "ssl_key_path: /nonexistent/key.pem does not exist",
        ),
        ({"ssl_mode": "SOMETIMES"}, "ssl_mode must be one of DISABLED, TLS, MTLS"),
        ({"max_request_body_bytes": 10}, "max_request_body_bytes must be between"),
        ({"shutdown_grace_seconds": -1.0}, "shutdown_grace_seconds must be >= 0"),
        ({"api_key": "  "}, "api_key must not be blank"),
        ({"api_key_exempt_paths": ("v1/metrics",)}, "must be a path starting with /"),
    ],
)
def test_bad_settings_are_refused_at_start(
    settings: dict[str, object], message: str, pem_files: dict[str, str]
) -> None:
    resolved = {
        key: {"KEY": pem_files["key"], "CERT": pem_files["cert"]}.get(value, value)  # type: ignore[call-overload]
        if isinstance(value, str)
        else value
        for key, value in settings.items()
    }
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServerConfig(**resolved)  # type: ignore[arg-type]


def test_cli_reports_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    from vlmserve.cli import main

    with pytest.raises(SystemExit) as exc_info:
        main(["serve", "--ssl-mode", "TLS"])
    assert exc_info.value.code == 2
    assert "ssl_mode TLS needs ssl_key_path" in capsys.readouterr().err


def test_uvicorn_options(pem_files: dict[str, str]) -> None:
    plain = uvicorn_config(ServerConfig(shutdown_grace_seconds=7), app=None)
    assert plain.ssl_keyfile is None and plain.timeout_graceful_shutdown == 7
    tls = uvicorn_config(
        ServerConfig(ssl_mode="TLS", ssl_key_path=pem_files["key"], ssl_certs_path=pem_files["cert"]),
        app=None,
    )
    assert tls.ssl_keyfile == pem_files["key"] and tls.ssl_certfile == pem_files["cert"]
    assert tls.ssl_cert_reqs == ssl.CERT_NONE
    mtls = uvicorn_config(
        ServerConfig(
            ssl_mode="MTLS",
            ssl_key_path=pem_files["key"],
            ssl_certs_path=pem_files["cert"],
            ssl_ca_certs_path=pem_files["ca"],
        ),
        app=None,
    )
    assert mtls.ssl_cert_reqs == ssl.CERT_REQUIRED and mtls.ssl_ca_certs == pem_files["ca"]
