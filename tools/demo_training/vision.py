"""Stage 2: the vision tower and mlp1 learn to produce the scene code from rendered pictures."""

from __future__ import annotations

import argparse
import logging
import math
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from demo_training.language import greedy_answer, packed_lm, report_accuracy
from demo_training.loop import run_steps, shuffled_batches
from demo_training.scene_code import (
    COLOUR_IDS,
    KIND_IDS,
    PromptBuilder,
    SceneCode,
    code_candidates,
    scene_indices,
)
from vlmserve.demo import shapes
from vlmserve.inputs.nemotron_vl import NemotronVLProcessor

logger = logging.getLogger("train_demo_model")


def render_pool(
    processor: NemotronVLProcessor, rng: random.Random, count: int
) -> tuple[list[shapes.Scene], torch.Tensor]:
    """`count` rendered pictures, preprocessed as the server does (one tile each), kept in float16:
    the vision stages go over them several times (rendering costs about half a training step)."""
    scenes = [shapes.random_scene(rng) for _ in range(count)]
    pixels = torch.empty(count, 3, processor.tile_size, processor.tile_size, dtype=torch.float16)
    for i, scene in enumerate(scenes):
        pixels[i] = processor.preprocess(shapes.render(scene, rng), max_tiles=1)[0]
    return scenes, pixels


