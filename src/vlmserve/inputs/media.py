"""Image loading: data URLs, http(s) fetches with limits, and decoding to RGB with Pillow.

Owns every check on untrusted image bytes: size, format (PNG and JPEG only, sniffed from the bytes),
pixel count (read from the header before decoding), and where a URL may lead (scheme, the allowed
domains, public addresses only, and a time cap on the whole fetch). Asset references
(data:image/png;asset_id,<id>) are only recognised here; inputs/assets.py resolves them.

DNS rebinding: each hop's host is resolved once (getaddrinfo in a thread), every address is checked,
and the request is then sent to a checked address itself (the URL's host is swapped for the IP; the
Host header and, for https, the TLS server name and certificate check keep the real name). The name
is never resolved a second time, so a rebinding answer cannot redirect the connection. Connections
are not kept alive (a pooled TLS connection could otherwise be reused for another name on the same
IP), and proxies from the environment are ignored (they would connect on our behalf, unchecked).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket

import httpx
from PIL import Image

from vlmserve.config import ServerConfig
from vlmserve.errors import ImageLoadError, UnsupportedMediaTypeError

# The formats we decode, as Pillow names them; everything else is refused before Pillow sees it.
_ACCEPTED_FORMATS = ("PNG", "JPEG")
_DATA_URL_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
_MAX_URL_IN_MESSAGE = 100
# RFC 6052's well-known NAT64 prefix: behind a NAT64 gateway, 64:ff9b::a00:1 reaches 10.0.0.1.
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


def _short(url: str) -> str:
    return url if len(url) <= _MAX_URL_IN_MESSAGE else url[: _MAX_URL_IN_MESSAGE - 3] + "..."


# ---------------------------------------------------------------------------------------------- data URLs


def decode_data_url(url: str, *, max_bytes: int) -> bytes:
    """The bytes of a `data:image/{png|jpeg|jpg};base64,...` URL.

    Other image types (gif, webp, ...) and non-image types raise UnsupportedMediaTypeError (415);
    a malformed URL, bad base64 or more than `max_bytes` decoded bytes raise ImageLoadError (400).
    Whether the bytes really are an image is decode_image's job.
    """
    header, comma, payload = url.partition(",")
    if not header.lower().startswith("data:") or not comma:
        raise ImageLoadError("image data URL must look like data:image/png;base64,<data>")
    media_type, *params = header[5:].split(";")
    media_type = media_type.strip().lower()
    if media_type not in _DATA_URL_TYPES:
        raise UnsupportedMediaTypeError(
            f"image data URL has media type {media_type or '(none)'!r}; "
            "only image/png and image/jpeg are supported"
        )
    params = [p.strip().lower() for p in params]
    if "asset_id" in params:
        raise ImageLoadError("image data URL is an asset reference; resolve it with the asset store")
    if "base64" not in params:
        raise ImageLoadError("image data URL must be base64-encoded (data:image/png;base64,<data>)")
    return _decode_base64(payload, max_bytes)


def asset_reference(url: str) -> str | None:
    """The asset id of a `data:image/<any subtype>;asset_id,<id>` URL; None for any other URL.

    The subtype is nominal: the stored bytes decide the format. A non-image media type raises
    UnsupportedMediaTypeError (415), an empty id ImageLoadError (400).
    """
    header, comma, payload = url.partition(",")
    if header[:5].lower() != "data:" or not comma:
        return None
    media_type, *params = header[5:].split(";")
    if "asset_id" not in (p.strip().lower() for p in params):
        return None
    media_type = media_type.strip().lower()
    if not media_type.startswith("image/"):
        raise UnsupportedMediaTypeError(
            f"image asset reference has media type {media_type or '(none)'!r}; "
            "use data:image/png;asset_id,<id>"
        )
    asset_id = payload.strip()
    if not asset_id:
        raise ImageLoadError("image asset reference has no asset id (data:image/png;asset_id,<id>)")
    return asset_id


def _decode_base64(payload: str, max_bytes: int) -> bytes:
    compact = "".join(payload.split())
    # 4 base64 characters carry 3 bytes: refuse an oversized payload before decoding it.
    if len(compact) // 4 * 3 > max_bytes + 3:
        raise ImageLoadError(f"image data URL holds more than {max_bytes} bytes")
    if not compact:
        raise ImageLoadError("image data URL has no data")
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageLoadError(f"image data URL is not valid base64: {e}") from e
    if len(data) > max_bytes:
        raise ImageLoadError(f"image data URL holds {len(data)} bytes, more than the limit of {max_bytes}")
    return data


# ---------------------------------------------------------------------------------------------- decoding


def sniff_format(data: bytes) -> str | None:
    """The image format the leading bytes announce (Pillow's name), or None when not an image we know."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "AVIF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1"):
        return "HEIF"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] == b"\x00\x00\x01\x00":
        return "ICO"
    return None


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode PNG or JPEG bytes to an RGB image (transparency flattened onto white).

    Raises UnsupportedMediaTypeError (415) for another image format, ImageLoadError (400) for bytes
    that are not an image, an image over `max_pixels` (checked from the header before any pixel is
    decoded) or a corrupt one.
    """
    image_format = sniff_format(data)
    if image_format is None:
        raise ImageLoadError("image data is not a PNG or JPEG image")
    if image_format not in _ACCEPTED_FORMATS:
        raise UnsupportedMediaTypeError(f"image format {image_format} is not supported; use PNG or JPEG")
    try:
        # Image.open only parses the header; Pillow's own decompression-bomb check runs here too.
        image = Image.open(io.BytesIO(data), formats=[image_format])
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"image has too many pixels: {e}") from e
    except Exception as e:
        raise ImageLoadError(f"image data cannot be read as {image_format}: {e}") from e
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"
        )
    if width < 1 or height < 1:
        raise ImageLoadError(f"image has an empty size {width}x{height}")
    try:
        image.load()
    except Exception as e:
        raise ImageLoadError(f"image data is corrupt or truncated ({image_format}): {e}") from e
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited over white (a bare convert("RGB") turns it black)."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


# ---------------------------------------------------------------------------------------------- http(s)


def create_fetch_client(config: ServerConfig) -> httpx.AsyncClient:
    """The client fetch_image expects: config timeouts, no redirects followed by httpx, no keep-alive,
    no proxies from the environment."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(config.image_fetch_timeout),
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
        headers={"User-Agent": "vlmserve", "Accept": "image/png, image/jpeg", "Accept-Encoding": "identity"},
    )


