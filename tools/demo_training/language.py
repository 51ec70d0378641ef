"""The frozen language model for training: answer losses over packed questions, greedy answers, and
the accuracy report."""

from __future__ import annotations

import argparse
import logging
import random

import torch
import torch.nn.functional as F
from torch import nn

from demo_training.scene_code import Example, PromptBuilder
from vlmserve.demo import shapes
from vlmserve.layers.rotary import apply_rotary_emb

logger = logging.getLogger("train_demo_model")


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


def packed_lm(model: nn.Module, builder: PromptBuilder, args: argparse.Namespace) -> PackedLM:
    """The frozen language model batched for answer losses, with the served prompt's fixed prefix."""
    probe = builder.example(shapes.random_scene(random.Random(0)), shapes.Question("count", "How many?"))
    row_ids = [builder.processor.image_start_id, builder.processor.image_end_id]
    return PackedLM(
        model, probe.input_ids[: probe.image_offset - 1], row_ids, token_weights(builder.tokenizer, args)
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


def token_weights(tokenizer, args: argparse.Namespace) -> torch.Tensor:
    """Loss weight per target token id: --key-weight for the words that carry the answer (colours,
    kinds, numbers, positions), 1 for the rest of the phrasing."""
    words = [*shapes.COLOURS, *shapes.KINDS, *shapes.NUMBER_WORDS, "top", "bottom", "left", "right"]
    weights = torch.ones(len(tokenizer))
    for word in words:
        for variant in (word, word.capitalize()):
            for text in (" " + variant, variant):
                weights[tokenizer.encode(text, add_special_tokens=False)[0]] = args.key_weight
    return weights
