"""cli.py: flags and environment variables from ServerConfig, their precedence, clean errors, and the
exit status of a server whose model fails to load."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest

from vlmserve.cli import build_parser, config_from_args, main
from vlmserve.config import ServerConfig


def config(argv: list[str], env: dict[str, str] | None = None) -> ServerConfig:
    parser, _ = build_parser()
    return config_from_args(parser.parse_args(["serve", *argv]), env or {})


def test_defaults() -> None:
    assert config([]) == ServerConfig()


def test_flag_beats_env_beats_default() -> None:
    assert config([], {"NIM_SERVER_PORT": "9000"}).port == 9000
    assert config(["--port", "9001"], {"NIM_SERVER_PORT": "9000"}).port == 9001
    assert config(["--max-images-per-prompt", "2"]).max_images_per_prompt == 2
    assert config([], {"NIM_MAX_IMAGES_PER_PROMPT": "3"}).max_images_per_prompt == 3


def test_first_env_name_wins() -> None:
    assert config([], {"NIM_MODEL_NAME": "/b"}).model == "/b"
    assert config([], {"NIM_MODEL_PATH": "/a", "NIM_MODEL_NAME": "/b"}).model == "/a"
    assert config(["--model", "/c"], {"NIM_MODEL_PATH": "/a"}).model == "/c"


def test_empty_env_is_unset_and_optional_ints_parse() -> None:
    assert config([], {"NIM_MAX_MODEL_LEN": ""}).max_model_len is None
    assert config([], {"NIM_MAX_MODEL_LEN": "8192"}).max_model_len == 8192
    assert config([], {"VLMSERVE_IMAGE_FETCH_TIMEOUT": "2.5"}).image_fetch_timeout == 2.5


@pytest.mark.parametrize(
    ("raw", "value"), [("1", True), ("true", True), ("TRUE", True), ("0", False), ("false", False)]
)
def test_bool_env(raw: str, value: bool) -> None:
    assert config([], {"VLMSERVE_ALLOW_PRIVATE_IMAGE_URLS": raw}).allow_private_image_urls is value


def test_bool_flags() -> None:
    env = {"VLMSERVE_ALLOW_PRIVATE_IMAGE_URLS": "1"}
    assert config(["--allow-private-image-urls"]).allow_private_image_urls is True
    assert config(["--no-allow-private-image-urls"], env).allow_private_image_urls is False


def test_choices_match_case_insensitively() -> None:
    assert config([], {"NIM_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    assert config(["--dtype", "BFLOAT16"]).dtype == "bfloat16"


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--port", "abc"], {}, "--port must be an integer, got 'abc'"),
        ([], {"NIM_SERVER_PORT": "70000"}, "port must be between 0 and 65535, got 70000"),
        (
            [],
            {"VLMSERVE_ALLOW_PRIVATE_IMAGE_URLS": "maybe"},
            "VLMSERVE_ALLOW_PRIVATE_IMAGE_URLS must be 1, 0, true",
        ),
        (["--dtype", "float8"], {}, "dtype must be one of"),
        ([], {"VLMSERVE_IMAGE_FETCH_TIMEOUT": "soon"}, "VLMSERVE_IMAGE_FETCH_TIMEOUT must be a number"),
    ],
)
def test_bad_values_exit_cleanly(
    argv: list[str],
    env: dict[str, str],
    needle: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        main(["serve", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_help_lists_every_setting_with_its_env_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(ServerConfig):
        assert f"--{f.name.replace('_', '-')}" in out, f.name
        for env in f.metadata["env"]:
            assert env in out, env


LOAD_FAILS = """
    import sys
    from vlmserve.config import ServerConfig
    {imports}

    def load(config):
        raise RuntimeError("cannot open checkpoint /models/missing")

    config = ServerConfig(host="127.0.0.1", port=0)
    {run}
"""


@pytest.mark.parametrize(
    ("imports", "run", "expected"),
    [
        # vlmserve serve: uvicorn is asked to stop, the exit status is 1
        ("from vlmserve.cli import run_server", "sys.exit(run_server(config, load))", 1),
        # create_app's default: SIGTERM to itself, which uvicorn shuts down on and then re-raises
        (
            "import uvicorn; from vlmserve.server.app import create_app",
            "uvicorn.Server(uvicorn.Config(create_app(config, load), port=0, log_config=None)).run()",
            None,
        ),
    ],
)
def test_a_server_whose_model_fails_to_load_exits_non_zero(
    imports: str, run: str, expected: int | None
) -> None:
    script = textwrap.dedent(LOAD_FAILS).format(imports=imports, run=run)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stderr
    if expected is not None:
        assert result.returncode == expected, result.stderr
    assert "loading the model failed" in result.stderr
    assert "cannot open checkpoint /models/missing" in result.stderr
