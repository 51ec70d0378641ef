import math

import torch

from vlmserve.protocol.types import SamplingParams
from vlmserve.runner.sampler import Sampler, apply_penalties, make_generator


def test_greedy_picks_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    result = Sampler().sample(
        logits, SamplingParams(temperature=0.0), [], make_generator(None, torch.device("cpu"))
    )
    assert result.token_id == 1
    assert result.logprob is None


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.zeros(1000)
    params = SamplingParams(temperature=1.0, top_p=1.0)

    def draw(seed):
        gen = make_generator(seed, torch.device("cpu"))
        return [Sampler().sample(logits, params, [], gen).token_id for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    # the API's seed is a signed int64
    assert draw(-(2**63)) == draw(-(2**63))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.6)
    gen = make_generator(0, torch.device("cpu"))
    seen = {Sampler().sample(logits, params, [], gen).token_id for _ in range(200)}
    assert seen == {0, 1}


def test_top_k_one_is_greedy():
    logits = torch.tensor([0.0, 1.0, 0.5])
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=1)
    gen = make_generator(0, torch.device("cpu"))
    assert {Sampler().sample(logits, params, [], gen).token_id for _ in range(50)} == {1}


def test_penalties_hand_computed():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, [0, 1, 1], params)
    # token 0: seen once: 2/2 - 0.25*1 - 0.5 = 0.25; token 1: seen twice: -2*2 - 0.25*2 - 0.5 = -5.0
    assert torch.allclose(out, torch.tensor([0.25, -5.0, 1.0, 0.5]))


def test_logprobs_top_alternatives():
    logits = torch.tensor([1.0, 2.0, 3.0])
    result = Sampler().sample(
        logits, SamplingParams(temperature=0.0, logprobs=2), [], make_generator(None, torch.device("cpu"))
    )
    expected = torch.log_softmax(logits, -1)
    assert result.logprob is not None
    assert result.logprob.token_id == 2
    assert math.isclose(result.logprob.logprob, float(expected[2]), rel_tol=1e-6)
    assert [t for t, _ in result.logprob.top] == [2, 1]
