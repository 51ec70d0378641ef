"""Would int8 linears pay on this CPU? Quality and decode time of the language model, fp32 vs int8.

    python -m bench.int8 [--model ~/.cache/vlmserve/default-2] [--keep-fp32 down_proj,o_proj,lm_head]

Loads the checkpoint with vlmserve's loader (fp32) and runs its language model on real text (this
repository's README and docs, --tokens of them): perplexity, the per-token KL divergence of the int8
logits from the fp32 ones, top-1 agreement, how many of --steps greedy tokens after the text stay the
same, and the median decode step (one token + logits, contiguous cache). Then it swaps every linear
(and the tied lm_head) for fbgemm's dynamic int8 linear (`quantized.linear_dynamic`: weights int8 per
output channel, activations quantized per tensor at run time), except the layers named in
--keep-fp32, and measures again. --no-reduce-range uses all 8 activation bits (on AVX2 without VNNI
fbgemm's u8 x s8 products can saturate). Not a serving option: docs/BENCHMARKS.md says why.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.machine import load_average, machine_info
from vlmserve.inputs.tokenizer import load_tokenizer
from vlmserve.layers.linear import Linear
from vlmserve.models.registry import load_model

REPO = Path(__file__).resolve().parent.parent
TEXT_FILES = ("README.md", "docs/ARCHITECTURE.md", "docs/DEMO_MODEL.md", "docs/BENCHMARKS.md")


class DynamicInt8Linear(nn.Module):
    """fbgemm's dynamic int8 linear over a float weight [out, in] (and bias)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, reduce_range: bool) -> None:
        super().__init__()
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
        zero_points = torch.zeros(len(scales), dtype=torch.long)
        qweight = torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8)
        bias = None if bias is None else bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.reduce_range = reduce_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)


def quantize(lm: nn.Module, keep: set[str], reduce_range: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Swap lm's linears in place (those named in `keep` stay); returns the logits function."""
    for module in list(lm.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Linear) and name not in keep:
                setattr(module, name, DynamicInt8Linear(child.weight, child.bias, reduce_range))
    if "lm_head" in keep:
        return lm.compute_logits
    # an untied lm_head was swapped above; a tied one reads the embedding matrix
    head = lm.lm_head or DynamicInt8Linear(lm.model.embed_tokens.weight, None, reduce_range)
    return lambda hidden: head(hidden).float()


def run(lm: nn.Module, logits_fn, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int], float]:
    """Logits over `ids`, then `steps` greedy tokens: (logits [T, vocab], tokens, median step ms)."""
    cache = lm.make_kv_cache(len(ids) + steps + 1, dtype=torch.float32, device="cpu")
    with torch.inference_mode():
        logits = logits_fn(lm(lm.embed_tokens(ids), torch.arange(len(ids)), cache)).float()
        token = logits[-1:].argmax(-1)
        tokens, times = [], []
        for step in range(steps):
            start = time.perf_counter()
            hidden = lm(lm.embed_tokens(token), torch.tensor([len(ids) + step]), cache)
            token = logits_fn(hidden).argmax(-1)
            times.append(time.perf_counter() - start)
            tokens.append(int(token))
    return logits, tokens, 1000 * statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache" / "vlmserve" / "default-2")
    parser.add_argument("--tokens", type=int, default=1100)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--keep-fp32", default="", help="comma-separated linear names left in fp32")
    parser.add_argument("--no-reduce-range", action="store_true")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    model = load_model(args.model, dtype=torch.float32, device=torch.device("cpu"), progress=False).model
    lm = getattr(model, "language_model", model)
    text = "\n".join((REPO / name).read_text() for name in TEXT_FILES)[: 16 * args.tokens]  # enough
    ids = torch.tensor(load_tokenizer(args.model).encode(text)[: args.tokens])
    reference, ref_tokens, ref_ms = run(lm, lm.compute_logits, ids, args.steps)
    keep = {name for name in args.keep_fp32.split(",") if name}
    logits_fn = quantize(lm, keep, reduce_range=not args.no_reduce_range)
    quantized, q_tokens, q_ms = run(lm, logits_fn, ids, args.steps)
    p, q = F.log_softmax(reference, -1), F.log_softmax(quantized, -1)
    same = next((i for i, (a, b) in enumerate(zip(ref_tokens, q_tokens, strict=True)) if a != b), args.steps)
    report = {
        "model": str(args.model),
        "threads": args.threads,
        "tokens": len(ids),
        "keep_fp32": sorted(keep),
        "reduce_range": not args.no_reduce_range,
        "perplexity_fp32": round(F.cross_entropy(reference[:-1], ids[1:]).exp().item(), 2),
        "perplexity_int8": round(F.cross_entropy(quantized[:-1], ids[1:]).exp().item(), 2),
        "kl_per_token": round((p.exp() * (p - q)).sum(-1).mean().item(), 4),
        "top1_agreement": round((reference.argmax(-1) == quantized.argmax(-1)).float().mean().item(), 4),
        "greedy_tokens_same": f"{same}/{args.steps}",
        "decode_ms_fp32": round(ref_ms, 1),
        "decode_ms_int8": round(q_ms, 1),
        "load_average": [load_before, load_average()],
        "machine": machine_info(),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
