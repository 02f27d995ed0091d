"""Local folders and s3:// URIs behind one small interface (pyarrow.fs).

S3-compatible servers (MinIO, SeaweedFS, ...) are reached with an endpoint override: the
`endpoint` argument, else the `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` environment variables
(the names boto3 uses). Credentials come from the usual AWS variables or files.

Writes are atomic: local files are written under a temporary name and renamed; S3 objects become
visible only when their upload completes. A reader never sees a half-written file.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_endpoint(endpoint: str | None = None) -> str | None:
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(uri: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3://bucket/key URI."""
    if is_s3(uri):
        parsed = urlparse(uri)
        endpoint = s3_endpoint(endpoint)
        kwargs = {}
        if endpoint:
            ep = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
            kwargs = dict(endpoint_override=ep.netloc, scheme=ep.scheme or "http")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        fs = pafs.S3FileSystem(region=region, allow_bucket_creation=True, **kwargs)
        return fs, (parsed.netloc + parsed.path).rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    path = os.path.abspath(uri.removeprefix("file://"))
    return pafs.LocalFileSystem(), path


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri, *parts) if is_s3(uri) else os.path.join(uri, *parts)


def exists(uri: str, endpoint: str | None = None) -> bool:
    fs, path = filesystem(uri, endpoint)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, endpoint: str | None = None) -> bytes:
    fs, path = filesystem(uri, endpoint)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes, endpoint: str | None = None) -> None:
    fs, path = filesystem(uri, endpoint)
    parent = posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path)
    fs.create_dir(parent, recursive=True)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:  # visible only once the upload completes
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    os.replace(tmp, path)


def list_files(uri: str, suffix: str = "", endpoint: str | None = None) -> list[str]:
    """Names (not paths) of the files directly under a folder/prefix, sorted; [] if it does not exist."""
    fs, path = filesystem(uri, endpoint)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def delete(uri: str, endpoint: str | None = None) -> None:
    fs, path = filesystem(uri, endpoint)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)
