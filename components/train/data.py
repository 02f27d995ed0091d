"""Deterministic streaming input for training, from the sample store.

Every rank streams its own store parts through Ray Data (`get_dataset_shard("train_<rank>")`),
dealt out per epoch in a seeded order, with order preserved. Samples are then shuffled (seeded) within
windows of 16 batches, and, as LLaVA's length-grouped sampler does, sorted by length within
megabatches of `group_batches` batches (LLaVA: world size x batch) so that padding stays small while
every batch remains a random draw. So the data a rank sees at each step is a function of
(seed, epoch, step) only: a run resumed from a checkpoint continues on exactly the data it would have
seen, and every rank runs the same number of micro-steps (DeepSpeed's collectives need that).

Sorting a whole window by length instead makes each batch one question template (the store keeps
records in file order): measured on the tiny demo, held-out accuracy then stays near the image-blind
level (0.40 after 600 steps, against 0.68 with shuffled batches).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from components import storage
from components.data.store import SAMPLE_SCHEMA, decode_sample, load_manifest, parts_uri
from model.conversation import IGNORE_INDEX

SHUFFLE_WINDOW_BATCHES = 16


def deal_parts(parts: list[dict], workers: int, seed: int, epoch: int) -> list[list[dict]]:
    """Parts in a seeded order, each to the rank holding the fewest samples so far (balanced ranks)."""
    order = sorted(parts, key=lambda p: p["name"])
    random.Random(f"{seed}-{epoch}").shuffle(order)
    ranks: list[list[dict]] = [[] for _ in range(workers)]
    for part in order:
        min(ranks, key=lambda r: sum(p["samples"] for p in r)).append(part)
    return ranks


def plan_epochs(manifest: dict, workers: int, per_device_batch: int, grad_accum: int, epochs: int, seed: int):
    """Per epoch: each rank's parts, rows, and the micro-steps every rank runs (a multiple of grad_accum)."""
    plan = []
    for epoch in range(epochs):
        ranks = deal_parts(manifest["parts"], workers, seed, epoch)
        rows = [sum(p["samples"] for p in r) for r in ranks]
        micro = min(rows) // per_device_batch // grad_accum * grad_accum
        plan.append({"parts": [[p["name"] for p in r] for r in ranks], "rows": rows, "micro_steps": micro})
    if sum(e["micro_steps"] for e in plan) == 0:
        raise ValueError(f"the store holds {manifest['counts']['samples']} samples: too few for {workers} workers x "
                         f"batch {per_device_batch} x accumulation {grad_accum}")
    return plan


def shard_name(rank: int, epoch: int) -> str:
    return f"train_r{rank}_e{epoch}"


def rank_datasets(store: str, plan: list[dict], workers: int, endpoint: str | None = None) -> dict:
    """{shard_name(rank, epoch): Dataset}: each rank's parts of each epoch, in plan order."""
    import ray.data

    fs, path = storage.filesystem(parts_uri(store), endpoint)
    datasets = {}
    for epoch, epoch_plan in enumerate(plan):
        for rank in range(workers):
            files = [f"{path}/{name}" for name in epoch_plan["parts"][rank]]
            ds = ray.data.read_parquet(files, filesystem=fs, schema=SAMPLE_SCHEMA, shuffle=None,
                                       ray_remote_args={"num_cpus": 0.25})
            ds.context.execution_options.preserve_order = True
            ds.context.enable_progress_bars = False
            datasets[shard_name(rank, epoch)] = ds
    return datasets


def collate(samples: list, pad_id: int, encode: str) -> dict:
    """Right-padded batch: input_ids, attention_mask, labels (B, T) and pixel_values or image_features."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.from_numpy(s.input_ids)
        labels[i, :n] = torch.from_numpy(s.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    images = [s.images for s in samples if s.images is not None]
    if images:
        key = "pixel_values" if encode == "pixels" else "image_features"
        batch[key] = torch.from_numpy(np.concatenate(images)).float()
    return batch


def micro_batches(rows, epoch_rows: int, micro_steps: int, batch: int, seed: int, epoch: int,
                  group_by_length: bool, group_batches: int = 2):
    """Consume exactly `epoch_rows` rows of `rows` (an iterator of store rows); yield `micro_steps` lists of samples."""
    window = batch * SHUFFLE_WINDOW_BATCHES
    megabatch = batch * max(1, group_batches)
    used = micro_steps * batch
    taken, buffer, emitted = 0, [], 0
    rng = random.Random(f"{seed}-{epoch}-shuffle")
    while taken < epoch_rows:
        row = next(rows)
        taken += 1
        if taken <= used:
            buffer.append(decode_sample(row))
        if len(buffer) == window or (taken == used and buffer):
            rng.shuffle(buffer)
            if group_by_length:
                buffer = [s for i in range(0, len(buffer), megabatch)
                          for s in sorted(buffer[i: i + megabatch], key=lambda s: (-len(s.input_ids), s.idx))]
            for i in range(0, len(buffer), batch):
                emitted += 1
                yield buffer[i: i + batch]
            buffer = []
    assert emitted == micro_steps, (emitted, micro_steps)


def load_store_manifest(store: str, endpoint: str | None = None) -> dict:
    return load_manifest(store, endpoint)
