"""`bitllava data preprocess`: LLaVA JSON + images -> sharded sample store, with Ray Data.

    JSON array (local or s3://) ── driver: parse, group records sharing images, skip committed records
      │ from_items(groups, blocks)           (a JSON array would reach Ray as one block)
      ▼ pixels:   map_batches(prepare_and_write)   one task per block of a few whole parts (pixel_tasks):
      │                        decode + validate each distinct image once, pad-to-square, CLIP processor,
      │                        template + tokenize + labels, then each part is written (processed pixels
      │                        never cross the object store)
      ▼ features: map_batches(prepare_groups) -> map_batches(EncodeGroups) -> map_batches(write_parts)
      │                        one block per part; the frozen CLIP tower runs in an autoscaling actor pool
      │                        (GPU actors when the cluster has GPUs) between preparing and writing
    manifest.json              counts by reason, identities, content hash (written last)

Grouping records that share images (connected components of the record-image graph) makes every
distinct image decoded and encoded exactly once (LLaVA-Instruct-150K holds about 81K images for
150K records), also when a two-image record shares an image with single-image records. Re-running with the same inputs and
config is a no-op; a killed run resumes from the committed parts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from components import paths, storage
from components.data.records import (
    DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_TEXT_CHARS, BadRecord, ImageSource, RecordProcessor, decode_image, image_names, parse_record,
    record_id,
)
from components.data.store import SCHEMA_VERSION, committed_parts, content_hash, resolve_overlaps, write_part

SOURCES = ("cc595k", "instruct")
PHASE_TEMPLATES = {"align": "plain", "instruct": "v1"}
ENCODINGS = ("pixels", "features")


@dataclass
class PreprocessConfig:
    """Configuration of one preprocessing run.

    source: dataset kind, "cc595k" (captions) or "instruct" (LLaVA-Instruct conversations).
    json: the dataset's JSON array file (local path or s3:// URI).
    images: folder, .zip archive or s3:// prefix holding the images named by the records.
    out: the store's URI (local folder or s3://bucket/prefix).
    phase: "align" (plain template) or "instruct" (v1 template).
    encode: "pixels" stores processed images; "features" stores the frozen tower's fp16 patch features.
    model: base model folder (`bitllava model init`): tokenizer, image processor and, for features, the tower.
    preset: used for tokenizer and image processor when `model` is not given (pixels mode only).
    max_length: token limit per sample (default: the preset's).
    shard_records: about how many records each Parquet part covers.
    max_image_pixels: images with more pixels are rejected as decompression bombs.
    max_text_chars: records with more conversation text are rejected as over-long (shorter ones are
        truncated to max_length tokens, as LLaVA does).
    encoder_actors: (min, max) size of the autoscaling feature-encoder actor pool.
    encode_batch: image groups per encoder call.
    prepare_batch: image groups per image-processor call (bounds the float32 working set of a call).
    s3_endpoint: S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL).
    storage_retry_s: seconds an S3 read or write keeps retrying through an object-store outage before the
        run stops with StorageUnavailableError, its committed parts kept for a rerun (default:
        $BITLLAVA_STORAGE_RETRY_S, else 120).
    """

    source: str
    json: str
    images: str
    out: str
    phase: str
    encode: str = "pixels"
    model: str | None = None
    preset: str = "tiny"
    max_length: int | None = None
    shard_records: int = 256
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    encoder_actors: tuple[int, int] = (1, 2)
    encode_batch: int = 16
    prepare_batch: int = 32
    s3_endpoint: str | None = None
    storage_retry_s: float | None = None

    def __post_init__(self):
        # resolved here so Ray workers get them too
        self.s3_endpoint = storage.s3_endpoint(self.s3_endpoint)
        self.storage_retry_s = storage.retry_budget_s(self.storage_retry_s)
        # user paths mean what they mean in the user's shell; Ray Data tasks run in other folders
        self.json, self.images, self.out = (paths.local_path(p) for p in (self.json, self.images, self.out))
        self.model = paths.model_ref(self.model)
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; choose one of {SOURCES}")
        if self.phase not in PHASE_TEMPLATES:
            raise ValueError(f"unknown phase {self.phase!r}; choose one of {tuple(PHASE_TEMPLATES)}")
        if self.encode not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.encode!r}; choose one of {ENCODINGS}")
        if self.encode == "features" and not self.model:
            raise ValueError("--encode features needs --model (a base model folder holding the frozen tower)")
        if min(self.shard_records, self.max_image_pixels, self.encode_batch, self.prepare_batch) < 1:
            raise ValueError("shard_records, max_image_pixels, encode_batch and prepare_batch must be positive")
        lo, hi = self.encoder_actors
        if not 1 <= lo <= hi:
            raise ValueError(f"encoder_actors must be (min, max) with 1 <= min <= max, got {self.encoder_actors}")
        if not storage.exists(self.json, self.s3_endpoint, self.storage_retry_s):
            raise ValueError(f"--json {self.json} does not exist")
        if not storage.is_s3(self.images) and not storage.exists(self.images):
            raise ValueError(f"--images {self.images} does not exist")
        if self.model and not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"--model {self.model} is not a model folder (no config.json)")

    @property
    def template(self) -> str:
        return PHASE_TEMPLATES[self.phase]


def load_processing(cfg: PreprocessConfig):
    """(tokenizer, image processor, image tokens per image, max_length, model config) of the run's model."""
    from model.backbones import context_length
    from model.checkpoint import load_tokenizer
    from model.multimodal import BitLlavaConfig
    from model.presets import get_preset, preset_config
    from model.towers import build_image_processor, load_image_processor

    if cfg.model:
        with open(os.path.join(cfg.model, "config.json")) as f:
            config = BitLlavaConfig.from_dict(json.load(f))
        tokenizer = load_tokenizer(cfg.model)
        processor = load_image_processor(cfg.model, config.vision_config)
        max_length = cfg.max_length or context_length(config.text_config)
    else:
        config, tokenizer = preset_config(cfg.preset)
        processor = build_image_processor(config.vision_config)
        max_length = cfg.max_length or get_preset(cfg.preset).max_length
    return tokenizer, processor, config.num_image_tokens, max_length, config


