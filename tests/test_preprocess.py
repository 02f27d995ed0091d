"""The Ray Data preprocessing pipeline on a real local Ray cluster (and a real S3 server)."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import ray
import torch

from components import storage
from components.data.preprocess import PreprocessConfig, preprocess
from components.data.records import ImageSource, RecordProcessor
from components.data.store import committed_parts, decode_sample, load_manifest, read_store
from components.data.synth import SynthConfig, synthesize
from model.checkpoint import load_vision_tower, save_model
from model.presets import build_from_preset
from model.towers import select_patch_features

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    # started after the S3 server so that its workers inherit the AWS_* credentials, as cluster nodes would
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    summary = synthesize(SynthConfig(out=str(root / "synth"), records=60, eval=0, corrupt=1, seed=5))
    model, tokenizer, processor = build_from_preset("tiny", seed=0)
    save_model(str(root / "base"), model, tokenizer, processor)
    return root, summary


def cc_config(root, summary, out, **kw):
    cc = summary["cc595k"]
    return PreprocessConfig(source="cc595k", json=cc["json"], images=cc["images"], out=str(out), phase="align",
                            model=str(root / "base"), shard_records=8, **kw)


@pytest.fixture(scope="module")
def cc_store(ray_cluster, data):
    root, summary = data
    manifest = preprocess(cc_config(root, summary, root / "cc_store"))
    return root / "cc_store", manifest


def test_manifest_counts_every_bad_record_by_reason(cc_store, data):
    store, manifest = cc_store
    _, summary = data
    expected = summary["cc595k"]["bad"]
    assert {b["id"]: b["reason"] for b in manifest["bad_records"]} == expected
    by_reason = {}
    for reason in expected.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    assert manifest["counts"]["bad_by_reason"] == by_reason
    assert manifest["counts"]["samples"] == 60 and manifest["counts"]["records"] == 60 + len(expected)
    assert manifest["template"] == "plain" and manifest["schema_version"] == 1
    assert manifest["tokenizer_sha256"] and manifest["content_hash"]
    assert all(p["samples"] <= 8 for p in manifest["parts"]) and len(manifest["parts"]) >= 8


def test_reader_returns_exactly_what_direct_processing_gives(cc_store, data):
    store, manifest = cc_store
    root, summary = data
    rows = read_store(str(store)).take_all()
    assert len(rows) == manifest["counts"]["samples"]
    from model.checkpoint import load_model

    loaded = load_model(str(root / "base"))
    direct = RecordProcessor(loaded.tokenizer, loaded.image_processor, "plain", 16, 512)
    source = ImageSource(summary["cc595k"]["images"])
    records = json.load(open(summary["cc595k"]["json"]))
    for row in rows:
        sample = decode_sample(row)
        ref, pixels = direct.process_one(json.dumps(records[sample.idx]), sample.idx, source)
        assert sample.id == ref.id
        assert np.array_equal(sample.input_ids, ref.input_ids) and np.array_equal(sample.labels, ref.labels)
        assert sample.images.dtype == np.float16 and np.array_equal(sample.images, pixels)


def test_rerun_with_same_inputs_is_a_no_op(cc_store, data):
    store, manifest = cc_store
    root, summary = data
    before = {n: os.path.getmtime(store / "parts" / n) for n in os.listdir(store / "parts")}
    again = preprocess(cc_config(root, summary, store))
    assert again == json.loads((store / "manifest.json").read_text())
    assert {n: os.path.getmtime(store / "parts" / n) for n in os.listdir(store / "parts")} == before
    with pytest.raises(ValueError, match="other inputs or settings"):
        preprocess(cc_config(root, summary, store, max_length=100))


def test_killed_run_resumes_to_the_same_store(ray_cluster, data):
    root, _ = data
    # a larger set in small parts, so the kill lands part-way through
    big = synthesize(SynthConfig(out=str(root / "synth-big"), records=600, eval=0, corrupt=1, seed=7))["cc595k"]

    def config(out):
        return PreprocessConfig(source="cc595k", json=big["json"], images=big["images"], out=str(out),
                                phase="align", model=str(root / "base"), shard_records=4)

    reference = preprocess(config(root / "big-uninterrupted"))
    out = root / "killed"
    cmd = [os.path.join(os.path.dirname(sys.executable), "bitllava"), "data", "preprocess", "--source", "cc595k",
           "--json", big["json"], "--images", big["images"], "--out", str(out), "--phase", "align",
           "--model", str(root / "base"), "--shard-records", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "parts").is_dir() or not os.listdir(out / "parts"):
        assert proc.poll() is None, "preprocessing ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray processes
    proc.wait()
    partial = len(committed_parts(str(out)))
    assert 1 <= partial < len(reference["parts"]) and not (out / "manifest.json").exists()
    resumed = preprocess(config(out))
    assert resumed["content_hash"] == reference["content_hash"]
    assert resumed["counts"] == reference["counts"]
    indices = [i for f in committed_parts(str(out)).values() for i in f["indices"]]
    assert len(indices) == len(set(indices)) == reference["counts"]["records"]  # no duplicate, none missing


def test_features_mode_equals_the_tower_and_encodes_each_distinct_image_once(ray_cluster, data):
    root, summary = data
    info = summary["instruct"]
    cfg = PreprocessConfig(source="instruct", json=info["json"], images=info["images"], out=str(root / "feat"),
                           phase="instruct", encode="features", model=str(root / "base"), shard_records=16)
    manifest = preprocess(cfg)
    records = json.load(open(info["json"]))
    good = [r for r in records if isinstance(r, dict) and r.get("id") not in info["bad"]]
    uses = [name for r in good if "image" in r for name in ([r["image"]] if isinstance(r["image"], str) else r["image"])]
    pairs = [r for r in good if isinstance(r.get("image"), list) and len(r["image"]) == 2]
    alone = {r["image"] for r in good if isinstance(r.get("image"), str)}
    assert pairs and any(name in alone for r in pairs for name in r["image"])  # pairs reuse images seen alone
    # every distinct image encoded exactly once, however many records (one- or two-image) use it
    assert manifest["counts"]["images_encoded"] == len(set(uses)) < len(uses)
    assert manifest["counts"]["samples"] == len(good)

    tower, config = load_vision_tower(str(root / "base"))
    from model.checkpoint import load_model

    loaded = load_model(str(root / "base"))
    direct = RecordProcessor(loaded.tokenizer, loaded.image_processor, "v1", 16, 512)
    source = ImageSource(info["images"])
    by_image = {}
    for row in read_store(cfg.out).take_all():
        sample = decode_sample(row)
        record = records[sample.idx]
        _, pixels = direct.process_one(json.dumps(record), sample.idx, source)
        if pixels is None:
            assert sample.images is None
            continue
        with torch.no_grad():
            expected = select_patch_features(tower, torch.from_numpy(pixels.astype(np.float32)), -2)
        assert sample.images.shape == (len(pixels), 16, 64)
        assert torch.allclose(torch.from_numpy(sample.images.astype(np.float32)), expected, atol=2e-2, rtol=1e-2)
        by_image.setdefault(json.dumps(record["image"]), []).append(sample.images)
    shared = [v for v in by_image.values() if len(v) > 1]
    assert shared and all(np.array_equal(v[0], w) for v in shared for w in v)


def test_s3_round_trip(ray_cluster, data, s3_server, cc_store):
    import boto3

    root, summary = data
    store, manifest = cc_store
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    cc = summary["cc595k"]
    client.upload_file(cc["json"], "bitllava-test", "raw/chat.json")
    with zipfile.ZipFile(cc["images"]) as z:  # images as an s3:// prefix, one object each
        for name in z.namelist():
            client.put_object(Bucket="bitllava-test", Key=f"raw/images/{name}", Body=z.read(name))
    cfg = PreprocessConfig(source="cc595k", json="s3://bitllava-test/raw/chat.json",
                           images="s3://bitllava-test/raw/images", out="s3://bitllava-test/stores/cc",
                           phase="align", model=str(root / "base"), shard_records=8)
    remote = preprocess(cfg)
    assert remote["content_hash"] == manifest["content_hash"]
    assert storage.exists("s3://bitllava-test/stores/cc/manifest.json")
    assert load_manifest("s3://bitllava-test/stores/cc")["counts"] == manifest["counts"]
    rows = read_store("s3://bitllava-test/stores/cc").take_all()
    assert sorted(r["idx"] for r in rows) == sorted(r["idx"] for r in read_store(str(store)).take_all())
