"""One record of LLaVA's JSON -> one training sample, or a bad-record reason.

This is the per-record logic of preprocessing, free of Ray so that a test (or a debugger) can
run it on a single record and compare with what the sharded store holds.

A sample is: `input_ids`, `labels` (int32, -100 outside answers), and its images as one fp16
array (num_images, 3, S, S) of processed pixels; `features` mode later replaces the pixels with
the frozen tower's patch features (num_images, patches, hidden).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from components import storage
from model.conversation import ConversationError, tokenize_conversation
from model.vision import preprocess_images

DEFAULT_MAX_IMAGE_PIXELS = 25_000_000  # a 5000x5000 image; larger ones are treated as decompression bombs
DEFAULT_MAX_TEXT_CHARS = 16_000  # conversation text beyond this is rejected as over-long, not truncated


class BadRecord(Exception):
    """A record that cannot become a sample; `reason` is counted in the manifest."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ImageSource:
    """Image files by name from a folder, a zip archive or an s3:// prefix."""

    def __init__(self, uri: str, endpoint: str | None = None):
        self.uri, self.endpoint = uri, endpoint
        self._zip = None
        if uri.endswith(".zip"):
            self._zip = zipfile.ZipFile(io.BytesIO(storage.read_bytes(uri, endpoint)) if storage.is_s3(uri) else uri)
            self._names = set(self._zip.namelist())
        elif not storage.is_s3(uri) and not os.path.isdir(uri):
            raise ValueError(f"image source {uri} is neither a folder, a .zip file nor an s3:// prefix")

    def read(self, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        if self._zip is not None:
            for candidate in (name, f"images/{name}"):
                if candidate in self._names:
                    return self._zip.read(candidate)
            return None
        try:
            return storage.read_bytes(storage.join(self.uri, name), self.endpoint)
        except FileNotFoundError:
            return None


def decode_image(data: bytes | None, name: str, max_pixels: int) -> Image.Image:
    """Validated RGB image, or BadRecord naming what is wrong with the file."""
    if data is None:
        raise BadRecord("missing_image", f"{name} not found")
    if len(data) == 0:
        raise BadRecord("empty_image", f"{name} is 0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size  # header only: nothing decoded yet
        if width == 0 or height == 0:
            raise BadRecord("empty_image", f"{name} is {width}x{height}")
        if width * height > max_pixels:
            raise BadRecord("decompression_bomb", f"{name} is {width}x{height}, over {max_pixels} pixels")
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except BadRecord:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadRecord("corrupt_image", f"{name}: {err}") from err


def image_names(record) -> list[str]:
    """The record's image file names ([] for text-only); BadRecord if the field is malformed."""
    if not isinstance(record, dict):
        raise BadRecord("malformed_record", f"record is a {type(record).__name__}, not an object")
    if "image" not in record:
        return []
    images = record["image"]
    if isinstance(images, str):
        return [images]
    if isinstance(images, list) and images and all(isinstance(x, str) for x in images):
        return images
    raise BadRecord("malformed_record", f"'image' must be a file name or a list of them, got {images!r:.60}")


def record_id(record, idx: int) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return str(rid) if isinstance(rid, (str, int)) else f"#{idx}"


@dataclass
class Sample:
    idx: int
    id: str
    input_ids: np.ndarray  # (T,) int32
    labels: np.ndarray  # (T,) int32
    num_images: int


class RecordProcessor:
    """Template + tokenizer + image processor of one model: the per-record maths of preprocessing."""

    def __init__(self, tokenizer, image_processor, template: str, num_image_tokens: int,
                 max_length: int, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_text_chars: int = DEFAULT_MAX_TEXT_CHARS):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.template, self.num_image_tokens = template, num_image_tokens
        self.max_length, self.max_image_pixels = max_length, max_image_pixels
        self.max_text_chars = max_text_chars

    def pixels(self, images: list[Image.Image]) -> np.ndarray:
        """(n, 3, S, S) float16 processed pixels."""
        return preprocess_images(images, self.image_processor).numpy().astype(np.float16)

    def sample(self, record, idx: int, num_images: int) -> Sample:
        if not isinstance(record.get("conversations"), list):
            raise BadRecord("malformed_record", "'conversations' must be a list of turns")
        chars = sum(len(t["value"]) for t in record["conversations"] if isinstance(t, dict)
                    and isinstance(t.get("value"), str))
        if chars > self.max_text_chars:
            raise BadRecord("too_long", f"{chars} characters of text, over the {self.max_text_chars} limit")
        try:
            tok = tokenize_conversation(record["conversations"], self.tokenizer, self.template, num_images,
                                        self.num_image_tokens, self.max_length)
        except ConversationError as err:
            raise BadRecord(err.reason, str(err)) from err
        return Sample(idx=idx, id=record_id(record, idx), input_ids=np.asarray(tok.input_ids, np.int32),
                      labels=np.asarray(tok.labels, np.int32), num_images=num_images)

    def process_one(self, raw: str, idx: int, source: ImageSource) -> tuple[Sample, np.ndarray | None]:
        """A whole record, directly: (sample, pixels or None). Raises BadRecord."""
        record = parse_record(raw)
        names = image_names(record)
        images = [decode_image(source.read(n), n, self.max_image_pixels) for n in names]
        sample = self.sample(record, idx, len(names))
        return sample, (self.pixels(images) if images else None)


def parse_record(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise BadRecord("malformed_record", f"not JSON: {err}") from err
