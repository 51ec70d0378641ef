"""Serving benchmark: start a server, drive it with concurrent streamed chat requests, write JSON + PNG.

    python -m bench.run --model smolvlm --workloads W1,W2,W3 --concurrency 1,4,8
    python -m bench.run --model smolvlm --dtype float32 --workloads W1 --concurrency 1 --label fp32
    python -m bench.run --model default --workloads W1          # Nemotron-VL default model (fallback)
    python -m bench.run --peer-cmd 'transformers serve --port {port}' \\
        --request-model HuggingFaceTB/SmolVLM-256M-Instruct --no-nvext --ready-path /v1/models
    python -m bench.run --plot a.json b.json --out-dir bench/results --label compare

Workloads (each request: temperature 0, streamed, --max-tokens output tokens, nvext.ignore_eos):
  W1  one 512x512 PNG + a short question; every request's image differs from all others in one
      pixel (position = a run-wide counter), so neither the prefix cache nor any image cache helps;
  W2  the same image in every request (one priming request first): the cache-hit path;
  W3  text-only chat (the question alone).

Measured per concurrency level (closed loop: c workers, each sends its next request when the last
one finished; --requests-per-level requests in all, default 2 x c):
  TTFT p50/p95 (send -> first content delta), inter-token latency (per request (last - first) /
  (tokens - 1), p50 over requests; and the p50 of the gaps between content deltas), decode tok/s
  per request, output tok/s per request (tokens / end-to-end) and aggregate (all tokens / level
  wall time), requests/s, prompt tokens (from usage), the server's peak RSS (its process tree,
  polled from /proc every 0.1 s; VmHWM of the main process at the end), load average before/after.

Only 127.0.0.1 is contacted. matplotlib is optional (the plot is skipped without it); it is a bench
dependency, never the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DEFAULT_QUESTION = "Can you describe this image briefly?"  # W1: 1142 prompt tokens, as the reference runs
WORKLOADS = ("W1", "W2", "W3")

if __package__ in (None, ""):  # run as a script (python bench/run.py): make the bench package importable
    sys.path.insert(0, str(REPO))

from bench.machine import RssMonitor, load_average, machine_info  # noqa: E402 (after the sys.path fix)
from bench.plot import plot  # noqa: E402
from bench.server import ensure_smolvlm, start_server, stop_server, wait_ready  # noqa: E402

# --------------------------------------------------------------------------------------------- requests


def base_image(size: int, seed: int) -> np.ndarray:
    """A seeded, smooth-ish RGB picture (gradients, a few rectangles, mild noise): PNG of realistic size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([x * 255, y * 255, (1 - x) * (1 - y) * 255], axis=-1)
    for _ in range(12):
        x0, y0 = rng.integers(0, size - 32, 2)
        w, h = rng.integers(16, size // 3, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def png_data_url(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Payloads:
    """Request bodies (as bytes, built before timing starts)."""

    def __init__(self, args: argparse.Namespace, model_id: str) -> None:
        self.args = args
        self.model_id = model_id
        self.base = base_image(args.image_size, args.seed)
        self.variant = 0  # run-wide: every W1 image differs from every other one
        self._fixed_url: str | None = None

    def _body(self, image_url: str | None) -> bytes:
        args = self.args
        if image_url is None:
            content: Any = args.question
        else:
            content = [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": args.question},
            ]
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if not args.no_nvext:
            body["nvext"] = {"ignore_eos": True}
        body.update(json.loads(args.extra_body or "{}"))
        return json.dumps(body).encode()

    def make(self, workload: str) -> bytes:
        if workload == "W1":
            self.variant += 1
            pixels = self.base.copy()
            n = self.variant
            y, x = divmod(n % (pixels.shape[0] * pixels.shape[1]), pixels.shape[1])
            pixels[y, x] ^= 0x80  # one pixel, a different one per request
            return self._body(png_data_url(pixels))
        if workload == "W2":
            if self._fixed_url is None:
                self._fixed_url = png_data_url(self.base)
            return self._body(self._fixed_url)
        if workload == "W3":
            return self._body(None)
        raise ValueError(workload)


@dataclass
class Result:
    index: int
    start: float = 0.0
    end: float = 0.0
    status: int | None = None
    error: str | None = None
    token_times: list[float] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    text: str = ""

    @property
    def completion_tokens(self) -> int:
        if self.usage and self.usage.get("completion_tokens"):
            return int(self.usage["completion_tokens"])
        return len(self.token_times)


async def send(client: httpx.AsyncClient, url: str, body: bytes, result: Result) -> None:
    result.start = time.perf_counter()
    pieces = []
    try:
        async with client.stream(
            "POST", url, content=body, headers={"Content-Type": "application/json"}
        ) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:500]
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result.usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        result.token_times.append(now)
                        pieces.append(piece)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.end = time.perf_counter()
        result.text = "".join(pieces)


