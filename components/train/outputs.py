"""Copy a finished local folder to its place in storage (local or s3://)."""

from __future__ import annotations

import os
import shutil

from components import storage


def publish_folder(local_dir: str, uri: str, endpoint: str | None = None) -> None:
    if not storage.is_s3(uri):
        if os.path.exists(uri):
            shutil.rmtree(uri)
        shutil.copytree(local_dir, uri)
        return
    for root, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            with open(path, "rb") as f:
                storage.write_bytes_atomic(storage.join(uri, rel), f.read(), endpoint)
