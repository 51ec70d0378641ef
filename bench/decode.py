"""Model-only decode cost: the language model's forward for one token (no engine, no HTTP).

    python -m bench.decode --model ~/.cache/vlmserve-bench/smolvlm-256m-random-seed0 --dtypes float32,bfloat16

Loads the checkpoint with vlmserve's loader, prefills --context text tokens into the model's own
contiguous KVCache, then times --steps single-token forwards + logits (greedy argmax). Compare the
ms/token with the server's inter-token latency at concurrency 1 (bench.run W2/W3): the difference is
the engine's per-step overhead (scheduling, paged batch building, sampling, detokenization, SSE).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=Path.home() / ".cache" / "vlmserve-bench" / "smolvlm-256m-random-seed0"
    )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--context", type=int, default=1142)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "decode.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from vlmserve.models.registry import load_model

    report: dict = {
        "threads": args.threads,
        "context": args.context,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "dtypes": {},
    }
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        model = load_model(args.model, dtype=dtype, device=torch.device("cpu"), progress=False).model
        cache = model.make_kv_cache(args.context + args.steps + 8, dtype=dtype, device="cpu")
        ids = torch.randint(0, 49000, (args.context,))
        with torch.inference_mode():
            start = time.perf_counter()
            hidden = model(model.embed_tokens(ids), torch.arange(args.context), cache)
            prefill_s = time.perf_counter() - start
            token = model.compute_logits(hidden[-1:]).argmax(-1)
            times, lm_head = [], []
            for step in range(args.steps):
                pos = torch.tensor([args.context + step])
                start = time.perf_counter()
                hidden = model(model.embed_tokens(token), pos, cache)
                mid = time.perf_counter()
                token = model.compute_logits(hidden).argmax(-1)
                end = time.perf_counter()
                times.append(end - start)
                lm_head.append(end - mid)
        entry = {
            "prefill_s": round(prefill_s, 3),
            "prefill_tok_s": round(args.context / prefill_s, 1),
            "decode_ms_median": round(1000 * statistics.median(times[2:]), 2),
            "decode_ms_min": round(1000 * min(times[2:]), 2),
            "lm_head_ms_median": round(1000 * statistics.median(lm_head[2:]), 2),
            "weight_bytes_mib": round(
                sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1
            ),
        }
        report["dtypes"][name] = entry
        print(name, json.dumps(entry), flush=True)
        del model, cache
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