async def run_level(
    url: str, bodies: list[bytes], concurrency: int, timeout: float
) -> tuple[list[Result], float]:
    queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    for item in enumerate(bodies):
        queue.put_nowait(item)
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    index, body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                result = Result(index)
                results.append(result)
                await send(client, url, body, result)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    results.sort(key=lambda r: r.index)
    return results, wall


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summarise(results: list[Result], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and r.token_times]
    ttft = [r.token_times[0] - r.start for r in ok]
    e2e = [r.end - r.start for r in ok]
    itl, decode_rate, out_rate, gaps = [], [], [], []
    for r in ok:
        n = r.completion_tokens
        span = r.token_times[-1] - r.token_times[0]
        if n > 1 and span > 0:
            itl.append(span / (n - 1))
            decode_rate.append((n - 1) / span)
        out_rate.append(n / (r.end - r.start))
        gaps.extend(np.diff(r.token_times).tolist())
    tokens = sum(r.completion_tokens for r in ok)
    prompt_tokens = sorted(
        {int(r.usage["prompt_tokens"]) for r in ok if r.usage and "prompt_tokens" in r.usage}
    )
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": [f"#{r.index} {r.status}: {r.error}" for r in results if r.error is not None][:5],
        "wall_s": round(wall, 3),
        "prompt_tokens": prompt_tokens,
        "completion_tokens_total": tokens,
        "completion_tokens_per_request": sorted({r.completion_tokens for r in ok}),
        "ttft_s": {"p50": pct(ttft, 50), "p95": pct(ttft, 95), "min": pct(ttft, 0), "max": pct(ttft, 100)},
        "e2e_s": {"p50": pct(e2e, 50), "p95": pct(e2e, 95)},
        "itl_s": {
            "p50": pct(itl, 50),
            "p95": pct(itl, 95),
            "delta_gap_p50": pct(gaps, 50),
            "delta_gap_p95": pct(gaps, 95),
            "delta_gap_max": pct(gaps, 100),
        },
        "decode_tok_s_per_request": {
            "p50": pct(decode_rate, 50),
            "mean": round(float(np.mean(decode_rate)), 3) if decode_rate else None,
        },
        "output_tok_s_per_request": {
            "p50": pct(out_rate, 50),
            "mean": round(float(np.mean(out_rate)), 3) if out_rate else None,
        },
        "output_tok_s_aggregate": round(tokens / wall, 3) if wall > 0 else None,
        "requests_per_s": round(len(ok) / wall, 4) if wall > 0 else None,
        "sample_text": (ok[0].text[:80] if ok else None),
    }


