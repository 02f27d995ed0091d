"""Copy a rank's checkpoint folder to Ray Train's storage, retrying through object-store outages.

Ray Train calls this (`ray.train.report(..., checkpoint_upload_fn=upload_checkpoint)`) in place of its
own copy, which tries three times in a few seconds. Here the whole folder is copied again while the store
stays unreachable, for the storage retry budget (`components.storage`): a copy overwrites the same
objects with the same bytes, and an interrupted upload leaves no object behind, so the checkpoint that
ends up on storage is the one an undisturbed save writes. Ray Train registers a checkpoint only once
every rank's copy returned, so a save that spends its budget fails the run with StorageUnavailableError
and leaves the checkpoints before it as they were: a rerun resumes from the last of them.
"""

from __future__ import annotations

import pyarrow.fs as pafs

from components import storage

CHUNK = 64 * 1024 * 1024  # Ray Train's own copy uses 64 MiB chunks for large checkpoint files


def upload_checkpoint(checkpoint, checkpoint_dir_name: str):
    """(ray.train.Checkpoint in a local folder, its name in the run) -> the Checkpoint on storage."""
    import ray.train

    ctx = ray.train.get_context().get_storage()
    fs, dest = ctx.storage_filesystem, ctx.build_checkpoint_path_from_name(checkpoint_dir_name)
    handler = getattr(fs, "handler", None)
    if isinstance(handler, storage.RetryingS3Handler):  # storage.retrying_filesystem: copy with its S3 fs, its budget
        target, retry_s, uri = handler.fs, handler.retry_s, f"s3://{dest}"
    else:
        target, retry_s, uri = fs, None, (f"s3://{dest}" if isinstance(fs, pafs.S3FileSystem) else dest)
    s3 = isinstance(target, pafs.S3FileSystem)

    def copy() -> None:
        target.create_dir(dest)
        # threaded uploads to S3 are unsafe in pyarrow (apache/arrow#32372), as Ray Train notes too
        pafs.copy_files(checkpoint.path, dest, source_filesystem=checkpoint.filesystem, destination_filesystem=target,
                        chunk_size=CHUNK, use_threads=not s3)

    if s3:
        storage.with_retries("upload checkpoint to", uri, copy, retry_s)
    else:
        copy()
    return ray.train.Checkpoint(path=dest, filesystem=fs)