async def fetch_image(url: str, *, client: httpx.AsyncClient, config: ServerConfig) -> bytes:
    """The body of an http(s) image URL, at most config.image_max_bytes long.

    Redirects (at most config.image_fetch_max_redirects) are followed here, one hop at a time, so that
    every hop's scheme, host (against config.image_url_allowed_domains) and addresses are checked.
    The whole fetch, every hop and DNS lookup included, ends after config.image_fetch_total_timeout
    seconds (the per-hop timeouts alone would let a slow drip or a redirect chain run for far longer).
    Any failure raises ImageLoadError naming the URL.
    """
    total = config.image_fetch_total_timeout
    try:
        async with asyncio.timeout(total):
            return await _follow_redirects(url, client, config)
    except TimeoutError as e:
        # Only the total cap gets here: every inner timeout is turned into an ImageLoadError below it.
        raise _error(url, f"took longer than {total:g} s") from e


async def _follow_redirects(url: str, client: httpx.AsyncClient, config: ServerConfig) -> bytes:
    current = url
    for _ in range(config.image_fetch_max_redirects + 1):
        try:
            body, location = await _fetch_hop(current, client, config)
        except httpx.TimeoutException as e:
            raise _error(url, f"timed out after {config.image_fetch_timeout:g}s") from e
        except httpx.HTTPError as e:
            raise _error(url, f"connection failed ({type(e).__name__}: {e})") from e
        if body is not None:
            return body
        assert location is not None
        current = location
    raise _error(url, f"too many redirects (more than {config.image_fetch_max_redirects})")


def _error(url: str, reason: str) -> ImageLoadError:
    return ImageLoadError(f"cannot load image URL {_short(url)}: {reason}")


async def _fetch_hop(
    url: str, client: httpx.AsyncClient, config: ServerConfig
) -> tuple[bytes | None, str | None]:
    """One request: (body, None), or (None, the redirect's absolute URL)."""
    target = check_image_url(url, config)
    addresses = await _resolve(target, config)
    response = await _send_pinned(client, target, addresses)
    try:
        if response.is_redirect:
            return None, _redirect_target(target, response.headers["location"])
        if response.status_code != 200:
            raise _error(url, f"HTTP {response.status_code} {response.reason_phrase}".rstrip())
        return await _read_capped(response, url, config.image_max_bytes), None
    finally:
        await response.aclose()


