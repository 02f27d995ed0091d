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


def random_scene(rng: random.Random, min_side: int = 64, max_side: int = 160) -> Scene:
    # Sizes vary freely; aspect ratios stay within 3:4..4:3 so that padding to square leaves the shapes
    # most of the canvas (a tiny tower sees 16 patches of it).
    width = rng.randint(min_side, max_side)
    height = max(min_side * 3 // 4, min(max_side * 4 // 3, round(width * rng.uniform(0.75, 4 / 3))))
    return Scene(
        shape=rng.choice(SHAPES),
        colour=rng.choice(sorted(COLOURS)),
        count=rng.randint(1, 3),
        position=rng.choice(POSITIONS),
        width=width,
        height=height,
        background=rng.choice(BACKGROUNDS),
    )


def _region(scene: Scene) -> tuple[float, float, float, float]:
    # the part of the canvas (x0, y0, x1, y1 as fractions) where the shapes are drawn
    return {
        "left": (0.0, 0.1, 0.5, 0.9), "right": (0.5, 0.1, 1.0, 0.9), "top": (0.1, 0.0, 0.9, 0.5),
        "bottom": (0.1, 0.5, 0.9, 1.0), "center": (0.2, 0.2, 0.8, 0.8),
    }[scene.position]


def draw_scene(scene: Scene) -> Image.Image:
    """Draw `count` shapes in a row along the longer side of the scene's region, as large as fits.

    Large shapes matter: with small ones the colour, count and position signal is a few pixels of a
    16-patch tower input and a small model learns to answer without looking (measured: held-out accuracy
    stayed at the image-blind level; with these sizes it reaches colour 0.99, count 0.77)."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    pen = ImageDraw.Draw(image)
    fx0, fy0, fx1, fy1 = _region(scene)
    x0, y0 = fx0 * scene.width, fy0 * scene.height
    region_w, region_h = (fx1 - fx0) * scene.width, (fy1 - fy0) * scene.height
    vertical = region_h > region_w
    cell_w, cell_h = (region_w, region_h / scene.count) if vertical else (region_w / scene.count, region_h)
    side = 0.9 * min(cell_w, cell_h)
    colour = COLOURS[scene.colour]
    for i in range(scene.count):
        cx = x0 + (region_w / 2 if vertical else cell_w * (i + 0.5))
        cy = y0 + (cell_h * (i + 0.5) if vertical else region_h / 2)
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        if scene.shape == "circle":
            pen.ellipse(box, fill=colour)
        elif scene.shape == "square":
            pen.rectangle(box, fill=colour)
        else:
            pen.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    return image