def processing_identity(cfg: PreprocessConfig, tokenizer, processor, config) -> dict:
    """What the store's samples depend on besides the data: tokenizer, image processing, vision tower."""
    from model.towers import processor_identity

    identity = {
        "tokenizer_sha256": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "image_processor": processor_identity(processor),
        "image_tokens": config.num_image_tokens,
        "vision_tower": None,
    }
    if cfg.encode == "features":
        identity["vision_tower"] = {"sha256": tower_sha256(cfg.model), "layer": config.vision_feature_layer,
                                    "hidden": config.vision_config.hidden_size}
    return identity


def tower_sha256(model_dir: str) -> str:
    from model.checkpoint import load_vision_tower

    tower, _ = load_vision_tower(model_dir)
    h = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.float().numpy().tobytes())
    return h.hexdigest()


_PREPARERS: dict = {}  # per worker process: run key -> PrepareGroups, so reused workers skip the set-up


def _preparer(key: str, cfg: PreprocessConfig, processing: dict) -> PrepareGroups:
    """The worker's PrepareGroups for run `key`. A task, unlike an actor, runs on Ray's reused worker
    processes, so a run pays no process start-up. The tokenizer and image processor travel as an object
    reference (nested in a dict, so Ray does not resolve it for every task) and are fetched once per
    worker and run: as plain task arguments every task would unpickle them again (0.09 s for the OLMo
    tokenizer)."""
    if key not in _PREPARERS:
        import ray

        _PREPARERS.clear()
        tokenizer, processor, image_tokens, max_length = ray.get(processing["ref"])
        _PREPARERS[key] = PrepareGroups(cfg, tokenizer, processor, image_tokens, max_length)
    return _PREPARERS[key]


def prepare_groups(batch: pa.Table, key: str, cfg: PreprocessConfig, processing: dict) -> pa.Table:
    """Ray Data UDF (tasks), `features` mode: image groups -> prepared groups for the encoder pool."""
    return pa.Table.from_pylist(_preparer(key, cfg, processing)(batch.to_pylist()))


