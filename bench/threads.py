"""Does image preprocessing in a worker thread slow the engine's decode, and do fewer torch threads help?

    python -m bench.threads --model ~/.cache/vlmserve-bench/smolvlm-256m-random-seed0

In one process, as in the server: the "engine" loop times single-token decode steps (the language
model's forward over a contiguous KV cache of --context tokens, plus logits and argmax) while a worker
thread decodes a 2048x1536 PNG and cuts it into 12 tiles of 512 plus the thumbnail (Nemotron-VL's
processor: PIL decode, bicubic resizes, uint8 -> float32 tensor, sha256 content hash) in a loop. For
each torch intra-op thread count in --threads: decode ms/token alone, and while preprocessing runs
(with the worker's ms per image). About a minute on 2 cores. Writes a JSON (--out).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


class _Tokenizer:
    """Just enough tokenizer for the processor's image token look-ups."""

    unk_token_id = -1

    def convert_tokens_to_ids(self, token: str) -> int:
        return {"<img>": 1, "</img>": 2, "<image>": 3}[token]


def make_png(width: int = 2048, height: int = 1536) -> bytes:
    """A photo-like PNG: smooth gradients plus mild noise (compresses like a photo, not like noise)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_processor() -> Any:
    from vlmserve.inputs.nemotron_vl import NemotronVLProcessor

    config = {"force_image_size": 512, "patch_size": 16, "downsample_ratio": 0.5, "use_thumbnail": True}
    return NemotronVLProcessor(config, _Tokenizer(), max_tiles=12)


def preprocess_once(png: bytes, processor: Any) -> float:
    """Seconds to decode the PNG and turn it into 13 tiles (tensor and content hash included)."""
    start = time.perf_counter()
    image = Image.open(io.BytesIO(png))
    image.load()
    processed = processor.process(image.convert("RGB"))
    assert processed.num_tiles == 13
    return time.perf_counter() - start


def preprocess_loop(png: bytes, processor: Any, stop: threading.Event, times: list[float]) -> None:
    while not stop.is_set():
        times.append(preprocess_once(png, processor))


@torch.inference_mode()
def decode_ms(model: Any, context: int, steps: int) -> list[float]:
    """ms of each of `steps` single-token decode steps after a prefill of `context` tokens."""
    cache = model.make_kv_cache(context + steps + 1, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 40000, (context,))
    hidden = model(model.embed_tokens(ids), torch.arange(context), cache)
    token = model.compute_logits(hidden[-1:]).argmax(-1)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        hidden = model(model.embed_tokens(token), torch.tensor([context + step]), cache)
        token = model.compute_logits(hidden).argmax(-1)
        times.append(1000 * (time.perf_counter() - start))
    return times


def measure(model: Any, png: bytes, processor: Any, args: argparse.Namespace) -> dict[str, Any]:
    alone = decode_ms(model, args.context, args.steps)
    stop, image_times = threading.Event(), []
    worker = threading.Thread(target=preprocess_loop, args=(png, processor, stop, image_times))
    worker.start()
    time.sleep(0.2)  # the worker is under way
    busy = decode_ms(model, args.context, args.steps)
    stop.set()
    worker.join()
    idle_image_times = [preprocess_once(png, processor) for _ in range(3)]  # no decode beside it
    return {
        "decode_ms_median_alone": round(statistics.median(alone[2:]), 2),
        "decode_ms_median_with_preprocessing": round(statistics.median(busy[2:]), 2),
        "decode_slowdown": round(statistics.median(busy[2:]) / statistics.median(alone[2:]), 2),
        "image_ms_median_alone": round(1000 * statistics.median(idle_image_times), 1),
        "image_ms_median_beside_decode": round(1000 * statistics.median(image_times), 1)
        if image_times
        else None,
        "images_preprocessed_during_decode": len(image_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=Path.home() / ".cache" / "vlmserve-bench" / "smolvlm-256m-random-seed0"
    )
    parser.add_argument("--threads", default=f"{len(os.sched_getaffinity(0))},1")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "threads.json")
    args = parser.parse_args()
    from vlmserve.models.registry import load_model

    model = load_model(args.model, dtype=torch.float32, device=torch.device("cpu"), progress=False).model
    png, processor = make_png(), make_processor()
    report: dict[str, Any] = {
        "cores": len(os.sched_getaffinity(0)),
        "model": args.model.name,
        "context": args.context,
        "png_bytes": len(png),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": {},
    }
    for num_threads in (int(n) for n in args.threads.split(",")):
        torch.set_num_threads(num_threads)
        entry = measure(model, png, processor, args)
        report["torch_threads"][num_threads] = entry
        print(num_threads, json.dumps(entry), flush=True)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
