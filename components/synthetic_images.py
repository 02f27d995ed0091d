"""Procedurally drawn images whose content is known exactly (colour, shape, count, position).

Every caption or answer about such an image is true by construction, so a small model can learn
them and evaluation can score them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220),
    "yellow": (240, 210, 30), "purple": (140, 50, 170), "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (200, 200, 200), (250, 245, 230), (225, 235, 250))


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int
    position: str
    width: int
    height: int
    background: tuple[int, int, int]

    def caption(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{NUMBER_WORDS[self.count]} {self.colour} {noun} at the {self.position}"


def random_scene(rng: random.Random, min_side: int = 48, max_side: int = 160) -> Scene:
    return Scene(
        shape=rng.choice(SHAPES),
        colour=rng.choice(sorted(COLOURS)),
        count=rng.randint(1, 3),
        position=rng.choice(POSITIONS),
        width=rng.randint(min_side, max_side),
        height=rng.randint(min_side, max_side),
        background=rng.choice(BACKGROUNDS),
    )


def _region(scene: Scene) -> tuple[float, float, float, float]:
    # the part of the canvas (x0, y0, x1, y1 as fractions) where the shapes are drawn
    return {
        "left": (0.0, 0.2, 0.5, 0.8), "right": (0.5, 0.2, 1.0, 0.8), "top": (0.2, 0.0, 0.8, 0.5),
        "bottom": (0.2, 0.5, 0.8, 1.0), "center": (0.25, 0.25, 0.75, 0.75),
    }[scene.position]


def draw_scene(scene: Scene) -> Image.Image:
    """Draw `count` shapes side by side inside the scene's region, on its background."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    pen = ImageDraw.Draw(image)
    fx0, fy0, fx1, fy1 = _region(scene)
    x0, y0 = fx0 * scene.width, fy0 * scene.height
    region_w, region_h = (fx1 - fx0) * scene.width, (fy1 - fy0) * scene.height
    cell_w = region_w / scene.count
    side = 0.8 * min(cell_w, region_h)
    colour = COLOURS[scene.colour]
    for i in range(scene.count):
        cx, cy = x0 + cell_w * (i + 0.5), y0 + region_h / 2
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        if scene.shape == "circle":
            pen.ellipse(box, fill=colour)
        elif scene.shape == "square":
            pen.rectangle(box, fill=colour)
        else:
            pen.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    return image
