"""bootstrap's small decisions that need no model: the tile budget a checkpoint declares."""

from __future__ import annotations

from vlmserve.bootstrap import model_max_tiles


def test_tile_budget_comes_from_the_checkpoint() -> None:
    assert model_max_tiles({"max_dynamic_patch": 1}) == 1
    assert model_max_tiles({"max_dynamic_patch": 6}) == 6
    # Idefics3 / SmolVLM configs have no such key: the server's historical default
    assert model_max_tiles({"architectures": ["Idefics3ForConditionalGeneration"]}) == 12
