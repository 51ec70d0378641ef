"""Logits -> next tokens for all the requests sampled in a step, in one pass over [N, vocab].

In order: logit bias, the allowed-token mask (structured output), repetition/presence/frequency
penalties, then (logprobs are read here: the model's distribution as adjusted, before temperature)
temperature, top-k, top-p, min-p, and the draw. Per-row settings become [N] tensors, so every stage
is one batched op whatever the mix. Only the random draw is per row: each row draws its noise from
its own request's generator (exponential race, below), so a seeded request gets the same tokens
whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmserve.protocol.types import SamplingParams, TokenLogprob


@dataclass(slots=True)
class SampleResult:
    token_id: int
    # None unless the request asked for logprobs
    logprob: TokenLogprob | None


@dataclass(frozen=True, slots=True)
class SamplingMetadata:
    """The per-row inputs of one `Sampler.sample` call: row i of the logits belongs to the request
    whose settings, generated tokens and generator are entry i of each list."""

    params: Sequence[SamplingParams]
    # the tokens each request generated so far (penalties count them)
    output_token_ids: Sequence[Sequence[int]]
    generators: Sequence[torch.Generator]
    # [N, vocab] bool on the logits' device, True = may be sampled (structured output); applied
    # after the logit bias, before penalties. None: every token allowed in every row
    allowed_token_mask: torch.Tensor | None = None


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator for one request: seeded when the request gives a seed, else from OS entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        # torch seeds are unsigned 64-bit; map the signed int64 range of the API onto them
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Adds each row's (token_id, bias) pairs. logits: [N, vocab]. Ids outside the vocabulary are
    skipped (the front end refuses them; a bad index on the device would kill every request)."""
    vocab_size = logits.shape[1]
    entries = [
        (row, token_id, bias)
        for row, p in enumerate(params)
        for token_id, bias in p.logit_bias
        if 0 <= token_id < vocab_size
    ]
    if not entries:
        return logits
    rows, token_ids, biases = zip(*entries, strict=True)
    index = (_tensor(rows, torch.long, logits), _tensor(token_ids, torch.long, logits))
    return logits.index_put(index, _tensor(biases, logits.dtype, logits), accumulate=True)


