"""Every shipped config loads and validates; the dry run prints a plan; bad configs are refused."""

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

from components.train.config import load_train_config
from pipelines.config import ROOT, load_pipeline_config
from pipelines.run import plan

PIPELINES = sorted(glob.glob(os.path.join(ROOT, "pipelines", "configs", "*.yaml")))
TRAIN = sorted(glob.glob(os.path.join(ROOT, "pipelines", "configs", "train", "*.yaml")))


def test_the_shipped_configs_are_there():
    names = {os.path.basename(p) for p in PIPELINES}
    assert {"tiny.yaml", "llava-olmo-bitnet-1b.yaml"} <= names
    assert len(TRAIN) >= 4


@pytest.mark.parametrize("path", PIPELINES, ids=os.path.basename)
def test_every_pipeline_config_validates_and_plans(path):
    cfg = load_pipeline_config(path)
    steps = [s["step"] for s in plan(cfg)["steps"]]
    assert steps[0] == "init" and steps[-2:] == ["pack", "deploy"]
    assert {"preprocess-align", "preprocess-instruct", "train-align", "train-instruct"} <= set(steps)


@pytest.mark.parametrize("path", TRAIN, ids=os.path.basename)
def test_every_train_config_validates(path):
    cfg = load_train_config(path, data="d", out="o", init="i")
    stage = os.path.basename(path).split("-", 1)[1].removesuffix(".yaml")
    assert cfg.phase == {"share": "align"}.get(stage, stage)  # the share stage trains on align data


def test_paper_recipe_values():
    p = os.path.join(ROOT, "pipelines", "configs", "train")
    align = load_train_config(os.path.join(p, "1b-align.yaml"), data="d", out="o", init="i")
    instruct = load_train_config(os.path.join(p, "1b-instruct.yaml"), data="d", out="o", init="i")
    assert (align.lr, align.per_device_batch, align.grad_accum, align.weight_decay) == (1e-3, 32, 4, 0.0)
    assert (instruct.lr, instruct.per_device_batch, instruct.grad_accum) == (2e-5, 8, 2)
    assert instruct.adam_betas == (0.9, 0.98) and instruct.zero_stage == 3 and align.zero_stage == 2
    assert align.warmup_ratio == instruct.warmup_ratio == 0.03 and align.epochs == instruct.epochs == 1
    cfg = load_pipeline_config(os.path.join(ROOT, "pipelines", "configs", "llava-olmo-bitnet-1b.yaml"))
    assert cfg.preset == "1b" and cfg.out.startswith("s3://")
    assert cfg.vision == "openai/clip-vit-large-patch14-336" and cfg.llm == "NousResearch/OLMo-Bitnet-1B"
    bitnet = load_pipeline_config(os.path.join(ROOT, "pipelines", "configs", "llava-bitnet-2b.yaml"))
    assert bitnet.preset == "bitnet-2b-4t" and bitnet.llm == "microsoft/bitnet-b1.58-2B-4T-bf16"
    assert (bitnet.instruct["per_device_batch"] * bitnet.instruct["grad_accum"]
            == instruct.per_device_batch * instruct.grad_accum)  # the same global batch on 8 workers


@pytest.mark.parametrize("change, message", [
    ({"preset": "7b"}, "unknown preset"),
    ({"preset": "bitnet-2b-4t"}, "needs llm"),
    ({"eval": {"tasks": ["mmlu"]}}, "unknown eval tasks"),
    ({"bogus": 1}, "unknown settings"),
    ({"data": {"synth": None}}, "needs either"),
    ({"align": {"config": "train/tiny-align.yaml", "lr": -1}}, "lr must be positive"),
    ({"pack": {"format": "3bit"}}, "pack.format"),
    ({"share": {"config": "train/tiny-share.yaml"}, "preprocess": {"encode_align": "features"}},
     "share: trains the vision tower, so the align store must hold pixels"),
    ({"share": {"config": "train/tiny-share.yaml", "phase": "instruct"}}, "share: trains phase 'align' data"),
    ({"share": {"tune_vision": "partial"}}, "partial needs tune_vision_from_layer"),
    ({"share": "yes"}, "share: must be a mapping"),
])
def test_bad_pipeline_configs_are_refused(tmp_path, change, message):
    with open(os.path.join(ROOT, "pipelines", "configs", "tiny.yaml")) as f:
        values = yaml.safe_load(f)
    values.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ValueError, match=message):
        load_pipeline_config(str(path))