def prepare_and_write(batch: pa.Table, key: str, cfg: PreprocessConfig, processing: dict,
                      groups_per_part: int) -> pa.Table:
    """Ray Data UDF (tasks), `pixels` mode: a few parts' image groups -> each part prepared, written, and
    its stats returned. Preparing and writing in one task keeps the processed pixels out of the object
    store and leaves one operator to Ray Data's resource allocator, so every core runs a task; one part
    at a time is held in memory."""
    preparer, groups = _preparer(key, cfg, processing), batch.to_pylist()
    return pa.concat_tables([write_groups(preparer(groups[i: i + groups_per_part]), cfg.out, cfg.s3_endpoint, key,
                                          cfg.storage_retry_s)
                             for i in range(0, len(groups), groups_per_part)])


class PrepareGroups:
    """Image groups -> their processed image(s) and each record's tokens or bad reason."""

    def __init__(self, cfg: PreprocessConfig, tokenizer, processor, image_tokens: int, max_length: int):
        self.source = ImageSource(cfg.images, cfg.s3_endpoint)
        self.max_pixels, self.chunk = cfg.max_image_pixels, cfg.prepare_batch
        self.processor = RecordProcessor(tokenizer, processor, cfg.template, image_tokens, max_length,
                                         cfg.max_image_pixels, cfg.max_text_chars)

    def __call__(self, groups: list[dict]) -> list[dict]:
        return [out for i in range(0, len(groups), self.chunk) for out in self.prepare_chunk(groups[i: i + self.chunk])]

    def prepare_chunk(self, groups: list[dict]) -> list[dict]:
        decoded = [self.decode(group) for group in groups]
        images = [image for _, _, group_images in decoded for image in group_images]
        # one processor call per chunk: its per-call overhead is most of a small image's cost
        pixels = self.processor.pixels(images) if images else None
        out, start = [], 0
        for group, (good, errors, group_images) in zip(groups, decoded):
            own = pixels[start: start + len(group_images)] if group_images else None
            start += len(group_images)
            out.append(self.prepare(group, good, errors, own))
        return out

    def decode(self, group: dict) -> tuple[list[str], dict, list]:
        """The group's distinct images, each read and decoded once: (good names, errors by name, images)."""
        good, errors, images = [], {}, []
        for name in json.loads(group["names"]):
            try:
                images.append(decode_image(self.source.read(name), name, self.max_pixels))
                good.append(name)
            except BadRecord as err:
                errors[name] = err
        return good, errors, images

    def prepare(self, group: dict, good: list[str], errors: dict, pixels: np.ndarray | None) -> dict:
        image_bytes, image_shape = b"", []
        if pixels is not None:
            image_bytes, image_shape = pixels.tobytes(), list(pixels.shape)
        position = {name: i for i, name in enumerate(good)}
        out = {k: [] for k in ("ids", "bad", "detail", "input_ids", "labels", "image_rows")}
        for idx, raw in zip(group["idx"], group["raw"]):
            rid, reason, detail, ids, labels, rows = f"#{idx}", "", "", b"", b"", "[]"
            try:
                record = parse_record(raw)
                rid = record_id(record, idx)
                own = image_names(record)  # re-validates the field for records grouped as malformed
                for name in own:
                    if name in errors:
                        raise errors[name]
                sample = self.processor.sample(record, idx, len(own))
                ids, labels = sample.input_ids.tobytes(), sample.labels.tobytes()
                rows = json.dumps([position[name] for name in own])
            except BadRecord as err:
                reason, detail = err.reason, err.detail
            for key, value in zip(out, (rid, reason, detail, ids, labels, rows)):
                out[key].append(value)
        return {"idx": list(group["idx"]), **out, "images": image_bytes, "image_shape": json.dumps(image_shape),
                "encoded": 0}


