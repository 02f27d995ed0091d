"""Small sets of every evaluation task in the published file layouts, drawn from generated images.

Each image's content is known (`components.synthetic_images`), so every label, human answer and option
letter is true by construction. The sets exercise the real loaders and scorers: VQAv2/TextVQA questions
carry 10 human answers with the variation real annotators show (number words, capitals, trailing
periods, a dissenting answer), so normalisation and the leave-one-out average both matter; GQA holds
an unbalanced question, ScienceQA text-only and train problems, MME both folder layouts, SEED-Bench a
video question, and MMBench 3- and 4-option questions with their circular copies. `write_all` writes
one of each (the layout `bitllava data synth` writes under `eval/`).
"""

from __future__ import annotations

import json
import os
import random

from PIL import ImageDraw

from components.evaluate.prompts import ocr_prompt, short_answer_prompt
from components.synthetic_images import COLOURS, NUMBER_WORDS, POSITIONS, SHAPES, draw_scene, random_scene

POPE_SPLITS = ("random", "popular", "adversarial")
TEXT_WORDS = ("stop", "exit", "open", "cafe", "taxi", "hotel", "bank", "park", "sale", "bus")


def _write_json(path: str, payload) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    return path


def write_pope(folder: str, per_split: int = 8, seed: int = 0) -> dict:
    """`coco_pope_{random,popular,adversarial}.json` (label lines) and their COCO-named images.

    Labels alternate yes/no; a "no" asks about a shape that is not drawn. The splits share images,
    as POPE's do, and their question ids restart at 1.
    """
    rng = random.Random(seed)
    images_dir = os.path.join(folder, "val2014")
    os.makedirs(images_dir, exist_ok=True)
    scenes = {}
    for i in range(per_split):
        image_id = 100 + i
        scenes[image_id] = random_scene(rng)
        draw_scene(scenes[image_id]).save(os.path.join(images_dir, f"COCO_val2014_{image_id:012d}.jpg"), quality=90)
    files = []
    for split in POPE_SPLITS:
        path = os.path.join(folder, f"coco_pope_{split}.json")
        with open(path, "w", encoding="utf-8") as f:
            for n, (image_id, scene) in enumerate(sorted(scenes.items())):
                label = "yes" if n % 2 == 0 else "no"
                shape = scene.shape if label == "yes" else rng.choice([s for s in SHAPES if s != scene.shape])
                record = {"question_id": n + 1, "image": f"COCO_val2014_{image_id:012d}.jpg",
                          "text": f"Is there a {shape} in the image?", "label": label}
                f.write(json.dumps(record) + "\n")
        files.append(path)
    return {"annotations": files, "images": images_dir}


def _vqa_question(rng: random.Random, scene, kind: str) -> tuple[str, list[str], str, str]:
    """(question, 10 human answers, answer_type, question_type) about a scene."""
    noun = scene.shape if scene.count == 1 else scene.shape + "s"
    if kind == "color":
        other = rng.choice([c for c in COLOURS if c != scene.colour])
        answers = [scene.colour] * 7 + [scene.colour.capitalize(), f"{scene.colour}.", other]
        return f"What color is the {scene.shape}?", answers, "other", "what color is the"
    if kind == "count":
        digit, word = str(scene.count), NUMBER_WORDS[scene.count]
        answers = [digit] * 6 + [word] * 3 + [str(scene.count + 1)]
        return f"How many {noun} are there?", answers, "number", "how many"
    asked = rng.choice(sorted(COLOURS))
    truth = "yes" if asked == scene.colour else "no"
    return f"Is the {scene.shape} {asked}?", [truth] * 9 + ["Yes" if truth == "yes" else "No"], "yes/no", "is the"


