"""Generated datasets in the published layouts (`bitllava data synth`).

Every image is drawn procedurally (`components.synthetic_images`), so every caption and answer is
known exactly and a small model can learn them:
- `cc595k/chat.json` (JSON array, LLaVA-CC3M-Pretrain-595K schema) with `images.zip`
  (or an `images/` folder);
- `instruct/llava_instruct_150k.json` with an `images/` folder: several conversations per image,
  multi-turn, some text-only records, some records with two images (`image` is then a list);
- `eval/pope/coco_pope_{random,popular,adversarial}.json` (question lines with `label`),
  `eval/vqav2/v2_OpenEnded_mscoco_val2014_{questions,annotations}.json` (`annotations` file is
  `v2_mscoco_val2014_annotations.json`), `eval/textvqa/TextVQA_0.5.1_val.json` (with
  `TextVQA_Rosetta_OCR_v0.2_val.json` and LLaVA's `llava_textvqa_val_v051_ocr.jsonl`), each with an
  `images/` folder of held-out images; LLaVA's `llava_pope_test.jsonl`; and small sets of the other
  evaluation tasks (`eval/{vqav2-test-dev,gqa,scienceqa,mme,seed,mmbench}/`, see
  `components.evaluate.synthetic_sets`).
`--corrupt K` adds K bad records of every kind in `CORRUPT_KINDS` to both training sets;
`synth.json` lists which record ids are bad and why, so tests can check the preprocessing report.
"""

from __future__ import annotations

import io
import json
import os
import random
import zipfile
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

from components.synthetic_images import COLOURS, NUMBER_WORDS, SHAPES, Scene, draw_scene, random_scene

CAPTION_PROMPTS = (
    "Provide a brief description of the given image.",
    "Describe the image concisely.",
    "Give a short and clear explanation of the subsequent image.",
    "Summarize the visual content of the image.",
)
# LLaVA-1.5 short-answer records put the image first: "<image>\n{question}\n" + this (the eval prompt too)
SHORT_ANSWER = "Answer the question using a single word or phrase."
# bad-record kind -> the reason the preprocessing report must give
CORRUPT_KINDS = {
    "missing_image": "missing_image",
    "truncated_image": "corrupt_image",
    "not_an_image": "corrupt_image",
    "decompression_bomb": "decompression_bomb",
    "zero_size_image": "empty_image",
    "malformed_record": "malformed_record",
    "missing_placeholder": "image_placeholder_mismatch",
    "extra_placeholder": "image_placeholder_mismatch",
    "empty_answer": "empty_answer",
    "too_long": "too_long",
}
BOMB_SIDE = 8000  # 64 Mpixel 1-bit PNG: a few KB on disk, over the default 25 Mpixel limit


@dataclass
class SynthConfig:
    """What `bitllava data synth` writes.

    out: output folder.
    records: CC-595K-style caption records (the instruct set gets about as many).
    eval: questions per evaluation set (POPE gets this many per split).
    corrupt: bad records of every kind added to each training set.
    seed: random seed; the same seed writes the same files.
    instruct_images: distinct images of the instruct set, two conversations each (default records // 2).
    cc_images: "zip" (as published: images.zip) or "folder".
    """

    out: str
    records: int = 200
    eval: int = 60
    corrupt: int = 0
    seed: int = 0
    cc_images: str = "zip"
    instruct_images: int | None = None

    def __post_init__(self):
        if self.records < 1 or self.eval < 0 or self.corrupt < 0:
            raise ValueError("records must be >= 1, eval and corrupt >= 0")
        if self.instruct_images is not None and self.instruct_images < 2:
            raise ValueError("instruct_images must be >= 2")
        if self.cc_images not in ("zip", "folder"):
            raise ValueError(f"cc_images must be 'zip' or 'folder', not {self.cc_images!r}")