def _redirect_target(target: httpx.URL, location: str) -> str:
    try:
        return str(target.join(location))
    except (httpx.InvalidURL, ValueError) as e:
        raise _error(str(target), f"redirect to an invalid location {_short(location)!r}") from e


def check_image_url(url: str, config: ServerConfig) -> httpx.URL:
    """The parsed URL, if its scheme is http(s) and its host is allowed; else ImageLoadError.

    Addresses are checked later, after resolution (a name says nothing about where it leads).
    """
    try:
        target = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as e:
        raise _error(url, f"not a valid URL ({e})") from e
    if target.scheme not in ("http", "https"):
        raise _error(url, f"scheme {target.scheme or '(none)'!r} is not allowed; use http or https")
    if not target.host:
        raise _error(url, "the URL has no host")
    allowed = config.image_url_allowed_domains
    if allowed and not is_allowed_host(target, allowed):
        raise _error(url, f"host {target.host!r} is not one of the allowed image domains")
    return target


def is_allowed_host(target: httpx.URL, patterns: tuple[str, ...]) -> bool:
    """True when the URL's host equals a pattern, or ends in `.example.com` for a `*.example.com` one.

    Case and a trailing dot are ignored; an internationalised name matches in its Unicode or its
    punycode spelling. A `*.` pattern does not match the bare domain itself.
    """
    names = {_normal_host(target.host), _normal_host(target.raw_host.decode("ascii", "replace"))}
    for pattern in patterns:
        pattern = _normal_host(pattern)
        if pattern.startswith("*."):
            if any(name.endswith(pattern[1:]) for name in names):
                return True
        elif pattern in names:
            return True
    return False


def _normal_host(host: str) -> str:
    return host.strip().lower().rstrip(".")


async def _resolve(target: httpx.URL, config: ServerConfig) -> list[str]:
    """Every address the host resolves to, each checked unless private addresses are allowed."""
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that arrives
        # as the lookup finishes, so a cancelled load would go on to connect and download.
        async with asyncio.timeout(config.image_fetch_timeout):
            infos = await asyncio.to_thread(socket.getaddrinfo, target.host, port, type=socket.SOCK_STREAM)
    except TimeoutError as e:
        raise _error(str(target), f"timed out resolving host {target.host!r}") from e
    except (OSError, UnicodeError) as e:
        raise _error(str(target), f"cannot resolve host {target.host!r} ({e})") from e
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise _error(str(target), f"host {target.host!r} has no address")
    if not config.allow_private_image_urls:
        for address in addresses:
            if not is_public_address(address):
                raise _error(str(target), f"host {target.host!r} resolves to a refused address {address} "
                             "(loopback, private, link-local, multicast or reserved)")
    return addresses


def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local, site-local, multicast, unspecified, reserved and other
    non-global addresses, including IPv6 forms that embed such an IPv4 address (IPv4-mapped, 6to4,
    Teredo server or client, NAT64 64:ff9b::/96)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if any(not is_public_address(str(embedded)) for embedded in _embedded_ipv4(ip)):
            return False
        if ip.is_site_local:
            return False
    refused = (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
               or ip.is_unspecified or ip.is_reserved)
    return ip.is_global and not refused


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if ip in _NAT64_PREFIX:
        embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [address for address in embedded if address is not None]


async def _send_pinned(client: httpx.AsyncClient, target: httpx.URL, addresses: list[str]) -> httpx.Response:
    """Send to the checked addresses in order until one connects; the name is not looked up again."""
    headers = {"Host": target.netloc.decode("ascii")}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    last_error: httpx.ConnectError | None = None
    for address in addresses:
        request = client.build_request("GET", target.copy_with(host=address), headers=headers,
                                       extensions=extensions)
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as e:
            last_error = e
    assert last_error is not None
    raise last_error


async def _read_capped(response: httpx.Response, url: str, max_bytes: int) -> bytes:
    """The body, read until it passes max_bytes (then refused without reading the rest)."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _error(url, f"the response is {encoding}-encoded; only identity encoding is accepted")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _error(url, f"too large ({declared} bytes, more than the limit of {max_bytes})")
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_raw():
        total += len(chunk)
        if total > max_bytes:
            raise _error(url, f"too large (more than the limit of {max_bytes} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)
