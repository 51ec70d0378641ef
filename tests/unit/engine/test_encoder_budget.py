"""The encoder budget (SchedulerConfig.max_encoder_tiles_per_step), driven with fake runner outputs.

A large image is encoded a slice of tiles per step; its tokens are scheduled only once every tile is
encoded, and other requests' decodes go on in the steps between. `SlicingFakeRunner` checks the
slice contract on top of FakeRunner's: slices of an image are contiguous from tile 0, within the
step's budget, and an image is in a chunk only after all its tiles were sliced.
"""

from __future__ import annotations

import random

import pytest

from tests.unit.engine.test_scheduler import (
    IMAGE_TOKEN,
    FakeRunner,
    RunResult,
    add_all,
    create_requests,
    run_to_completion,
    step,
)
from vlmserve.engine.kv_cache import KVCacheManager
from vlmserve.engine.outputs import ModelRunnerOutput, SchedulerOutput
from vlmserve.engine.scheduler import Scheduler, SchedulerConfig
from vlmserve.protocol.types import ImageInput

BLOCK_SIZE = 4


def create_scheduler(
    encoder_tiles: int,
    *,
    max_num_batched_tokens: int = 64,
    num_blocks: int = 256,
    max_num_seqs: int = 16,
    prefix_caching: bool = True,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        max_encoder_tiles_per_step=encoder_tiles,
    )
    manager = KVCacheManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=prefix_caching)
    return Scheduler(config, manager, eos_token_ids={2})


def tiled_image_prompt(
    content_hash: str, *, before: int, num_tiles: int, after: int
) -> tuple[list[int], ImageInput]:
    """An image of num_tiles tiles x 2 tokens whose runs are separated by one layout token each."""
    runs = tuple((3 * tile, 2) for tile in range(num_tiles))
    length = 3 * num_tiles - 1
    span = [IMAGE_TOKEN if any(s <= i < s + 2 for s, _ in runs) else 7 for i in range(length)]
    token_ids = list(range(10, 10 + before)) + span + list(range(50, 50 + after))
    return token_ids, ImageInput(None, num_tiles, content_hash, offset=before, length=length, embed_runs=runs)


class SlicingFakeRunner(FakeRunner):
    """FakeRunner plus the encoder-slice contract; `cached` hashes are encoder-cache hits."""

    def __init__(self, budget: int, cached: frozenset[str] = frozenset()) -> None:
        super().__init__(BLOCK_SIZE)
        self.budget = budget
        self.cached = cached
        # (request_id, image index) -> tiles encoded so far
        self.tiles: dict[tuple[str, int], int] = {}
        self.num_tiles_encoded = 0
        self.last_output = SchedulerOutput.make_empty()

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        self.last_output = output
        for request_id in output.finished_request_ids | set(output.preempted_request_ids):
            self.tiles = {key: n for key, n in self.tiles.items() if key[0] != request_id}
        assert sum(
            s.tile_end - s.tile_start for v in output.scheduled_encoder_slices.values() for s in v
        ) <= (self.budget)
        encoded: dict[str, list[int]] = {}
        for request_id, slices in output.scheduled_encoder_slices.items():
            for encoder_slice in slices:
                key = (request_id, encoder_slice.image_index)
                image = encoder_slice.image
                if encoder_slice.tile_start == 0 and image.content_hash in self.cached:
                    self.tiles[key] = image.num_tiles
                    encoded.setdefault(request_id, []).append(encoder_slice.image_index)
                    continue
                assert self.tiles.get(key, 0) == encoder_slice.tile_start, "slices in order, none twice"
                assert encoder_slice.tile_start < encoder_slice.tile_end <= image.num_tiles
                self.tiles[key] = encoder_slice.tile_end
                self.num_tiles_encoded += encoder_slice.tile_end - encoder_slice.tile_start
        for request_id, indices in output.scheduled_encoder_inputs.items():
            state_images = {new.request_id: new.images for new in output.scheduled_new_requests}
            images = state_images.get(request_id) or self.states[request_id].images
            for index in indices:
                assert self.tiles.get((request_id, index)) == images[index].num_tiles, "image not encoded"
        result = super().execute(output)
        return ModelRunnerOutput(
            sampled_token_ids=result.sampled_token_ids, encoder_stats=None, encoded_images=encoded
        )


