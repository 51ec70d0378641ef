"""Structured output's cost inside the engine: inter-token latency of guided vs free requests.

    python -m bench.guided --model ~/.cache/vlmserve-bench/smolvlm-256m-random-seed0 --rounds 3

Loads the model with vlmserve's own bootstrap (the real engine, no HTTP), then alternates a free
request (ignore_eos, --tokens tokens) with a guided one (a JSON schema whose one string property is
exactly --tokens characters long, so the guide never ends it early), one at a time, greedy. Reports
per kind the median inter-token latency and, for the guided runs, the time the runner spent
building the allowed-token masks (guide fill, copy, unpack to bool), per token. Writes
bench/results/guided.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Write a long description of a quiet harbour at dawn."


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.guided", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=Path.home() / ".cache" / "vlmserve-bench" / "smolvlm-256m-random-seed0"
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "guided.json")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from vlmserve.bootstrap import load_model_server
    from vlmserve.config import ServerConfig
    from vlmserve.protocol.types import EngineRequest, GuidedDecodingSpec, SamplingParams

    server = load_model_server(ServerConfig(model=str(args.model), dtype="float32", max_model_len=2048))
    runner = server.engine.core.runner
    guide_seconds = _instrument(runner)
    schema = {
        "type": "object",
        "properties": {
            "text": {"type": "string", "minLength": 4 * args.tokens, "maxLength": 4 * args.tokens}
        },
        "required": ["text"],
    }
    guided = GuidedDecodingSpec("json", json.dumps(schema))
    prompt = server.tokenizer.encode(PROMPT)
    itl: dict[str, list[float]] = {"free": [], "guided": []}
    per_token_guide: list[float] = []
    for index in range(args.rounds):
        for kind in ("free", "guided"):
            params = SamplingParams(
                temperature=0.0,
                max_tokens=args.tokens,
                ignore_eos=kind == "free",
                guided=guided if kind == "guided" else None,
            )
            guide_seconds.clear()
            stamps = [
                time.perf_counter()
                async for _ in server.engine.generate(EngineRequest(f"{kind}-{index}", prompt, params))
            ]
            itl[kind].append((stamps[-1] - stamps[0]) / max(1, len(stamps) - 1))
            if kind == "guided":
                per_token_guide.append(sum(guide_seconds) / max(1, len(stamps)))
    await server.aclose()
    free_ms, guided_ms = (statistics.median(itl[k]) * 1e3 for k in ("free", "guided"))
    return {
        "model": str(args.model),
        "threads": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "tokens": args.tokens,
        "rounds": args.rounds,
        "itl_ms_free_p50": round(free_ms, 2),
        "itl_ms_guided_p50": round(guided_ms, 2),
        "guided_over_free": round(guided_ms / free_ms, 3),
        "guide_us_per_token_p50": round(statistics.median(per_token_guide) * 1e6, 1),
    }


def _instrument(runner: Any) -> list[float]:
    """Wraps the runner's mask building with a timer; the seconds of each call land in the list."""
    seconds: list[float] = []
    build_mask = runner._allowed_token_mask

    def timed_mask(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return build_mask(*a, **kw)
        finally:
            seconds.append(time.perf_counter() - start)

    runner._allowed_token_mask = timed_mask
    return seconds


if __name__ == "__main__":
    main()