def test_dry_run_command():
    bitllava = os.path.join(os.path.dirname(sys.executable), "bitllava")
    out = subprocess.run([bitllava, "run", os.path.join(ROOT, "pipelines", "configs", "llava-olmo-bitnet-1b.yaml"),
                          "--dry-run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    train = [s for s in report["steps"] if s["step"] == "train-instruct"][0]
    assert train["resources"] == "8 workers x (1 GPU), ZeRO-3" and train["global_batch"] == 8 * 2 * 8


def test_the_share_stage_sits_between_align_and_instruct(tmp_path):
    from pipelines.run import plan, step_names

    with open(os.path.join(ROOT, "pipelines", "configs", "tiny.yaml")) as f:
        values = yaml.safe_load(f)
    path = tmp_path / "share.yaml"
    path.write_text(yaml.safe_dump({**values, "share": {"config": "train/tiny-share.yaml"}}))
    cfg = load_pipeline_config(str(path))
    assert step_names(cfg)[4:7] == ["train-align", "train-share", "train-instruct"]
    steps = {s["step"]: s for s in plan(cfg)["steps"]}
    assert steps["train-share"]["tune"] == {"projector": "full", "llm": "full", "vision": "partial from layer 0"}
    assert steps["train-align"]["tune"] == {"projector": "full", "llm": "frozen", "vision": "frozen"}
    assert "train-share" not in step_names(load_pipeline_config(os.path.join(ROOT, "pipelines", "configs", "tiny.yaml")))
    share = load_train_config(os.path.join(ROOT, "pipelines", "configs", "train", "1b-share.yaml"), data="d", out="o",
                              init="i")  # TinyLLaVA's: the upper half of CLIP ViT-L's 24 layers, the LLM, lr 2e-5
    assert (share.tune_vision, share.tune_vision_from_layer, share.tune_llm, share.lr) == ("partial", 12, "full", 2e-5)


@pytest.mark.parametrize("name", ["tiny.yaml", "llava-olmo-bitnet-1b.yaml"])
def test_kfp_compile_orders_the_steps(tmp_path, name):
    out = tmp_path / "pipeline.yaml"
    bitllava = os.path.join(os.path.dirname(sys.executable), "bitllava")
    proc = subprocess.run([bitllava, "kfp", "compile", os.path.join(ROOT, "pipelines", "configs", name), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    spec = yaml.safe_load(out.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    order = {t["taskInfo"]["name"]: t for t in tasks.values()}
    expected = ["init", "synth", "preprocess-align", "preprocess-instruct", "train-align", "train-instruct",
                "eval", "pack", "deploy"]
    if name != "tiny.yaml":
        expected.remove("synth")
    assert list(order) == expected or sorted(order) == sorted(expected)
    by_task = {key: t["taskInfo"]["name"] for key, t in tasks.items()}
    for key, task in tasks.items():
        step = by_task[key]
        i = expected.index(step)
        deps = [by_task[d] for d in task.get("dependentTasks", [])]
        assert deps == ([expected[i - 1]] if i else []), (step, deps)
        assert task["inputs"]["parameters"]["step"]["runtimeValue"]["constant"] == step
    image = spec["deploymentSpec"]["executors"]["exec-pipeline-step"]["container"]["image"]
    assert image.endswith("-ray2.60.0")
