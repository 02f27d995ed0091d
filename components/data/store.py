"""The sharded sample store: Parquet parts plus manifest.json, in a local folder or under s3://.

Layout of a store URI:
    _fingerprint.json         inputs + config identity, written when a build starts
    parts/part-<first idx>-<hash>.parquet
                              good samples; the footer's key-value metadata (`bitllava`) lists
                              every record index the part accounts for (good and bad), the bad
                              records with their reasons, and per-sample content hashes
    manifest.json             written last: counts, bad records, config, identities, content hash

A part is written atomically, so a part that exists is complete; the record indices in the
committed footers are what a resumed build skips.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components import storage

SCHEMA_VERSION = 1
FOOTER_KEY = b"bitllava"
SAMPLE_SCHEMA = pa.schema([
    ("idx", pa.int64()),
    ("id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("length", pa.int32()),
    ("num_images", pa.int32()),
    ("images", pa.binary()),  # float16, C order, shape `image_shape`
    ("image_shape", pa.list_(pa.int32())),  # (num_images, 3, S, S) pixels or (num_images, patches, hidden)
])


def sample_hash(idx: int, input_ids: np.ndarray, labels: np.ndarray, images: bytes) -> str:
    h = hashlib.sha256(str(idx).encode())
    for part in (np.asarray(input_ids, np.int32).tobytes(), np.asarray(labels, np.int32).tobytes(), images):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def parts_uri(store: str) -> str:
    return storage.join(store, "parts")


def part_name(indices: list[int]) -> str:
    digest = hashlib.sha1(",".join(map(str, sorted(indices))).encode()).hexdigest()[:10]
    return f"part-{min(indices):09d}-{digest}.parquet"


def write_part(store: str, rows: list[dict], indices: list[int], bad: list[dict], images_encoded: int,
               endpoint: str | None = None, attempt: str = "", retry_s: float | None = None) -> str:
    """Write one part atomically: `rows` are samples (SAMPLE_SCHEMA fields), `indices` every record covered."""
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    footer = {
        "schema_version": SCHEMA_VERSION,
        "indices": sorted(indices),
        "bad": bad,
        "hashes": {str(r["idx"]): sample_hash(r["idx"], r["input_ids"], r["labels"], r["images"]) for r in rows},
        "images_encoded": images_encoded,
        "attempt": attempt,  # which preprocess invocation wrote it (see resolve_overlaps)
    }
    table = table.replace_schema_metadata({FOOTER_KEY: json.dumps(footer).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    name = part_name(indices)
    storage.write_bytes_atomic(storage.join(parts_uri(store), name), buf.getvalue(), endpoint, retry_s)
    return name


def read_footer(store: str, name: str, endpoint: str | None = None, retry_s: float | None = None) -> dict:
    uri = storage.join(parts_uri(store), name)
    fs, path = storage.filesystem(uri, endpoint)

    def read_metadata() -> dict:
        with fs.open_input_file(path) as f:
            return pq.read_schema(f).metadata or {}

    metadata = storage.with_retries("read", uri, read_metadata, retry_s)
    if FOOTER_KEY not in metadata:
        raise ValueError(f"{name} in {store} is not a bitllava part (no footer metadata)")
    return json.loads(metadata[FOOTER_KEY])


def committed_parts(store: str, endpoint: str | None = None, retry_s: float | None = None) -> dict[str, dict]:
    """name -> footer of every complete part in the store."""
    return {name: read_footer(store, name, endpoint, retry_s)
            for name in storage.list_files(parts_uri(store), ".parquet", endpoint, retry_s)}


def resolve_overlaps(parts: dict[str, dict], latest_attempt: str) -> tuple[dict[str, dict], list[str]]:
    """Parts that cover each record once, and the redundant ones.

    A killed run's Ray workers can finish a part after the resumed run scanned the store; the resumed
    run then processes those records again. Its own parts are kept; an older part whose records the
    latest attempt also wrote is redundant. A partial overlap would mean a corrupt store.
    """
    keep = {n: f for n, f in parts.items() if f.get("attempt") == latest_attempt}
    covered = {i for f in keep.values() for i in f["indices"]}
    redundant = []
    for name, footer in sorted(parts.items()):
        if name in keep:
            continue
        mine = set(footer["indices"])
        if not mine & covered:
            keep[name] = footer
            covered |= mine
        elif mine <= covered:
            redundant.append(name)
        else:
            raise RuntimeError(f"part {name} partly overlaps other parts: the store is corrupt, rebuild it")
    return keep, redundant


def load_manifest(store: str, endpoint: str | None = None) -> dict:
    uri = storage.join(store, "manifest.json")
    if not storage.exists(uri, endpoint):
        raise ValueError(f"{store} is not a finished sample store (no manifest.json); run `bitllava data preprocess`")
    return json.loads(storage.read_bytes(uri, endpoint))


def read_store(store: str, endpoint: str | None = None, **read_parquet_kwargs):
    """The store's samples as a Ray Dataset (one row per sample, SAMPLE_SCHEMA columns)."""
    import ray.data

    manifest = load_manifest(store, endpoint)
    fs, path = storage.filesystem(parts_uri(store), endpoint)
    files = [f"{path}/{p['name']}" for p in manifest["parts"]]
    return ray.data.read_parquet(files, filesystem=fs, schema=SAMPLE_SCHEMA, **read_parquet_kwargs)


@dataclass
class DecodedSample:
    idx: int
    id: str
    input_ids: np.ndarray  # (T,) int64
    labels: np.ndarray  # (T,) int64
    images: np.ndarray | None  # (n, ...) float16


def decode_sample(row: dict) -> DecodedSample:
    """A store row (as Ray or pyarrow give it) -> numpy arrays."""
    shape = [int(s) for s in row["image_shape"]]
    images = np.frombuffer(row["images"], np.float16).reshape(shape) if row["num_images"] else None
    return DecodedSample(idx=int(row["idx"]), id=row["id"], input_ids=np.asarray(row["input_ids"], np.int64),
                         labels=np.asarray(row["labels"], np.int64), images=images)


def content_hash(footers: list[dict]) -> str:
    """Hash of every sample in index order: equal for stores holding the same samples, however partitioned."""
    hashes = sorted((int(i), h) for footer in footers for i, h in footer["hashes"].items())
    return hashlib.sha256("".join(f"{i}:{h};" for i, h in hashes).encode()).hexdigest()
