"""Where one W1 prefill's time goes: vision tower + connector vs the language model's prefill.

    python -m bench.prefill --model ~/.cache/vlmserve-bench/smolvlm-256m-random-seed0 [--profile]

Builds W1's prompt with vlmserve's own processor (one 512x512 picture, --max-tiles 16: 17 sub-images,
1142 prompt tokens) and runs it through the ModelRunner over the paged KV pool as the engine does:
once with the image whole in one step, once sliced by the encoder budget (--encoder-tiles per step).
Reports the encoder seconds (the runner's EncoderStats), the rest of the step (embedding, the LM
forward over all prompt tokens, logits), the tower's achieved GFLOP/s against the analytic count of
bench/vision.py, and with --profile the top operators of one whole step (SigLIP's linears are
`addmm`/`mkldnn::_linear_pointwise`, the LM's are bias-free `mm`). Nothing is served.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from PIL import Image

from bench.vision import siglip_flops
from vlmserve.engine.outputs import EncoderSlice, NewRequestData, SchedulerOutput
from vlmserve.inputs.idefics3 import Idefics3Processor
from vlmserve.inputs.tokenizer import load_tokenizer
from vlmserve.layers.attention import KVCacheSpec, PagedKVCache
from vlmserve.models.registry import load_model
from vlmserve.protocol.types import SamplingParams
from vlmserve.runner.model_runner import ModelRunner

BLOCK_SIZE = 16


def w1_prompt(model_dir: Path, max_tiles: int) -> tuple[list[int], list]:
    tokenizer = load_tokenizer(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    processor = Idefics3Processor(config, tokenizer, max_tiles=max_tiles)
    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(512, 512, 3, generator=rng) * 255).to(torch.uint8).numpy()
    image = processor.process(Image.fromarray(pixels))
    text = "<|im_start|>User:\x00Can you describe this image briefly?<end_of_utterance>\nAssistant:"
    return processor.build_prompt(text, "\x00", [image])


def step(runner: ModelRunner, ids: list[int], images: list, request_id: str, slices=None, tokens=True):
    num_blocks = -(-len(ids) // BLOCK_SIZE)
    new = NewRequestData(
        request_id, ids, [], SamplingParams(temperature=0.0, max_tokens=1), images, list(range(num_blocks)), 0
    )
    return SchedulerOutput(
        scheduled_new_requests=[new] if tokens else [],
        scheduled_running_requests=[],
        num_scheduled_tokens={request_id: len(ids)} if tokens else {},
        total_num_scheduled_tokens=len(ids) if tokens else 0,
        scheduled_encoder_inputs={request_id: [0]} if tokens else {},
        preempted_request_ids=[],
        finished_request_ids=set(),
        scheduled_encoder_slices={request_id: slices} if slices else {},
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prefill", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=Path.home() / ".cache" / "vlmserve-bench" / "smolvlm-256m-random-seed0"
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tiles", type=int, default=16)
    parser.add_argument("--encoder-tiles", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    loaded = load_model(args.model, dtype=dtype, device=torch.device("cpu"), progress=False)
    model = loaded.model
    ids, images = w1_prompt(args.model, args.max_tiles)
    image = images[0]
    spec = KVCacheSpec.from_model(model, dtype)
    kv = PagedKVCache.allocate(spec, -(-len(ids) // BLOCK_SIZE) + 1, BLOCK_SIZE, device="cpu")
    runner = ModelRunner(model, kv, device=torch.device("cpu"), dtype=dtype)
    runner.warm_up()
    flop = siglip_flops(loaded.raw_config)["total_gflop"] * image.num_tiles
    print(
        f"prompt {len(ids)} tokens, {image.num_tiles} tiles, {image.num_embeds} image tokens, "
        f"{flop:.0f} GFLOP of vision"
    )
    print("load", [round(x, 2) for x in os.getloadavg()], "threads", torch.get_num_threads(), flush=True)
    for counter in range(args.repeats):
        started = time.perf_counter()
        out = runner.execute(step(runner, ids, images, f"whole{counter}"))
        total = time.perf_counter() - started
        enc = out.encoder_stats.encoder_seconds
        print(
            f"whole: step {total:.2f} s = encoder {enc:.2f} s ({flop / enc:.0f} GFLOP/s) + LM prefill "
            f"and the rest {total - enc:.2f} s; load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        runner.execute(
            SchedulerOutput(
                **{**_fields(SchedulerOutput.make_empty()), "finished_request_ids": {f"whole{counter}"}}
            )
        )
        rid = f"sliced{counter}"
        started, enc, steps = time.perf_counter(), 0.0, 0
        for tile in range(0, image.num_tiles, args.encoder_tiles):
            end = min(tile + args.encoder_tiles, image.num_tiles)
            last = end == image.num_tiles
            out = runner.execute(
                step(runner, ids, images, rid, [EncoderSlice(0, image, tile, end)], tokens=last)
            )
            enc += out.encoder_stats.encoder_seconds if out.encoder_stats else 0.0
            steps += 1
        total = time.perf_counter() - started
        print(
            f"sliced by {args.encoder_tiles}: {steps} steps {total:.2f} s = encoder {enc:.2f} s "
            f"({flop / enc:.0f} GFLOP/s) + the rest {total - enc:.2f} s; load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        runner.execute(
            SchedulerOutput(**{**_fields(SchedulerOutput.make_empty()), "finished_request_ids": {rid}})
        )
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            runner.execute(step(runner, ids, images, "profiled"))
        print("one whole W1 prefill step through the runner (paged path), top operators:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16))


def _fields(output: SchedulerOutput) -> dict:
    return {name: getattr(output, name) for name in SchedulerOutput.__slots__}


if __name__ == "__main__":
    main()
