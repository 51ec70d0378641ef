"""Uploaded image assets: the self-hosted counterpart of NIM's hosted NVCF asset flow.

A client uploads an image once (the HTTP layer calls AssetStore.put), gets an asset id (a UUID), and
then refers to it as `data:image/png;asset_id,<id>` in an image_url part or an `<img src>` tag, listing
the id in the request's NVCF-INPUT-ASSET-REFERENCES header. The store keeps the bytes in memory with a
per-asset size limit, a time to live and a total byte budget (the oldest assets are evicted first).
It checks only that the bytes are PNG or JPEG; decoding and the pixel cap happen when a request uses it.
Thread-safe: one lock guards every read and write.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from vlmserve.config import ServerConfig
from vlmserve.errors import (
    ImageLoadError,
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from vlmserve.inputs.media import sniff_format

ASSET_REFERENCES_HEADER = "NVCF-INPUT-ASSET-REFERENCES"
# The hosted API's limit on the header ("length <= 370": ten UUIDs and their commas).
MAX_ASSET_REFERENCES_LENGTH = 370
# Declared upload types we accept (none at all included); the bytes decide the stored type.
_ACCEPTED_CONTENT_TYPES = ("", "application/octet-stream", "image/png", "image/jpeg", "image/jpg")
_IMAGE_CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg"}
# How many gone ids the store remembers, to say "expired" or "evicted" rather than "unknown".
_MAX_REMEMBERED_GONE = 4096
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True, slots=True)
class Asset:
    """One stored image. Times are seconds since the epoch (by the store's clock)."""

    id: str
    size: int
    # "image/png" or "image/jpeg", from the bytes (not from what the client declared)
    content_type: str
    created: float
    expires: float
    data: bytes = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class AssetStoreStats:
    num_assets: int
    total_bytes: int
    max_total_bytes: int
    # assets removed because their TTL passed / to make room for newer ones, since the store started
    num_expired: int
    num_evicted: int


class AssetStore:
    """In-memory image assets with a per-asset limit, a TTL and a total byte budget.

    Expired assets are purged lazily (a get of one) and all at once on every put. Eviction is oldest
    first (insertion order, which with one TTL is also expiry order). `clock` returns seconds since
    the epoch; tests inject a fake one.
    """

    def __init__(
        self,
        *,
        max_asset_bytes: int,
        ttl_seconds: float,
        max_total_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert max_asset_bytes > 0 and max_total_bytes > 0 and ttl_seconds > 0
        self.max_asset_bytes = max_asset_bytes
        self.ttl_seconds = ttl_seconds
        self.max_total_bytes = max_total_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._assets: OrderedDict[str, Asset] = OrderedDict()
        # id -> why it is gone ("expired", "evicted", "deleted"); bounded, oldest forgotten first
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._total_bytes = 0
        self._num_expired = 0
        self._num_evicted = 0

    @classmethod
    def from_config(cls, config: ServerConfig) -> AssetStore:
        return cls(
            max_asset_bytes=config.asset_max_bytes,
            ttl_seconds=config.asset_ttl_seconds,
            max_total_bytes=config.asset_store_max_bytes,
        )

    def put(self, data: bytes, content_type: str | None = None) -> Asset:
        """Store `data` and return its Asset (a new uuid4 id).

        Raises InvalidRequestError (400) for empty data, PayloadTooLargeError (413) over the per-asset
        limit or the whole budget, UnsupportedMediaTypeError (415) for a declared type other than
        image/png, image/jpeg or application/octet-stream, or bytes that are not PNG or JPEG.
        """
        stored_type = self._check_upload(data, content_type)
        with self._lock:
            now = self._clock()
            self._purge_expired(now)
            while self._assets and self._total_bytes + len(data) > self.max_total_bytes:
                self._remove(next(iter(self._assets)), "evicted")
                self._num_evicted += 1
            asset = Asset(str(uuid.uuid4()), len(data), stored_type, now, now + self.ttl_seconds, data)
            self._assets[asset.id] = asset
            self._total_bytes += asset.size
            return asset

    def get(self, asset_id: str) -> Asset | None:
        """The asset, or None when it is unknown, deleted, evicted or expired (see why_missing)."""
        key = canonical_asset_id(asset_id)
        if key is None:
            return None
        with self._lock:
            asset = self._assets.get(key)
            if asset is not None and self._clock() >= asset.expires:
                self._remove(key, "expired")
                self._num_expired += 1
                return None
            return asset

    def delete(self, asset_id: str) -> bool:
        """Remove an asset; False when there was none (unknown, or already gone)."""
        key = canonical_asset_id(asset_id)
        with self._lock:
            if key is None or key not in self._assets:
                return False
            self._remove(key, "deleted")
            return True

    def why_missing(self, asset_id: str) -> str:
        """Why get(asset_id) returns None, as the end of a sentence naming the asset."""
        key = canonical_asset_id(asset_id)
        with self._lock:
            reason = self._gone.get(key) if key is not None else None
        if reason == "expired":
            return f"has expired (assets are kept {self.ttl_seconds:g} s); upload it again"
        if reason == "evicted":
            return "was evicted to make room for newer assets; upload it again"
        if reason == "deleted":
            return "was deleted"
        return "does not exist on this server"

    def stats(self) -> AssetStoreStats:
        with self._lock:
            self._purge_expired(self._clock())
            return AssetStoreStats(
                num_assets=len(self._assets),
                total_bytes=self._total_bytes,
                max_total_bytes=self.max_total_bytes,
                num_expired=self._num_expired,
                num_evicted=self._num_evicted,
            )

    def resolve(self, asset_id: str, referenced: frozenset[str]) -> bytes:
        """The bytes of the asset a request's image refers to, when its header lists it.

        `referenced` comes from parse_asset_references. Raises ImageLoadError (400) naming the asset
        and why: not in the header, not an asset id, unknown, deleted, evicted or expired.
        """
        key = canonical_asset_id(asset_id)
        if key is None:
            raise ImageLoadError(f"image asset reference {_short(asset_id)!r} is not an asset id (a UUID)")
        if key not in referenced:
            raise ImageLoadError(
                f"image asset {key} is not listed in the {ASSET_REFERENCES_HEADER} header; "
                "list every asset id the messages use",
                param=ASSET_REFERENCES_HEADER,
            )
        asset = self.get(key)
        if asset is None:
            raise ImageLoadError(f"image asset {key} {self.why_missing(key)}")
        return asset.data

    def _check_upload(self, data: bytes, content_type: str | None) -> str:
        declared = (content_type or "").split(";", 1)[0].strip().lower()
        if declared not in _ACCEPTED_CONTENT_TYPES:
            raise UnsupportedMediaTypeError(
                f"asset content type {declared!r} is not supported; upload image/png or image/jpeg"
            )
        if not data:
            raise InvalidRequestError("asset is empty; upload a PNG or JPEG image")
        if len(data) > min(self.max_asset_bytes, self.max_total_bytes):
            limit = min(self.max_asset_bytes, self.max_total_bytes)
            raise PayloadTooLargeError(f"asset is {len(data)} bytes, more than the limit of {limit}")
        image_format = sniff_format(data)
        if image_format not in _IMAGE_CONTENT_TYPES:
            found = f"a {image_format} image" if image_format else "not an image we recognise"
            raise UnsupportedMediaTypeError(f"asset is {found}; upload a PNG or JPEG image")
        return _IMAGE_CONTENT_TYPES[image_format]

    def _purge_expired(self, now: float) -> None:
        expired = [key for key, asset in self._assets.items() if now >= asset.expires]
        for key in expired:
            self._remove(key, "expired")
        self._num_expired += len(expired)

    def _remove(self, key: str, reason: str) -> None:
        asset = self._assets.pop(key)
        self._total_bytes -= asset.size
        self._gone[key] = reason
        self._gone.move_to_end(key)
        while len(self._gone) > _MAX_REMEMBERED_GONE:
            self._gone.popitem(last=False)


def parse_asset_references(header: str | None) -> frozenset[str]:
    """The asset ids an NVCF-INPUT-ASSET-REFERENCES header lists (comma-separated, spaces ignored).

    None or blank: no ids. Raises InvalidRequestError (400) for a header over 370 characters or an
    item that is not a UUID. Ids come back in canonical form (lower-case, hyphenated).
    """
    if header is None or not header.strip():
        return frozenset()
    if len(header) > MAX_ASSET_REFERENCES_LENGTH:
        raise InvalidRequestError(
            f"the {ASSET_REFERENCES_HEADER} header is {len(header)} characters long; "
            f"at most {MAX_ASSET_REFERENCES_LENGTH} are allowed",
            param=ASSET_REFERENCES_HEADER,
        )
    ids: set[str] = set()
    for item in header.split(","):
        item = item.strip()
        if not item:
            continue
        key = canonical_asset_id(item)
        if key is None:
            raise InvalidRequestError(
                f"the {ASSET_REFERENCES_HEADER} header lists {_short(item)!r}, "
                "which is not an asset id (a UUID)",
                param=ASSET_REFERENCES_HEADER,
            )
        ids.add(key)
    return frozenset(ids)


def canonical_asset_id(asset_id: str) -> str | None:
    """The id in lower case, or None when it is not a hyphenated UUID (8-4-4-4-12 hex digits).

    uuid.UUID would also take braces, "urn:uuid:" and bare hex: those are not ids anyone was given.
    """
    text = asset_id.strip()
    return text.lower() if _UUID.fullmatch(text) else None


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
