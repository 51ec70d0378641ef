"""Server configuration: one frozen dataclass whose fields carry their CLI flag, env names and help.

`cli.py` builds argparse from these fields and the README's table is generated from them, so the
three cannot drift. Values are checked in `__post_init__`; a bad value raises ConfigError with a
message naming the setting.
"""

from __future__ import annotations

import dataclasses
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
        "Weights and compute dtype; auto: bfloat16 where supported (CPU with AVX-512 bf16, CUDA), else float32.",
        env=("VLMSERVE_DTYPE",),
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = setting(
        "auto", "cpu, cuda or auto.", env=("VLMSERVE_DEVICE",), choices=("auto", "cpu", "cuda")
    )
    num_threads: int = setting(
        0, "torch intra-op threads for the model; 0: the cores available.", env=("VLMSERVE_NUM_THREADS",)
    )
    max_images_per_prompt: int = setting(
        4, "Most images one request may carry.", env=("NIM_MAX_IMAGES_PER_PROMPT",)
    )
    max_tiles: int = setting(
        12, "Most tiles one image is cut into (a thumbnail is added beyond one).", env=("VLMSERVE_MAX_TILES",)
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
    image_fetch_max_redirects: int = setting(
        3, "Redirects followed when fetching an image.", env=("VLMSERVE_IMAGE_FETCH_MAX_REDIRECTS",)
    )
    allow_private_image_urls: bool = setting(
        False,
        "Allow image URLs on loopback, private and link-local addresses.",
        env=("VLMSERVE_ALLOW_PRIVATE_IMAGE_URLS",),
    )
    seed: int = setting(
        0, "Seed for random weights of the default model's untrained vision half.", env=("VLMSERVE_SEED",)
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

    def __post_init__(self) -> None:
        _check_range("port", self.port, 0, 65535)
        _check_range("max_images_per_prompt", self.max_images_per_prompt, 0, 1024)
        _check_range("max_tiles", self.max_tiles, 1, 64)
        _check_range("image_max_bytes", self.image_max_bytes, 1, 1 << 40)
        _check_range("image_max_pixels", self.image_max_pixels, 1, 1 << 40)
        _check_range("image_fetch_max_redirects", self.image_fetch_max_redirects, 0, 20)
        _check_range("num_threads", self.num_threads, 0, 4096)
        if self.max_model_len is not None:
            _check_range("max_model_len", self.max_model_len, 16, 1 << 24)
        if not self.image_fetch_timeout > 0:
            raise ConfigError(f"image_fetch_timeout must be > 0, got {self.image_fetch_timeout}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}"
                )


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
