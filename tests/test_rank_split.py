"""Each epoch's samples split across ranks at sample granularity (components.train.data)."""

import collections
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from components.data.store import SAMPLE_SCHEMA, parts_uri, write_part
from components.train.data import micro_batches, plan_epochs, rank_datasets, read_ranges, shard_name

STORES = {
    "one part": [200],
    "uneven parts": [37, 5, 90, 1, 64, 13, 0, 22],
    "many small parts": [3] * 41,
    "one big part, many small": [500, 2, 1, 7],
}


def manifest(sizes: list[int]) -> dict:
    parts = [{"name": f"part-{i * 1000:09d}-{i:010x}.parquet", "samples": n, "records": n + 1}
             for i, n in enumerate(sizes)]
    return {"counts": {"samples": sum(sizes)}, "parts": parts}


def rows_of(epoch_plan: dict, rank: int) -> list[tuple[str, int]]:
    return [(name, row) for name, start, stop in epoch_plan["ranges"][rank] for row in range(start, stop)]


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("batch,accum", [(1, 1), (4, 1), (3, 2), (2, 4)])
def test_every_sample_once_per_epoch_but_a_short_remainder(store, workers, batch, accum):
    m = manifest(STORES[store])
    sizes = {p["name"]: p["samples"] for p in m["parts"]}
    total, step = sum(sizes.values()), workers * batch * accum
    plan = plan_epochs(m, workers, batch, accum, epochs=3, seed=7)
    assert len(plan) == 3
    for epoch_plan in plan:
        ranks = [rows_of(epoch_plan, r) for r in range(workers)]
        used = [row for rows in ranks for row in rows]
        assert len(used) == len(set(used)) == epoch_plan["samples_used"]  # no sample on two ranks, or twice
        assert all(0 <= row < sizes[name] for name, row in used)
        assert epoch_plan["samples_used"] + epoch_plan["samples_dropped"] == total
        assert 0 <= epoch_plan["samples_dropped"] < step and epoch_plan["samples_used"] % step == 0
        # every rank runs the same micro-steps, whole optimizer steps, on exactly the rows it reads
        assert epoch_plan["micro_steps"] % accum == 0 and epoch_plan["micro_steps"] > 0
        assert [len(rows) for rows in ranks] == epoch_plan["rows"] == [epoch_plan["micro_steps"] * batch] * workers


def test_a_single_part_store_trains_on_any_number_of_workers():
    # the store: one part of 200 samples could not train on 2 workers x batch 4 when parts were dealt whole
    for workers in range(1, 9):
        plan = plan_epochs(manifest([200]), workers, 4, 1, epochs=1, seed=0)
        assert plan[0]["micro_steps"] == 200 // (4 * workers)
        assert plan[0]["samples_dropped"] == 200 % (4 * workers)


def test_too_small_a_store_names_the_samples_one_step_needs():
    with pytest.raises(ValueError, match=r"holds 7 samples: too few for 2 workers x batch 2 x accumulation 2 "
                                         r"\(one optimizer step needs 8 samples\)"):
        plan_epochs(manifest([3, 4]), 2, 2, 2, epochs=2, seed=0)
    assert plan_epochs(manifest([4, 4]), 2, 2, 2, epochs=1, seed=0)[0]["samples_dropped"] == 0


def test_order_is_a_function_of_seed_and_epoch_only():
    for sizes in STORES.values():
        m = manifest(sizes)
        a = plan_epochs(m, 3, 4, 2, epochs=4, seed=5)
        shuffled = dict(m, parts=random.Random(1).sample(m["parts"], len(m["parts"])))
        assert plan_epochs(shuffled, 3, 4, 2, epochs=4, seed=5) == a  # the manifest's listing order does not matter
        assert plan_epochs(m, 3, 4, 2, epochs=2, seed=5) == a[:2]  # an epoch's plan does not depend on later ones
        orders = [[rows_of(e, r) for r in range(3)] for e in a]
        assert all(orders[i] != orders[j] for i in range(4) for j in range(i))  # every epoch its own order
        assert plan_epochs(m, 3, 4, 2, epochs=1, seed=6)[0] != a[0]