def write_vqav2(folder: str, num_questions: int = 12, seed: int = 0, subtype: str = "val2014") -> dict:
    """`v2_OpenEnded_mscoco_<subtype>_questions.json`, `v2_mscoco_<subtype>_annotations.json`, images."""
    rng = random.Random(seed)
    images_dir = os.path.join(folder, subtype)
    os.makedirs(images_dir, exist_ok=True)
    questions, annotations = [], []
    for i in range(num_questions):
        image_id = 1000 + i
        scene = random_scene(rng)
        draw_scene(scene).save(os.path.join(images_dir, f"COCO_{subtype}_{image_id:012d}.jpg"), quality=90)
        question, answers, answer_type, question_type = _vqa_question(rng, scene, ("color", "count", "yesno")[i % 3])
        qid = image_id * 1000
        questions.append({"image_id": image_id, "question": question, "question_id": qid})
        annotations.append({
            "question_id": qid, "image_id": image_id, "question_type": question_type, "answer_type": answer_type,
            "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)],
        })
    meta = {"info": {"description": "bitllava synthetic VQAv2"}, "license": {}, "data_type": "mscoco",
            "data_subtype": subtype}
    q_path = _write_json(os.path.join(folder, f"v2_OpenEnded_mscoco_{subtype}_questions.json"),
                         {**meta, "task_type": "Open-Ended", "questions": questions})
    a_path = _write_json(os.path.join(folder, f"v2_mscoco_{subtype}_annotations.json"),
                         {**meta, "annotations": annotations})
    return {"questions": q_path, "annotations": [a_path], "images": images_dir}


def write_textvqa(folder: str, num_questions: int = 12, seed: int = 0) -> dict:
    """`TextVQA_0.5.1_val.json` and `train_images/<image_id>.jpg` with a word written on each image."""
    rng = random.Random(seed)
    images_dir = os.path.join(folder, "train_images")
    os.makedirs(images_dir, exist_ok=True)
    data = []
    for i in range(num_questions):
        image_id = f"{rng.getrandbits(64):016x}"
        word = rng.choice(TEXT_WORDS)
        image = draw_scene(random_scene(rng, min_side=96))
        ImageDraw.Draw(image).text((4, 4), word.upper(), fill=(0, 0, 0))
        image.save(os.path.join(images_dir, f"{image_id}.jpg"), quality=90)
        answers = [word] * 7 + [word.upper(), f"{word}.", rng.choice([w for w in TEXT_WORDS if w != word])]
        data.append({
            "question": "what word is written on the sign?", "image_id": image_id, "image_classes": ["sign"],
            "image_width": image.width, "image_height": image.height, "answers": answers,
            "question_tokens": ["what", "word", "is", "written", "on", "the", "sign"], "question_id": 34600 + i,
            "set_name": "val",
        })
    path = _write_json(os.path.join(folder, "TextVQA_0.5.1_val.json"),
                       {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})
    return {"annotations": [path], "images": images_dir}


# ---------------------------------------------------------------- LLaVA question files, test-dev, OCR


