"""The stage-1 scene code (what each image token of a one-tile picture stands for) and the training
examples in the served prompt layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlmserve.demo import shapes
from vlmserve.inputs.chat_template import render_chat
from vlmserve.inputs.content import ParsedMessage
from vlmserve.inputs.nemotron_vl import NemotronVLProcessor, ProcessedImage
from vlmserve.inputs.tokenizer import load_tokenizer
from vlmserve.protocol.types import ImagePart

_SENTINEL = "<|vlmserve-train-image|>"
COLOUR_IDS = {name: i + 1 for i, name in enumerate(shapes.COLOURS)}  # 0: empty quadrant
KIND_IDS = {name: i + 1 for i, name in enumerate(shapes.KINDS)}


@dataclass
class Example:
    """One question about one scene, as token ids in the served prompt layout."""

    input_ids: list[int]  # prompt + answer (the image span holds <image> ids)
    answer_start: int  # first answer position in input_ids
    image_offset: int  # first <image> position
    scene: shapes.Scene


def scene_indices(scene: shapes.Scene, grid: int) -> torch.Tensor:
    """[grid * grid, 4] (colour id, kind id, count - 1, role) for each image token of a one-tile
    picture; role: the token's place inside its quadrant's block of tokens."""
    by_position = {shape.position: shape for shape in scene.shapes}
    half = grid // 2
    rows = []
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        quadrant = shapes.POSITIONS[(row // half) * 2 + col // half]
        shape = by_position.get(quadrant)
        colour = COLOUR_IDS[shape.colour] if shape else 0
        kind = KIND_IDS[shape.kind] if shape else 0
        rows.append((colour, kind, len(scene.shapes) - 1, (row % half) * half + col % half))
    return torch.tensor(rows, dtype=torch.long)


class SceneCode(nn.Module):
    """The stage-1 table: scene indices [B, T, 4] -> image-token embeddings [B, T, hidden].

    Token i = base[i] (where it is) + content[role, colour, kind] (what its quadrant holds, one vector
    per colour-and-kind pair, so the pair is bound in one vector) + count[role, shapes in the picture].
    """

    def __init__(self, roles: int, hidden: int, init: torch.Tensor) -> None:
        super().__init__()
        self.base = nn.Parameter(init.clone())  # [T, hidden]
        self.content = nn.Parameter(torch.zeros(roles, len(COLOUR_IDS) + 1, len(KIND_IDS) + 1, hidden))
        self.count = nn.Parameter(torch.zeros(roles, len(shapes.POSITIONS), hidden))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        colour, kind, count, role = indices.unbind(-1)
        return self.base + self.content[role, colour, kind] + self.count[role, count]


def answer_text(scene: shapes.Scene, question: shapes.Question) -> str:
    """The training answer to a question (the served model phrases it this way)."""
    single = len(scene.shapes) == 1
    target = question.shape
    if question.type == "colour":
        return f"The {'shape' if single else target.kind} is {target.colour}."
    if question.type == "shape":
        return f"It is a {target.kind}."
    if question.type == "count":
        n = len(scene.shapes)
        return f"There {'is' if n == 1 else 'are'} {shapes.NUMBER_WORDS[n]} shape{'' if n == 1 else 's'}."
    if question.type == "position":
        return f"It is at the {target.position}."
    listed = [f"a {s.colour} {s.kind}" for s in scene.shapes]
    text = listed[0] if single else ", ".join(listed[:-1]) + " and " + listed[-1]
    return text[0].upper() + text[1:] + "."


class PromptBuilder:
    """Served-format token ids for (scene, question, answer), through the server's own template and
    processor code, so training sees exactly what the server will feed the model."""

    def __init__(self, model_dir: Path, hf_config: dict) -> None:
        self.tokenizer = load_tokenizer(model_dir)
        self.processor = NemotronVLProcessor(hf_config, self.tokenizer, max_tiles=1)
        size = self.processor.tile_size
        self._image = ProcessedImage(torch.zeros(1, 3, size, size), 1, "train")
        self.end_ids = self.tokenizer.encode("<|im_end|>", add_special_tokens=False)

    def example(self, scene: shapes.Scene, question: shapes.Question) -> Example:
        message = ParsedMessage("user", [ImagePart(url="data:"), question.text])
        text = render_chat(self.tokenizer, [message], sentinel=_SENTINEL, completion_mode=False)
        prompt_ids, images = self.processor.build_prompt(text, _SENTINEL, [self._image])
        answer = self.tokenizer.encode(answer_text(scene, question), add_special_tokens=False)
        return Example([*prompt_ids, *answer, *self.end_ids], len(prompt_ids), images[0].offset, scene)


def code_candidates(code: SceneCode, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every code vector each token can take: [T, A, hidden], and the (colour, kind, count) index
    triple of each of the A choices [A, 3]."""
    choices = torch.tensor(
        [
            (c, k, n)
            for c in range(len(COLOUR_IDS) + 1)
            for k in range(len(KIND_IDS) + 1)
            for n in range(len(shapes.POSITIONS))
        ]
    )
    # every token's role is fixed by its place in the grid: take it from any scene
    roles = scene_indices(shapes.Scene(1, 1, ()), grid)[:, 3]
    indices = torch.cat(
        [choices.expand(grid * grid, -1, -1), roles[:, None, None].expand(-1, len(choices), 1)], dim=-1
    )
    return code.base[:, None] + code.content[indices[..., 3], indices[..., 0], indices[..., 1]] + code.count[
        indices[..., 3], indices[..., 2]
    ], choices
