"""The batched sampler: each stage against a hand-computed case, logprobs, and seeded draws that do
not depend on the rest of the batch."""

import math

import pytest
import torch

from vlmserve.protocol.types import SamplingParams
from vlmserve.runner.sampler import (
    Sampler,
    SamplingMetadata,
    apply_logit_bias,
    apply_penalties,
    apply_top_k_top_p_min_p,
    make_generator,
)

CPU = torch.device("cpu")


def metadata(params, output_token_ids=None, seeds=None, mask=None) -> SamplingMetadata:
    seeds = seeds or [None] * len(params)
    return SamplingMetadata(
        params=params,
        output_token_ids=output_token_ids or [[] for _ in params],
        generators=[make_generator(seed, CPU) for seed in seeds],
        allowed_token_mask=mask,
    )


def sample_one(logits, params, generator, output_token_ids=()):
    md = SamplingMetadata([params], [list(output_token_ids)], [generator])
    return Sampler().sample(logits.unsqueeze(0), md)[0]


def test_greedy_picks_argmax():
    result = Sampler().sample(
        torch.tensor([[0.1, 3.0, -1.0, 2.9]]), metadata([SamplingParams(temperature=0.0)])
    )
    assert result[0].token_id == 1
    assert result[0].logprob is None


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.zeros(1000)
    params = SamplingParams(temperature=1.0, top_p=1.0)

    def draw(seed):
        gen = make_generator(seed, CPU)
        return [sample_one(logits, params, gen).token_id for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    # the API's seed is a signed int64
    assert draw(-(2**63)) == draw(-(2**63))


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    gen = make_generator(0, CPU)
    counts = torch.zeros(3)
    for _ in range(2000):
        counts[sample_one(probs.log(), SamplingParams(), gen).token_id] += 1
    assert torch.allclose(counts / 2000, probs, atol=0.04)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.6)
    gen = make_generator(0, CPU)
    assert {sample_one(logits, params, gen).token_id for _ in range(200)} == {0, 1}


def test_top_k_one_is_greedy():
    logits = torch.tensor([0.0, 1.0, 0.5])
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=1)
    gen = make_generator(0, CPU)
    assert {sample_one(logits, params, gen).token_id for _ in range(50)} == {1}


def test_filters_per_row_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4))
    inf = float("-inf")
    out = apply_top_k_top_p_min_p(
        logits,
        top_k=torch.tensor([2, 4, 4, 4]),
        top_p=torch.tensor([1.0, 0.8, 1.0, 1.0]),
        # row 2: 0.35 * 0.5 = 0.175 drops 0.15 and 0.05; row 3: off
        min_p=torch.tensor([0.0, 0.0, 0.35, 0.0]),
    )
    kept = out > inf
    assert kept.tolist() == [
        [True, True, False, False],  # top-k 2
        [True, True, False, False],  # top-p 0.8: 0.5 + 0.3 reaches it, 0.15 is dropped
        [True, True, False, False],  # min-p
        [True, True, True, True],
    ]
    assert torch.equal(out[kept], logits[kept])


def test_min_p_applies_after_temperature():
    # probs [0.5, 0.3, 0.2] at temperature 1; min_p 0.5 keeps p >= 0.25: tokens 0 and 1
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    gen = make_generator(0, CPU)
    params = SamplingParams(temperature=1.0, min_p=0.5)
    assert {sample_one(logits, params, gen).token_id for _ in range(300)} == {0, 1}
    # at temperature 2 the probs flatten to ~[0.41, 0.32, 0.26]: 0.26 >= 0.5 * 0.41, all three stay
    params = SamplingParams(temperature=2.0, min_p=0.5)
    assert {sample_one(logits, params, gen).token_id for _ in range(300)} == {0, 1, 2}


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    params = [
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(),  # no penalty: untouched though it has output
        SamplingParams(frequency_penalty=1.0),
    ]
    out = apply_penalties(logits, [[0, 1, 1], [0, 1], [3, 3, 3]], params)
    # row 0: token 0 seen once: 2/2 - 0.25*1 - 0.5 = 0.25; token 1 seen twice: -2*2 - 0.25*2 - 0.5 = -5.0
    expected = torch.tensor([[0.25, -5.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5], [1.0, 1.0, 1.0, -2.0]])
    assert torch.allclose(out, expected)