class CodeTargets:
    """The stage-1 code as targets for the vision stages: for each picture token the index of its
    code vector among the candidates, and the losses of an output against them."""

    def __init__(self, code: SceneCode, grid: int, temperature: float) -> None:
        self.grid = grid
        self.temperature = temperature
        with torch.no_grad():
            candidates, choices = code_candidates(code, grid)
            self.scale = candidates.pow(2).sum(-1).mean().sqrt()
            self.candidates = candidates / self.scale  # [T, A, H]
        self.lookup = {tuple(c): i for i, c in enumerate(choices.tolist())}

    def indices(self, scenes: list[shapes.Scene]) -> torch.Tensor:
        return torch.stack([scene_indices(s, self.grid) for s in scenes])  # [B, T, 4]

    def answers(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[self.lookup[tuple(t[:3])] for t in row] for row in indices.tolist()])

    def losses(self, output: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """output [B, T, H] (mlp1's, unscaled), answer [B, T] -> (squared error to the right code
        vector, cross entropy over the candidates by negative squared distance, nearest-is-right)."""
        output = output / self.scale
        tokens = torch.arange(answer.shape[1])
        target = self.candidates[tokens, answer]
        regression = (output - target).pow(2).sum(-1).mean()
        distance = (
            output.pow(2).sum(-1, keepdim=True)
            - 2 * torch.einsum("bth,tah->bta", output, self.candidates)
            + self.candidates.pow(2).sum(-1)
        )
        logits = -distance / self.temperature
        nearest = F.cross_entropy(logits.flatten(0, 1), answer.flatten())
        return regression, nearest, (logits.argmax(-1) == answer).float().mean().item()


def train_vision(
    model: nn.Module,
    code: SceneCode,
    row_embeds: torch.Tensor,
    builder: PromptBuilder,
    args: argparse.Namespace,
) -> None:
    """Stage 2: the tower and mlp1 learn to produce the scene code from rendered pictures, in four
    steps that each learn fast: (a) the tower alone, with per-token classifiers (the colour and kind
    of the token's quadrant, the shape count, the token's place) on its shuffled features; (b) mlp1
    alone, on the frozen tower's features computed once, regressing to the code; (c) both together
    with all the losses; (d) mlp1 (and the tower with --answer-tower) with the answer loss through
    the frozen language model. The classifiers are dropped after training."""
    grid = math.isqrt(builder.processor.tokens_per_tile)
    targets = CodeTargets(code, grid, args.code_temperature)
    rng = random.Random(args.seed + 1000)
    started = time.monotonic()
    scenes, pixels = render_pool(builder.processor, rng, args.pool_size)
    held_scenes, held_pixels = render_pool(builder.processor, rng, args.held_out)
    logger.info(
        "rendered %d + %d pictures in %.1f s", len(scenes), len(held_scenes), time.monotonic() - started
    )
    width = model.mlp1[0].normalized_shape[0]
    torch.manual_seed(args.seed)  # the classifiers' initial weights: the only draws from torch's global RNG
    heads = nn.ModuleList(
        [
            nn.Linear(width, len(COLOUR_IDS) + 1),
            nn.Linear(width, len(KIND_IDS) + 1),
            nn.Linear(width, len(shapes.POSITIONS)),
            nn.Linear(width, grid * grid),
            nn.Linear(width, len(COLOUR_IDS) + 1),
            nn.Linear(width, len(KIND_IDS) + 1),
        ]
    )
    place = torch.arange(grid * grid)
    half = grid // 2
    corner = torch.tensor([q_row * half * grid + q_col * half for q_row in range(2) for q_col in range(2)])

    def classifier_loss(features: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        labels = [indices[..., 0], indices[..., 1], indices[..., 2], place.expand_as(indices[..., 0])]
        # each quadrant's tokens pooled: what the quadrant holds, wherever in it the shape is
        pooled = features.view(len(features), 2, half, 2, half, -1).mean(dim=(2, 4)).flatten(1, 2)
        labels += [indices[:, corner, 0], indices[:, corner, 1]]
        inputs = [features] * 4 + [pooled] * 2
        losses, right = [], []
        for head, label, x in zip(heads, labels, inputs, strict=True):
            logits = head(x)
            losses.append(F.cross_entropy(logits.flatten(0, 1), label.flatten()))
            right.append((logits.argmax(-1) == label).float().mean().item())
        return sum(losses), right  # type: ignore[return-value]

    generator = torch.Generator().manual_seed(args.seed)

    def batches(steps: int, size: int):
        for batch in shuffled_batches(len(scenes), steps, size, generator):
            yield [scenes[i] for i in batch.tolist()], pixels[batch].float()

    tower = list(model.vision_model.parameters())
    for p in tower + list(model.mlp1.parameters()):
        p.requires_grad_(True)

    # (a) the tower learns what each token's quadrant holds
    model.vision_model.train()
    optimizer = torch.optim.AdamW([*tower, *heads.parameters()], lr=args.lr_vision, weight_decay=0.01)
    run_steps(
        "classify",
        optimizer,
        args.lr_vision,
        args.steps_classify,
        args.minutes_classify,
        batches(args.steps_classify, args.images_per_step),
        lambda batch: classifier_loss(
            model.shuffled_features(batch[1]).view(len(batch[0]), grid * grid, -1), targets.indices(batch[0])
        ),
    )
    # (b) mlp1 learns the code from the frozen tower's features
    model.vision_model.eval()
    with torch.no_grad():
        features = torch.cat(
            [
                model.shuffled_features(pixels[i : i + 64].float()).view(-1, grid * grid, width)
                for i in range(0, len(scenes), 64)
            ]
        )
    answers = targets.answers(targets.indices(scenes))
    optimizer = torch.optim.AdamW(model.mlp1.parameters(), lr=args.lr_projector, weight_decay=0.01)

    def projector_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
        regression, nearest, right = targets.losses(model.mlp1(batch[0]), batch[1])
        return regression + nearest, [regression.item(), right]

    run_steps(
        "project",
        optimizer,
        args.lr_projector,
        args.steps_project,
        args.minutes_project,
        (
            (features[b], answers[b])
            for b in shuffled_batches(len(scenes), args.steps_project, 256, generator)
        ),
        projector_loss,
    )
    held_out_check(model, targets, held_scenes, held_pixels, "after project")
    # (c) both together
    model.vision_model.train()
    params = [*tower, *model.mlp1.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr_joint, weight_decay=0.01)

    def joint_loss(batch: tuple[list[shapes.Scene], torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
        indices = targets.indices(batch[0])
        features = model.shuffled_features(batch[1]).view(len(batch[0]), grid * grid, -1)
        regression, nearest, right = targets.losses(model.mlp1(features), targets.answers(indices))
        aux, _ = classifier_loss(features, indices)
        return regression + nearest + args.aux_weight * aux, [regression.item(), right]

    run_steps(
        "joint",
        optimizer,
        args.lr_joint,
        args.steps_joint,
        args.minutes_joint,
        batches(args.steps_joint, args.images_per_step),
        joint_loss,
    )
    model.eval().requires_grad_(False)
    held_out_check(model, targets, held_scenes, held_pixels, "after joint")
    # (d) the answer loss through the frozen language model: the code as the language model reads it
    # from the tower's real, imperfect features (which, with --answer-tower, the tower adapts too)
    packed = packed_lm(model, builder, args)
    answer_params = [*model.mlp1.parameters(), *(tower if args.answer_tower else [])]
    for p in answer_params:
        p.requires_grad_(True)
    if args.answer_tower:
        model.vision_model.train()
    optimizer = torch.optim.AdamW(answer_params, lr=args.lr_answer, weight_decay=0.01)
    questions_rng = random.Random(args.seed + 2000)

    def answer_loss(batch: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        with torch.set_grad_enabled(args.answer_tower):
            features = model.shuffled_features(pixels[batch].float()).view(len(batch), grid * grid, -1)
        examples = [
            [builder.example(scenes[i], q) for q in shapes.questions(scenes[i], questions_rng)]
            for i in batch.tolist()
        ]
        loss, accuracy = packed.loss(examples, model.mlp1(features), row_embeds)
        return loss, [accuracy]

    run_steps(
        "answer",
        optimizer,
        args.lr_answer,
        args.steps_answer,
        args.minutes_answer,
        shuffled_batches(len(scenes), args.steps_answer, args.scenes_per_step, generator),
        answer_loss,
    )
    model.eval().requires_grad_(False)
    held_out_check(model, targets, held_scenes, held_pixels, "after answer")
    check = random.Random(args.seed + 700)
    answers_out = []
    for _ in range(args.check_scenes):
        scene = shapes.random_scene(check)
        with torch.no_grad():
            embeds = model.embed_images(
                builder.processor.preprocess(shapes.render(scene, check), max_tiles=1)
            )
        for question in shapes.questions(scene, check):
            example = builder.example(scene, question)
            answers_out.append(
                (example, question, greedy_answer(model, builder, example, embeds, row_embeds))
            )
    report_accuracy("whole model (vision + code rows)", answers_out)


@torch.no_grad()
def held_out_check(model, targets: CodeTargets, scenes, pixels, label: str) -> None:
    model.vision_model.eval()
    features = model.shuffled_features(pixels.float()).view(len(scenes), targets.grid**2, -1)
    regression, _, right = targets.losses(model.mlp1(features), targets.answers(targets.indices(scenes)))
    logger.info("%s: held-out relative error %.4f nearest-code acc %.4f", label, regression.item(), right)
