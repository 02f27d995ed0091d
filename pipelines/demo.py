"""The laptop demo: what `make demo` runs on embedded defaults.

Today it exercises the real model path end to end on the `tiny` preset: draw an image with a known
caption, train on it (alignment template, AdamW) until the caption is learned, save the model
folder, load it back and generate a reply from the image. Later steps (Ray Data, Ray Train,
evaluation, packing, Serve) extend it.
"""

from __future__ import annotations

import json
import os
import random
import time

import torch

from components.synthetic_images import draw_scene, random_scene
from model.chat import generate_reply
from model.checkpoint import load_model, save_model
from model.conversation import tokenize_conversation
from model.presets import build_from_preset, count_parameters
from model.vision import preprocess_images


def run_demo(out_dir: str = "demo_out", steps: int = 60, seed: int = 0, lr: float = 3e-3) -> dict:
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
