"""Server configuration: one frozen dataclass whose fields carry their CLI flag, env names and help.

`cli.py` builds argparse from these fields and the README's table is generated from them, so the
three cannot drift. Values are checked in `__post_init__`; a bad value raises ConfigError with a
message naming the setting.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting with a bad value; the message names the setting and the rule."""


def setting(default: Any, help: str, env: tuple[str, ...] = (), choices: tuple[str, ...] = ()) -> Any:
    """A config field with its help text, environment variable names and allowed values."""
    return field(default=default, metadata={"help": help, "env": env, "choices": choices})


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlmserve"


@dataclass(frozen=True)
class ServerConfig:
    """Everything `vlmserve serve` can be told. Field order is the order of --help and the README table."""

    model: str | None = setting(
        None,
        "Checkpoint directory (Hugging Face layout). Empty: the built-in default model.",
        env=("NIM_MODEL_PATH", "NIM_MODEL_NAME"),
    )
    served_model_name: str | None = setting(
        None, "Model id clients use; default: the checkpoint's folder name.", env=("NIM_SERVED_MODEL_NAME",)
    )
    host: str = setting("0.0.0.0", "Address to listen on.", env=("NIM_SERVER_HOST",))
    port: int = setting(8000, "Port to listen on.", env=("NIM_SERVER_PORT",))
    max_model_len: int | None = setting(
        None, "Context length (prompt + output); default: the model's.", env=("NIM_MAX_MODEL_LEN",)
    )
    dtype: str = setting(
        "auto",
        "Weights and compute dtype; auto: bfloat16 on CUDA, on CPU the faster of bfloat16 and float32 here.",
        env=("VLMSERVE_DTYPE",),
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = setting(
        "auto", "cpu, cuda or auto.", env=("VLMSERVE_DEVICE",), choices=("auto", "cpu", "cuda")
    )
    num_threads: int = setting(
        0, "torch intra-op threads for the model; 0: the cores available.", env=("VLMSERVE_NUM_THREADS",)
    )
    block_size: int = setting(16, "Tokens per KV cache block.", env=("VLMSERVE_BLOCK_SIZE",))
    num_kv_blocks: int = setting(
        0,
        "KV cache blocks; 0: as many as --kv-cache-percent of free memory holds.",
        env=("VLMSERVE_NUM_KV_BLOCKS",),
    )
    kv_cache_percent: float | None = setting(
        None,
        "Fraction (0 to 1] of the memory free after loading the model that the KV cache takes; "
        "default: 0.9 on CUDA, 0.3 on CPU.",
        env=("NIM_KV_CACHE_PERCENT",),
    )
    enable_prefix_caching: bool = setting(
        True,
        "Reuse the KV cache of earlier requests' identical prompt prefixes (images included).",
        env=("NIM_ENABLE_KV_CACHE_REUSE",),
    )
    encoder_cache_bytes: int = setting(
        256 * 1024 * 1024,
        "Bytes of vision-encoder outputs kept on the device, so an image sent again (after another prompt "
        "prefix too) skips the encoder; least recently used first out; outside the KV cache budget. 0: off.",
        env=("VLMSERVE_ENCODER_CACHE_BYTES",),
    )
    image_cache_bytes: int = setting(
        256 * 1024 * 1024,
        "Bytes of decoded, tiled images kept by the front end, so the same image file sent again (the next "
        "turn of a chat about it) is not decoded and tiled again; least recently used first out. 0: off.",
        env=("VLMSERVE_IMAGE_CACHE_BYTES",),
    )
    max_num_batched_tokens: int = setting(
        0,
        "Most tokens computed in one engine step, all requests together; 0: 2048, or more when one image "
        "of --max-tiles tiles needs more.",
        env=("VLMSERVE_MAX_NUM_BATCHED_TOKENS",),
    )
    max_encoder_tiles_per_step: int = setting(
        2,
        "Most image tiles the vision encoder runs in one engine step: a large image is encoded over "
        "several steps, with other requests' decodes in between; 0: no limit (an image is encoded whole "
        "in the step that prefills it).",
        env=("VLMSERVE_MAX_ENCODER_TILES_PER_STEP",),
    )
    max_num_seqs: int = setting(64, "Most requests running at once.", env=("VLMSERVE_MAX_NUM_SEQS",))
    max_queue: int = setting(
        256, "Most requests waiting to start; beyond it requests get 503.", env=("VLMSERVE_MAX_QUEUE",)
    )
    max_images_per_prompt: int = setting(
        4, "Most images one request may carry.", env=("NIM_MAX_IMAGES_PER_PROMPT",)
    )
    max_tiles: int = setting(
        0,
        "Most tiles one image is cut into (a thumbnail is added beyond one); 0: the model's own limit "
        "(config.json max_dynamic_patch, else 12).",
        env=("VLMSERVE_MAX_TILES",),
    )
    default_image_detail: str = setting(
        "high",
        "Tile budget for images whose detail is auto (and for img tags in string content): low = one tile "
        "(the whole image resized), high = --max-tiles.",
        env=("VLMSERVE_DEFAULT_IMAGE_DETAIL",),
        choices=("low", "high"),
    )
    image_max_bytes: int = setting(
        20 * 1024 * 1024, "Largest encoded image, data URL or fetched.", env=("VLMSERVE_IMAGE_MAX_BYTES",)
    )
    image_max_pixels: int = setting(
        40_000_000,
        "Largest decoded image (width x height); bigger is refused before decoding.",
        env=("VLMSERVE_IMAGE_MAX_PIXELS",),
    )
    image_fetch_timeout: float = setting(
        10.0,
        "Seconds to connect to, and between reads from, an image URL.",
        env=("VLMSERVE_IMAGE_FETCH_TIMEOUT",),
    )
    image_fetch_total_timeout: float = setting(
        30.0,
        "Seconds one image URL fetch may take in all (DNS, redirects and body included).",
        env=("VLMSERVE_IMAGE_FETCH_TOTAL_TIMEOUT",),
    )
    image_fetch_max_redirects: int = setting(
        3, "Redirects followed when fetching an image.", env=("VLMSERVE_IMAGE_FETCH_MAX_REDIRECTS",)
    )
    allow_private_image_urls: bool = setting(
        False,
        "Allow image URLs on loopback, private and link-local addresses.",
        env=("VLMSERVE_ALLOW_PRIVATE_IMAGE_URLS",),
    )
    image_url_allowed_domains: tuple[str, ...] = setting(
        (),
        "Comma-separated hosts image URLs (and their redirects) may use: example.com matches that host "
        "only, *.example.com its subdomains. Empty: any host.",
        env=("VLMSERVE_IMAGE_URL_ALLOWED_DOMAINS",),
    )
    asset_max_bytes: int = setting(
        20 * 1024 * 1024, "Largest uploaded image asset.", env=("VLMSERVE_ASSET_MAX_BYTES",)
    )
    asset_ttl_seconds: float = setting(
        3600.0, "Seconds an uploaded image asset is kept.", env=("VLMSERVE_ASSET_TTL_SECONDS",)
    )
    asset_store_max_bytes: int = setting(
        512 * 1024 * 1024,
        "Memory for uploaded image assets in all; the oldest are evicted to make room.",
        env=("VLMSERVE_ASSET_STORE_MAX_BYTES",),
    )
    cache_dir: str = setting(
        str(default_cache_dir()), "Where the default model is assembled.", env=("VLMSERVE_CACHE_DIR",)
    )
    log_level: str = setting(
        "INFO",
        "Log level.",
        env=("NIM_LOG_LEVEL",),
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
    )
    jsonl_logging: bool = setting(
        False,
        "Log one JSON object per line (time, level, logger, request_id, message) instead of text.",
        env=("NIM_JSONL_LOGGING",),
    )
    disable_log_requests: bool = setting(
        True,
        "Keep prompts out of the logs. Off (0): each chat request's prompt text is logged at INFO, "
        "truncated; image bytes and URLs never are.",
        env=("NIM_DISABLE_LOG_REQUESTS",),
    )
    api_key: str | None = setting(
        None,
        "Require `Authorization: Bearer <key>` on every path but --api-key-exempt-paths (401 otherwise). "
        "Empty: no key.",
        env=("NIM_API_KEY", "VLMSERVE_API_KEY"),
    )
    api_key_exempt_paths: tuple[str, ...] = setting(
        ("/v1/health/live", "/v1/health/ready", "/v1/metrics"),
        "Comma-separated paths that need no API key (exact matches).",
        env=("VLMSERVE_API_KEY_EXEMPT_PATHS",),
    )
    max_request_body_bytes: int = setting(
        32 * 1024 * 1024,
        "Largest request body (413 beyond it, before the body is parsed). The default holds one "
        "--image-max-bytes image as a base64 data URL; raise it for several large images per request.",
        env=("VLMSERVE_MAX_REQUEST_BODY_BYTES",),
    )
    ssl_mode: str = setting(
        "DISABLED",
        "TLS: serve HTTPS with --ssl-key-path and --ssl-certs-path; MTLS: also require client "
        "certificates signed by --ssl-ca-certs-path.",
        env=("NIM_SSL_MODE",),
        choices=("DISABLED", "TLS", "MTLS"),
    )
    ssl_key_path: str | None = setting(None, "PEM private key of the server.", env=("NIM_SSL_KEY_PATH",))
    ssl_certs_path: str | None = setting(
        None, "PEM certificate (chain) of the server.", env=("NIM_SSL_CERTS_PATH",)
    )
    ssl_ca_certs_path: str | None = setting(
        None, "PEM CA certificates client certificates must chain to (MTLS).", env=("NIM_SSL_CA_CERTS_PATH",)
    )
    cors_allow_origins: tuple[str, ...] = setting(
        (),
        "Comma-separated origins allowed to call from a browser (* for any). Empty: CORS off.",
        env=("NIM_CORS_ALLOW_ORIGINS",),
    )
    cors_allow_credentials: bool = setting(
        False,
        "Allow credentials (cookies, Authorization) in CORS requests.",
        env=("NIM_CORS_ALLOW_CREDENTIALS",),
    )
    cors_allow_methods: tuple[str, ...] = setting(
        ("*",), "Comma-separated methods allowed in CORS requests.", env=("NIM_CORS_ALLOW_METHODS",)
    )
    cors_allow_headers: tuple[str, ...] = setting(
        ("*",), "Comma-separated request headers allowed in CORS requests.", env=("NIM_CORS_ALLOW_HEADERS",)
    )
    shutdown_grace_seconds: float = setting(
        30.0,
        "On SIGTERM: seconds in-flight requests get to finish (new ones get 503) before they are cut.",
        env=("VLMSERVE_SHUTDOWN_GRACE_SECONDS",),
    )

    def __post_init__(self) -> None:
        _check_range("port", self.port, 0, 65535)
        _check_range("max_images_per_prompt", self.max_images_per_prompt, 0, 1024)
        _check_range("max_tiles", self.max_tiles, 0, 64)
        _check_range("image_max_bytes", self.image_max_bytes, 1, 1 << 40)
        _check_range("image_max_pixels", self.image_max_pixels, 1, 1 << 40)
        _check_range("image_fetch_max_redirects", self.image_fetch_max_redirects, 0, 20)
        _check_range("asset_max_bytes", self.asset_max_bytes, 1, 1 << 40)
        _check_range("asset_store_max_bytes", self.asset_store_max_bytes, 1, 1 << 42)
        if self.asset_store_max_bytes < self.asset_max_bytes:
            raise ConfigError(
                f"asset_store_max_bytes ({self.asset_store_max_bytes}) must be at least "
                f"asset_max_bytes ({self.asset_max_bytes})"
            )
        _check_range("num_threads", self.num_threads, 0, 4096)
        _check_range("block_size", self.block_size, 1, 1024)
        _check_range("num_kv_blocks", self.num_kv_blocks, 0, 1 << 40)
        if self.kv_cache_percent is not None and not 0 < self.kv_cache_percent <= 1:
            raise ConfigError(f"kv_cache_percent must be in (0, 1], got {self.kv_cache_percent}")
        _check_range("max_num_seqs", self.max_num_seqs, 1, 1 << 16)
        _check_range("max_queue", self.max_queue, 0, 1 << 20)
        if self.max_num_batched_tokens != 0 and self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be 0 or at least "
                f"max_num_seqs ({self.max_num_seqs}): every running request's decode must fit in a step"
            )
        _check_range("max_num_batched_tokens", self.max_num_batched_tokens, 0, 1 << 24)
        _check_range("max_encoder_tiles_per_step", self.max_encoder_tiles_per_step, 0, 1 << 16)
        if self.max_model_len is not None:
            _check_range("max_model_len", self.max_model_len, 16, 1 << 24)
        if not self.image_fetch_timeout > 0:
            raise ConfigError(f"image_fetch_timeout must be > 0, got {self.image_fetch_timeout}")
        if not self.image_fetch_total_timeout > 0:
            raise ConfigError(f"image_fetch_total_timeout must be > 0, got {self.image_fetch_total_timeout}")
        if not self.asset_ttl_seconds > 0:
            raise ConfigError(f"asset_ttl_seconds must be > 0, got {self.asset_ttl_seconds}")
        if isinstance(self.image_url_allowed_domains, str):
            raise ConfigError("image_url_allowed_domains must be a tuple of hosts, not a string")
        for pattern in self.image_url_allowed_domains:
            _check_domain_pattern(pattern)
        _check_range("encoder_cache_bytes", self.encoder_cache_bytes, 0, 1 << 44)
        _check_range("image_cache_bytes", self.image_cache_bytes, 0, 1 << 44)
        _check_range("max_request_body_bytes", self.max_request_body_bytes, 1024, 1 << 40)
        if not self.shutdown_grace_seconds >= 0:
            raise ConfigError(f"shutdown_grace_seconds must be >= 0, got {self.shutdown_grace_seconds}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key must not be blank (leave it unset for no key)")
        for path in self.api_key_exempt_paths:
            if not path.startswith("/"):
                raise ConfigError(f"api_key_exempt_paths: {path!r} must be a path starting with /")
        for name in _LIST_SETTINGS:
            if isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a tuple of strings, not a string")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}"
                )
        _check_ssl(self)


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")


