"""Where a replica reads the packed model from: a local folder as is, an s3:// prefix via a local copy.

An s3:// model is copied once per node into `cache_dir/<hash of the URI>` (under a temporary
name, renamed when complete, so concurrent replicas never read a half-copied folder). The copy is
reused while its config.json equals the bucket's: config.json records the size and sha256 of
every other file, and `load_packed` re-hashes them, so a stale or damaged copy cannot be served.
The ingress needs the tokenizer and configs only and skips the weights (`weights=False`).

S3-compatible stores are reached with `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, credentials
from the usual AWS variables (what boto3 reads).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from urllib.parse import urlparse

WEIGHTS_FILE = "model.safetensors"


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "bitllava", "models")


def _s3(uri: str):
    import pyarrow.fs as pafs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs = dict(endpoint_override=parsed.netloc, scheme=parsed.scheme or "http")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    parsed = urlparse(uri)
    return pafs.S3FileSystem(region=region, **kwargs), (parsed.netloc + parsed.path).rstrip("/"), endpoint or ""


def local_model_folder(uri: str, cache_dir: str | None = None, weights: bool = True) -> str:
    """A local folder holding the packed model at `uri` (a path, file:// or s3:// URI)."""
    if not uri.startswith("s3://"):
        if "://" in uri and not uri.startswith("file://"):
            raise ValueError(f"unsupported model URI {uri!r}: use a local folder or s3://bucket/prefix")
        path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{uri} is not a model folder (no config.json); pack one with `bitllava pack`")
        return path

    import pyarrow.fs as pafs

    fs, prefix, endpoint = _s3(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=False, allow_not_found=True))
    except OSError as err:
        raise ValueError(f"cannot list {uri}: {err}") from err
    names = sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File)
    if "config.json" not in names:
        raise ValueError(f"{uri} is not a model folder (no config.json under it)")
    if not weights:
        names = [n for n in names if n != WEIGHTS_FILE]
    with fs.open_input_stream(f"{prefix}/config.json") as f:
        config = f.read()
    key = hashlib.sha256(f"{endpoint}|{uri}".encode()).hexdigest()[:16] + ("" if weights else "-meta")
    root = cache_dir or default_cache_dir()
    target = os.path.join(root, key)
    current = os.path.join(target, "config.json")
    if os.path.isfile(current) and open(current, "rb").read() == config:
        return target
    os.makedirs(root, exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        for name in names:
            with fs.open_input_stream(f"{prefix}/{name}") as src, open(os.path.join(tmp, name), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        if os.path.isdir(target):
            shutil.rmtree(target, ignore_errors=True)  # an older copy of this URI
        try:
            os.rename(tmp, target)
        except OSError:  # another replica on this node renamed its copy first
            if not (os.path.isfile(current) and open(current, "rb").read() == config):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