class EncodeGroups:
    """Ray Data UDF (actor pool): processed pixels -> fp16 patch features of the frozen tower, per group."""

    def __init__(self, model_dir: str):
        import torch

        from model.checkpoint import load_vision_tower

        self.torch = torch
        tower, config = load_vision_tower(model_dir)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tower = tower.to(self.device, torch.float16 if self.device == "cuda" else torch.float32)
        self.layer = config.vision_feature_layer

    def __call__(self, batch: pa.Table) -> pa.Table:
        from model.towers import select_patch_features

        torch = self.torch
        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if r["images"] and any(not b for b in r["bad"])]
        if todo:
            pixels = [np.frombuffer(rows[i]["images"], np.float16).reshape(json.loads(rows[i]["image_shape"]))
                      for i in todo]
            stacked = torch.from_numpy(np.concatenate(pixels)).to(self.device, self.tower.dtype)
            with torch.no_grad():
                feats = select_patch_features(self.tower, stacked, self.layer).to(torch.float16).cpu().numpy()
            start = 0
            for i, p in zip(todo, pixels):
                f = feats[start: start + len(p)]
                start += len(p)
                rows[i].update(images=f.tobytes(), image_shape=json.dumps(list(f.shape)), encoded=len(p))
        return pa.Table.from_pylist(rows, schema=batch.schema)


def write_parts(batch: pa.Table, out: str, endpoint: str | None, attempt: str,
                retry_s: float | None = None) -> pa.Table:
    """Ray Data UDF (light tasks), `features` mode: a batch of encoded groups -> one Parquet part's stats."""
    return write_groups(batch.to_pylist(), out, endpoint, attempt, retry_s)


def write_groups(groups: list[dict], out: str, endpoint: str | None, attempt: str,
                 retry_s: float | None = None) -> pa.Table:
    """Prepared (or encoded) groups -> one Parquet part, written atomically; returns the part's stats."""
    rows, bad, indices, encoded = [], [], [], 0
    for group in groups:
        shape = json.loads(group["image_shape"])
        encoded += group["encoded"]
        for j, idx in enumerate(group["idx"]):
            indices.append(idx)
            if group["bad"][j]:
                bad.append({"idx": idx, "id": group["ids"][j], "reason": group["bad"][j],
                            "detail": group["detail"][j][:300]})
                continue
            ids = np.frombuffer(group["input_ids"][j], np.int32)
            own = json.loads(group["image_rows"][j])  # this record's images among the group's
            images = np.frombuffer(group["images"], np.float16).reshape(shape)[own] if own else None
            rows.append({"idx": idx, "id": group["ids"][j], "input_ids": ids,
                         "labels": np.frombuffer(group["labels"][j], np.int32), "length": len(ids),
                         "num_images": len(own), "images": images.tobytes() if own else b"",
                         "image_shape": list(images.shape) if own else []})
    name = write_part(out, rows, indices, bad, encoded, endpoint, attempt, retry_s)
    print(f"[preprocess] wrote {name}: {len(rows)} samples, {len(bad)} bad records", file=sys.stderr, flush=True)
    return pa.table({"part": [name], "samples": [len(rows)], "bad": [len(bad)]})


TASK_RECORDS = 2048  # records per `pixels` task: see pixel_tasks()


def pixel_tasks(groups: list[dict], groups_per_part: int, cpus: int) -> int:
    """How many tasks (Ray Data blocks) to split the groups into in `pixels` mode. Each task writes its
    groups as parts of at most `groups_per_part` groups and covers about TASK_RECORDS records, so that Ray
    Data's per-task scheduling latency (0.1-0.2 s between a task's end and the next one's start on that
    worker) stays small against the work; there are at least two tasks per CPU, and a multiple of the CPU
    count, while the parts allow, so that no core idles while the last tasks run."""
    parts = math.ceil(len(groups) / groups_per_part)
    records = sum(len(g["idx"]) for g in groups)
    return min(parts, cpus * math.ceil(max(records / TASK_RECORDS, 2 * cpus) / cpus))


MAX_GROUP_IMAGES = 32  # a group is one row of the prepare/encode stages: its images travel together


