"""Write a seeded random-weight checkpoint of SmolVLM-256M-Instruct's architecture (Hub layout, real size).

    python tools/make_smolvlm_checkpoint.py OUT_DIR [--seed 0] [--dtype bfloat16] [--tiny]

The config is reproduced from SmolVLM-256M-Instruct's public config (see
vlmserve.testing.smolvlm_checkpoint.smolvlm_256m_config for the values we are unsure of); the
tokenizer is SmolLM2's plus the Idefics3 special tokens. The weights are random: for benchmarks
and serving tests, not for answers. `vlmserve serve --model OUT_DIR` serves it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vlmserve.testing.smolvlm_checkpoint import write_smolvlm_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="the test-size model of the same architecture")
    parser.add_argument(
        "--max-shard-bytes", type=int, default=None, help="shard the weights (default: one file)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    write_smolvlm_checkpoint(
        args.out_dir,
        seed=args.seed,
        tiny=args.tiny,
        dtype=getattr(torch, args.dtype),
        max_shard_bytes=args.max_shard_bytes,
    )
    print(f"wrote {args.out_dir} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