# ------------------------------------------------------------------------------------------------- main


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "label": args.label,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], "-m", "bench.run", *sys.argv[1:]]),
        "machine": machine_info(),
        "load_average_before": load_average(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("plot",)},
    }
    report["settings"]["model_dir"] = str(args.model_dir) if args.model_dir else None
    server = start_server(args, out_dir / f"{args.label}.server.log")
    monitor = RssMonitor(server.process.pid)
    monitor.start()
    levels: list[dict[str, Any]] = []
    report["levels"] = levels
    try:
        wait_ready(server, args.ready_path, args.ready_timeout)
        monitor.sample()
        report["server"] = {
            "command": shlex.join(server.command),
            "ready_after_s": server.ready_after_s,
            "rss_after_ready_mib": round(monitor.peak_kib / 1024, 1),
        }
        if args.request_model:
            model_id = args.request_model
        else:
            model_id = httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        report["server"]["model_id"] = model_id
        try:
            meta = httpx.get(server.base_url + "/v1/metadata", timeout=10)
            if meta.status_code == 200:
                report["server"]["metadata"] = meta.json()
        except httpx.HTTPError:
            pass
        url = server.base_url + "/v1/chat/completions"
        payloads = Payloads(args, model_id)
        for workload, plan_levels in args.plan:
            # warm-up (W2: also primes the cache with its one image)
            warm = max(args.warmup, 1 if workload == "W2" else 0)
            if warm:
                results, wall = asyncio.run(
                    run_level(url, [payloads.make(workload) for _ in range(warm)], 1, args.timeout)
                )
                summary = summarise(results, wall)
                print(
                    f"{workload} warm-up x{warm}: {summary['wall_s']} s, "
                    f"prompt tokens {summary['prompt_tokens']}, errors {summary['errors']}",
                    flush=True,
                )
                levels.append({"workload": workload, "concurrency": 1, "warmup": True, **summary})
            for concurrency, n in plan_levels:
                bodies = [payloads.make(workload) for _ in range(n)]
                before = load_average()
                monitor.new_phase()
                results, wall = asyncio.run(run_level(url, bodies, concurrency, args.timeout))
                monitor.sample()
                summary = summarise(results, wall)
                level = {
                    "workload": workload,
                    "concurrency": concurrency,
                    "warmup": False,
                    **summary,
                    "peak_rss_mib": round(monitor.phase_peak_kib / 1024, 1),
                    "load_average_before": before,
                    "load_average_after": load_average(),
                }
                levels.append(level)
                print(
                    f"{workload} c={concurrency} n={n}: TTFT p50 {summary['ttft_s']['p50']} s "
                    f"p95 {summary['ttft_s']['p95']} s, "
                    f"ITL p50 {summary['itl_s']['p50']} s, "
                    f"decode/req {summary['decode_tok_s_per_request']['p50']} tok/s, "
                    f"agg {summary['output_tok_s_aggregate']} tok/s, {summary['requests_per_s']} req/s, "
                    f"prompt {summary['prompt_tokens']}, RSS {level['peak_rss_mib']} MiB, "
                    f"load {before} -> {level['load_average_after']}, errors {summary['errors']}",
                    flush=True,
                )
    finally:
        monitor.sample()
        stop_server(server)
        monitor.stop()
        report["peak_rss_mib"] = round(monitor.peak_kib / 1024, 1)
        report["main_process_vmhwm_mib"] = round(monitor.main_hwm_kib / 1024, 1)
        report["load_average_after"] = load_average()
        report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        json_path = out_dir / f"{args.label}.json"
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_path}", flush=True)
    return report


Plan = list[tuple[str, list[tuple[int, int]]]]  # (workload, [(concurrency, requests), ...]) in run order


def parse_plan(text: str) -> Plan:
    """'W3:1x2,4x4 W2:1x2' -> [('W3', [(1, 2), (4, 4)]), ('W2', [(1, 2)])]."""
    plan: Plan = []
    for item in text.split():
        workload, _, levels = item.partition(":")
        workload = workload.upper()
        if workload not in WORKLOADS:
            raise ValueError(f"--plan: unknown workload {workload!r}: one of {', '.join(WORKLOADS)}")
        try:
            pairs = [tuple(int(x) for x in level.split("x")) for level in levels.split(",")]
        except ValueError:
            pairs = []
        if not pairs or any(len(pair) != 2 or min(pair) < 1 for pair in pairs):
            raise ValueError(f"--plan: {item!r} is not WORKLOAD:CxN[,CxN...] with C, N >= 1")
        plan.append((workload, [(c, n) for c, n in pairs]))
    return plan