def group_records(records: list, skip: set[int], max_images: int = MAX_GROUP_IMAGES) -> list[dict]:
    """Pending records grouped so that records sharing any image land together (connected components of
    the record-image graph): every distinct image is then decoded and encoded exactly once, also when a
    two-image record shares one image with records of its own. Text-only and malformed records stand alone.
    A component with more than `max_images` images (multi-image records chaining many images together) is
    split into groups of at most that many; an image shared across the split is processed once per group
    (the manifest's images_encoded counts it each time)."""
    parent: dict = {}

    def find(key):
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    pending = []
    for idx, record in enumerate(records):
        if idx in skip:
            continue
        try:
            names = image_names(record)
        except BadRecord:
            names = None
        keys = [("image", n) for n in names] if names else [("<text>" if names == [] else "<malformed>", idx)]
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
        find(keys[0])
        pending.append((idx, record, keys))
    components: dict = {}
    for idx, record, keys in pending:
        components.setdefault(find(keys[0]), []).append((idx, record, [k[1] for k in keys if k[0] == "image"]))
    groups = []
    for members in components.values():
        group = None
        for idx, record, own in members:
            if group is None or len(set(group["names"]) | set(own)) > max(max_images, len(own)):
                group = {"names": [], "idx": [], "raw": []}
                groups.append(group)
            group["names"] += [n for n in dict.fromkeys(own) if n not in group["names"]]
            group["idx"].append(idx)
            group["raw"].append(json.dumps(record))
    return [{**g, "names": json.dumps(g["names"])} for g in groups]


def fingerprint(cfg: PreprocessConfig, json_bytes: bytes, identity: dict) -> dict:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "encoder_actors", "encode_batch",
                                                                   "s3_endpoint", "model", "storage_retry_s")}
    fp = {"schema_version": SCHEMA_VERSION, "json_sha256": hashlib.sha256(json_bytes).hexdigest(),
          "settings": settings, "identity": identity}
    return json.loads(json.dumps(fp))  # the form it takes on disk, so comparisons are exact


def _check_fingerprint(cfg: PreprocessConfig, fp: dict) -> dict | None:
    """The existing manifest when the store is already built from these inputs; error on a different store."""
    manifest_uri = storage.join(cfg.out, "manifest.json")
    fp_uri = storage.join(cfg.out, "_fingerprint.json")
    for uri in (manifest_uri, fp_uri):
        if storage.exists(uri, cfg.s3_endpoint, cfg.storage_retry_s):
            existing = json.loads(storage.read_bytes(uri, cfg.s3_endpoint, cfg.storage_retry_s))
            if existing.get("fingerprint", existing) != fp:
                raise ValueError(f"{cfg.out} holds a store built from other inputs or settings; "
                                 f"choose another --out or delete it")
            if uri == manifest_uri:
                return existing
    storage.write_bytes_atomic(fp_uri, json.dumps(fp).encode(), cfg.s3_endpoint, cfg.storage_retry_s)
    return None


