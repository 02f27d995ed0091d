"""Local folders and s3:// URIs behind one small interface (pyarrow.fs).

S3-compatible servers (MinIO, SeaweedFS, ...) are reached with an endpoint override: the
`endpoint` argument, else the `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` environment variables
(the names boto3 uses). Credentials come from the usual AWS variables or files.

Writes are atomic: local files are written under a temporary name and renamed; S3 objects become
visible only when their upload completes. A reader never sees a half-written file.

Outages: every S3 operation here is retried as a whole (a file is uploaded again from its first byte)
with exponential backoff while the store is unreachable, for at most the retry budget: the `retry_s`
argument, else $BITLLAVA_STORAGE_RETRY_S, else 120 s. Past it, StorageUnavailableError says in one
line which URI and which budget. Below this, the AWS SDK inside pyarrow retries each HTTP request (its
standard strategy, 3 attempts: about a second), which covers blips also in what Ray Train and Ray Data do
on these filesystems themselves (a pickled S3FileSystem carries no retry strategy of its own).
"""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
import re
import sys
import time
import uuid
from contextlib import contextmanager
from typing import Callable, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

RETRY_ENV = "BITLLAVA_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 120.0
# Errors pyarrow reports (in its OSError messages, with the AWS SDK's names) for faults that pass:
# the server is down or restarting, overloaded, or dropped the connection.
TRANSIENT = re.compile(r"NETWORK_CONNECTION|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|SLOW_DOWN|THROTTLING|"
                       r"REQUEST_TIMEOUT|REQUEST_TIME_TOO_SKEWED|HTTP status 5\d\d|curlCode|"
                       r"Connection reset|Broken pipe|timed out")
UNAVAILABLE = "object store unreachable:"  # how the error's message starts
_UNAVAILABLE_LINE = re.compile(rf"StorageUnavailableError: ({UNAVAILABLE} [^\n]+)")  # in a remote traceback
T = TypeVar("T")


class StorageUnavailableError(ConnectionError):
    """The object store stayed unreachable for the whole retry budget (one line: URI, budget, last error)."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_endpoint(endpoint: str | None = None) -> str | None:
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def retry_budget_s(retry_s: float | None = None) -> float:
    """Seconds an S3 operation keeps retrying through an outage: `retry_s`, else $BITLLAVA_STORAGE_RETRY_S, else 120."""
    if retry_s is None:
        raw = os.environ.get(RETRY_ENV)
        if raw is None:
            return DEFAULT_RETRY_S
        try:
            retry_s = float(raw)
        except ValueError:
            raise ValueError(f"{RETRY_ENV}={raw!r} is not a number of seconds") from None
    if not retry_s >= 0:
        raise ValueError(f"the storage retry budget must be >= 0 seconds, got {retry_s}")
    return float(retry_s)


def is_transient(err: BaseException) -> bool:
    return isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and bool(TRANSIENT.search(str(err)))


def _reason(err: BaseException) -> str:
    """A short form of pyarrow's message: 'NETWORK_CONNECTION during PutObject' (no 'AWS Error' prefix, so
    that Ray's own upload retry, which matches on it, does not retry a spent budget once more)."""
    text = str(err)
    m = re.search(r"AWS Error (\w+)(?: \(HTTP status \d+\))? during (\w+) operation", text)
    return f"{m.group(1)} during {m.group(2)}" if m else text.splitlines()[0][:200]


def with_retries(what: str, uri: str, op: Callable[[], T], retry_s: float | None = None) -> T:
    """op(), repeated with exponential backoff (0.5 s doubling to 8 s) while it fails with a transient S3 error.

    `op` must be safe to repeat from the start (a whole upload, read or listing). Local paths are not retried.
    """
    if not is_s3(uri):
        return op()
    budget = retry_budget_s(retry_s)
    start = time.monotonic()
    delay, failures = 0.5, 0
    while True:
        try:
            result = op()
        except OSError as err:
            if not is_transient(err):
                raise
            waited = time.monotonic() - start
            if waited >= budget:
                raise StorageUnavailableError(
                    f"{UNAVAILABLE} could not {what} {uri} within the retry budget of {budget:g} s "
                    f"({RETRY_ENV}); last error: {_reason(err)}") from err
            if failures == 0:
                print(f"[storage] {what} {uri}: {_reason(err)}; retrying for up to {budget:g} s",
                      file=sys.stderr, flush=True)
            failures += 1
            time.sleep(min(delay, budget - waited))
            delay = min(delay * 2, 8.0)
            continue
        if failures:
            print(f"[storage] {what} {uri}: done after {failures} retries, {time.monotonic() - start:.1f} s",
                  file=sys.stderr, flush=True)
        return result