def test_a_large_image_is_encoded_over_several_steps_while_decodes_go_on() -> None:
    """A 7-tile image with 2 tiles per step: 4 steps of slices (2, 2, 2, 1), the last with the
    prefill; the running request decodes one token in every one of those steps."""
    scheduler = create_scheduler(encoder_tiles=2)
    runner = SlicingFakeRunner(budget=2)
    decoding = create_requests(1, 6, max_tokens=20)[0]
    add_all(scheduler, [decoding])
    step(scheduler, runner)  # its prefill
    token_ids, image = tiled_image_prompt("big", before=3, num_tiles=7, after=2)
    (with_image,) = create_requests(1, prompt_token_ids=token_ids, images=[image], start_id=1, max_tokens=4)
    add_all(scheduler, [with_image])

    schedules = []
    for _ in range(4):
        outputs = step(scheduler, runner)
        schedules.append(scheduler_output := runner.last_output)
        assert scheduler_output.num_scheduled_tokens["0"] == 1  # the decode never stalls
        assert "0" in {o.request_id for o in outputs if o.new_token_ids}
    slices = [
        [(s.tile_start, s.tile_end) for s in o.scheduled_encoder_slices.get("1", [])] for o in schedules
    ]
    assert slices == [[(0, 2)], [(2, 4)], [(4, 6)], [(6, 7)]]
    # the text before the image goes ahead; the image's tokens wait for its last slice
    assert [o.num_scheduled_tokens.get("1", 0) for o in schedules] == [3, 0, 0, image.length + 2]
    assert schedules[-1].scheduled_encoder_inputs == {"1": [0]}
    assert runner.num_tiles_encoded == 7
    run_to_completion(scheduler, runner)


def test_sliced_and_unsliced_give_the_same_tokens() -> None:
    """The budget changes when tokens are computed, never what they are."""
    results = []
    for budget in (0, 1, 3):
        scheduler = create_scheduler(encoder_tiles=budget)
        runner = SlicingFakeRunner(budget=budget) if budget else FakeRunner(BLOCK_SIZE)
        requests = []
        for index in range(4):
            token_ids, image = tiled_image_prompt(
                f"img{index}", before=2 + index, num_tiles=3 + index, after=3
            )
            requests += create_requests(
                1, prompt_token_ids=token_ids, images=[image], start_id=index, max_tokens=5 + index
            )
        requests += create_requests(2, 9, start_id=10, max_tokens=8)
        add_all(scheduler, requests)
        results.append(run_to_completion(scheduler, runner).token_ids)
    assert results[0] == results[1] == results[2]


def test_an_encoder_cache_hit_skips_the_remaining_slices() -> None:
    scheduler = create_scheduler(encoder_tiles=2)
    runner = SlicingFakeRunner(budget=2, cached=frozenset({"seen"}))
    token_ids, image = tiled_image_prompt("seen", before=0, num_tiles=9, after=2)
    add_all(scheduler, create_requests(1, prompt_token_ids=token_ids, images=[image], max_tokens=2))
    result = run_to_completion(scheduler, runner, RunResult())
    first, second = result.schedules[:2]
    assert [(s.tile_start, s.tile_end) for s in first.scheduled_encoder_slices["0"]] == [(0, 2)]
    assert first.num_scheduled_tokens == {}
    assert second.scheduled_encoder_slices == {} and second.scheduled_encoder_inputs == {"0": [0]}
    assert runner.num_tiles_encoded == 0


def test_preemption_starts_the_image_over() -> None:
    """A request preempted after its image was encoded is encoded again when it comes back (no prefix
    cache here to cover the image; the runner dropped what it held)."""
    scheduler = create_scheduler(
        encoder_tiles=4, num_blocks=10, max_num_batched_tokens=32, prefix_caching=False
    )
    runner = SlicingFakeRunner(budget=4)
    token_ids, image = tiled_image_prompt("p", before=1, num_tiles=3, after=1)  # 10 tokens
    add_all(scheduler, create_requests(1, 12, max_tokens=12))
    add_all(
        scheduler, create_requests(1, prompt_token_ids=token_ids, images=[image], start_id=1, max_tokens=12)
    )
    result = run_to_completion(scheduler, runner, RunResult())
    assert any("1" in s.preempted_request_ids for s in result.schedules)
    assert runner.num_tiles_encoded == 6


@pytest.mark.parametrize("seed", range(4))
def test_random_traffic_with_an_encoder_budget(seed: int) -> None:
    rng = random.Random(seed)
    budget = rng.choice([1, 2, 5])
    scheduler = create_scheduler(
        encoder_tiles=budget, max_num_batched_tokens=24, max_num_seqs=6, num_blocks=20
    )
    runner, result = SlicingFakeRunner(budget=budget), RunResult()
    for index in range(40):
        if rng.random() < 0.6:
            prefix = [rng.randrange(3, 90) for _ in range(rng.randrange(0, 6))]
            images = []
            if rng.random() < 0.6:
                token_ids, image = tiled_image_prompt(
                    rng.choice("abc"), before=len(prefix), num_tiles=rng.randrange(1, 6), after=0
                )
                prefix, images = prefix + token_ids[len(prefix) :], [image]
            prefix.append(rng.randrange(3, 90))
            scheduler.add_request(
                create_requests(
                    1, prompt_token_ids=prefix, images=images, start_id=index, max_tokens=rng.randrange(1, 10)
                )[0]
            )
        if scheduler.num_unfinished_requests and rng.random() < 0.1:
            scheduler.abort(rng.choice(list(scheduler.requests)))
        if scheduler.num_unfinished_requests:
            step(scheduler, runner, result)
    run_to_completion(scheduler, runner, result)
