"""Accuracy of the demo model per question type, on held-out pictures, through a real server.

    python -m vlmserve.demo.evaluate [--samples 100] [--model DIR] [--json out.json]

Starts `vlmserve serve` on 127.0.0.1 (the built-in demo model unless --model is given), renders
`--samples` pictures from seed 2 (training and its checks draw from other seeds), asks each picture
one question of every type (vlmserve.demo.shapes) as a PNG data URL with greedy decoding, grades each
answer by its words and prints the accuracy per type and overall. Exit status 0; the figures are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from vlmserve.demo import shapes

EVAL_SEED = 2


@dataclass(frozen=True, slots=True)
class Case:
    scene: shapes.Scene
    question: shapes.Question
    image_url: str


def held_out_cases(samples: int, seed: int = EVAL_SEED) -> list[Case]:
    """`samples` pictures (shape counts cycling 1-4), each with one question of every type."""
    rng = random.Random(seed)
    cases = []
    for index in range(samples):
        scene = shapes.random_scene(rng, num_shapes=index % 4 + 1)
        url = png_data_url(shapes.render(scene, rng))
        cases.extend(Case(scene, question, url) for question in shapes.questions(scene, rng))
    return cases


def png_data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(case: Case, model: str) -> dict[str, Any]:
    content = [
        {"type": "image_url", "image_url": {"url": case.image_url}},
        {"type": "text", "text": case.question.text},
    ]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 48,
    }


async def ask_all(base_url: str, cases: list[Case], concurrency: int) -> list[str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        limit = asyncio.Semaphore(concurrency)

        async def ask(case: Case) -> str:
            async with limit:
                response = await client.post("/v1/chat/completions", json=chat_body(case, model))
                response.raise_for_status()
                return response.json()["choices"][0]["message"]["content"]

        return list(await asyncio.gather(*(ask(case) for case in cases)))


def score(cases: list[Case], right: list[bool]) -> dict[str, dict[str, float]]:
    """Per type and overall: {"correct", "total", "accuracy"}, from each case's grade."""
    table: dict[str, dict[str, float]] = {t: {"correct": 0, "total": 0} for t in shapes.QUESTION_TYPES}
    for case, ok in zip(cases, right, strict=True):
        row = table[case.question.type]
        row["total"] += 1
        row["correct"] += ok
    table["overall"] = {
        "correct": sum(r["correct"] for r in table.values()),
        "total": sum(r["total"] for r in table.values()),
    }
    for row in table.values():
        row["accuracy"] = row["correct"] / row["total"] if row["total"] else 0.0
    return table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: argparse.Namespace, log: Any) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, "-m", "vlmserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if args.model:
        command += ["--model", str(args.model)]
    if args.cache_dir:
        command += ["--cache-dir", str(args.cache_dir)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}; log: {log.name}")
        try:
            if httpx.get(base_url + "/v1/health/ready", timeout=2).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit(f"the server was not ready within {args.start_timeout} s; log: {log.name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Accuracy of the demo model per question type.")
    parser.add_argument("--samples", type=int, default=100, help="pictures (5 questions each)")
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: the built-in demo model)")
    parser.add_argument("--cache-dir", type=Path, help="where the demo model is assembled")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, help="also write the table and every answer here")
    parser.add_argument("--show-errors", type=int, default=0, help="print this many wrong answers")
    args = parser.parse_args(argv)
    cases = held_out_cases(args.samples)
    with tempfile.NamedTemporaryFile("w", prefix="vlmserve-eval-", suffix=".log", delete=False) as log:
        process, base_url = _serve(args, log)
        try:
            started = time.monotonic()
            answers = asyncio.run(ask_all(base_url, cases, args.concurrency))
            elapsed = time.monotonic() - started
        finally:
            process.terminate()
            process.wait(30)
    right = [shapes.grade(c.scene, c.question, a) for c, a in zip(cases, answers, strict=True)]
    table = score(cases, right)
    print(f"{'type':<12} {'correct':>8} {'total':>6} {'accuracy':>9}")
    for name, row in table.items():
        print(f"{name:<12} {int(row['correct']):>8} {int(row['total']):>6} {row['accuracy']:>9.1%}")
    print(f"{len(cases)} questions in {elapsed:.0f} s (seed {EVAL_SEED}, {args.samples} pictures)")
    wrong = [(c, a) for c, a, ok in zip(cases, answers, right, strict=True) if not ok]
    for case, answer in wrong[: args.show_errors]:
        print(f"- {shapes.describe(case.scene)} | {case.question.text} -> {answer!r}")
    if args.json:
        records = [
            {
                "scene": shapes.describe(c.scene),
                "question": c.question.text,
                "type": c.question.type,
                "answer": a,
                "correct": ok,
            }
            for c, a, ok in zip(cases, answers, right, strict=True)
        ]
        args.json.write_text(json.dumps({"table": table, "answers": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
