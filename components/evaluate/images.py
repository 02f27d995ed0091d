"""Evaluation images from a local folder or an object store (`s3://bucket/prefix`).

Object-store folders are read through `pyarrow.fs` (`FileSystem.from_uri`): credentials and the
endpoint come from the usual AWS settings (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL`) or from URI options such as `?endpoint_override=host:port&scheme=http`.
"""

from __future__ import annotations

import io
import os
from functools import lru_cache
from urllib.parse import urlsplit

from PIL import Image

MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused (decompression bombs)


def is_uri(path: str) -> bool:
    return "://" in path


def image_location(folder: str, name: str) -> str:
    """Where image `name` of `folder` lives (a path, or a URI keeping the folder URI's query)."""
    if not is_uri(folder):
        return os.path.join(folder, name)
    parts = urlsplit(folder)
    location = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/{name}"
    return location + (f"?{parts.query}" if parts.query else "")


def _split_uri(uri: str) -> tuple[str, str]:
    """The store and the path inside it: s3://bucket/a/b.jpg?opts -> (s3://bucket?opts, bucket/a/b.jpg)."""
    parts = urlsplit(uri)
    root = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
    return root, parts.netloc + parts.path


@lru_cache(maxsize=16)
def _store(root: str):
    """One pyarrow filesystem per store, reused for all the images an actor reads."""
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(root)[0]
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError variants
        raise ValueError(f"cannot open {root}: {err}") from err


def read_bytes(location: str) -> bytes:
    if not is_uri(location):
        with open(location, "rb") as f:
            return f.read()
    root, path = _split_uri(location)
    with _store(root).open_input_stream(path) as stream:
        return stream.read()


def decode_image(data: bytes, location: str) -> Image.Image:
    """Bytes -> RGB image; a corrupt or oversized image is a ValueError naming it."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{img.width}x{img.height} exceeds {MAX_IMAGE_PIXELS} pixels")
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {location}: {err}") from err


def missing_images(folder: str, names: list[str]) -> list[str]:
    """The names of `names` that `folder` does not hold (one listing call for object stores)."""
    unique = list(dict.fromkeys(names))
    if not is_uri(folder):
        if not os.path.isdir(folder):
            raise ValueError(f"image folder {folder} does not exist")
        return [n for n in unique if not os.path.isfile(os.path.join(folder, n))]
    from pyarrow import fs

    root, base = _split_uri(folder)
    infos = _store(root).get_file_info([f"{base.rstrip('/')}/{n}" for n in unique])
    return [n for n, info in zip(unique, infos) if info.type != fs.FileType.File]