def apply_penalties(
    logits: torch.Tensor, output_token_ids: Sequence[Sequence[int]], params: Sequence[SamplingParams]
) -> torch.Tensor:
    """Repetition (multiplicative, as in CTRL/HF), presence and frequency (additive, as in OpenAI)
    penalties over each row's generated tokens. logits: [N, vocab] float32."""
    rows = [
        row
        for row, p in enumerate(params)
        if output_token_ids[row]
        and (p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty)
    ]
    if not rows:
        return logits
    # counts [n, V] of each token in each row's output: a scatter of ones over the ids padded with
    # id 0 of weight 0
    lengths = [len(output_token_ids[row]) for row in rows]
    max_len = max(lengths)
    ids = [[*output_token_ids[row], *[0] * (max_len - n)] for row, n in zip(rows, lengths, strict=True)]
    weights = [[1.0] * n + [0.0] * (max_len - n) for n in lengths]
    counts = torch.zeros(len(rows), logits.shape[1], dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, _tensor(ids, torch.long, logits), _tensor(weights, logits.dtype, logits))
    seen = counts > 0
    row_index = _tensor(rows, torch.long, logits)
    selected = logits[row_index]  # [n, V]
    repetition = _column([params[row].repetition_penalty for row in rows], logits)
    penalised = torch.where(selected > 0, selected / repetition, selected * repetition)
    selected = torch.where(seen, penalised, selected)
    selected = selected - _column([params[row].frequency_penalty for row in rows], logits) * counts
    selected = selected - _column([params[row].presence_penalty for row in rows], logits) * seen
    return logits.index_copy(0, row_index, selected)


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Masks with -inf, per row, everything outside the top-k, then outside the top-p nucleus, then
    below min_p times the most likely token's probability (the HF warpers' order).

    logits [n, V]; top_k [n] int64 (V: off), top_p [n] (1.0: off), min_p [n] (0.0: off). Ties with the
    k-th logit stay; the most likely token always stays."""
    vocab_size = logits.shape[1]
    use_top_k, use_top_p = bool((top_k < vocab_size).any()), bool((top_p < 1.0).any())
    if use_top_k or use_top_p:
        sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)
        if use_top_k:
            kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))  # [n, 1]
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        if use_top_p:
            probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the mass before it already reaches top_p (rows with top_p 1.0 drop
            # nothing, whatever the rounding of the cumulative sum)
            mass_before = torch.cumsum(probs, dim=-1) - probs
            drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
            drop[:, 0] = False
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)
    if bool((min_p > 0.0).any()):
        probs = torch.softmax(logits, dim=-1)
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


class Sampler:
    """Chooses the next token of every sampled request from its logits row."""

    def sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> list[SampleResult]:
        """logits: [N, vocab] for the last position of each request -> N results, in row order.
        Greedy (argmax) for rows with temperature 0."""
        params = metadata.params
        logits = apply_logit_bias(logits.float(), params)
        if metadata.allowed_token_mask is not None:
            logits = logits.masked_fill(~metadata.allowed_token_mask, float("-inf"))
        logits = apply_penalties(logits, metadata.output_token_ids, params)
        token_ids = self._draw(logits, metadata)  # [N] int64
        logprobs = self._logprobs(logits, token_ids, params)
        return [
            SampleResult(token_id, logprob)
            for token_id, logprob in zip(token_ids.tolist(), logprobs, strict=True)
        ]

    @staticmethod
    def _draw(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Argmax for greedy rows; for the others an exponential race over the filtered
        distribution: argmax(probs / E) with E ~ Exponential(1) per token picks token i with
        probability probs[i] (the Gumbel-max trick in another form), and the noise of each row comes
        from that row's generator only."""
        token_ids = logits.argmax(dim=-1)
        params = metadata.params
        rows = [row for row, p in enumerate(params) if p.temperature > 0.0]
        if not rows:
            return token_ids
        vocab_size = logits.shape[1]
        top_k = [min(params[row].top_k, vocab_size) if params[row].top_k > 0 else vocab_size for row in rows]
        row_index = _tensor(rows, torch.long, logits)
        scaled = logits[row_index] / _column([params[row].temperature for row in rows], logits)
        scaled = apply_top_k_top_p_min_p(
            scaled,
            _tensor(top_k, torch.long, logits),
            _tensor([params[row].top_p for row in rows], logits.dtype, logits),
            _tensor([params[row].min_p for row in rows], logits.dtype, logits),
        )
        probs = torch.softmax(scaled, dim=-1)  # [n, V]
        noise = torch.empty_like(probs)
        for i, row in enumerate(rows):
            noise[i].exponential_(generator=metadata.generators[row])
        # a draw of exactly 0 would divide by zero
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return token_ids.index_copy(0, row_index, (probs / noise).argmax(dim=-1))

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, token_ids: torch.Tensor, params: Sequence[SamplingParams]
    ) -> list[TokenLogprob | None]:
        # OpenAI reports the model's distribution (after bias, mask and penalties; before
        # temperature and the top-k/top-p/min-p filters). One device -> host copy for all rows.
        results: list[TokenLogprob | None] = [None] * len(params)
        rows = [row for row, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return results
        row_index = _tensor(rows, torch.long, logits)
        logprobs = torch.log_softmax(logits[row_index], dim=-1)  # [n, V]
        chosen_ids = token_ids[row_index]
        chosen = logprobs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1).tolist()
        num_top = max(params[row].logprobs or 0 for row in rows)
        top_values, top_ids = torch.topk(logprobs, num_top)  # [n, num_top] (num_top may be 0)
        top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
        for i, (row, token_id) in enumerate(zip(rows, chosen_ids.tolist(), strict=True)):
            k = params[row].logprobs or 0
            top = tuple(
                (top_id, value)
                for top_id, value in zip(top_ids_list[i][:k], top_values_list[i][:k], strict=True)
                if value != float("-inf")  # masked-out tokens are no alternatives
            )
            results[row] = TokenLogprob(token_id=token_id, logprob=chosen[i], top=top)
        return results


def _tensor(values: Sequence[object], dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=like.device)


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """[n, 1] on like's device and dtype, to scale the rows of an [n, V] tensor."""
    return _tensor(values, like.dtype, like).unsqueeze(1)