def test_logit_bias_hand_computed_and_out_of_vocab_skipped():
    logits = torch.zeros(2, 4)
    params = [SamplingParams(logit_bias=((1, 2.5), (3, -100.0), (99, 1.0))), SamplingParams()]
    out = apply_logit_bias(logits, params)
    assert out.tolist() == [[0.0, 2.5, 0.0, -100.0], [0.0, 0.0, 0.0, 0.0]]


def test_logit_bias_comes_before_penalties_and_greedy():
    # token 0 wins on logits; bias +1 makes token 1 win; its repetition penalty (seen) halves it back
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    md = metadata([SamplingParams(temperature=0.0, logit_bias=((1, 1.0),))])
    assert Sampler().sample(logits, md)[0].token_id == 1
    md = metadata([SamplingParams(temperature=0.0, logit_bias=((1, 1.0),), repetition_penalty=2.0)], [[1]])
    assert Sampler().sample(logits, md)[0].token_id == 0  # 2.5 / 2 = 1.25 < 2.0


def test_allowed_token_mask_restricts_every_row():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    mask = torch.tensor([[False, True, False, True], [True, True, True, True], [False, False, False, True]])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0), SamplingParams(seed=1)]
    results = Sampler().sample(logits, metadata(params, mask=mask))
    assert [r.token_id for r in results] == [1, 0, 3]


def test_logprobs_and_top_logprobs_shape():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 5.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.0),
    ]
    results = Sampler().sample(logits, metadata(params))
    expected = torch.log_softmax(logits, -1)
    first, second, third = (r.logprob for r in results)
    assert first is not None and second is not None and third is None
    assert first.token_id == 2 and math.isclose(first.logprob, float(expected[0, 2]), rel_tol=1e-6)
    assert [t for t, _ in first.top] == [2, 1]
    assert math.isclose(first.top[1][1], float(expected[0, 1]), rel_tol=1e-6)
    assert second.token_id == 2 and second.top == ()


def test_top_logprobs_leave_out_masked_tokens():
    mask = torch.tensor([[True, False, True, False]])
    params = [SamplingParams(temperature=0.0, logprobs=3)]
    (result,) = Sampler().sample(torch.zeros(1, 4), metadata(params, mask=mask))
    assert result.logprob is not None and [t for t, _ in result.logprob.top] in ([0, 2], [2, 0])


@pytest.mark.parametrize("position", [0, 2, 3])
def test_seeded_row_gives_the_same_tokens_alone_and_in_a_mixed_batch(position):
    """A seeded request's draws depend on its own logits, settings and generator only."""
    torch.manual_seed(0)
    vocab = 500
    logits = torch.randn(4, vocab) * 3
    target = SamplingParams(
        temperature=0.8, top_p=0.95, top_k=50, min_p=0.01, seed=1234, repetition_penalty=1.1
    )
    others = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=1.3, top_k=5, seed=99),
        SamplingParams(temperature=0.7, top_p=0.5, frequency_penalty=0.5, logit_bias=((7, 3.0),)),
    ]
    params = [*others[:position], target, *others[position:]]
    outputs = [[5, 9] if p is target else [1, 2, 2] for p in params]
    row_logits = torch.cat([logits[1 : position + 1], logits[:1], logits[position + 1 :]])
    sampler = Sampler()

    alone = make_generator(1234, CPU)
    mixed = [make_generator(p.seed, CPU) for p in params]
    for _ in range(10):
        token_alone = sampler.sample(logits[:1], SamplingMetadata([target], [[5, 9]], [alone]))[0].token_id
        md = SamplingMetadata(params, outputs, mixed)
        token_mixed = sampler.sample(row_logits, md)[position].token_id
        assert token_alone == token_mixed