def preprocess(cfg: PreprocessConfig, address: str | None = None) -> dict:
    """Build (or finish, or confirm) the store; returns its manifest."""
    import ray

    start = time.time()
    tokenizer, processor, image_tokens, max_length, config = load_processing(cfg)
    identity = processing_identity(cfg, tokenizer, processor, config)
    json_bytes = storage.read_bytes(cfg.json, cfg.s3_endpoint, cfg.storage_retry_s)
    fp = fingerprint(cfg, json_bytes, identity)
    done = _check_fingerprint(cfg, fp)
    if done is not None:
        print(f"[preprocess] {cfg.out} is up to date ({done['counts']['samples']} samples); nothing to do",
              file=sys.stderr)
        return done
    try:
        records = json.loads(json_bytes)
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg.json} is not valid JSON: {err}") from err
    if not isinstance(records, list):
        raise ValueError(f"{cfg.json} must hold a JSON array of records, not a {type(records).__name__}")
    del json_bytes

    covered = {i for footer in committed_parts(cfg.out, cfg.s3_endpoint, cfg.storage_retry_s).values()
               for i in footer["indices"]}
    groups = group_records(records, covered)
    attempt = uuid.uuid4().hex
    print(f"[preprocess] {len(records)} records, {len(covered)} already in committed parts, "
          f"{len(records) - len(covered)} to process in {len(groups)} image groups", file=sys.stderr)
    if groups:
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=True)
        groups_per_part = max(1, round(cfg.shard_records / (sum(len(g["idx"]) for g in groups) / len(groups))))
        # `attempt` (unique per run) keys the workers' cached processors
        prep_args = (attempt, cfg, {"ref": ray.put((tokenizer, processor, image_tokens, max_length))})
        if cfg.encode == "pixels":
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            # a block is one task's work (batch_size=None)
            ds = ray.data.from_items(groups, override_num_blocks=pixel_tasks(groups, groups_per_part, cpus))
            ds = ds.map_batches(prepare_and_write, fn_args=(*prep_args, groups_per_part), batch_size=None,
                                batch_format="pyarrow", num_cpus=1)
        else:
            # one block per part: parts stream through the encoder pool
            ds = ray.data.from_items(groups, override_num_blocks=math.ceil(len(groups) / groups_per_part))
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            # Fractional CPU requests keep the prepare tasks, the encoder pool and the writer from reserving
            # every core and starving each other on small clusters; the OS shares the cores among them.
            ds = ds.map_batches(prepare_groups, fn_args=prep_args, batch_size=None, batch_format="pyarrow",
                                num_cpus=0.5)
            ds = ds.map_batches(EncodeGroups, fn_constructor_args=(cfg.model,), batch_size=cfg.encode_batch,
                                batch_format="pyarrow", concurrency=tuple(cfg.encoder_actors), num_gpus=gpus,
                                num_cpus=0.1 if gpus else 0.5)
            # writing is I/O: light tasks that never wait for a free core
            ds = ds.map_batches(write_parts, fn_kwargs={"out": cfg.out, "endpoint": cfg.s3_endpoint, "attempt": attempt,
                                                        "retry_s": cfg.storage_retry_s},
                                batch_size=groups_per_part, batch_format="pyarrow", num_cpus=0.1)
        with storage.surface_outage():  # a part write that spent its retry budget: one line, parts kept
            written = ds.take_all()
        print(f"[preprocess] wrote {len(written)} parts", file=sys.stderr)

    manifest = build_manifest(cfg, fp, records, identity, attempt)
    storage.write_bytes_atomic(storage.join(cfg.out, "manifest.json"), json.dumps(manifest, indent=1).encode(),
                               cfg.s3_endpoint, cfg.storage_retry_s)
    counts = manifest["counts"]
    print(f"[preprocess] done in {time.time() - start:.1f}s: {counts['samples']} samples, {counts['bad']} bad "
          f"records {dict(counts['bad_by_reason'])}, {len(manifest['parts'])} parts -> {cfg.out}", file=sys.stderr)
    return manifest


def build_manifest(cfg: PreprocessConfig, fp: dict, records: list, identity: dict, attempt: str) -> dict:
    parts, redundant = resolve_overlaps(committed_parts(cfg.out, cfg.s3_endpoint, cfg.storage_retry_s), attempt)
    for name in redundant:
        print(f"[preprocess] {name} was finished by an interrupted run after this one started; "
              f"its records were processed again here, removing it", file=sys.stderr)
        storage.delete(storage.join(cfg.out, "parts", name), cfg.s3_endpoint, cfg.storage_retry_s)
    covered = [i for footer in parts.values() for i in footer["indices"]]
    if len(covered) != len(set(covered)) or set(covered) != set(range(len(records))):
        missing = sorted(set(range(len(records))) - set(covered))[:10]
        raise RuntimeError(f"store {cfg.out} is inconsistent: {len(covered)} records covered "
                           f"({len(covered) - len(set(covered))} twice), first missing {missing}")
    bad = sorted((b for footer in parts.values() for b in footer["bad"]), key=lambda b: b["idx"])
    footers = list(parts.values())
    samples = sum(len(f["hashes"]) for f in footers)
    return {
        "schema_version": SCHEMA_VERSION,
        "source": cfg.source,
        "phase": cfg.phase,
        "template": cfg.template,
        "encode": cfg.encode,
        "config": asdict(cfg),
        "fingerprint": fp,
        "tokenizer_sha256": identity["tokenizer_sha256"],
        "vision": identity,
        "counts": {"records": len(records), "samples": samples, "bad": len(bad),
                   "bad_by_reason": dict(sorted(Counter(b["reason"] for b in bad).items())),
                   "images_encoded": sum(f["images_encoded"] for f in footers)},
        "bad_records": bad,
        "parts": [{"name": name, "samples": len(f["hashes"]), "records": len(f["indices"])}
                  for name, f in sorted(parts.items())],
        "content_hash": content_hash(footers),
    }
