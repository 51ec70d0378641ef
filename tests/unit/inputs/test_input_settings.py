"""The inputs-side settings: defaults, environment parsing and the checks in ServerConfig.__post_init__.

(They sit here, beside the code that reads them; tests/unit/test_cli.py covers the CLI machinery.)
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from vlmserve.cli import config_from_args
from vlmserve.config import ConfigError, ServerConfig


def test_defaults() -> None:
    config = ServerConfig()
    assert config.default_image_detail == "high"
    assert config.image_url_allowed_domains == ()
    assert config.image_fetch_total_timeout == 30.0
    assert config.asset_max_bytes <= config.asset_store_max_bytes and config.asset_ttl_seconds > 0


def test_environment() -> None:
    environ = {
        "VLMSERVE_DEFAULT_IMAGE_DETAIL": "LOW",
        "VLMSERVE_IMAGE_URL_ALLOWED_DOMAINS": " images.example.com, *.cdn.example.org ,",
        "VLMSERVE_IMAGE_FETCH_TOTAL_TIMEOUT": "2.5",
        "VLMSERVE_ASSET_MAX_BYTES": "1000",
        "VLMSERVE_ASSET_TTL_SECONDS": "60",
        "VLMSERVE_ASSET_STORE_MAX_BYTES": "5000",
    }
    config = config_from_args(argparse.Namespace(), environ)
    assert config.default_image_detail == "low"
    assert config.image_url_allowed_domains == ("images.example.com", "*.cdn.example.org")
    assert (config.image_fetch_total_timeout, config.asset_max_bytes, config.asset_ttl_seconds,
            config.asset_store_max_bytes) == (2.5, 1000, 60.0, 5000)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"default_image_detail": "auto"}, "default_image_detail must be one of low, high"),
        ({"image_fetch_total_timeout": 0}, "image_fetch_total_timeout must be > 0"),
        ({"asset_ttl_seconds": -1}, "asset_ttl_seconds must be > 0"),
        ({"asset_max_bytes": 0}, "asset_max_bytes must be between"),
        ({"asset_max_bytes": 10, "asset_store_max_bytes": 9}, r"store_max_bytes \(9\) must be at least"),
        ({"image_url_allowed_domains": "example.com"}, "not a string"),
        ({"image_url_allowed_domains": ("https://example.com",)}, "must be a host"),
        ({"image_url_allowed_domains": ("example.com:443",)}, "must be a host"),
        ({"image_url_allowed_domains": ("*",)}, "must be a host"),
        ({"image_url_allowed_domains": ("*.*.example.com",)}, "must be a host"),
    ],
)
def test_bad_values(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ServerConfig(**settings)


def test_ip_literals_are_allowed_domains() -> None:
    hosts = ("93.184.216.34", "2606:4700::1111")
    assert ServerConfig(image_url_allowed_domains=hosts).image_url_allowed_domains == hosts
