"""The vision tower's achieved GFLOP/s for W1 against this machine's matmul throughput.

    python -m bench.vision --model ~/.cache/vlmserve-bench/smolvlm-256m-random-seed0 --dtypes float32,bfloat16

1. Matmul: F.linear of x [1024, 1280] by W [5120, 1280] (13.4 GFLOP) in each dtype, best and median
   of --repeats (>= 1) after warm-up, on --threads torch threads (default: the cores available).
2. FLOPs of one SigLIP sub-image at the checkpoint's image_size (analytic, from config.json): per layer
   2 x tokens x (4 h^2 + 2 h i) for the qkv/out/MLP linears, plus 4 x tokens^2 x h for QK^T and AV;
   the patch embedding (2 x tokens x 3 p^2 h) and the connector (pixel shuffle + linear) on top.
3. Our vision tower (vlmserve's own model code, loaded with vlmserve's loader) timed on W1's 17
   sub-images, one sub-image per call, and all 17 in one batch (what the runner does without an
   encoder budget; with one it runs --max-encoder-tiles-per-step sub-images per call).
Writes a JSON (--out). Nothing is served; no network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent


def timed(fn, repeats: int, warmup: int = 2) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"best_s": min(times), "median_s": statistics.median(times)}


def matmul(dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    m, k, n = 1024, 1280, 5120
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    t = timed(lambda: F.linear(x, w), repeats)
    flop = 2 * m * k * n
    return {
        "shape": f"[{m}x{k}] x [{k}x{n}]",
        "gflop": flop / 1e9,
        **t,
        "gflops_best": flop / t["best_s"] / 1e9,
        "gflops_median": flop / t["median_s"] / 1e9,
    }


def siglip_flops(config: dict[str, Any]) -> dict[str, float]:
    v = config["vision_config"]
    h, i, layers = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    p, size = v["patch_size"], v["image_size"]
    tokens = (size // p) ** 2
    linear = layers * 2 * tokens * (4 * h * h + 2 * h * i)
    attention = layers * 4 * tokens * tokens * h
    patch = 2 * tokens * 3 * p * p * h
    scale = config.get("scale_factor", 1)
    lm_hidden = config["text_config"]["hidden_size"]
    connector = 2 * (tokens // scale**2) * (h * scale**2) * lm_hidden
    return {
        "tokens_per_subimage": tokens,
        "linear_gflop": linear / 1e9,
        "attention_gflop": attention / 1e9,
        "patch_embed_gflop": patch / 1e9,
        "connector_gflop": connector / 1e9,
        "total_gflop": (linear + attention + patch + connector) / 1e9,
    }


def tower(model_dir: Path, dtype: torch.dtype, num_tiles: int, batched: bool) -> dict[str, Any]:
    from vlmserve.models.registry import load_model

    loaded = load_model(model_dir, dtype=dtype, device=torch.device("cpu"), progress=False)
    model = loaded.model
    size = loaded.raw_config["vision_config"]["image_size"]
    pixels = torch.randn(num_tiles, 3, size, size).clamp(-1, 1).to(dtype)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        model.embed_images(pixels[:1])  # warm-up
        start = time.perf_counter()
        for index in range(num_tiles):
            model.embed_images(pixels[index : index + 1])
        out["per_subimage_calls_s"] = time.perf_counter() - start
        if batched:
            start = time.perf_counter()
            model.embed_images(pixels)
            out["one_batch_s"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.vision",
        description=__doc__.splitlines()[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", type=Path, default=Path.home() / ".cache" / "vlmserve-bench" / "smolvlm-256m-random-seed0"
    )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--tiles", type=int, default=17)
    parser.add_argument("--repeats", type=int, default=8, help="matmul repeats (after 2 warm-ups)")
    parser.add_argument(
        "--no-batch", action="store_true", help="skip the tower run with all sub-images in one batch"
    )
    parser.add_argument("--no-tower", action="store_true", help="matmul and FLOP count only")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vision.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = json.loads((args.model / "config.json").read_text())
    flops = siglip_flops(config)
    report: dict[str, Any] = {
        "threads": args.threads,
        "torch": torch.__version__,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "siglip_per_subimage": flops,
        "w1_subimages": args.tiles,
        "w1_vision_gflop": flops["total_gflop"] * args.tiles,
        "dtypes": {},
    }
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        entry: dict[str, Any] = {"matmul": matmul(dtype, args.repeats)}
        print(name, "matmul", json.dumps(entry["matmul"]), flush=True)
        if not args.no_tower:
            t = tower(args.model, dtype, args.tiles, not args.no_batch)
            for key in ("per_subimage_calls_s", "one_batch_s"):
                if key in t:
                    t[key.removesuffix("_s") + "_gflops"] = report["w1_vision_gflop"] / t[key]
            entry["tower"] = t
            print(name, "tower", json.dumps(t), flush=True)
        report["dtypes"][name] = entry
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps({k: report[k] for k in ("w1_vision_gflop", "load_average_before", "load_average_after")})
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
