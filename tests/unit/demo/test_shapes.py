"""The demo model's synthetic scenes: seeded, well-formed, rendered where they say, graded fairly."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vlmserve.demo import shapes
from vlmserve.demo.shapes import Question, Scene, Shape


def test_same_seed_same_scenes_and_pixels() -> None:
    first, second = random.Random(7), random.Random(7)
    for _ in range(5):
        a, b = shapes.random_scene(first), shapes.random_scene(second)
        assert a == b
        assert np.array_equal(np.asarray(shapes.render(a, first)), np.asarray(shapes.render(b, second)))


def test_scenes_are_well_formed() -> None:
    rng = random.Random(3)
    counts = set()
    for _ in range(300):
        scene = shapes.random_scene(rng)
        count = len(scene.shapes)
        counts.add(count)
        assert len({s.colour for s in scene.shapes}) == count == len({s.kind for s in scene.shapes})
        assert [s.position for s in scene.shapes] == sorted(
            {s.position for s in scene.shapes}, key=shapes.POSITIONS.index
        )
        assert min(scene.width, scene.height) >= 96 and max(scene.width, scene.height) <= 768
        assert max(scene.width, scene.height) / min(scene.width, scene.height) <= 2.5 + 0.05
    assert counts == {1, 2, 3, 4}


def test_each_shape_is_drawn_in_its_quadrant_in_its_colour() -> None:
    rng = random.Random(11)
    for _ in range(20):
        scene = shapes.random_scene(rng)
        pixels = np.asarray(shapes.render(scene, rng)).astype(int)
        h, w = pixels.shape[:2]
        for index, position in enumerate(shapes.POSITIONS):
            quadrant = pixels[
                (index // 2) * h // 2 : (index // 2 + 1) * h // 2,
                (index % 2) * w // 2 : (index % 2 + 1) * w // 2,
            ].reshape(-1, 3)
            present = [s for s in scene.shapes if s.position == position]
            for name, rgb in shapes.COLOURS.items():
                near = (np.abs(quadrant - np.array(rgb)).max(axis=1) <= 14).mean()
                if present and present[0].colour == name:
                    assert near > 0.03, (scene, position, name)
                else:
                    assert near < 0.01, (scene, position, name)


def test_render_respects_size_and_mode() -> None:
    scene = shapes.random_scene(random.Random(5), num_shapes=2)
    image = shapes.render(scene, random.Random(5))
    assert image.size == (scene.width, scene.height) and image.mode == "RGB"
    with pytest.raises(ValueError):
        shapes.random_scene(random.Random(5), num_shapes=5)


def test_description_names_every_shape() -> None:
    scene = Scene(300, 200, (Shape("red", "circle", "top left"), Shape("blue", "square", "bottom right")))
    assert shapes.describe(scene) == (
        "There are two shapes: a red circle at the top left and a blue square at the bottom right."
    )
    one = Scene(300, 200, (Shape("green", "star", "top right"),))
    assert shapes.describe(one) == "There is one shape: a green star at the top right."


def test_questions_cover_every_type_and_name_their_shape() -> None:
    scene = Scene(300, 200, (Shape("red", "circle", "top left"), Shape("blue", "square", "bottom right")))
    questions = shapes.questions(scene, random.Random(0))
    assert [q.type for q in questions] == list(shapes.QUESTION_TYPES)
    target = questions[0].shape
    assert target in scene.shapes and target.kind in questions[0].text


CASES = [
    ("colour", "The circle is red.", True),
    ("colour", "It is RED, not blue.", False),
    ("colour", "The circle is a blue square.", False),
    ("shape", "It is a circle.", True),
    ("shape", "Circles.", True),
    ("shape", "A square.", False),
    ("count", "There are two shapes.", True),
    ("count", "2", True),
    ("count", "There are three shapes.", False),
    ("count", "Two shapes, one red and one blue.", False),
    ("position", "It is at the top left.", True),
    ("position", "Top right.", False),
    ("position", "At the top left, not the bottom.", False),
    ("description", "A red circle and a blue square.", True),
    ("description", "A red circle.", False),
    ("description", "A red circle, a blue square and a green star.", False),
]


@pytest.mark.parametrize(("kind", "answer", "right"), CASES)
def test_grade(kind: str, answer: str, right: bool) -> None:
    circle = Shape("red", "circle", "top left")
    scene = Scene(300, 200, (circle, Shape("blue", "square", "bottom right")))
    question = Question(kind, "?", circle if kind in ("colour", "shape", "position") else None)
    assert shapes.grade(scene, question, answer) is right
