"""Generated datasets and the per-record preprocessing logic (no Ray)."""

import json
import os
import subprocess
import sys
import zipfile

import pytest

from components.data.records import BadRecord, ImageSource, RecordProcessor
from components.data.synth import CORRUPT_KINDS, SynthConfig, synthesize
from model.presets import preset_config
from model.towers.clip import clip_image_processor


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return synthesize(SynthConfig(out=str(out), records=40, eval=12, corrupt=1, seed=3)), out


@pytest.fixture(scope="module")
def processor():
    config, tokenizer = preset_config("tiny")
    return lambda template: RecordProcessor(tokenizer, clip_image_processor(64), template, 16, 256)


def test_cc595k_layout(synth):
    summary, out = synth
    records = json.load(open(out / "cc595k" / "chat.json"))
    assert isinstance(records, list) and len(records) == 40 + len(CORRUPT_KINDS)
    good = [r for r in records if isinstance(r, dict) and r.get("id", "").startswith("GCC_train_")]
    assert len(good) == 40
    r = good[0]
    assert set(r) == {"id", "image", "conversations"} and r["image"] == r["id"] + os.path.splitext(r["image"])[1]
    assert [t["from"] for t in r["conversations"]] == ["human", "gpt"] and "<image>" in r["conversations"][0]["value"]
    names = zipfile.ZipFile(out / "cc595k" / "images.zip").namelist()
    assert {g["image"] for g in good} <= set(names)
    assert any(n.endswith(".png") for n in names) and any(n.endswith(".jpg") for n in names)


def test_instruct_layout(synth):
    summary, out = synth
    records = json.load(open(out / "instruct" / "llava_instruct_150k.json"))
    good = [r for r in records if isinstance(r, dict) and r["id"] not in summary["instruct"]["bad"]]
    assert any("image" not in r for r in good)  # text-only
    assert any(isinstance(r.get("image"), list) and len(r["image"]) == 2 for r in good)  # two images
    assert any(len(r["conversations"]) >= 6 for r in good)  # multi-turn
    single = [r["image"] for r in good if isinstance(r.get("image"), str)]
    assert len(single) > len(set(single))  # several conversations per image


def test_instruct_images_sets_the_distinct_images(tmp_path):
    summary = synthesize(SynthConfig(out=str(tmp_path), records=10, instruct_images=30, eval=0, seed=4))
    records = json.load(open(summary["instruct"]["json"]))
    single = [r["image"] for r in records if isinstance(r.get("image"), str)]
    assert summary["instruct"]["images_distinct"] == 30 and len(set(single)) == 30 and len(single) == 60


def test_shapes_fill_enough_of_the_image():
    # a 16-patch tower must see them: the smallest drawing (three triangles) still covers >= 5% of the canvas
    import random

    from PIL import ImageChops

    from components.synthetic_images import draw_scene, random_scene
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng)
        image = draw_scene(scene)
        assert 3 / 4 - 0.02 <= image.height / image.width <= 4 / 3 + 0.02
        background = image.copy()
        background.paste(scene.background, (0, 0, *image.size))
        diff = ImageChops.difference(image, background).convert("L").point(lambda v: 255 if v else 0)
        covered = sum(diff.histogram()[255:]) / (image.width * image.height)
        assert covered >= 0.05, (scene, covered)


def test_eval_layouts(synth):
    summary, out = synth
    pope = [json.loads(line) for line in open(out / "eval/pope/coco_pope_adversarial.json")]
    assert set(pope[0]) == {"question_id", "image", "text", "label"} and {p["label"] for p in pope} == {"yes", "no"}
    q = json.load(open(out / "eval/vqav2/v2_OpenEnded_mscoco_val2014_questions.json"))
    a = json.load(open(out / "eval/vqav2/v2_mscoco_val2014_annotations.json"))
    assert {x["question_id"] for x in q["questions"]} == {x["question_id"] for x in a["annotations"]}
    assert all(len(x["answers"]) == 10 for x in a["annotations"])
    t = json.load(open(out / "eval/textvqa/TextVQA_0.5.1_val.json"))
    assert t["dataset_version"] == "0.5.1" and all(len(d["answers"]) == 10 for d in t["data"])
    for d in t["data"]:
        assert os.path.isfile(out / "eval/textvqa/images" / f"{d['image_id']}.jpg")


