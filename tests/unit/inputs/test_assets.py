"""AssetStore limits, TTL and eviction (with a fake clock), the references header, and asset resolution
in requests (image_url parts and <img src> tags)."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.unit.inputs.helpers import SMALL_TILE_CONFIG, data_url, encode_image
from vlmserve.config import ServerConfig
from vlmserve.errors import (
    ImageLoadError,
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from vlmserve.inputs.assets import (
    ASSET_REFERENCES_HEADER,
    AssetStore,
    canonical_asset_id,
    parse_asset_references,
)
from vlmserve.inputs.nemotron_vl import NemotronVLProcessor
from vlmserve.inputs.preprocess import InputPreprocessor
from vlmserve.protocol.types import ChatMessage, ImagePart, TextPart

PNG = encode_image(Image.new("RGB", (64, 32), (0, 128, 255)))
JPEG = encode_image(Image.new("RGB", (20, 90), (200, 10, 10)), "JPEG")
GIF = encode_image(Image.new("RGB", (4, 4)), "GIF")


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _store(clock: FakeClock | None = None, **limits: Any) -> AssetStore:
    settings = {"max_asset_bytes": 10_000, "ttl_seconds": 60.0, "max_total_bytes": 100_000} | limits
    return AssetStore(clock=clock or FakeClock(), **settings)


def _blob(size: int) -> bytes:
    """A PNG signature padded to `size` bytes: the store sniffs, it does not decode."""
    return PNG[:8] + b"\x00" * (size - 8)


# ------------------------------------------------------------------------------------------ the store


def test_put_and_get() -> None:
    clock = FakeClock()
    store = _store(clock)
    asset = store.put(PNG, "image/png")
    assert uuid.UUID(asset.id).version == 4 and str(uuid.UUID(asset.id)) == asset.id
    assert (asset.size, asset.content_type, asset.created, asset.expires) == (
        len(PNG), "image/png", clock.now, clock.now + 60.0
    )
    assert store.get(asset.id) == asset and store.get(asset.id.upper()) == asset
    assert store.get(asset.id).data == PNG  # type: ignore[union-attr]
    assert store.put(JPEG).content_type == "image/jpeg"
    assert store.put(PNG).id != asset.id
    assert PNG not in repr(asset).encode()


@pytest.mark.parametrize(
    "content_type", [None, "", "image/png", "IMAGE/JPEG", "image/jpg", "image/png; charset=binary",
                     "application/octet-stream"],
)
def test_declared_types_accepted(content_type: str | None) -> None:
    # the bytes decide what is stored, whatever was declared
    assert _store().put(PNG, content_type).content_type == "image/png"


@pytest.mark.parametrize(
    ("data", "content_type", "match"),
    [
        (GIF, None, "GIF"),
        (b"hello, world", None, "not an image"),
        (PNG, "text/plain", "text/plain"),
        (PNG, "image/gif", "image/gif"),
    ],
)
def test_other_media_is_415(data: bytes, content_type: str | None, match: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError, match=match) as info:
        _store().put(data, content_type)
    assert info.value.status == 415


def test_empty_is_400() -> None:
    with pytest.raises(InvalidRequestError, match="empty") as info:
        _store().put(b"", "image/png")
    assert info.value.status == 400


def test_per_asset_limit_is_413() -> None:
    store = _store(max_asset_bytes=1000)
    assert store.put(_blob(1000)).size == 1000
    with pytest.raises(PayloadTooLargeError, match="1001 bytes, more than the limit of 1000") as info:
        store.put(_blob(1001))
    assert info.value.status == 413


def test_asset_bigger_than_the_whole_budget_is_413_and_evicts_nothing() -> None:
    store = _store(max_asset_bytes=5000, max_total_bytes=3000)
    kept = store.put(_blob(2000))
    with pytest.raises(PayloadTooLargeError, match="limit of 3000"):
        store.put(_blob(3001))
    assert store.get(kept.id) is not None


def test_ttl_with_lazy_purge() -> None:
    clock = FakeClock()
    store = _store(clock, ttl_seconds=10.0)
    asset = store.put(PNG)
    clock.now += 9.999
    assert store.get(asset.id) is not None
    clock.now += 0.001
    assert store.get(asset.id) is None
    assert "expired" in store.why_missing(asset.id)
    stats = store.stats()
    assert (stats.num_assets, stats.total_bytes, stats.num_expired) == (0, 0, 1)


def test_put_purges_every_expired_asset() -> None:
    clock = FakeClock()
    store = _store(clock, ttl_seconds=10.0)
    old = [store.put(_blob(1000)) for _ in range(3)]
    clock.now += 5
    young = store.put(_blob(1000))
    clock.now += 5
    store.put(_blob(500))
    assert store._total_bytes == 1500 and len(store._assets) == 2
    assert all("expired" in store.why_missing(asset.id) for asset in old)
    assert store.get(young.id) is not None


def test_oldest_evicted_first_to_make_room() -> None:
    store = _store(max_asset_bytes=4000, max_total_bytes=10_000)
    first, second = store.put(_blob(4000)), store.put(_blob(4000))
    # 8000 stored; 4000 more needs 2000 freed: only the oldest goes
    third = store.put(_blob(4000))
    assert store.get(first.id) is None
    assert store.get(second.id) is not None and store.get(third.id) is not None
    assert "evicted" in store.why_missing(first.id)
    stats = store.stats()
    assert (stats.num_assets, stats.total_bytes, stats.num_evicted) == (2, 8000, 1)
    # one big enough to need both gone
    store.put(_blob(4000))
    store.put(_blob(4000))
    assert store.get(second.id) is None and store.get(third.id) is None
    assert store.stats().total_bytes == 8000 and store.stats().num_evicted == 3


def test_delete() -> None:
    store = _store()
    asset = store.put(PNG)
    assert store.delete(asset.id.upper()) is True
    assert store.get(asset.id) is None and store.stats().total_bytes == 0
    assert store.delete(asset.id) is False
    assert store.why_missing(asset.id) == "was deleted"
    assert store.delete("not-an-id") is False
    assert store.why_missing(str(uuid.uuid4())) == "does not exist on this server"


def test_from_config() -> None:
    config = ServerConfig(asset_max_bytes=123, asset_ttl_seconds=4.5, asset_store_max_bytes=1000)
    store = AssetStore.from_config(config)
    assert (store.max_asset_bytes, store.ttl_seconds, store.max_total_bytes) == (123, 4.5, 1000)


def test_concurrent_puts_keep_the_books_straight() -> None:
    store = _store(max_asset_bytes=1000, max_total_bytes=5000)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(100):
                asset = store.put(_blob(100 + (seed * 37 + i * 13) % 900))
                store.get(asset.id)
                if i % 7 == 0:
                    store.delete(asset.id)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store._total_bytes == sum(asset.size for asset in store._assets.values()) <= 5000


# ------------------------------------------------------------------------------ the references header


def test_parse_asset_references() -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert parse_asset_references(None) == frozenset()
    assert parse_asset_references("  ") == frozenset()
    assert parse_asset_references(a) == {a}
    assert parse_asset_references(f" {a.upper()} ,\t{b},, ") == {a, b}


def test_header_at_most_370_characters() -> None:
    ids = [str(uuid.uuid4()) for _ in range(10)]
    header = ",".join(ids) + " "  # 10 ids, 9 commas, one space: exactly 370
    assert len(header) == 370
    assert parse_asset_references(header) == set(ids)
    with pytest.raises(InvalidRequestError, match="371 characters long; at most 370") as info:
        parse_asset_references(header + " ")
    assert info.value.status == 400 and info.value.param == ASSET_REFERENCES_HEADER


@pytest.mark.parametrize("item", ["1234-abcd", "{12345678-1234-1234-1234-123456789abc}",
                                  "12345678123412341234123456789abc", "12345678-1234-1234-1234-123456789abg"])
def test_header_items_must_be_uuids(item: str) -> None:
    with pytest.raises(InvalidRequestError, match="not an asset id") as info:
        parse_asset_references(f"{uuid.uuid4()}, {item}")
    assert info.value.status == 400


def test_canonical_asset_id() -> None:
    canonical = "12345678-abcd-1234-1234-123456789abc"
    assert canonical_asset_id(f" {canonical.upper()} ") == canonical
    assert canonical_asset_id("urn:uuid:12345678-abcd-1234-1234-123456789abc") is None


# ------------------------------------------------------------------------------------------ resolution


def test_resolve_each_failure_says_which_and_why() -> None:
    clock = FakeClock()
    store = _store(clock, ttl_seconds=10.0)
    asset = store.put(PNG)
    assert store.resolve(asset.id, frozenset({asset.id})) == PNG
    not_listed = f"{asset.id} is not listed in the {ASSET_REFERENCES_HEADER}"
    with pytest.raises(ImageLoadError, match=not_listed) as info:
        store.resolve(asset.id, frozenset())
    assert info.value.status == 400 and info.value.param == ASSET_REFERENCES_HEADER
    with pytest.raises(ImageLoadError, match="'nope' is not an asset id"):
        store.resolve("nope", frozenset({asset.id}))
    unknown = str(uuid.uuid4())
    with pytest.raises(ImageLoadError, match=f"{unknown} does not exist"):
        store.resolve(unknown, frozenset({unknown}))
    clock.now += 10
    with pytest.raises(ImageLoadError, match=f"{asset.id} has expired.*upload it again"):
        store.resolve(asset.id, frozenset({asset.id}))


def _refuse(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"nothing should be fetched, got {request.url}")


def _preprocessor(tokenizer: Any, store: AssetStore | None = None) -> InputPreprocessor:
    config = ServerConfig()
    processor = NemotronVLProcessor(SMALL_TILE_CONFIG, tokenizer, max_tiles=12)
    client = httpx.AsyncClient(transport=httpx.MockTransport(_refuse))
    return InputPreprocessor(tokenizer, processor, config, client=client, assets=store)


async def test_assets_in_parts_and_tags_equal_the_same_bytes_inline(tiny_tokenizer: Any) -> None:
    store = _store()
    png, jpeg = store.put(PNG), store.put(JPEG)
    preprocessor = _preprocessor(tiny_tokenizer, store)
    assert preprocessor.assets is store
    by_asset = [
        ChatMessage("user", [ImagePart(f"data:image/png;asset_id,{png.id}"), TextPart("and")]),
        ChatMessage("assistant", "ok"),
        ChatMessage("user", f'see <img src="data:image/jpeg;asset_id,{jpeg.id}" /> too'),
    ]
    inline = [
        ChatMessage("user", [ImagePart(data_url(PNG)), TextPart("and")]),
        ChatMessage("assistant", "ok"),
        ChatMessage("user", f'see <img src="{data_url(JPEG, "image/jpeg")}" /> too'),
    ]
    asset_ids = parse_asset_references(f"{png.id}, {jpeg.id}")
    prepared = await preprocessor.prepare(by_asset, completion_mode=False, asset_ids=asset_ids)
    expected = await preprocessor.prepare(inline, completion_mode=False)
    assert prepared.prompt_token_ids == expected.prompt_token_ids
    assert [i.content_hash for i in prepared.images] == [i.content_hash for i in expected.images]
    await preprocessor.aclose()


async def test_asset_not_in_header_is_400(tiny_tokenizer: Any) -> None:
    store = _store()
    asset = store.put(PNG)
    preprocessor = _preprocessor(tiny_tokenizer, store)
    message = ChatMessage("user", f"<img src='data:image/png;asset_id,{asset.id}'>")
    with pytest.raises(ImageLoadError, match=ASSET_REFERENCES_HEADER):
        await preprocessor.prepare([message], completion_mode=False)
    other = str(uuid.uuid4())
    with pytest.raises(ImageLoadError, match=f"{other} does not exist"):
        await preprocessor.prepare([ChatMessage("user", f"<img src='data:image/png;asset_id,{other}'>")],
                                   completion_mode=False, asset_ids=frozenset({other}))
    await preprocessor.aclose()


async def test_default_store_from_config(tiny_tokenizer: Any) -> None:
    processor = NemotronVLProcessor(SMALL_TILE_CONFIG, tiny_tokenizer, max_tiles=12)
    preprocessor = InputPreprocessor(tiny_tokenizer, processor, ServerConfig(asset_max_bytes=777))
    assert preprocessor.assets.max_asset_bytes == 777
    await preprocessor.aclose()
