"""Dataclass settings from a YAML mapping plus overrides: the one loader of the pipeline and training configs."""

from __future__ import annotations

import dataclasses

import yaml


def load_fields(path: str | None, cls, overrides: dict, what: str) -> dict:
    """The YAML file's mapping (none when `path` is None), updated with the non-None `overrides`; an error
    names any key that is not a field of the dataclass `cls` (`what` names the settings in messages)."""
    values: dict = {}
    if path:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of {what}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path or 'flags'}: unknown {what} {unknown}; known: {sorted(known)}")
    return values
