"""The README's settings table is the one generated from ServerConfig, and --help lists the same."""

import dataclasses
from pathlib import Path

from vlmserve.cli import build_parser
from vlmserve.config import ServerConfig
from vlmserve.config_doc import BEGIN, END, flag_name, readme_with_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_is_generated_from_config():
    text = README.read_text()
    assert BEGIN in text and END in text
    assert text == readme_with_table(text), "run: python -m vlmserve.config_doc --write README.md"


def test_help_lists_every_setting_and_its_env_names():
    _, serve = build_parser()
    serve_help = serve.format_help()
    for field in dataclasses.fields(ServerConfig):
        assert flag_name(field.name) in serve_help
        for env in field.metadata.get("env", ()):
            assert env in serve_help
