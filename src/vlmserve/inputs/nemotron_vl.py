"""Llama_Nemotron_Nano_VL image processing: dynamic tiling, pixel tensors and image token expansion.

Tiling follows vLLM's native port (vllm/transformers_utils/processors/nemotron_vl.py), which adapts the
Hub's image_processing.py: candidate grids (cols, rows) with 1 <= cols * rows <= max_tiles, sorted by
area; the grid maximising min(grid pixels / image pixels, 0.6) * aspect-ratio closeness wins (the first
of equals); the image is resized (bicubic) to the grid and cut into row-major tiles, plus a tile-sized
thumbnail of the whole image when there is more than one tile.

Known divergence (docs: MODEL.md): one public copy of the Hub's processor upsamples every image 2x
before tiling; vLLM does not, and neither do we. So 512x512 is 1 tile here (5 with the upsampling).

Per-image tile budget: every method that depends on the grid takes `max_tiles` (default: the
processor's, which is the server's --max-tiles); a request's `detail: low` asks for 1, which is the whole
image resized to one tile (no thumbnail: there is nothing to add to a single tile).

Pixel values stay in [0, 1]: the vision tower normalises them itself. Runs on CPU, off the event loop.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmserve.errors import ModelLoadError
from vlmserve.inputs.prompt import check_image_token_count, splice_images
from vlmserve.protocol.types import ImageInput

IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"
IMAGE_CONTEXT_TOKEN = "<image>"
# What stands for one image in prompt text (the reference puts it in the user turn, before the text).
IMAGE_PLACEHOLDER = "<image>\n"
# Bounds the 2-D similarity term, so a grid larger than the image gains nothing over a just-fitting one.
_MAX_SIZE_FACTOR = 0.6


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    """One image after tiling, before its tokens have a place in a prompt.

    pixel_values: float32 [num_tiles, 3, tile_size, tile_size] in [0, 1].
    """

    pixel_values: torch.Tensor
    num_tiles: int
    content_hash: str


def candidate_grids(max_tiles: int) -> list[tuple[int, int]]:
    """Every (cols, rows) with 1 <= cols * rows <= max_tiles, sorted by area.

    Grids of one area keep the order of a set built exactly as the reference builds it: that order
    decides ties (e.g. (3, 3) against (3, 4) for some large square images), and CPython's set order
    for small int tuples depends on the insertion sequence but not on the hash seed.
    """
    grids = {
        (cols, rows)
        for n in range(1, max_tiles + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if 1 <= cols * rows <= max_tiles
    }
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def best_grid(width: int, height: int, tile_size: int, grids: list[tuple[int, int]]) -> tuple[int, int]:
    """The grid with the highest min(area ratio, 0.6) * aspect closeness; the first wins a tie."""
    aspect_ratio = width / height
    image_area = width * height
    best_factor = float("-inf")
    best = (1, 1)
    for cols, rows in grids:
        grid_ratio = cols / rows
        size_factor = min(cols * rows * tile_size * tile_size / image_area, _MAX_SIZE_FACTOR)
        closeness = min(grid_ratio / aspect_ratio, aspect_ratio / grid_ratio)
        factor = size_factor * closeness
        if factor > best_factor:
            best_factor = factor
            best = (cols, rows)
    return best


class NemotronVLProcessor:
    """Turns RGB images into tiles and pixel tensors, and prompt text with image sentinels into ids.

    Built from the checkpoint's config.json dict (force_image_size, patch_size, downsample_ratio,
    use_thumbnail) and the tokenizer, which must hold <img>, </img> and <image> as tokens.
    """

    def __init__(self, hf_config: dict[str, Any], tokenizer: Any, *, max_tiles: int) -> None:
        self.tile_size = int(_config_value(hf_config, "force_image_size"))
        self.patch_size = int(_config_value(hf_config, "patch_size"))
        self.downsample_ratio = float(_config_value(hf_config, "downsample_ratio"))
        self.use_thumbnail = bool(hf_config.get("use_thumbnail", True))
        self.max_tiles = max_tiles
        # pixel shuffle keeps downsample_ratio^2 of the (tile / patch)^2 patch features
        self.tokens_per_tile = round((self.tile_size // self.patch_size) ** 2 * self.downsample_ratio**2)
        self.tokenizer = tokenizer
        self.image_start_id = _token_id(tokenizer, IMAGE_START_TOKEN)
        self.image_end_id = _token_id(tokenizer, IMAGE_END_TOKEN)
        self.image_token_id = _token_id(tokenizer, IMAGE_CONTEXT_TOKEN)
        # candidate grids per tile budget, filled on first use (the budget's own set order breaks ties)
        self._grids = {max_tiles: candidate_grids(max_tiles)}

    def grid(self, width: int, height: int, *, max_tiles: int | None = None) -> tuple[int, int]:
        """(cols, rows) of the tile grid an image of this size is resized to."""
        return best_grid(width, height, self.tile_size, self._candidate_grids(max_tiles))

    def num_tiles(self, width: int, height: int, *, max_tiles: int | None = None) -> int:
        """Tiles of an image of this size, the thumbnail included."""
        cols, rows = self.grid(width, height, max_tiles=max_tiles)
        blocks = cols * rows
        return blocks + 1 if self.use_thumbnail and blocks > 1 else blocks

    def tile(self, image: Image.Image, *, max_tiles: int | None = None) -> list[Image.Image]:
        """The tiles of an RGB image: row-major grid tiles, then the thumbnail when there are several."""
        cols, rows = self.grid(*image.size, max_tiles=max_tiles)
        size = self.tile_size
        resized = image.resize((cols * size, rows * size), Image.Resampling.BICUBIC)
        tiles = [
            resized.crop((col * size, row * size, (col + 1) * size, (row + 1) * size))
            for row in range(rows)
            for col in range(cols)
        ]
        if self.use_thumbnail and len(tiles) > 1:
            tiles.append(image.resize((size, size), Image.Resampling.BICUBIC))
        return tiles

    def preprocess(self, image: Image.Image, *, max_tiles: int | None = None) -> torch.Tensor:
        """float32 [num_tiles, 3, tile_size, tile_size] in [0, 1] for an RGB image."""
        tiles = self.tile(image, max_tiles=max_tiles)
        pixels = np.stack([np.asarray(tile.convert("RGB"), dtype=np.uint8) for tile in tiles])
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)

    def content_hash(self, image: Image.Image, *, max_tiles: int | None = None) -> str:
        """sha256 of the RGB pixels, the size and every setting that changes the tiles (the tile budget
        included, so one image sent with detail low and high has two cache keys)."""
        budget = self._budget(max_tiles)
        digest = hashlib.sha256()
        settings = f"nemotron_vl|{image.size}|{self.tile_size}|{budget}|{self.use_thumbnail}|"
        digest.update(settings.encode())
        digest.update(image.convert("RGB").tobytes())
        return digest.hexdigest()

    def process(self, image: Image.Image, *, max_tiles: int | None = None) -> ProcessedImage:
        """Tiles, tensor and hash of one decoded RGB image (CPU work: call it off the event loop).

        max_tiles: this image's tile budget, 1 to the processor's max_tiles; None: the processor's.
        """
        pixel_values = self.preprocess(image, max_tiles=max_tiles)
        content_hash = self.content_hash(image, max_tiles=max_tiles)
        return ProcessedImage(pixel_values, pixel_values.shape[0], content_hash)

    def _budget(self, max_tiles: int | None) -> int:
        if max_tiles is None:
            return self.max_tiles
        # the preprocessor maps a request's detail to 1 or self.max_tiles: anything else is a bug
        assert 1 <= max_tiles <= self.max_tiles, f"tile budget {max_tiles} outside 1..{self.max_tiles}"
        return max_tiles

    def _candidate_grids(self, max_tiles: int | None) -> list[tuple[int, int]]:
        budget = self._budget(max_tiles)
        grids = self._grids.get(budget)
        if grids is None:
            # racing worker threads may both build it; the result is the same
            grids = self._grids[budget] = candidate_grids(budget)
        return grids

    def image_token_ids(self, num_tiles: int) -> list[int]:
        """<img>, tokens_per_tile * num_tiles x <image>, </img>."""
        context_ids = [self.image_token_id] * (self.tokens_per_tile * num_tiles)
        return [self.image_start_id, *context_ids, self.image_end_id]

    def build_prompt(
        self, prompt_text: str, sentinel: str, images: list[ProcessedImage]
    ) -> tuple[list[int], list[ImageInput]]:
        """Token ids of `prompt_text`, whose i-th `sentinel` stands for images[i], and the image positions.

        Each segment between sentinels is tokenized on its own (no special tokens added: the template
        already wrote BOS) and each image's ids are spliced in. Since the image tokens are special
        tokens, this equals tokenizing the text with each sentinel replaced by "<img><image>...</img>".
        """
        prompt_token_ids, image_inputs = splice_images(
            self.tokenizer, prompt_text, sentinel, images, self._expand
        )
        check_image_token_count(prompt_token_ids, image_inputs, self.image_token_id, IMAGE_CONTEXT_TOKEN)
        return prompt_token_ids, image_inputs

    def _expand(self, image: ProcessedImage, position: int) -> tuple[list[int], ImageInput]:
        # offset: the first <image> token, just after <img>
        length = image.num_tiles * self.tokens_per_tile
        image_input = ImageInput(
            image.pixel_values, image.num_tiles, image.content_hash, position + 1, length
        )
        return self.image_token_ids(image.num_tiles), image_input


def _config_value(hf_config: dict[str, Any], key: str) -> Any:
    if key not in hf_config:
        raise ModelLoadError(f"config.json: missing {key!r} (needed for image tiling)")
    return hf_config[key]


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ModelLoadError(f"tokenizer: the image token {token!r} is not in the vocabulary")
    return int(token_id)