def plan_from_levels(args: argparse.Namespace) -> Plan:
    """The plan --workloads, --concurrency, --requests-per-level and --requests-factor describe."""
    counts = args.requests_per_level
    if len(counts) == 1:
        counts = counts * len(args.concurrency)
    if len(counts) != len(args.concurrency):
        raise ValueError("--requests-per-level: one number, or one per --concurrency level")
    for workload in args.workloads:
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}: one of {', '.join(WORKLOADS)}")
    levels = [(c, n or args.requests_factor * c) for c, n in zip(args.concurrency, counts, strict=True)]
    return [(workload, list(levels)) for workload in args.workloads]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "--model",
        default="smolvlm",
        help="smolvlm (the seeded random SmolVLM-256M checkpoint, written into --cache-dir once), "
        "default (vlmserve's built-in Nemotron-VL model: no --model), or a checkpoint directory; "
        "for --peer-cmd, substituted for {model}",
    )
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "vlmserve-bench"))
    parser.add_argument("--seed", type=int, default=0, help="checkpoint weights and the image")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--max-tiles",
        type=int,
        default=16,
        help="16 gives transformers' 4x4 + global = 17 sub-images for a 512x512 SmolVLM image",
    )
    parser.add_argument(
        "--num-threads", type=int, default=None, help="--num-threads for vlmserve (default: its own)"
    )
    parser.add_argument("--server-args", default="", help="more vlmserve serve arguments (one string)")
    parser.add_argument(
        "--peer-cmd",
        default=None,
        help="run this server instead of vlmserve; {port} and {model} are substituted",
    )
    parser.add_argument(
        "--ready-path", default="/v1/health/ready", help="GET path that answers 200 when ready"
    )
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument(
        "--request-model", default=None, help="model field of requests (default: the first of /v1/models)"
    )
    parser.add_argument(
        "--no-nvext",
        action="store_true",
        help="do not send nvext.ignore_eos (servers without NIM extensions)",
    )
    parser.add_argument(
        "--extra-body",
        default=None,
        help="JSON merged into every request body, e.g. '{\"ignore_eos\": true}'",
    )
    parser.add_argument(
        "--workloads",
        default="W1,W2,W3",
        type=lambda s: [w.strip().upper() for w in s.split(",") if w.strip()],
    )
    parser.add_argument("--concurrency", default="1,4,8", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument(
        "--requests-per-level",
        default="0",
        type=lambda s: [int(n) for n in s.split(",")],
        help="requests per concurrency level: one number, or one per --concurrency level "
        "(0: --requests-factor x concurrency)",
    )
    parser.add_argument("--requests-factor", type=int, default=2)
    parser.add_argument(
        "--warmup", type=int, default=1, help="requests before each workload's levels, not measured"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--timeout", type=float, default=3600, help="per request, seconds")
    parser.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    parser.add_argument("--label", default=None, help="file name stem of the JSON, PNG and server log")
    parser.add_argument(
        "--plot",
        nargs="+",
        metavar="JSON",
        help="only plot these result files together (into OUT_DIR/LABEL.png)",
    )
    parser.add_argument(
        "--plan",
        default=None,
        help="workloads and levels in one string, overriding --workloads, --concurrency and "
        "--requests-per-level: 'W3:1x2,4x4 W2:1x2' runs W3 at c=1 (2 requests) and c=4 (4 requests), "
        "then W2 at c=1 (2 requests)",
    )
    args = parser.parse_args(argv)
    try:
        args.plan = parse_plan(args.plan) if args.plan else plan_from_levels(args)
    except ValueError as exc:
        parser.error(str(exc))
    args.workloads = [workload for workload, _ in args.plan]
    args.model_dir = None
    if not args.plot and not args.peer_cmd:
        if args.model == "smolvlm":
            args.model_dir = ensure_smolvlm(Path(args.cache_dir).expanduser(), args.seed)
        elif args.model != "default":
            args.model_dir = Path(args.model)
    if args.label is None:
        who = (
            "peer"
            if args.peer_cmd
            else f"vlmserve-{args.model if args.model in ('smolvlm', 'default') else Path(args.model).name}"
            f"-{args.dtype}"
        )
        args.label = f"{who}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.plot:
        out_dir.mkdir(parents=True, exist_ok=True)
        plot([json.loads(Path(p).read_text()) for p in args.plot], out_dir / f"{args.label}.png")
        return
    report = run_benchmark(args)
    plot([report], out_dir / f"{args.label}.png")


if __name__ == "__main__":
    main()
