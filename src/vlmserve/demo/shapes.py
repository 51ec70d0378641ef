"""Seeded synthetic scenes for the built-in demo model: one to four coloured shapes on a background.

A scene puts each shape in its own quadrant of the picture (top left, top right, bottom left, bottom
right), with no two shapes of one colour or one kind, so every question below has one right answer.
Pictures vary in size (96 to 768 pixels a side), aspect ratio (1:2.5 to 2.5:1), background (plain or
noisy, light or dark) and shape size and placement inside the quadrant.

Questions cover five types: colour, shape, count, position and a one-sentence description. `grade`
checks a free-text answer by its words, since the frozen language model phrases answers its own way.
Everything here is pure Python + Pillow + numpy: training, evaluation and tests share it.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 25),
    "purple": (135, 45, 170),
    "orange": (245, 125, 20),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "description")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")

_MIN_SIDE, _MAX_SIDE = 96, 768
_MAX_ASPECT = 2.5


@dataclass(frozen=True, slots=True)
class Shape:
    colour: str
    kind: str
    position: str


@dataclass(frozen=True, slots=True)
class Scene:
    """What a picture shows; shapes are in POSITIONS order."""

    width: int
    height: int
    shapes: tuple[Shape, ...]


@dataclass(frozen=True, slots=True)
class Question:
    type: str
    text: str
    # the shape asked about (colour, shape and position questions)
    shape: Shape | None = None


def random_scene(rng: random.Random, *, num_shapes: int | None = None) -> Scene:
    """A scene with `num_shapes` (default: 1 to 4 at random) distinct shapes in distinct quadrants."""
    count = num_shapes if num_shapes is not None else rng.randint(1, 4)
    if not 1 <= count <= len(POSITIONS):
        raise ValueError(f"num_shapes must be 1 to {len(POSITIONS)}, got {count}")
    positions = sorted(rng.sample(range(len(POSITIONS)), count))
    colours = rng.sample(list(COLOURS), count)
    kinds = rng.sample(KINDS, count)
    shapes = tuple(
        Shape(colour, kind, POSITIONS[pos])
        for pos, colour, kind in zip(positions, colours, kinds, strict=True)
    )
    aspect = math.exp(rng.uniform(-math.log(_MAX_ASPECT), math.log(_MAX_ASPECT)))
    long_side = rng.randint(160, _MAX_SIDE)
    short_side = max(_MIN_SIDE, round(long_side / max(aspect, 1 / aspect)))
    width, height = (long_side, short_side) if aspect >= 1 else (short_side, long_side)
    return Scene(width, height, shapes)


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """An RGB picture of `scene`: background, then each shape inside its quadrant."""
    image = _background(scene.width, scene.height, rng)
    draw = ImageDraw.Draw(image)
    half_w, half_h = scene.width / 2, scene.height / 2
    for shape in scene.shapes:
        index = POSITIONS.index(shape.position)
        left, top = (index % 2) * half_w, (index // 2) * half_h
        # the shape's box: 45-80% of the quadrant's shorter side, kept inside the quadrant
        side = min(half_w, half_h) * rng.uniform(0.45, 0.8)
        cx = left + rng.uniform(side / 2 + 0.05 * half_w, half_w - side / 2 - 0.05 * half_w)
        cy = top + rng.uniform(side / 2 + 0.05 * half_h, half_h - side / 2 - 0.05 * half_h)
        _draw_shape(draw, shape, cx, cy, side / 2, rng)
    return image


def _background(width: int, height: int, rng: random.Random) -> Image.Image:
    light = rng.random() < 0.75
    base = [rng.randint(200, 250) if light else rng.randint(10, 60) for _ in range(3)]
    if rng.random() < 0.5:
        return Image.new("RGB", (width, height), tuple(base))
    noise_rng = np.random.default_rng(rng.getrandbits(32))
    noise = noise_rng.standard_normal((height, width, 3), dtype=np.float32)
    noise *= rng.uniform(6.0, 22.0)
    noise += np.asarray(base, dtype=np.float32)
    pixels = np.clip(noise, 0, 255, out=noise).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: Shape, cx: float, cy: float, r: float, rng: random.Random
) -> None:
    jitter = [rng.randint(-12, 12) for _ in range(3)]
    fill = tuple(int(min(255, max(0, c + j))) for c, j in zip(COLOURS[shape.colour], jitter, strict=True))
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape.kind == "star":
        points = []
        for i in range(10):
            angle = -math.pi / 2 + i * math.pi / 5
            radius = r if i % 2 == 0 else r * 0.42
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")


def describe(scene: Scene) -> str:
    """The one-sentence description of a scene, e.g. "There are two shapes: a red circle at the top
    left and a blue square at the bottom right." """
    parts = [f"a {s.colour} {s.kind} at the {s.position}" for s in scene.shapes]
    count = len(parts)
    if count == 1:
        return f"There is one shape: {parts[0]}."
    listed = ", ".join(parts[:-1]) + f" and {parts[-1]}"
    return f"There are {NUMBER_WORDS[count]} shapes: {listed}."


def questions(scene: Scene, rng: random.Random) -> list[Question]:
    """One question of each type about `scene` (the shape asked about is picked with `rng`)."""
    target = rng.choice(scene.shapes)
    single = len(scene.shapes) == 1
    colour = "What colour is the shape?" if single else f"What colour is the {target.kind}?"
    shape = "What shape is in the image?" if single else f"What shape is the {target.colour} one?"
    return [
        Question("colour", colour, target),
        Question("shape", shape, target),
        Question("count", "How many shapes are there?"),
        Question("position", f"Where is the {target.colour} {target.kind}?", target),
        Question("description", "Describe the image in one sentence."),
    ]


def grade(scene: Scene, question: Question, answer: str) -> bool:
    """Whether a free-text `answer` to `question` about `scene` is right, judged by its words."""
    words = _words(answer)
    if question.type == "count":
        said = {n for n, word in enumerate(NUMBER_WORDS) if word in words} | {
            int(w) for w in words if w.isdigit()
        }
        return said == {len(scene.shapes)}
    if question.type == "description":
        colours = _named(words, list(COLOURS))
        kinds = _named(words, KINDS)
        return colours == {s.colour for s in scene.shapes} and kinds == {s.kind for s in scene.shapes}
    target = question.shape
    if target is None:
        raise ValueError(f"a {question.type} question needs the shape it asks about")
    if question.type == "colour":
        return _named(words, list(COLOURS)) == {target.colour}
    if question.type == "shape":
        return _named(words, KINDS) == {target.kind}
    if question.type == "position":
        vertical, horizontal = target.position.split()
        wrong = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}
        return {vertical, horizontal} <= words and not {wrong[vertical], wrong[horizontal]} & words
    raise ValueError(f"unknown question type {question.type!r}")


def _words(text: str) -> set[str]:
    words = set(re.findall(r"[a-z0-9]+", text.lower()))
    # plurals and the American spelling count as the word
    return words | {w[:-1] for w in words if w.endswith("s")} | ({"colour"} if "color" in words else set())


def _named(words: set[str], vocabulary: list[str] | tuple[str, ...]) -> set[str]:
    return {name for name in vocabulary if name in words}