@pytest.mark.parametrize("source", ["cc595k", "instruct"])
def test_every_bad_kind_gives_its_reason(synth, processor, source):
    summary, out = synth
    info = summary[source]
    records = json.load(open(info["json"]))
    proc = processor("plain" if source == "cc595k" else "v1")
    images = ImageSource(info["images"])
    seen = {}
    for idx, record in enumerate(records):
        rid = record.get("id") if isinstance(record, dict) else None
        try:
            proc.process_one(json.dumps(record), idx, images)
            assert rid not in info["bad"], f"{rid} should have been rejected"
        except BadRecord as err:
            assert rid in info["bad"], f"good record {rid} rejected: {err}"
            seen[rid] = err.reason
    assert seen == info["bad"]
    assert set(seen.values()) == set(CORRUPT_KINDS.values())


def test_sample_images_are_processed_pixels(synth, processor):
    summary, out = synth
    records = json.load(open(summary["instruct"]["json"]))
    pair = next(r for r in records if str(r.get("id", "")).startswith("pair_"))
    sample, pixels = processor("v1").process_one(json.dumps(pair), 0, ImageSource(summary["instruct"]["images"]))
    assert pixels.shape == (2, 3, 64, 64) and pixels.dtype.name == "float16"
    assert sample.num_images == 2 and (sample.input_ids == preset_config("tiny")[0].image_token_id).sum() == 32


def test_image_source_refuses_a_file_that_is_not_a_zip(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a folder"):
        ImageSource(str(tmp_path / "x.txt"))


def test_preprocess_command_line_errors(tmp_path):
    bitllava = os.path.join(os.path.dirname(sys.executable), "bitllava")
    base = ["data", "preprocess", "--source", "cc595k", "--images", str(tmp_path), "--out", str(tmp_path / "o")]
    (tmp_path / "a.json").write_text("[]")
    cases = [
        (["--json", str(tmp_path / "missing.json"), "--phase", "align"], "does not exist"),
        (["--json", str(tmp_path / "a.json"), "--phase", "pretrain"], "unknown phase 'pretrain'"),
        (["--json", str(tmp_path / "a.json"), "--phase", "align", "--encode", "features"], "needs --model"),
    ]
    for extra, message in cases:
        proc = subprocess.run([bitllava, *base, *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_record_groups_share_images_and_stay_bounded():
    from components.data.preprocess import group_records

    turn = [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "no"}]
    chain = [{"id": f"c{i}", "image": [f"{i}.jpg", f"{i + 1}.jpg"], "conversations": turn} for i in range(100)]
    one = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    single = [{"id": "s", "image": "a.jpg", "conversations": one}, {"id": "t", "image": "a.jpg", "conversations": one},
              {"id": "text", "conversations": one[1:]}]
    groups = group_records(chain + single, skip={5}, max_images=32)
    covered = sorted(i for g in groups for i in g["idx"])
    assert covered == [i for i in range(103) if i != 5]  # every pending record exactly once
    names = [json.loads(g["names"]) for g in groups]
    assert all(len(n) <= 32 for n in names)  # the 100-record chain (skip 5 splits it in two) is capped
    assert len({n for ns in names for n in ns}) == 102  # 0..100.jpg and a.jpg
    by_first = {g["idx"][0]: g for g in groups}
    assert by_first[100]["idx"] == [100, 101] and json.loads(by_first[100]["names"]) == ["a.jpg"]  # shared image: one group
    records = chain + single
    for g in groups:  # each group lists exactly its records' images, each once
        image_fields = [records[i].get("image", []) for i in g["idx"]]
        own = {n for field in image_fields for n in ([field] if isinstance(field, str) else field)}
        assert sorted(json.loads(g["names"])) == sorted(own)
    uncapped = group_records(chain, skip=set(), max_images=1000)
    assert len(uncapped) == 1 and len(json.loads(uncapped[0]["names"])) == 101


@pytest.mark.parametrize("records,per_group,per_part,cpus,expected", [
    (20000, 1, 256, 2, 10), (10000, 1, 256, 2, 6), (2000, 1, 256, 2, 4), (600, 1, 4, 2, 4), (60, 1, 8, 2, 4),
    (100, 1, 256, 4, 1), (300000, 2, 128, 16, 160), (7, 1, 256, 2, 1)])
def test_pixel_tasks_are_long_but_keep_every_core_busy(records, per_group, per_part, cpus, expected):
    from components.data.preprocess import TASK_RECORDS, pixel_tasks

    groups = [{"idx": list(range(i, i + per_group))} for i in range(0, records, per_group)]
    parts = -(-len(groups) // per_part)
    tasks = pixel_tasks(groups, per_part, cpus)
    assert tasks == expected and 1 <= tasks <= parts
    if parts >= 2 * cpus:
        assert tasks >= 2 * cpus  # every core has work, twice over
    if parts >= 4 * cpus:
        assert records / tasks <= 2 * TASK_RECORDS  # tasks stay short enough to balance
