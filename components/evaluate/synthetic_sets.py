"""Small POPE, VQAv2 and TextVQA sets in the official file formats, drawn from generated images.

Each image's content is known (`components.synthetic_images`), so every label and human answer is
true by construction. The sets exercise the real loaders and scorers: VQAv2/TextVQA questions
carry 10 human answers with the variation real annotators show (number words, capitals, trailing
periods, a dissenting answer), so normalisation and the leave-one-out average both matter.
"""

from __future__ import annotations

import json
import os
import random

from PIL import ImageDraw

from components.synthetic_images import COLOURS, NUMBER_WORDS, SHAPES, draw_scene, random_scene

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
