"""User paths, resolved once where they enter (CLI flags, YAML fields): a relative path means what it
means in the user's shell.

Ray Train workers, Ray Data tasks and Serve replicas run in folders of their own
(`/tmp/ray/session_*/artifacts/...`), so a relative path that reached them would point elsewhere:
everything downstream of these functions sees absolute paths or URIs only.
"""

from __future__ import annotations

import os


def is_uri(value: str) -> bool:
    """s3://, gs://, http(s)://, sqlite:///, file:// ... : passed through untouched."""
    return "://" in value


def local_path(value: str | None) -> str | None:
    """An absolute path for a local path (`~` expanded); a URI or None as is."""
    if value is None or is_uri(value):
        return value
    return os.path.abspath(os.path.expanduser(value))


def local_paths(values: list[str] | None) -> list[str] | None:
    return None if values is None else [local_path(v) for v in values]


def model_ref(value: str | None) -> str | None:
    """A model given as a local folder or a Hugging Face hub id: an existing local path (or anything that
    cannot be a hub id) becomes absolute; an 'owner/name' with no such local folder stays a hub id."""
    from model.checkpoint import is_hub_id  # the loader's own rule

    if value is None or is_uri(value) or is_hub_id(value):
        return value
    return local_path(value)


def tracking_uri(value: str | None) -> str | None:
    """An MLflow tracking URI: `sqlite:///relative.db` and plain local paths become absolute (a Train worker
    logs from another folder); server URIs and absolute ones as is."""
    if value is None:
        return None
    if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(value[len("sqlite:///"):])
    if value.startswith("file://") or is_uri(value):
        return value
    return local_path(value)


PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_file(path: str) -> str:
    """A config file given on the command line: relative to the working directory, else one of the project's
    shipped files (`pipelines/configs/...` works from any folder, and in a job's or kfp task's folder)."""
    if not os.path.isabs(path) and not os.path.isfile(path) and os.path.isfile(os.path.join(PROJECT_ROOT, path)):
        return os.path.join(PROJECT_ROOT, path)
    return os.path.abspath(path)
