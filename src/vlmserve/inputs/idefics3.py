"""Idefics3 / SmolVLM image processing: resize, split into sub-images, normalise, and the prompt expansion.

Follows transformers' Idefics3ImageProcessor (the PIL one) and Idefics3Processor step by step, on uint8
RGB with Pillow so the pixels come out identical:
1. resize (LANCZOS) so the longest edge is `size.longest_edge` (2048 for SmolVLM-256M; small images are
   upscaled too), the other edge int(...) rounded up to even, all capped at 4096;
2. resize each edge up to a multiple of the sub-image size T = `max_image_size.longest_edge` (512);
3. when that is larger than T x T: cut row-major T x T sub-images and add the whole image resized to
   T x T (the global image); else the single T x T image;
4. rescale by 1/255 (float64, then float32) and normalise with image_mean / image_std (0.5).
Each sub-image becomes `<fake_token_around_image><row_R_col_C>` + tokens_per_tile x `<image>`, rows end
with "\\n", then "\\n<fake_token_around_image><global-img>" + `<image>` x tokens_per_tile +
`<fake_token_around_image>`; a single image is `<fake_token_around_image><global-img><image>...<fake_...>`.

Unlike transformers, `max_tiles` (the server's limit on sub-images, the global image not counted) is
honoured: when rows x cols would exceed it, the longest edge is lowered in steps of T until it fits
(so --max-tiles 16 or more gives transformers' output for SmolVLM's 2048/512 setting).
Pixel values leave here normalised: the model does not normalise.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmserve.errors import ModelLoadError
from vlmserve.inputs.prompt import check_image_token_count, splice_images
from vlmserve.protocol.types import ImageInput

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
# transformers' MAX_IMAGE_SIZE: no edge exceeds this after the first resize
_MAX_IMAGE_SIZE = 4096
PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True, slots=True)
class Idefics3Image:
    """One image after splitting, before its tokens have a place in a prompt.

    pixel_values: float32 [num_tiles, 3, T, T], normalised; the sub-images row-major, then the global
    image (num_tiles = rows * cols + 1), or just the one image (rows = cols = 0, num_tiles = 1).
    """

    pixel_values: torch.Tensor
    num_tiles: int
    content_hash: str
    rows: int
    cols: int


def resize_to_longest_edge(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """transformers' `_resize_output_size_rescale_to_max_len` then `..._scale_below_upper_bound(4096)`."""
    aspect_ratio = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect_ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect_ratio = width / height
    if width >= height and width > _MAX_IMAGE_SIZE:
        width, height = _MAX_IMAGE_SIZE, int(_MAX_IMAGE_SIZE / aspect_ratio)
    elif height > width and height > _MAX_IMAGE_SIZE:
        height, width = _MAX_IMAGE_SIZE, int(_MAX_IMAGE_SIZE * aspect_ratio)
    return max(height, 1), max(width, 1)


