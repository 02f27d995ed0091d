"""Errors no restart can fix end `bitllava train` in the driver, in seconds, with one line naming the path:
no Ray cluster is started, so no worker is started or restarted on them."""

import os
import subprocess
import sys
import time

import pytest

BIN = os.path.join(os.path.dirname(sys.executable), "bitllava")
CONFIG = "pipelines/configs/train/tiny-align.yaml"  # the README's path: a shipped config, from any folder


def train(cwd, *args):
    start = time.time()
    proc = subprocess.run([BIN, "train", "--config", CONFIG, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    return proc, time.time() - start


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    subprocess.run([BIN, "model", "init", "--preset", "tiny", "--out", "base"], cwd=folder, check=True,
                   capture_output=True, timeout=120)
    return folder


def assert_one_line_error(proc, elapsed, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert elapsed < 30, elapsed
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitllava: error:"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ray_train_run" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_missing_init_folder_is_named(base):
    proc, elapsed = train(base, "--data", "stores/align", "--out", "runs/a", "--init", "nope")
    assert_one_line_error(proc, elapsed, str(base / "nope"), "not a model folder")


def test_an_init_folder_of_another_kind_is_named(base, tmp_path):
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text('{"model_type": "olmo_bitnet"}')
    proc, elapsed = train(tmp_path, "--data", "stores/align", "--out", "runs/a", "--init", "llm")
    assert_one_line_error(proc, elapsed, str(tmp_path / "llm"), "not a multimodal bitllava model")


def test_a_missing_store_is_named(base):
    proc, elapsed = train(base, "--data", "stores/none", "--out", "runs/a", "--init", "base")
    assert_one_line_error(proc, elapsed, str(base / "stores" / "none"), "not a finished sample store")


def test_a_missing_config_file_is_named(base):
    proc = subprocess.run([BIN, "train", "--config", "nope.yaml", "--data", "s", "--out", "o", "--init", "base"],
                          cwd=base, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "training config" in proc.stderr and str(base / "nope.yaml") in proc.stderr


@pytest.fixture(scope="module")
def features_store(base):
    subprocess.run([BIN, "data", "synth", "--out", "data", "--records", "8"], cwd=base, check=True,
                   capture_output=True, timeout=300)
    subprocess.run([BIN, "data", "preprocess", "--source", "cc595k", "--json", "data/cc595k/chat.json", "--images",
                    "data/cc595k/images.zip", "--out", "stores/features", "--phase", "align", "--model", "base",
                    "--encode", "features"], cwd=base, check=True, capture_output=True, timeout=300)
    return "stores/features"


def test_a_trained_tower_refuses_a_store_of_cached_features(base, features_store):
    proc, elapsed = train(base, "--data", features_store, "--out", "runs/a", "--init", "base",
                          "--tune-vision", "full")
    assert_one_line_error(proc, elapsed, str(base / "stores" / "features"), "cached tower features",
                          "--encode pixels")


def test_a_tower_layer_past_the_features_is_named(base, features_store):
    # the tiny tower has 2 layers and reads hidden layer -2: only layer 0 reaches the features
    proc, elapsed = train(base, "--data", features_store, "--out", "runs/a", "--init", "base",
                          "--tune-vision", "partial", "--tune-vision-from-layer", "1")
    assert_one_line_error(proc, elapsed, "tune_vision_from_layer 1 trains no layer", str(base / "base"),
                          "first 1 of its 2 layers")
    proc, elapsed = train(base, "--data", features_store, "--out", "runs/a", "--init", "base",
                          "--tune-vision", "partial")
    assert_one_line_error(proc, elapsed, "partial needs tune_vision_from_layer")
