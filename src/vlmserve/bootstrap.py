"""Turns a ServerConfig into a running ModelServer: resolve the checkpoint (or assemble the default
model), pick device, dtype and threads, load weights, tokenizer and processor, size the paged KV
cache from the memory budget, build the scheduler and runner, start the engine.

Blocking; the HTTP layer runs it in a background thread while /v1/health/ready answers 503.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vlmserve.config import ConfigError, ServerConfig
from vlmserve.engine.async_engine import AsyncEngine
from vlmserve.engine.engine_core import EngineCore
from vlmserve.engine.kv_cache import KVCacheManager
from vlmserve.engine.scheduler import Scheduler, SchedulerConfig
from vlmserve.inputs.preprocess import InputPreprocessor
from vlmserve.inputs.tokenizer import eos_token_ids, load_tokenizer
from vlmserve.layers.attention import KVCacheSpec, PagedKVCache
from vlmserve.models.registry import load_model
from vlmserve.runner.model_runner import ModelRunner
from vlmserve.runner.structured_output import TokenizerInfo, build_tokenizer_info

logger = logging.getLogger(__name__)


@dataclass
class ModelServer:
    """What the HTTP layer serves: the engine, the input preprocessor and facts about the model."""

    engine: AsyncEngine
    preprocessor: InputPreprocessor
    tokenizer: Any
    # what structured-output specs compile against (shared with the engine's runner)
    tokenizer_info: TokenizerInfo
    served_model_name: str
    max_model_len: int
    created: int
    metadata: dict[str, Any] = field(default_factory=dict)

    async def aclose(self) -> None:
        await self.preprocessor.aclose()
        await self.engine.aclose()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def _linear_gflops(dtype: torch.dtype) -> float:
    """Best-of-8 throughput of a prefill-sized linear layer in `dtype` on this CPU (after warm-up;
    about 0.3 s for both dtypes together)."""
    x = torch.randn(512, 1024, dtype=dtype)
    w = torch.randn(4096, 1024, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(8):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return 2 * 512 * 1024 * 4096 / best / 1e9


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype asked for, or for auto: bf16 (fp16 without bf16) on CUDA; on CPU whichever of bf16
    and fp32 runs a matmul faster here, measured (CPUs with AMX or AVX-512 BF16 often favour bf16,
    others run bf16 through slow conversions)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    fp32, bf16 = _linear_gflops(torch.float32), _linear_gflops(torch.bfloat16)
    chosen = torch.bfloat16 if bf16 > fp32 else torch.float32
    logger.info("dtype auto: matmul %.0f GFLOP/s in float32, %.0f in bfloat16: using %s", fp32, bf16, chosen)
    return chosen


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_model_dir(config: ServerConfig) -> tuple[Path, str, str | None]:
    """(checkpoint dir, served name, description for the start log)."""
    if config.model:
        path = Path(config.model).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model: {path} is not a directory")
        return path, config.served_model_name or path.name, None
    from vlmserve.models import default_model

    path = default_model.ensure_default_model(Path(config.cache_dir))
    name = config.served_model_name or default_model.DEFAULT_SERVED_MODEL_NAME
    return path, name, default_model.DEFAULT_MODEL_DESCRIPTION


def model_max_tiles(hf_config: dict[str, Any]) -> int:
    """The tile budget a checkpoint declares (Nemotron-VL's max_dynamic_patch), else 12."""
    return int(hf_config.get("max_dynamic_patch") or 12)


def model_context_length(hf_config: dict[str, Any]) -> int:
    llm = hf_config.get("llm_config") or hf_config.get("text_config") or hf_config
    lengths = [hf_config.get("max_sequence_length"), llm.get("max_position_embeddings")]
    known = [n for n in lengths if isinstance(n, int) and n > 0]
    if not known:
        raise ConfigError("the checkpoint's config.json gives no context length; set --max-model-len")
    return min(known)


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def load_model_server(config: ServerConfig) -> ModelServer:
    """Loads everything and starts the engine thread. Raises ConfigError / ModelLoadError."""
    started = time.perf_counter()
    model_dir, served_name, description = resolve_model_dir(config)
    device = resolve_device(config.device)
    torch.set_num_threads(config.num_threads or available_cores())
    dtype = resolve_dtype(config.dtype, device)
    loaded = load_model(model_dir, dtype=dtype, device=device)
    if config.max_tiles == 0:
        config = replace(config, max_tiles=model_max_tiles(loaded.raw_config))
    max_model_len = _max_model_len(config, loaded.raw_config)
    tokenizer = load_tokenizer(model_dir)
    processor = _import(loaded.family.processor)(loaded.raw_config, tokenizer, max_tiles=config.max_tiles)
    eos = eos_token_ids(model_dir, tokenizer)
    tokenizer_info = build_tokenizer_info(tokenizer, eos, logits_width(loaded.model, device))
    engine = build_engine(
        config,
        loaded.model,
        tokenizer,
        eos,
        device=device,
        dtype=dtype,
        max_model_len=max_model_len,
        max_image_tokens=processor.tokens_per_tile * (config.max_tiles + 1),
        tokenizer_info=tokenizer_info,
    )
    architecture = loaded.raw_config["architectures"][0]
    logger.info(
        "loaded %s (%s) from %s on %s as %s with %d threads in %.1f s; max_model_len %d",
        served_name,
        architecture,
        model_dir,
        device,
        str(dtype).removeprefix("torch."),
        torch.get_num_threads(),
        time.perf_counter() - started,
        max_model_len,
    )
    if description:
        logger.info("%s", description)
    return ModelServer(
        engine=engine,
        preprocessor=InputPreprocessor(tokenizer, processor, config),
        tokenizer=tokenizer,
        tokenizer_info=tokenizer_info,
        served_model_name=served_name,
        max_model_len=max_model_len,
        created=int(time.time()),
        metadata={
            "architecture": architecture,
            "model_path": str(model_dir),
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "num_threads": torch.get_num_threads(),
            "tokens_per_tile": processor.tokens_per_tile,
            "tile_size": getattr(processor, "tile_size", None),
            "max_tiles": config.max_tiles,
            "max_images_per_prompt": config.max_images_per_prompt,
        },
    )


@torch.inference_mode()
def logits_width(model: torch.nn.Module, device: torch.device) -> int:
    """The model's logits width (its vocabulary, padding rows included), from one embedded token."""
    ids = torch.zeros(1, dtype=torch.long, device=device)
    return int(model.compute_logits(model.embed_tokens(ids)).shape[-1])


def _max_model_len(config: ServerConfig, hf_config: dict[str, Any]) -> int:
    limit = model_context_length(hf_config)
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ConfigError(f"max_model_len {config.max_model_len} is over the model's context length {limit}")
    return config.max_model_len


# --- the engine --------------------------------------------------------------------------------
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
# the share of free memory the KV cache takes when --kv-cache-percent is not given
DEFAULT_KV_CACHE_PERCENT = {"cuda": 0.9, "cpu": 0.3}


def build_engine(
    config: ServerConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    eos: set[int],
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
    max_image_tokens: int,
    tokenizer_info: TokenizerInfo | None = None,
) -> AsyncEngine:
    """Sizes and allocates the KV pool, builds scheduler and runner, starts the engine thread.

    max_image_tokens: the placeholder tokens of the largest image (tokens_per_tile x (max_tiles + 1)),
    so that by default any one image fits in a step's token budget. tokenizer_info: for structured
    output (None: guided requests fail)."""
    spec = KVCacheSpec.from_model(model, dtype)
    num_blocks = kv_cache_num_blocks(config, spec, device, max_model_len)
    scheduler_config = SchedulerConfig(
        max_num_batched_tokens=config.max_num_batched_tokens
        or max(DEFAULT_MAX_NUM_BATCHED_TOKENS, max_image_tokens, config.max_num_seqs),
        max_num_seqs=config.max_num_seqs,
        max_waiting=config.max_queue,
        max_encoder_tiles_per_step=config.max_encoder_tiles_per_step,
    )
    kv_cache = PagedKVCache.allocate(spec, num_blocks, config.block_size, device=device)
    runner = ModelRunner(
        model,
        kv_cache,
        device=device,
        dtype=dtype,
        encoder_cache_bytes=config.encoder_cache_bytes,
        tokenizer_info=tokenizer_info,
    )
    runner.warm_up()
    logger.info(
        "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB); %d tokens per step, %d requests at once",
        num_blocks,
        config.block_size,
        num_blocks * config.block_size,
        num_blocks * spec.bytes_per_block(config.block_size) / 2**30,
        scheduler_config.max_num_batched_tokens,
        scheduler_config.max_num_seqs,
    )

    def make_core(sink: Any) -> EngineCore:
        manager = KVCacheManager(
            num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        scheduler = Scheduler(scheduler_config, manager, eos_token_ids=eos)
        return EngineCore(scheduler, runner, max_model_len=max_model_len, sink=sink)

    return AsyncEngine(make_core, tokenizer, max_waiting_requests=config.max_num_seqs + config.max_queue)


def kv_cache_num_blocks(
    config: ServerConfig, spec: KVCacheSpec, device: torch.device, max_model_len: int
) -> int:
    """--num-kv-blocks, or as many blocks as the budget (a share of free memory) holds, up to
    max_num_seqs requests of max_model_len; at least one max_model_len request's worth, else ConfigError."""
    bytes_per_block = spec.bytes_per_block(config.block_size)
    if config.num_kv_blocks:
        num_blocks, source = config.num_kv_blocks, f"num_kv_blocks {config.num_kv_blocks}"
    else:
        percent = config.kv_cache_percent or DEFAULT_KV_CACHE_PERCENT.get(device.type, 0.3)
        budget = int(free_memory_bytes(device) * percent)
        source = f"kv_cache_percent {percent} of free memory ({budget / 2**30:.2f} GiB)"
        # never more than every running request at full length: the pool is zero-filled up front,
        # and a small model would otherwise take (and write) gigabytes it cannot use
        num_blocks = min(
            budget // bytes_per_block, config.max_num_seqs * -(-max_model_len // config.block_size)
        )
    needed = -(-max_model_len // config.block_size)
    if num_blocks < needed:
        raise ConfigError(
            f"the KV cache ({source}) holds {num_blocks * config.block_size} tokens, less than "
            f"max_model_len {max_model_len} ({needed * bytes_per_block / 2**30:.2f} GiB): lower "
            "--max-model-len or raise --kv-cache-percent / --num-kv-blocks"
        )
    return num_blocks


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for the KV cache now (weights loaded): the CUDA device's free memory, or on CPU
    the kernel's MemAvailable (psutil when /proc/meminfo is missing)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError as exc:
        raise ConfigError("cannot measure free memory here: set --num-kv-blocks") from exc
    return int(psutil.virtual_memory().available)