def resize_to_tile_multiple(height: int, width: int, tile_size: int) -> tuple[int, int]:
    """transformers' `resize_for_vision_encoder` size: both edges rounded up to multiples of tile_size
    (the shorter one via int(longer / aspect_ratio) first, exactly as there)."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile_size) * tile_size
        height = math.ceil(int(width / aspect_ratio) / tile_size) * tile_size
    else:
        height = math.ceil(height / tile_size) * tile_size
        width = math.ceil(int(height * aspect_ratio) / tile_size) * tile_size
    return height, width


class Idefics3Processor:
    """Turns RGB images into normalised sub-images, and prompt text with image sentinels into ids.

    Settings come from `image_config` (a preprocessor_config.json dict) when given, else from
    preprocessor_config.json beside the tokenizer (`tokenizer.name_or_path`) when there is one, else
    from config.json (`vision_config.size` / `max_image_size`, or 4 x image_size and image_size).
    The tokenizer must hold `<image>`, `<fake_token_around_image>` and `<global-img>`.
    """

    def __init__(
        self,
        hf_config: dict[str, Any],
        tokenizer: Any,
        *,
        max_tiles: int,
        image_config: dict[str, Any] | None = None,
    ) -> None:
        vision = _require(hf_config, "vision_config")
        settings = image_config if image_config is not None else _read_preprocessor_config(tokenizer)
        image_size, patch_size = int(_require(vision, "image_size")), int(_require(vision, "patch_size"))
        scale_factor = int(hf_config.get("scale_factor", 2))
        self.tile_size = _edge(settings, vision, "max_image_size", image_size)
        self.longest_edge = _edge(settings, vision, "size", 4 * image_size)
        self.do_image_splitting = bool(settings.get("do_image_splitting", True))
        self.rescale_factor = float(settings.get("rescale_factor", 1 / 255))
        self.image_mean = _triple(settings.get("image_mean", 0.5))
        self.image_std = _triple(settings.get("image_std", 0.5))
        self.resample = Image.Resampling(int(settings.get("resample", Image.Resampling.LANCZOS)))
        self.max_tiles = max_tiles
        self.tokens_per_tile = (image_size // patch_size) ** 2 // scale_factor**2
        self.tokenizer = tokenizer
        self.image_token_id = _token_id(tokenizer, IMAGE_TOKEN)
        _token_id(tokenizer, FAKE_IMAGE_TOKEN)
        _token_id(tokenizer, GLOBAL_IMAGE_TOKEN)
        self._expansion_ids = cache(self._tokenize_expansion)

    def grid(self, width: int, height: int, *, max_tiles: int | None = None) -> tuple[int, int, int, int]:
        """(rows, cols, height, width after the first resize) for an image of this size; rows = cols = 0
        when the image is not split. max_tiles: this image's budget (None: the processor's)."""
        if not self.do_image_splitting:
            return 0, 0, self.tile_size, self.tile_size
        budget = self._budget(max_tiles)
        tile = self.tile_size
        longest = self.longest_edge
        while True:
            h, w = resize_to_longest_edge(height, width, longest)
            h2, w2 = resize_to_tile_multiple(h, w, tile)
            rows, cols = (h2 // tile, w2 // tile) if h2 > tile or w2 > tile else (0, 0)
            if rows * cols <= budget or longest <= tile:
                return rows, cols, h, w
            longest = (math.ceil(longest / tile) - 1) * tile

    def split(
        self, image: Image.Image, *, max_tiles: int | None = None
    ) -> tuple[list[Image.Image], int, int]:
        """The sub-images of an RGB image (row-major, then the global image) and the grid's rows, cols."""
        if not self.do_image_splitting:
            return [image.resize((self.tile_size, self.tile_size), self.resample)], 0, 0
        rows, cols, height, width = self.grid(*image.size, max_tiles=max_tiles)
        resized = image.resize((width, height), self.resample)
        height, width = resize_to_tile_multiple(height, width, self.tile_size)
        resized = resized.resize((width, height), self.resample)
        if rows == 0:
            return [resized], 0, 0
        t = self.tile_size
        tiles = [
            resized.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)
        ]
        tiles.append(resized.resize((t, t), self.resample))
        return tiles, rows, cols

    def preprocess(self, tiles: list[Image.Image]) -> torch.Tensor:
        """float32 [num_tiles, 3, T, T]: uint8 * rescale_factor (in float64, as transformers), then
        (x - mean) / std in float32."""
        pixels = np.stack([np.asarray(tile.convert("RGB"), dtype=np.uint8) for tile in tiles])
        values = (
            torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float64).mul_(self.rescale_factor).float()
        )
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        return (values - mean) / std

    def content_hash(self, image: Image.Image, *, max_tiles: int | None = None) -> str:
        """sha256 of the RGB pixels, the size and every setting that changes the sub-images (the
        tile budget included)."""
        digest = hashlib.sha256()
        settings = (
            f"idefics3|{image.size}|{self.tile_size}|{self.longest_edge}|{self._budget(max_tiles)}|"
            f"{self.do_image_splitting}|{self.resample}|{self.image_mean}|{self.image_std}|"
        )
        digest.update(settings.encode())
        digest.update(image.convert("RGB").tobytes())
        return digest.hexdigest()

    def process(self, image: Image.Image, *, max_tiles: int | None = None) -> Idefics3Image:
        """Sub-images, tensor and hash of one decoded RGB image (CPU work: call it off the event loop).

        max_tiles: this image's budget of sub-images, 1 to the processor's max_tiles (None: the
        processor's); 1 gives the unsplit image alone, as for detail "low".
        """
        tiles, rows, cols = self.split(image, max_tiles=max_tiles)
        pixel_values = self.preprocess(tiles)
        content_hash = self.content_hash(image, max_tiles=max_tiles)
        return Idefics3Image(pixel_values, pixel_values.shape[0], content_hash, rows, cols)

    def _budget(self, max_tiles: int | None) -> int:
        if max_tiles is None:
            return self.max_tiles
        # the preprocessor maps a request's detail to 1 or self.max_tiles: anything else is a bug
        assert 1 <= max_tiles <= self.max_tiles, f"tile budget {max_tiles} outside 1..{self.max_tiles}"
        return max_tiles

    def expansion_text(self, rows: int, cols: int) -> str:
        """The text transformers' Idefics3Processor puts in place of one `<image>`."""
        image_run = IMAGE_TOKEN * self.tokens_per_tile
        global_part = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{image_run}{FAKE_IMAGE_TOKEN}"
        if rows == 0 and cols == 0:
            return global_part
        grid = "".join(
            "".join(f"{FAKE_IMAGE_TOKEN}<row_{r + 1}_col_{c + 1}>{image_run}" for c in range(cols)) + "\n"
            for r in range(rows)
        )
        return f"{grid}\n{global_part}"

    def _tokenize_expansion(self, rows: int, cols: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(ids of the expansion, offset of each sub-image's `<image>` run within them)."""
        ids = tuple(self.tokenizer.encode(self.expansion_text(rows, cols), add_special_tokens=False))
        starts = tuple(
            i
            for i, token_id in enumerate(ids)
            if token_id == self.image_token_id and (i == 0 or ids[i - 1] != self.image_token_id)
        )
        expected = rows * cols + 1
        if len(starts) != expected or ids.count(self.image_token_id) != expected * self.tokens_per_tile:
            raise ModelLoadError(
                f"tokenizer: {IMAGE_TOKEN!r} runs do not survive tokenization of the expansion"
            )
        return ids, starts

    def build_prompt(
        self, prompt_text: str, sentinel: str, images: list[Idefics3Image]
    ) -> tuple[list[int], list[ImageInput]]:
        """Token ids of `prompt_text`, whose i-th `sentinel` stands for images[i], and the image inputs.

        Each image is one ImageInput (all its sub-images, so the vision tower runs once on them as a
        batch) whose span runs from its first `<image>` to its last; `embed_runs` marks the
        sub-images' `<image>` runs inside it, so the `<fake_token_around_image><row_R_col_C>` tags
        between them keep their token embeddings. Segments between sentinels are tokenized on their
        own (no special tokens added); the expansion starts and ends with special tokens, so this
        equals tokenizing the expanded text in one piece, as transformers does.
        """
        prompt_token_ids, image_inputs = splice_images(
            self.tokenizer, prompt_text, sentinel, images, self._expand
        )
        check_image_token_count(prompt_token_ids, image_inputs, self.image_token_id, IMAGE_TOKEN)
        return prompt_token_ids, image_inputs

    def _expand(self, image: Idefics3Image, position: int) -> tuple[list[int], ImageInput]:
        ids, starts = self._expansion_ids(image.rows, image.cols)
        first, length = starts[0], starts[-1] + self.tokens_per_tile - starts[0]
        runs = tuple((start - first, self.tokens_per_tile) for start in starts) if len(starts) > 1 else ()
        return ids, ImageInput(
            image.pixel_values, image.num_tiles, image.content_hash, position + first, length, runs
        )


def _require(config: dict[str, Any], key: str) -> Any:
    if key not in config:
        raise ModelLoadError(f"config.json: missing {key!r} (needed for image processing)")
    return config[key]


def _edge(settings: dict[str, Any], vision: dict[str, Any], key: str, default: int) -> int:
    """settings[key]["longest_edge"], else vision_config[key]["longest_edge"], else `default`."""
    for source in (settings, vision):
        value = source.get(key)
        if isinstance(value, dict) and isinstance(value.get("longest_edge"), int):
            return int(value["longest_edge"])
    return default


def _triple(value: Any) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, int | float) else list(value)
    if len(values) != 3:
        raise ModelLoadError(f"{PREPROCESSOR_CONFIG}: image_mean / image_std must be a number or 3 numbers")
    return (float(values[0]), float(values[1]), float(values[2]))


def _read_preprocessor_config(tokenizer: Any) -> dict[str, Any]:
    """preprocessor_config.json beside the tokenizer's files, or {} when there is none."""
    name = getattr(tokenizer, "name_or_path", "") or ""
    path = Path(name) / PREPROCESSOR_CONFIG
    if not name or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ModelLoadError(f"tokenizer: the image token {token!r} is not in the vocabulary")
    return int(token_id)
