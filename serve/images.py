"""Images of a chat request: base64 data URLs (and allowlisted http(s) URLs) -> checked PIL images.

Every check happens before pixels are decoded: the encoded size bounds the file size, the image
header gives width and height (a decompression bomb is refused without being decompressed), and
only then is the image decoded and converted to RGB. Remote URLs are fetched only when they match
an allowlisted prefix (scheme, host and port exactly, path by prefix), without following redirects,
with a timeout and a byte limit.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
import warnings
from urllib.parse import urlparse

from PIL import Image, UnidentifiedImageError

from serve.errors import bad_request
from serve.settings import Limits

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def _origin(url: str) -> tuple[str, str, int | None, str]:
    parsed = urlparse(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    return parsed.scheme, (parsed.hostname or "").lower(), port, parsed.path or "/"


def url_allowed(url: str, allowlist: list[str]) -> bool:
    """`url` is under one of the allowlisted prefixes (same scheme, host and port; path prefix)."""
    try:
        scheme, host, port, path = _origin(url)
    except ValueError:  # a malformed port
        return False
    if "@" in (urlparse(url).netloc or ""):
        return False  # user-info tricks ("http://allowed@evil/")
    for prefix in allowlist:
        p_scheme, p_host, p_port, p_path = _origin(prefix)
        if (scheme, host, port) == (p_scheme, p_host, p_port) and path.startswith(p_path):
            return True
    return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # a redirect could leave the allowlist


def fetch_url(url: str, limits: Limits, param: str) -> bytes:
    """GET an allowlisted URL, at most `limits.max_image_bytes` bytes."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=limits.image_fetch_timeout_s) as response:
            data = response.read(limits.max_image_bytes + 1)
    except urllib.error.HTTPError as err:
        raise bad_request(f"fetching the image URL failed: HTTP {err.code}", "image_fetch_failed", param) from err
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise bad_request(f"fetching the image URL failed: {err}", "image_fetch_failed", param) from err
    if len(data) > limits.max_image_bytes:
        raise bad_request(f"the image at the URL exceeds {limits.max_image_bytes} bytes", "image_too_large", param)
    return data


def decode_data_url(url: str, limits: Limits, param: str) -> bytes:
    """`data:image/<type>;base64,<data>` -> the file's bytes."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise bad_request("image data URLs must look like data:image/png;base64,<data>", "invalid_image_url", param)
    mime = header[len("data:"):-len(";base64")].split(";")[0].strip().lower()
    if not mime.startswith("image/"):
        raise bad_request(f"the data URL's media type is {mime or 'missing'!r}, not an image type",
                          "invalid_image", param)
    payload = payload.strip()
    if len(payload) * 3 // 4 > limits.max_image_bytes + 2:
        raise bad_request(f"the image exceeds {limits.max_image_bytes} bytes", "image_too_large", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"the image data URL is not valid base64 ({err})", "invalid_base64", param) from err
    if len(data) > limits.max_image_bytes:
        raise bad_request(f"the image exceeds {limits.max_image_bytes} bytes", "image_too_large", param)
    return data


def open_image(data: bytes, limits: Limits, param: str) -> Image.Image:
    """Image file bytes -> RGB image, refusing non-images, unsupported formats and too many pixels."""
    if not data:
        raise bad_request("the image is empty", "invalid_image", param)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise bad_request(f"the image has too many pixels ({err}); at most {limits.max_image_pixels} are "
                              "accepted", "image_too_large", param) from err
        except UnidentifiedImageError as err:
            raise bad_request("the image data is not a readable image file", "invalid_image", param) from err
        except (OSError, ValueError, SyntaxError) as err:
            raise bad_request(f"the image file is damaged ({err})", "invalid_image", param) from err
        if image.format not in IMAGE_FORMATS:
            raise bad_request(f"image format {image.format} is not accepted (use one of {', '.join(IMAGE_FORMATS)})",
                              "invalid_image", param)
        width, height = image.size
        if width <= 0 or height <= 0 or width * height > limits.max_image_pixels:
            raise bad_request(f"the image is {width}x{height} = {width * height} pixels; at most "
                              f"{limits.max_image_pixels} are accepted", "image_too_large", param)
        try:
            image.seek(0)
            rgb = image.convert("RGB")  # decodes the pixels
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise bad_request(f"the image file is damaged or truncated ({err})", "invalid_image", param) from err
    return rgb


def load_image(url: str, limits: Limits, allowlist: list[str], param: str) -> Image.Image:
    """An `image_url.url` of a request -> a checked RGB image (APIError 400 for anything else)."""
    if url.startswith("data:"):
        return open_image(decode_data_url(url, limits, param), limits, param)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        if not url_allowed(url, allowlist):
            raise bad_request("remote image URLs are not accepted by this server (send the image as a base64 data "
                              "URL, or ask the operator to allowlist its host)", "image_url_not_allowed", param)
        return open_image(fetch_url(url, limits, param), limits, param)
    raise bad_request(f"unsupported image URL scheme {scheme or 'none'!r}: send a base64 data URL",
                      "invalid_image_url", param)