def unavailable_cause(err: BaseException) -> str | None:
    """The one-line message of the StorageUnavailableError that ended a Ray task or training run, wherever
    Ray wrapped it: as the error itself or its cause, or only in the remote traceback's text (Ray Data wraps
    a UDF's exception in UserCodeException, and the original object does not cross processes)."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is StorageUnavailableError:  # Ray's RayTaskError subclasses the type of what it wraps
            return str(e)
        m = _UNAVAILABLE_LINE.search(str(e))
        if m:
            return m.group(1)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo += [getattr(e, "controller_failure", None), *getattr(e, "worker_failures", {}).values()]
    return None


@contextmanager
def surface_outage():
    """Re-raise an object-store outage that ended a Ray job as the plain one-line StorageUnavailableError
    (Ray Data and Ray Train hand it over wrapped in their own errors, with remote tracebacks)."""
    try:
        yield
    except Exception as err:
        if type(err) is StorageUnavailableError:
            raise
        message = unavailable_cause(err)
        if message is None:
            raise
        raise StorageUnavailableError(message) from None


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


def retrying_filesystem(uri: str, endpoint: str | None = None,
                        retry_s: float | None = None) -> tuple[pafs.FileSystem, str]:
    """As `filesystem`, for code that is not ours (Ray Train's storage): on S3, a filesystem whose every
    operation retries through outages for the budget (which travels with it when pickled to Ray's
    processes), and whose written files are uploaded whole on close, so that a cut upload starts again."""
    fs, path = filesystem(uri, endpoint)
    if not is_s3(uri):
        return fs, path
    return pafs.PyFileSystem(RetryingS3Handler(fs, retry_budget_s(retry_s))), path


class RetryingS3Handler(pafs.FileSystemHandler):
    """pyarrow filesystem handler over an S3FileSystem: each call goes through `with_retries`."""

    def __init__(self, fs: pafs.S3FileSystem, retry_s: float):
        self.fs, self.retry_s = fs, retry_s

    def __reduce__(self):
        return RetryingS3Handler, (self.fs, self.retry_s)

    def _retry(self, what: str, path: str, op: Callable[[], T]) -> T:
        return with_retries(what, f"s3://{path}", op, self.retry_s)

    def get_type_name(self) -> str:
        return "s3-with-retries"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def equals(self, other) -> bool:
        return isinstance(other, RetryingS3Handler) and other.fs.equals(self.fs) and other.retry_s == self.retry_s

    def get_file_info(self, paths):
        return self._retry("check", paths[0] if paths else "", lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._retry("list", selector.base_dir, lambda: self.fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._retry("create", path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._retry("delete", path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._retry("delete", path, lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete every bucket's contents")

    def delete_file(self, path):
        self._retry("delete", path, lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        self._retry("move", src, lambda: self.fs.move(src, dest))

    def copy_file(self, src, dest):
        self._retry("copy", src, lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        return self._retry("read", path, lambda: self.fs.open_input_stream(path))

    def open_input_file(self, path):
        return self._retry("read", path, lambda: self.fs.open_input_file(path))

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_UploadOnClose(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        raise OSError("S3 objects cannot be appended to")


class _UploadOnClose(io.RawIOBase):
    """A file written to a local spool (memory, then disk past 64 MiB) and uploaded whole, with retries, on close."""

    def __init__(self, handler: RetryingS3Handler, path: str, metadata):
        self.handler, self.path, self.metadata = handler, path, metadata
        self.spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self.spool.write(b)

    def _upload(self) -> None:
        self.spool.seek(0)
        with self.handler.fs.open_output_stream(self.path, metadata=self.metadata) as out:
            while chunk := self.spool.read(16 << 20):
                out.write(chunk)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.handler._retry("write", self.path, self._upload)
        finally:
            self.spool.close()
            super().close()


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri, *parts) if is_s3(uri) else os.path.join(uri, *parts)


def exists(uri: str, endpoint: str | None = None, retry_s: float | None = None) -> bool:
    fs, path = filesystem(uri, endpoint)
    return with_retries("check", uri, lambda: fs.get_file_info(path).type != pafs.FileType.NotFound, retry_s)


def read_bytes(uri: str, endpoint: str | None = None, retry_s: float | None = None) -> bytes:
    fs, path = filesystem(uri, endpoint)

    def read() -> bytes:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{uri} does not exist")
        with fs.open_input_stream(path) as f:
            return f.read()

    return with_retries("read", uri, read, retry_s)


def write_bytes_atomic(uri: str, data: bytes, endpoint: str | None = None, retry_s: float | None = None) -> None:
    fs, path = filesystem(uri, endpoint)
    if is_s3(uri):
        def upload() -> None:
            fs.create_dir(posixpath.dirname(path), recursive=True)
            with fs.open_output_stream(path) as f:  # visible only once the upload completes
                f.write(data)

        with_retries("write", uri, upload, retry_s)
        return
    fs.create_dir(os.path.dirname(path), recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    os.replace(tmp, path)


def list_files(uri: str, suffix: str = "", endpoint: str | None = None, retry_s: float | None = None) -> list[str]:
    """Names (not paths) of the files directly under a folder/prefix, sorted; [] if it does not exist."""
    fs, path = filesystem(uri, endpoint)

    def listing() -> list[str]:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
        return sorted(posixpath.basename(i.path) for i in infos
                      if i.type == pafs.FileType.File and i.path.endswith(suffix))

    return with_retries("list", uri, listing, retry_s)


def delete(uri: str, endpoint: str | None = None, retry_s: float | None = None) -> None:
    fs, path = filesystem(uri, endpoint)

    def remove() -> None:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_file(path)

    with_retries("delete", uri, remove, retry_s)