def _lines(path: str, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_llava_pope(folder: str, pope: dict) -> str:
    """LLaVA's `llava_pope_test.jsonl` for POPE files written by `write_pope`: ids numbered across the
    splits, the split in `category`, `text` with the short-answer line (the prompt as LLaVA sends it)."""
    records, qid = [], 0
    for path in pope["annotations"]:
        split = os.path.basename(path)[len("coco_pope_"):-len(".json")]
        for line in open(path, encoding="utf-8"):
            q = json.loads(line)
            qid += 1
            records.append({"question_id": qid, "image": q["image"], "text": short_answer_prompt(q["text"]),
                            "category": split})
    return _lines(os.path.join(folder, "llava_pope_test.jsonl"), records)


def write_vqav2_test_dev(folder: str, num_questions: int = 6, extra_test_ids: int = 3, seed: int = 0) -> dict:
    """LLaVA's `llava_vqav2_mscoco_test-dev2015.jsonl` (no answers), its test2015 images, and the full test list
    `llava_vqav2_mscoco_test2015.jsonl` (test-dev plus `extra_test_ids` more, as test-std adds to test-dev)."""
    rng = random.Random(seed)
    images_dir = os.path.join(folder, "test2015")
    os.makedirs(images_dir, exist_ok=True)
    dev = []
    for i in range(num_questions):
        image_id = 2000 + i
        scene = random_scene(rng)
        name = f"COCO_test2015_{image_id:012d}.jpg"
        draw_scene(scene).save(os.path.join(images_dir, name), quality=90)
        question = _vqa_question(rng, scene, ("color", "count", "yesno")[i % 3])[0]
        dev.append({"question_id": image_id * 1000, "image": name, "text": short_answer_prompt(question),
                    "category": "default"})
    full = dev + [{"question_id": (3000 + k) * 1000, "image": f"COCO_test2015_{3000 + k:012d}.jpg",
                   "text": short_answer_prompt("What is in the image?"), "category": "default"}
                  for k in range(extra_test_ids)]
    return {"questions": _lines(os.path.join(folder, "llava_vqav2_mscoco_test-dev2015.jsonl"), dev),
            "test_questions": _lines(os.path.join(folder, "llava_vqav2_mscoco_test2015.jsonl"), full),
            "images": images_dir}


def write_textvqa_ocr(folder: str, textvqa: dict) -> dict:
    """`TextVQA_Rosetta_OCR_v0.2_val.json` (the written word, as Rosetta reads it, and a stray token) and LLaVA's
    `llava_textvqa_val_v051_ocr.jsonl`, for a set written by `write_textvqa`."""
    data = json.load(open(textvqa["annotations"][0], encoding="utf-8"))["data"]
    ocr, lines = [], []
    for item in data:
        word = max(set(item["answers"]), key=item["answers"].count)
        tokens = [word.upper(), "sign"]
        ocr.append({"image_id": item["image_id"], "ocr_tokens": tokens, "set_name": "val",
                    "ocr_info": [{"word": t, "bounding_box": {"top_left_x": 0.05, "top_left_y": 0.05, "width": 0.3,
                                                              "height": 0.1, "rotation": 0, "roll": 0, "pitch": 0,
                                                              "yaw": 0}} for t in tokens]})
        lines.append({"question_id": item["image_id"], "image": f"{item['image_id']}.jpg",
                      "text": ocr_prompt(item["question"], tokens), "category": "default"})
    return {"ocr": _write_json(os.path.join(folder, "TextVQA_Rosetta_OCR_v0.2_val.json"),
                               {"dataset_name": "textvqa", "dataset_type": "val", "data": ocr}),
            "questions": _lines(os.path.join(folder, "llava_textvqa_val_v051_ocr.jsonl"), lines)}


# --------------------------------------------------------------------------------------------- GQA


def write_gqa(folder: str, num_questions: int = 9, seed: int = 0) -> dict:
    """`testdev_balanced_questions.json` (colour queries, colour and object checks; the last one unbalanced),
    LLaVA's `llava_gqa_testdev_balanced.jsonl`, and `images/<imageId>.jpg`."""
    rng = random.Random(seed)
    images_dir = os.path.join(folder, "images")
    os.makedirs(images_dir, exist_ok=True)
    questions, lines = {}, []
    for i in range(num_questions):
        image_id = f"n{100000 + i}"
        scene = random_scene(rng)
        draw_scene(scene).save(os.path.join(images_dir, f"{image_id}.jpg"), quality=90)
        kind = i % 3
        if kind == 0:
            text, answer, types = f"What color is the {scene.shape}?", scene.colour, ("query", "attr")
        elif kind == 1:
            asked = rng.choice(sorted(COLOURS))
            text, answer, types = (f"Is the {scene.shape} {asked}?", "yes" if asked == scene.colour else "no",
                                   ("verify", "attr"))
        else:
            asked = rng.choice(SHAPES)
            text, answer, types = (f"Is there a {asked} in the image?", "yes" if asked == scene.shape else "no",
                                   ("verify", "obj"))
        qid = str(20000000 + i)
        questions[qid] = {"semantic": [{"operation": "select", "dependencies": [], "argument": scene.shape}],
                          "entailed": [], "equivalent": [qid], "question": text, "imageId": image_id,
                          "isBalanced": i != num_questions - 1, "groups": {"global": None, "local": "01-x"},
                          "answer": answer, "semanticStr": "", "annotations": {"answer": {}, "question": {},
                                                                               "fullAnswer": {}},
                          "types": {"detailed": types[0] + "Attr", "semantic": types[1], "structural": types[0]},
                          "fullAnswer": f"The answer is {answer}."}
        lines.append({"question_id": qid, "image": f"{image_id}.jpg", "text": short_answer_prompt(text),
                      "category": "default"})
    return {"annotations": [_write_json(os.path.join(folder, "testdev_balanced_questions.json"), questions)],
            "questions": _lines(os.path.join(folder, "llava_gqa_testdev_balanced.jsonl"), lines),
            "images": images_dir}


# ---------------------------------------------------------------------------------------- ScienceQA


def write_scienceqa(folder: str, num_questions: int = 8, seed: int = 0) -> dict:
    """`problems.json`, `pid_splits.json` and `images/test/<pid>/image.png`: colour questions with 2-4 choices
    (some with a hint), plus two text-only test problems and a train problem (both left out of ScienceQA-IMG)."""
    rng = random.Random(seed)
    problems, test, train = {}, [], []
    base = {"task": "closed choice", "grade": "grade3", "subject": "natural science", "topic": "colors",
            "category": "Identify colors", "skill": "colors", "lecture": "", "solution": "", "caption": ""}
    for i in range(num_questions + 3):
        pid = str(100 + i)
        scene = random_scene(rng)
        choices = [scene.colour] + rng.sample([c for c in sorted(COLOURS) if c != scene.colour], 1 + i % 3)
        rng.shuffle(choices)
        text_only = i in (num_questions, num_questions + 1)
        split = "train" if i == num_questions + 2 else "test"
        problems[pid] = {**base, "question": "Which color is the shape in the image?" if not text_only else
                         "Which color do you get by mixing red and yellow?",
                         "choices": choices if not text_only else ["orange", "green"],
                         "answer": choices.index(scene.colour) if not text_only else 0,
                         "hint": "Look at the picture." if i % 2 else "", "image": None if text_only else "image.png",
                         "split": split}
        (train if split == "train" else test).append(pid)
        if not text_only:
            os.makedirs(os.path.join(folder, "images", split, pid), exist_ok=True)
            draw_scene(scene).save(os.path.join(folder, "images", split, pid, "image.png"))
    _write_json(os.path.join(folder, "problems.json"), problems)
    _write_json(os.path.join(folder, "pid_splits.json"), {"train": train, "val": [], "test": test, "minival": []})
    return {"annotations": [folder], "images": os.path.join(folder, "images", "test")}


# -------------------------------------------------------------------------------------------- MME


def _mme_pair(rng: random.Random, subtask: str, scene) -> list[tuple[str, str]]:
    """Two questions about one image, answered Yes and No (as MME's are)."""
    suffix = " Please answer yes or no."
    if subtask == "existence":
        other = rng.choice([s for s in SHAPES if s != scene.shape])
        return [(f"Is there a {scene.shape} in this image?{suffix}", "Yes"),
                (f"Is there a {other} in this image?{suffix}", "No")]
    if subtask == "count":
        noun = scene.shape + "s"
        return [(f"Are there {scene.count} {noun} in the image?{suffix}", "Yes"),
                (f"Are there {scene.count + 1} {noun} in the image?{suffix}", "No")]
    if subtask == "color":
        other = rng.choice([c for c in sorted(COLOURS) if c != scene.colour])
        return [(f"Is there a {scene.colour} {scene.shape} in the image?{suffix}", "Yes"),
                (f"Is there a {other} {scene.shape} in the image?{suffix}", "No")]
    other = rng.choice([s for s in SHAPES if s != scene.shape])  # artwork
    return [(f"Does this artwork show a {scene.shape}?{suffix}", "Yes"),
            (f"Does this artwork show a {other}?{suffix}", "No")]


def write_mme(folder: str, images_per_subtask: int = 2, seed: int = 0) -> dict:
    """`MME_Benchmark_release_version/` with existence, count and color (image and text side by side), artwork
    (`images/` + `questions_answers_YN/`) and numerical_calculation (a sum written on the image)."""
    rng = random.Random(seed)
    root = os.path.join(folder, "MME_Benchmark_release_version")
    for subtask in ("existence", "count", "color", "artwork", "numerical_calculation"):
        split_layout = subtask == "artwork"
        text_dir = os.path.join(root, subtask, "questions_answers_YN") if split_layout else os.path.join(root, subtask)
        image_dir = os.path.join(root, subtask, "images") if split_layout else text_dir
        os.makedirs(text_dir, exist_ok=True)
        os.makedirs(image_dir, exist_ok=True)
        for k in range(images_per_subtask):
            stem = f"{k + 1:04d}"
            scene = random_scene(rng, min_side=96)
            image = draw_scene(scene)
            if subtask == "numerical_calculation":
                a, b = rng.randint(1, 4), rng.randint(1, 4)
                ImageDraw.Draw(image).text((4, 4), f"{a}+{b}=", fill=(0, 0, 0))
                pairs = [(f"Is the answer to the arithmetic question in the image {a + b}? Please answer yes or no.",
                          "Yes"),
                         (f"Is the answer to the arithmetic question in the image {a + b + 1}? Please answer yes or "
                          f"no.", "No")]
            else:
                pairs = _mme_pair(rng, subtask, scene)
            image.save(os.path.join(image_dir, f"{stem}.png"))
            with open(os.path.join(text_dir, f"{stem}.txt"), "w", encoding="utf-8") as f:
                f.write("".join(f"{q}\t{a}\n" for q, a in pairs))
    return {"annotations": [root], "images": root}


# ------------------------------------------------------------------------------------------- SEED-Bench


SEED_TYPES = {"Scene Understanding": 1, "Instance Identity": 2, "Instance Attributes": 3, "Instance Location": 4,
              "Instances Counting": 5, "Spatial Relation": 6, "Instance Interaction": 7, "Visual Reasoning": 8,
              "Text Understanding": 9, "Action Recognition": 10, "Action Prediction": 11,
              "Procedure Understanding": 12}


def _four_choices(rng: random.Random, truth: str, pool: list[str]) -> tuple[list[str], str]:
    choices = [truth] + rng.sample([p for p in pool if p != truth], 3)
    rng.shuffle(choices)
    return choices, "ABCD"[choices.index(truth)]


def _scene_choice_question(rng: random.Random, scene, kind: int) -> tuple[str, list[str], str, str]:
    """(question, 4 choices, answer letter, SEED-Bench dimension) about a scene."""
    if kind == 0:
        choices, letter = _four_choices(rng, scene.colour, sorted(COLOURS))
        return f"What is the color of the {scene.shape}?", choices, letter, "Instance Attributes"
    if kind == 1:
        choices, letter = _four_choices(rng, NUMBER_WORDS[scene.count].capitalize(),
                                        [w.capitalize() for w in NUMBER_WORDS[1:]])
        return f"How many {scene.shape}s are in the image?", choices, letter, "Instances Counting"
    choices, letter = _four_choices(rng, scene.position, list(POSITIONS))
    return "Where are the shapes in the image?", choices, letter, "Instance Location"


def write_seed(folder: str, num_questions: int = 9, seed: int = 0) -> dict:
    """`SEED-Bench.json` (image questions of three dimensions and one video question) and `SEED-Bench-image/`."""
    rng = random.Random(seed)
    images_dir = os.path.join(folder, "SEED-Bench-image")
    os.makedirs(images_dir, exist_ok=True)
    questions = []
    for i in range(num_questions):
        data_id = f"{1454426 + i}_{2591111986 + i}"
        scene = random_scene(rng)
        draw_scene(scene).save(os.path.join(images_dir, data_id), format="JPEG", quality=90)
        text, choices, letter, dimension = _scene_choice_question(rng, scene, i % 3)
        questions.append({"answer": letter, **{f"choice_{c}": v for c, v in zip("abcd", choices)},
                          "data_id": data_id, "data_type": "image", "question": text,
                          "question_id": str(101669 + i), "question_type_id": SEED_TYPES[dimension]})
    questions.append({"answer": "B", "choice_a": "throwing something", "choice_b": "catching something",
                      "choice_c": "lifting something", "choice_d": "poking something", "data_id": "94328.webm",
                      "data_type": "video", "question": "What is the action being carried out in the video?",
                      "question_id": "v1738", "question_type_id": 10})
    return {"annotations": [_write_json(os.path.join(folder, "SEED-Bench.json"),
                                        {"questions": questions, "question_type": SEED_TYPES})],
            "images": images_dir}


# ----------------------------------------------------------------------------------------------- MMBench


MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split")


def write_mmbench(folder: str, num_questions: int = 4, seed: int = 0, circular: bool = True) -> dict:
    """`mmbench_dev_20230712.tsv`: scene questions with 3 or 4 options (some with a hint), base64 images, and
    (`circular`) the rotated copies at index + k * 1,000,000 whose image cell names the original row."""
    import base64
    import csv
    import io

    from components.evaluate.tasks.mmbench import rotations

    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(num_questions):
        scene = random_scene(rng)
        buffer = io.BytesIO()
        draw_scene(scene).save(buffer, format="JPEG", quality=90)
        text, choices, letter, dimension = _scene_choice_question(rng, scene, i % 3)
        if i % 2:  # three options: drop a wrong one
            truth = choices["ABCD".index(letter)]
            wrong = next(c for c in choices if c != truth)
            choices = [c for c in choices if c != wrong]
            letter = "ABC"[choices.index(truth)]
        row = {"index": str(i), "question": text, "hint": "The image shows simple shapes." if i % 2 == 0 else "",
               "A": choices[0], "B": choices[1], "C": choices[2], "D": choices[3] if len(choices) > 3 else "",
               "answer": letter, "category": dimension.lower().replace(" ", "_"), "image":
               base64.b64encode(buffer.getvalue()).decode(), "source": "bitllava-synthetic",
               "l2-category": "attribute_reasoning" if i % 3 == 0 else "fine-grained_perception",
               "comment": "", "split": "dev"}
        rows.append(row)
    if circular:
        copies = [dict(r, image=str(int(r["index"]) % 1_000_000)) for row in rows for r in rotations(row)[1:]]
        rows = rows + copies
    path = os.path.join(folder, "mmbench_dev_20230712.tsv")
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MMBENCH_COLUMNS, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return {"annotations": [path]}


def write_all(folder: str, size: int = 8, seed: int = 0) -> dict:
    """Every task's set, in the published layouts, under `folder/<task>/`: {task: eval files} as `eval run` takes
    them (annotations, questions, ocr, test_questions, images); TextVQA's LLaVA question file is `llava_questions`
    (an alternative to `ocr`)."""
    def sub(name):
        return os.path.join(folder, name)

    pope = write_pope(sub("pope"), per_split=max(2, size // 2), seed=seed)
    vqav2 = write_vqav2(sub("vqav2"), num_questions=size, seed=seed + 1)
    textvqa = write_textvqa(sub("textvqa"), num_questions=size, seed=seed + 2)
    textvqa_ocr = write_textvqa_ocr(sub("textvqa"), textvqa)
    return {
        "pope": {**pope, "questions": write_llava_pope(sub("pope"), pope)},
        "vqav2": vqav2,
        "vqav2-test-dev": write_vqav2_test_dev(sub("vqav2"), num_questions=max(3, size // 2), seed=seed + 3),
        "textvqa": {**textvqa, "ocr": textvqa_ocr["ocr"], "llava_questions": textvqa_ocr["questions"]},
        "gqa": write_gqa(sub("gqa"), num_questions=size, seed=seed + 4),
        "scienceqa": write_scienceqa(sub("scienceqa"), num_questions=size, seed=seed + 5),
        "mme": write_mme(sub("mme"), images_per_subtask=max(1, size // 4), seed=seed + 6),
        "seed": write_seed(sub("seed"), num_questions=size, seed=seed + 7),
        "mmbench": write_mmbench(sub("mmbench"), num_questions=max(2, size // 2), seed=seed + 8),
    }