def _check_ssl(config: ServerConfig) -> None:
    """TLS needs a key and a certificate, MTLS also the CA; every file named must be readable."""
    if config.ssl_mode == "DISABLED":
        return
    needed = {"ssl_key_path": config.ssl_key_path, "ssl_certs_path": config.ssl_certs_path}
    if config.ssl_mode == "MTLS" or config.ssl_ca_certs_path:
        needed["ssl_ca_certs_path"] = config.ssl_ca_certs_path
    for name, value in needed.items():
        if not value:
            env = _FIELD_ENV[name]
            raise ConfigError(f"ssl_mode {config.ssl_mode} needs {name} (--{name.replace('_', '-')}, {env})")
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"{name}: {path} does not exist or is not a file")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{name}: {path} is not readable")


_LIST_SETTINGS = ("api_key_exempt_paths", "cors_allow_origins", "cors_allow_methods", "cors_allow_headers")
_FIELD_ENV = {
    "ssl_key_path": "NIM_SSL_KEY_PATH",
    "ssl_certs_path": "NIM_SSL_CERTS_PATH",
    "ssl_ca_certs_path": "NIM_SSL_CA_CERTS_PATH",
}


def _check_domain_pattern(pattern: str) -> None:
    """A host name or IP literal, or *. and a host name: no scheme, port, path or other wildcard."""
    name = pattern.removeprefix("*.")
    is_ipv6 = ":" in name and _is_ip_address(name)
    if not name or (any(c in name for c in "*/:@[] ") and not is_ipv6):
        raise ConfigError(
            f"image_url_allowed_domains: {pattern!r} must be a host (example.com) or *.example.com"
        )


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
