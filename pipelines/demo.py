"""The laptop demo: what `make demo` runs on embedded defaults.

`run_pipeline_demo` runs the whole `tiny` pipeline (generated data -> Ray Data stores -> Ray Train +
DeepSpeed align and instruct on 2 workers -> evaluation -> 2-bit packing -> Ray Serve + one HTTP chat
request with an image) and condenses its summary: the headline eval metrics next to the best score an
image-blind answerer could reach on the same questions, the served answer, and where to look.

`run_model_demo` (`bitllava demo --model-only`) is the model path alone, in one process: draw an
image with a known caption, train on it until the caption is learned, save, reload, generate.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shlex
import sys
import time

import torch

from components.synthetic_images import draw_scene, random_scene
from model.chat import generate_reply
from model.checkpoint import load_model, save_model
from model.conversation import tokenize_conversation
from model.presets import build_from_preset, count_parameters
from model.vision import preprocess_images

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.yaml")
HEADLINE = {"pope": ("accuracy", "f1"), "vqav2": ("accuracy",), "textvqa": ("accuracy",)}


def blind_vqa_accuracy(annotations_path: str, limit: int | None = None) -> float:
    """VQA accuracy (0-100) of an image-blind answerer that knows the evaluation set's answers: every
    question gets the most common answer among the set's questions of its type ("what color", "how
    many", ...). A model that scores above it has read something from the image. `limit`: the first
    questions only, as the evaluation took them."""
    from components.evaluate.scoring import vqav2_accuracy

    with open(annotations_path) as f:
        annotations = json.load(f)["annotations"][:limit]
    by_type = collections.defaultdict(collections.Counter)
    for a in annotations:
        by_type[a["question_type"]][a["multiple_choice_answer"]] += 1
    scores = [vqav2_accuracy(by_type[a["question_type"]].most_common(1)[0][0], [h["answer"] for h in a["answers"]])
              for a in annotations]
    return 100.0 * sum(scores) / len(scores)


def run_pipeline_demo(config: str = DEMO_CONFIG, out: str | None = None, address: str | None = None) -> dict:
    from pipelines.config import load_pipeline_config
    from pipelines.run import run_pipeline

    start = time.time()
    cfg = load_pipeline_config(config, out=out)
    summary = run_pipeline(cfg, address=address)
    evals = {task: {k: round(m["mean"][k] if task == "pope" else m[k], 2) for k in HEADLINE[task]}
             for task, m in summary["eval"].items()}
    if "vqav2" in evals and cfg.data.synth:
        annotations = os.path.join(cfg.out, "synth", "eval", "vqav2", "v2_mscoco_val2014_annotations.json")
        evals["vqav2"]["blind_baseline"] = round(blind_vqa_accuracy(annotations, cfg.eval.limit), 2)
    served = summary["served"]
    packed = summary["packed_dir"]
    commands = {  # what to try next, each runnable as printed from any folder (absolute paths)
        "mlflow_ui": f"mlflow ui --backend-store-uri {shlex.quote(summary['tracking_uri'])}",
        "generate": f"bitllava generate --model {shlex.quote(packed)}"
                    + (f" --image {shlex.quote(served['image'])}" if served["image"] else "")
                    + f" --prompt {shlex.quote(served['prompt'])} --greedy",
        "serve": f"bitllava serve --model {shlex.quote(packed)}",
    }
    report = {
        "pipeline": cfg.name,
        "eval": evals,
        "served": {"prompt": served["prompt"], "image": served["image"], "answer": served["answer"]},
        "mlflow_ui": commands["mlflow_ui"],
        "mlflow_parent_run_id": summary["mlflow_parent_run_id"],
        "stores": {phase: os.path.join(cfg.out, "stores", phase) for phase in ("align", "instruct")},
        "model_dir": summary["model_dir"],
        "packed_dir": packed,
        "commands": commands,
        "seconds": round(time.time() - start, 1),
    }
    where = [f"sample stores: {report['stores']['align']}, {report['stores']['instruct']}",
             f"trained model: {report['model_dir']}", f"packed model: {packed}",
             f"MLflow runs: {commands['mlflow_ui']}", f"ask the packed model: {commands['generate']}",
             f"serve it (OpenAI-compatible HTTP): {commands['serve']}"]
    for line in where:
        print(f"[demo] {line}", file=sys.stderr, flush=True)
    return report


def run_model_demo(out_dir: str = "demo_out", steps: int = 60, seed: int = 0, lr: float = 3e-3) -> dict:
    torch.manual_seed(seed)
    scene = random_scene(random.Random(seed))
    image = draw_scene(scene)
    caption = scene.caption()
    model, tokenizer, processor = build_from_preset("tiny", seed=seed)
    counts = count_parameters(model)
    print(f"[demo] tiny preset: {json.dumps(counts)}", flush=True)

    conversation = [
        {"from": "human", "value": "Provide a brief description of the given image.\n<image>"},
        {"from": "gpt", "value": caption},
    ]
    sample = tokenize_conversation(
        conversation, tokenizer, "plain", 1, model.config.num_image_tokens, max_length=128
    )
    input_ids = torch.tensor([sample.input_ids])
    labels = torch.tensor([sample.labels])
    pixel_values = preprocess_images([image], processor)

    model.train()
    model.vision_tower.requires_grad_(False)  # frozen in both phases (the recipe's job, not the loader's)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    start = time.perf_counter()
    losses = []
    for step in range(steps):
        loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"[demo] step {step:3d} loss {loss.item():.4f}", flush=True)
    train_s = time.perf_counter() - start

    model.config.template = "plain"  # the demo trains the alignment template
    folder = os.path.join(out_dir, "tiny-model")
    save_model(folder, model, tokenizer, processor)
    loaded = load_model(folder)
    reply = generate_reply(loaded, "", [image], max_new_tokens=16, greedy=True)
    answer = reply.text.split("\n")[0].strip()
    summary = {
        "caption": caption,
        "reply": answer,
        "learned": answer == caption,
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "steps": steps,
        "train_seconds": round(train_s, 2),
        "tokens_per_second": round(steps * input_ids.numel() / train_s, 1),
        "model_dir": folder,
    }
    return summary
