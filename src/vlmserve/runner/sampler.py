"""Logits -> next token: penalties, temperature, top-k, top-p, seeded draws, logprobs.

Works on one request's float32 logits row at a time. The batched sampler of the continuous-batching
engine replaces the inside of `Sampler.sample`, not its contract: same inputs, same token for the
same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmserve.protocol.types import SamplingParams, TokenLogprob


@dataclass(slots=True)
class SampleResult:
    token_id: int
    # None unless the request asked for logprobs
    logprob: TokenLogprob | None


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator for one request: seeded when the request gives a seed, else from OS entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        # torch seeds are unsigned 64-bit; map the signed int64 range of the API onto them
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def apply_penalties(
    logits: torch.Tensor, output_token_ids: list[int], params: SamplingParams
) -> torch.Tensor:
    """Repetition (multiplicative, as in CTRL/HF), presence and frequency (additive, as in OpenAI)
    penalties over the tokens generated so far. logits: [vocab] float32."""
    if not output_token_ids:
        return logits
    needs = params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
    if not needs:
        return logits
    ids = torch.tensor(output_token_ids, device=logits.device)
    counts = torch.bincount(ids, minlength=logits.shape[0]).to(logits.dtype)
    seen = counts > 0
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        penalised = torch.where(
            logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty
        )
        logits = torch.where(seen, penalised, logits)
    logits -= params.frequency_penalty * counts
    logits -= params.presence_penalty * seen.to(logits.dtype)
    return logits


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask everything outside the top-k and the top-p nucleus with -inf. logits: [vocab]."""
    if top_k > 0 and top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_ids = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p; the first token always stays
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= top_p
        drop[0] = False
        logits = logits.scatter(0, sorted_ids[drop], float("-inf"))
    return logits


class Sampler:
    """Chooses the next token for one request from its logits."""

    def sample(
        self,
        logits: torch.Tensor,
        params: SamplingParams,
        output_token_ids: list[int],
        generator: torch.Generator,
    ) -> SampleResult:
        """logits: [vocab] float32 for the last position. Greedy when temperature == 0."""
        logits = apply_penalties(logits.float(), output_token_ids, params)
        if params.temperature == 0.0:
            token_id = int(torch.argmax(logits))
        else:
            scaled = _filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
            probs = torch.softmax(scaled, dim=-1)
            token_id = int(torch.multinomial(probs, 1, generator=generator))
        return SampleResult(token_id, self._logprob(logits, token_id, params.logprobs))

    @staticmethod
    def _logprob(logits: torch.Tensor, token_id: int, num_top: int | None) -> TokenLogprob | None:
        # OpenAI reports the model's distribution (after penalties, before temperature/top-p).
        if num_top is None:
            return None
        logprobs = torch.log_softmax(logits, dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if num_top > 0:
            values, ids = torch.topk(logprobs, num_top)
            top = tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
        return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top=top)
