"""A request's image, from its `image_url`: a base64 `data:` URL, or (only with --allow-remote-images) an http(s)
URL. Never a file: `file://` URLs and paths are refused, whatever the server's settings. Bytes, pixel count and
format are checked before the picture is decoded; what passes is fully decoded here, so a broken file fails its
own request and never the batch it would have joined."""

from __future__ import annotations

import base64
import binascii
import re
import urllib.error
import urllib.request

from ..runtime.generate import InputError
from ..runtime.images import ResizeRule, check_pixels, decode_bytes, peek, read_image
from .protocol import APIError

PARAM = "messages.image_url.url"
DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.ASCII)
REMOTE_TIMEOUT_S = 10


def load(url: str, *, max_bytes: int, allow_remote: bool, rule: ResizeRule | None = None):
    """An RGB PIL image, or APIError 400 saying what is wrong with the URL or the picture."""
    return decode(fetch(url, max_bytes=max_bytes, allow_remote=allow_remote), rule)


def fetch(url: str, *, max_bytes: int, allow_remote: bool) -> bytes:
    """The image file's bytes from its URL (checked for size; not decoded)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, max_bytes)
    if scheme in ("http", "https"):
        if not allow_remote:
            raise APIError(
                400,
                "remote image URLs are off on this server: send the image inline as a data URL "
                "(data:image/png;base64,...), or start star-serve with --allow-remote-images",
                param=PARAM,
                code="remote_image_refused",
            )
        return _fetch(url, max_bytes)
    raise APIError(
        400,
        f"image_url must be a data: URL (data:image/png;base64,...){' or an http(s) URL' if allow_remote else ''}; "
        f"got {'a ' + scheme + ': URL' if scheme else 'a path or an unknown form'} "
        "(files on the server are never read)",
        param=PARAM,
        code="invalid_image_url",
    )


def _data_url(url: str, max_bytes: int) -> bytes:
    m = DATA_URL.match(url)
    if m is None or not m.group("b64"):
        raise APIError(
            400, "a data URL must be base64: data:image/<format>;base64,<data>", param=PARAM, code="invalid_image_url"
        )
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise APIError(
            400,
            f"the data URL's media type is {mime[:100]!r}: send an image (image/png, image/jpeg, ...)",
            param=PARAM,
            code="invalid_image",
        )
    payload = url[m.end() :]
    if len(payload) // 4 * 3 > max_bytes + 3:  # checked before decoding
        raise APIError(
            400,
            f"the image is about {len(payload) // 4 * 3:,} bytes, over this server's limit of {max_bytes:,} "
            "(--max-image-bytes): downscale or recompress it",
            param=PARAM,
            code="image_too_large",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(
            400, f"the data URL's base64 is malformed ({e})", param=PARAM, code="invalid_image_url"
        ) from None
    if len(data) > max_bytes:
        raise APIError(
            400,
            f"the image is {len(data):,} bytes, over this server's limit of {max_bytes:,} (--max-image-bytes)",
            param=PARAM,
            code="image_too_large",
        )
    return data


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise APIError(
                400,
                f"the image URL redirects to {newurl.split(':', 1)[0]}: (only http(s) is followed)",
                param=PARAM,
                code="invalid_image_url",
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, max_bytes: int) -> bytes:
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    try:
        with opener.open(
            urllib.request.Request(url, headers={"User-Agent": "star-serve"}), timeout=REMOTE_TIMEOUT_S
        ) as r:
            data = r.read(max_bytes + 1)
    except APIError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise APIError(
            400,
            f"the image URL could not be fetched ({type(e).__name__}: {str(e)[:200]})",
            param=PARAM,
            code="image_fetch_failed",
        ) from None
    if len(data) > max_bytes:
        raise APIError(
            400,
            f"the image at the URL is over this server's limit of {max_bytes:,} bytes (--max-image-bytes)",
            param=PARAM,
            code="image_too_large",
        )
    return data


def decode_cost(data: bytes, rule: ResizeRule | None) -> int:
    """Bytes a decode of `data` holds at its peak, from its header (runtime/images.decode_bytes), plus the file
    itself and the processor-size copy. A header that cannot be read, or that read_image refuses from its size alone,
    costs its bytes: the decode refuses it before any pixel (and says why)."""
    header = peek(data)
    if header is None:
        return 2 * len(data)
    try:
        check_pixels(header.size, "the image")
        if rule is not None:
            rule.check(header.size, "the image")
    except InputError:
        return 2 * len(data)
    resized = rule.target(header.size) if rule is not None else None
    fitted = resized if rule is not None and rule.exact else None  # read_image resizes first only where that is exact
    return len(data) + decode_bytes(header, fitted) + (4 * resized[0] * resized[1] if resized else 0)


def decode(data: bytes, rule: ResizeRule | None = None):
    """Bytes -> RGB picture through runtime/images.read_image (header checks first, a decompression bomb is never
    decoded; with `rule`, resized as the processor will)."""
    try:
        return read_image(data, name="the image", rule=rule)
    except InputError as e:
        raise APIError(400, str(e), param=PARAM, code="invalid_image") from None