def test_the_dropped_samples_change_from_epoch_to_epoch():
    m = manifest([37, 5, 90, 1, 64])  # 197 samples, 5 dropped per epoch at 2 x 4 x 3
    plan = plan_epochs(m, 2, 4, 3, epochs=12, seed=3)
    counts = collections.Counter(row for e in plan for r in range(2) for row in rows_of(e, r))
    assert len(counts) == 197  # no sample is always left out
    assert all(e["samples_dropped"] == 5 for e in plan)


def _sample(idx: int, images: bool) -> dict:
    length = 3 + idx % 5
    image = np.full((1, 2, 2), idx, np.float16)
    return {"idx": idx, "id": f"s{idx}", "input_ids": list(range(idx, idx + length)), "labels": [-100] * length,
            "length": length, "num_images": int(images), "images": image.tobytes() if images else b"",
            "image_shape": list(image.shape) if images else []}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of uneven parts (sample idx = 1000 x part + row), one of them in row groups of 7 rows."""
    root = tmp_path_factory.mktemp("rank_split") / "store"
    parts, idx_of = [], {}
    for p, n in enumerate([150, 9, 1, 40, 23]):
        rows = [_sample(1000 * p + i, images=i % 3 == 0) for i in range(n)]
        name = write_part(str(root), rows, [r["idx"] for r in rows] + [1000 * p + n], bad=[], images_encoded=n)
        if p == 3:  # several row groups: the reader must skip and cut them exactly
            pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), f"{parts_uri(str(root))}/{name}",
                           row_group_size=7)
        parts.append({"name": name, "samples": n, "records": n + 1})
        idx_of[name] = [r["idx"] for r in rows]
    m = {"phase": "instruct", "counts": {"samples": 223}, "parts": parts}
    (root / "manifest.json").write_text(json.dumps(m))
    return str(root), m, idx_of


def _read(store_path: str, ranges: list[list]) -> list[int]:
    batch = pa.table({"part": [r[0] for r in ranges], "start": [r[1] for r in ranges], "stop": [r[2] for r in ranges]})
    tables = list(read_ranges(batch, pafs.LocalFileSystem(), parts_uri(store_path)))
    assert all(t.schema == SAMPLE_SCHEMA for t in tables)
    return [i for t in tables for i in t.column("idx").to_pylist()]


def test_the_reader_yields_exactly_the_rows_of_each_range(store):
    path, m, idx_of = store
    big, grouped = m["parts"][0]["name"], m["parts"][3]["name"]
    for name in (big, grouped):
        n = len(idx_of[name])
        for start, stop in [(0, n), (0, 1), (n - 1, n), (6, 7), (7, 8), (6, 15), (13, 36), (64, 129), (3, 3)]:
            if stop <= n:
                assert _read(path, [[name, start, stop]]) == idx_of[name][start:stop], (name, start, stop)
    assert _read(path, [[grouped, 30, 40], [big, 0, 2], [grouped, 0, 3]]) == \
        idx_of[grouped][30:40] + idx_of[big][0:2] + idx_of[grouped][0:3]


@pytest.mark.slow
def test_rank_streams_hold_the_planned_rows_in_order(store):
    import ray

    path, m, idx_of = store
    workers, batch, accum = 3, 4, 2
    plan = plan_epochs(m, workers, batch, accum, epochs=2, seed=1)
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        datasets = rank_datasets(path, plan, workers)
        assert set(datasets) == {shard_name(r, e) for r in range(workers) for e in range(2)}
        for epoch, epoch_plan in enumerate(plan):
            seen = []
            for rank in range(workers):
                rows = list(datasets[shard_name(rank, epoch)].iter_rows())
                assert [r["idx"] for r in rows] == [idx_of[name][row] for name, row in rows_of(epoch_plan, rank)]
                batches = list(micro_batches(iter(rows), epoch_plan["rows"][rank], epoch_plan["micro_steps"], batch,
                                             1, epoch, True, group_batches=workers))
                assert len(batches) == epoch_plan["micro_steps"] and all(len(b) == batch for b in batches)
                for s in (s for b in batches for s in b):
                    assert s.id == f"s{s.idx}" and list(s.input_ids[:1]) == [s.idx]
                    assert s.images is None if s.idx % 1000 % 3 else s.images.flat[0] == np.float16(s.idx)
                seen += [s.idx for b in batches for s in b]
            assert len(seen) == len(set(seen)) == epoch_plan["samples_used"] == 216
    finally:
        ray.shutdown()