def encode_image(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _scene_questions(scene: Scene) -> list[tuple[str, str]]:
    """(question, short answer) pairs that are true of the scene."""
    plural = scene.shape + ("s" if scene.count > 1 else "")
    return [
        (f"What color is the {scene.shape}?" if scene.count == 1 else f"What color are the {plural}?", scene.colour),
        (f"How many {scene.shape}s are there?", str(scene.count)),
        ("What shape is shown?", scene.shape),
        (f"Where is the {scene.shape}?" if scene.count == 1 else f"Where are the {plural}?", scene.position),
    ]


def _corrupt_image_bytes(kind: str, rng: random.Random) -> bytes | None:
    if kind == "missing_image":
        return None
    if kind == "zero_size_image":
        return b""
    if kind == "not_an_image":
        return bytes(rng.getrandbits(8) for _ in range(512))
    if kind == "decompression_bomb":
        return encode_image(Image.new("1", (BOMB_SIDE, BOMB_SIDE)), "PNG")
    whole = encode_image(draw_scene(random_scene(rng)), "JPEG")
    return whole[: len(whole) // 3]  # truncated_image


class _Writer:
    """Writes images to a folder or a zip; remembers which bad record is which."""

    def __init__(self, folder: str, as_zip: bool):
        self.folder, self.zip = folder, None
        os.makedirs(folder, exist_ok=True)
        if as_zip:
            self.zip = zipfile.ZipFile(os.path.join(os.path.dirname(folder), "images.zip"), "w", zipfile.ZIP_STORED)

    def put(self, name: str, data: bytes | None) -> None:
        if data is None:
            return
        if self.zip is not None:
            self.zip.writestr(name, data)
        else:
            with open(os.path.join(self.folder, name), "wb") as f:
                f.write(data)

    def close(self):
        if self.zip is not None:
            self.zip.close()
            os.rmdir(self.folder)


def _bad_records(kind: str, n: int, prefix: str, writer: _Writer, rng: random.Random, multi_ok: bool) -> list[dict]:
    records = []
    for i in range(n):
        rid = f"{prefix}_bad_{kind}_{i}"
        name = f"{rid}.jpg"
        scene = random_scene(rng)
        conv = [{"from": "human", "value": f"{CAPTION_PROMPTS[0]}\n<image>"}, {"from": "gpt", "value": scene.caption()}]
        if kind in ("missing_image", "truncated_image", "not_an_image", "decompression_bomb", "zero_size_image"):
            writer.put(name, _corrupt_image_bytes(kind, rng))
        else:
            writer.put(name, encode_image(draw_scene(scene), "JPEG"))
        record = {"id": rid, "image": name, "conversations": conv}
        if kind == "malformed_record":
            record = [{"id": rid, "image": name}, {"id": rid, "image": name, "conversations": "not a list"},
                      {"id": rid, "image": 7, "conversations": conv}][i % 3]
        elif kind == "missing_placeholder":
            conv[0]["value"] = CAPTION_PROMPTS[0]
        elif kind == "extra_placeholder":
            conv[0]["value"] = "<image>\n" + conv[0]["value"]
        elif kind == "empty_answer":
            conv[1]["value"] = "  "
        elif kind == "too_long":
            conv[1]["value"] = " ".join(["red circle"] * 3000)
        records.append(record)
    return records


def write_cc595k(cfg: SynthConfig, rng: random.Random) -> dict:
    folder = os.path.join(cfg.out, "cc595k")
    writer = _Writer(os.path.join(folder, "images"), as_zip=cfg.cc_images == "zip")
    records = []
    for i in range(cfg.records):
        scene = random_scene(rng)
        fmt = "PNG" if i % 4 == 3 else "JPEG"
        rid = f"GCC_train_{i:09d}"
        name = f"{rid}.{'png' if fmt == 'PNG' else 'jpg'}"
        writer.put(name, encode_image(draw_scene(scene), fmt))
        prompt = rng.choice(CAPTION_PROMPTS)
        human = f"{prompt}\n<image>" if rng.random() < 0.5 else f"<image>\n{prompt}"
        records.append({"id": rid, "image": name,
                        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": scene.caption()}]})
    bad = _insert_bad_records(records, cfg.corrupt, "GCC", writer, rng, multi_ok=False)
    writer.close()
    with open(os.path.join(folder, "chat.json"), "w") as f:
        json.dump(records, f)
    return {"json": os.path.join(folder, "chat.json"),
            "images": os.path.join(folder, "images.zip" if cfg.cc_images == "zip" else "images"),
            "records": len(records), "bad": bad}


def _insert_bad_records(records: list, count: int, prefix: str, writer, rng: random.Random,
                        multi_ok: bool) -> dict[str, str]:
    """`count` bad records of every kind, inserted at random places; returns {record id: expected reason}."""
    bad = {}
    for kind, reason in CORRUPT_KINDS.items():
        for record in _bad_records(kind, count, prefix, writer, rng, multi_ok=multi_ok):
            records.insert(rng.randrange(len(records) + 1), record)
            bad[record["id"]] = reason
    return bad


def write_instruct(cfg: SynthConfig, rng: random.Random) -> dict:
    folder = os.path.join(cfg.out, "instruct")
    writer = _Writer(os.path.join(folder, "images"), as_zip=False)
    records, scenes = [], {}
    n_images = cfg.instruct_images or max(2, cfg.records // 2)
    for i in range(n_images):
        scene = random_scene(rng)
        name = f"{i:012d}.jpg"
        scenes[name] = scene
        writer.put(name, encode_image(draw_scene(scene), "JPEG"))
    names = sorted(scenes)
    for name in names:  # two conversations per image on average: one multi-turn, one short
        qa = _scene_questions(scenes[name])
        rng.shuffle(qa)
        turns = []
        for j, (q, a) in enumerate(qa[: rng.randint(2, 4)]):
            turns += [{"from": "human", "value": (f"<image>\n{q}" if j == 0 else q)}, {"from": "gpt", "value": a}]
        records.append({"id": f"{name[:-4]}_conv", "image": name, "conversations": turns})
        q, a = rng.choice(qa)
        records.append({"id": f"{name[:-4]}_short", "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{q}\n{SHORT_ANSWER}"}, {"from": "gpt", "value": a}]})
    for i in range(max(1, cfg.records // 20)):  # text-only records
        a, b = rng.randint(0, 4), rng.randint(0, 5)
        if a + b < len(NUMBER_WORDS):
            answer = NUMBER_WORDS[a + b]
        else:
            answer = str(a + b)
        records.append({"id": f"text_{i}", "conversations": [
            {"from": "human", "value": f"What is {a} plus {b}?"}, {"from": "gpt", "value": answer}]})
    for i in range(max(1, cfg.records // 20)):  # two-image records
        first, second = rng.sample(names, 2)
        answer = f"{scenes[first].colour} and {scenes[second].colour}"
        records.append({"id": f"pair_{i}", "image": [first, second], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat colors are the shapes in the two images?"},
            {"from": "gpt", "value": answer}]})
    bad = _insert_bad_records(records, cfg.corrupt, "instruct", writer, rng, multi_ok=True)
    writer.close()
    path = os.path.join(folder, "llava_instruct_150k.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return {"json": path, "images": os.path.join(folder, "images"), "records": len(records),
            "images_distinct": n_images, "bad": bad}


def _eval_images(folder: str, n: int, rng: random.Random, name_fmt: str) -> list[tuple[int, str, Scene]]:
    os.makedirs(folder, exist_ok=True)
    out = []
    for i in range(n):
        image_id = 500000 + i
        scene = random_scene(rng)
        name = name_fmt.format(image_id)
        draw_scene(scene).save(os.path.join(folder, name), quality=92)
        out.append((image_id, name, scene))
    return out


def write_pope(cfg: SynthConfig, rng: random.Random) -> dict:
    folder = os.path.join(cfg.out, "eval", "pope")
    images = _eval_images(os.path.join(folder, "images"), max(1, cfg.eval // 2), rng, "COCO_val2014_{:012d}.jpg")
    splits = {}
    for split in ("random", "popular", "adversarial"):
        lines = []
        for qid in range(1, cfg.eval + 1):
            _, name, scene = images[(qid - 1) % len(images)]
            label = "yes" if qid % 2 else "no"
            if label == "yes":
                colour, shape = scene.colour, scene.shape
            elif split == "adversarial":  # same colour, another shape
                colour, shape = scene.colour, rng.choice([s for s in SHAPES if s != scene.shape])
            elif split == "popular":  # the most common colour, unless present
                colour, shape = ("red" if scene.colour != "red" else "blue"), scene.shape
            else:
                colour = rng.choice([c for c in sorted(COLOURS) if c != scene.colour])
                shape = rng.choice(SHAPES)
            lines.append({"question_id": qid, "image": name,
                          "text": f"Is there a {colour} {shape} in the image?", "label": label})
        path = os.path.join(folder, f"coco_pope_{split}.json")
        with open(path, "w") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
        splits[split] = path
    return {"questions": splits, "images": os.path.join(folder, "images")}


def _ten_answers(answer: str, rng: random.Random, alternatives: list[str]) -> list[str]:
    """Ten human answers: mostly the true one, a few variants (exercises the leave-one-out average)."""
    answers = [answer] * 10
    for k in rng.sample(range(10), rng.randint(0, 3)):
        answers[k] = rng.choice(alternatives)
    return answers


def write_vqav2(cfg: SynthConfig, rng: random.Random) -> dict:
    folder = os.path.join(cfg.out, "eval", "vqav2")
    images = _eval_images(os.path.join(folder, "images"), max(1, cfg.eval // 3), rng, "COCO_val2014_{:012d}.jpg")
    questions, annotations = [], []
    for qid in range(cfg.eval):
        image_id, _, scene = images[qid % len(images)]
        q, a = _scene_questions(scene)[qid % 4]
        answer_type = "number" if a.isdigit() else "other"
        alternatives = {"number": [NUMBER_WORDS[scene.count], str(scene.count)],
                        "other": [f"the {a}", a.upper(), "unknown"]}[answer_type]
        question_id = image_id * 10 + qid
        questions.append({"image_id": image_id, "question": q, "question_id": question_id})
        answers = _ten_answers(a, rng, alternatives)
        annotations.append({
            "question_id": question_id, "image_id": image_id, "question_type": " ".join(q.split()[:2]).lower(),
            "answer_type": answer_type, "multiple_choice_answer": a,
            "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1} for i, x in enumerate(answers)],
        })
    qpath = os.path.join(folder, "v2_OpenEnded_mscoco_val2014_questions.json")
    apath = os.path.join(folder, "v2_mscoco_val2014_annotations.json")
    with open(qpath, "w") as f:
        json.dump({"info": {"description": "bitllava synthetic VQAv2"}, "task_type": "Open-Ended",
                   "data_type": "mscoco", "data_subtype": "val2014", "license": {}, "questions": questions}, f)
    with open(apath, "w") as f:
        json.dump({"info": {"description": "bitllava synthetic VQAv2"}, "data_type": "mscoco",
                   "data_subtype": "val2014", "license": {}, "annotations": annotations}, f)
    return {"questions": qpath, "annotations": apath, "images": os.path.join(folder, "images")}


TEXT_WORDS = ("stop", "open", "exit", "sale", "cafe", "bank", "taxi", "park", "hotel", "bus")


def write_textvqa(cfg: SynthConfig, rng: random.Random) -> dict:
    folder = os.path.join(cfg.out, "eval", "textvqa")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    data = []
    for qid in range(cfg.eval):
        word = rng.choice(TEXT_WORDS)
        colour = rng.choice(sorted(COLOURS))
        image = Image.new("RGB", (rng.randint(96, 160), rng.randint(64, 120)), (255, 255, 255))
        pen = ImageDraw.Draw(image)
        pen.rectangle((4, 4, image.width - 4, image.height - 4), outline=COLOURS[colour], width=3)
        pen.text((image.width // 4, image.height // 3), word.upper(), fill=(0, 0, 0))
        image_id = f"{rng.getrandbits(64):016x}"
        image.save(os.path.join(folder, "images", f"{image_id}.jpg"), quality=92)
        question = "what word is written in the image?"
        data.append({
            "question": question, "image_id": image_id, "image_classes": ["sign"], "flickr_original_url": "",
            "flickr_300k_url": "", "image_width": image.width, "image_height": image.height,
            "answers": _ten_answers(word, rng, [word.upper(), f"{word} sign", "unanswerable"]),
            "question_tokens": question.rstrip("?").split(), "question_id": qid, "set_name": "val",
        })
    path = os.path.join(folder, "TextVQA_0.5.1_val.json")
    with open(path, "w") as f:
        json.dump({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}, f)
    return {"questions": path, "annotations": path, "images": os.path.join(folder, "images")}


def write_more_eval_sets(cfg: SynthConfig, written: dict, seed: int) -> dict:
    """LLaVA's question files and TextVQA's OCR file beside the sets above, a VQAv2 test-dev set, and small sets
    of the other tasks (GQA, ScienceQA, MME, SEED-Bench, MMBench), all in their published layouts
    (`components.evaluate.synthetic_sets`). At most 24 questions each: they cost well under a second."""
    from components.evaluate import synthetic_sets as sets

    n = max(4, min(cfg.eval, 24))
    root = os.path.join(cfg.out, "eval")
    pope_files = [written["pope"]["questions"][s] for s in ("random", "popular", "adversarial")]
    written["pope"]["llava_questions"] = sets.write_llava_pope(os.path.join(root, "pope"), {"annotations": pope_files})
    written["textvqa"].update({f"llava_{k}" if k == "questions" else k: v for k, v in sets.write_textvqa_ocr(
        os.path.join(root, "textvqa"), {"annotations": [written["textvqa"]["annotations"]]}).items()})
    return {
        "vqav2-test-dev": sets.write_vqav2_test_dev(os.path.join(root, "vqav2-test-dev"), num_questions=n // 2,
                                                    seed=seed),
        "gqa": sets.write_gqa(os.path.join(root, "gqa"), num_questions=n, seed=seed + 1),
        "scienceqa": sets.write_scienceqa(os.path.join(root, "scienceqa"), num_questions=n, seed=seed + 2),
        "mme": sets.write_mme(os.path.join(root, "mme"), images_per_subtask=max(1, n // 8), seed=seed + 3),
        "seed": sets.write_seed(os.path.join(root, "seed"), num_questions=n, seed=seed + 4),
        "mmbench": sets.write_mmbench(os.path.join(root, "mmbench"), num_questions=max(2, n // 3), seed=seed + 5),
    }


def synthesize(cfg: SynthConfig) -> dict:
    """Write every dataset; returns (and writes to synth.json) where everything is."""
    os.makedirs(cfg.out, exist_ok=True)
    rng = random.Random(cfg.seed)
    summary = {
        "config": asdict(cfg),
        "cc595k": write_cc595k(cfg, random.Random(rng.random())),
        "instruct": write_instruct(cfg, random.Random(rng.random())),
        "eval": {},
    }
    if cfg.eval:
        summary["eval"] = {
            "pope": write_pope(cfg, random.Random(rng.random())),
            "vqav2": write_vqav2(cfg, random.Random(rng.random())),
            "textvqa": write_textvqa(cfg, random.Random(rng.random())),
        }
        summary["eval"].update(write_more_eval_sets(cfg, summary["eval"], rng.randrange(2**31)))
    with open(os.path.join(cfg.out, "synth.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
