"""Synthetic images and questions for the embedded vision model ``vlm-1``.

Every image is drawn with Pillow from a seeded ``random.Random``: shapes (circle, square,
triangle) in named colours on a light, slightly tinted background, either one shape in one
cell of a 3x3 grid (position questions) or 1-4 equal shapes scattered (count questions). Each
scene comes with a caption and question-answer pairs, so the same generator feeds training,
the held-out test set and the sample images in ``assets/images/vlm/``.

No torch here: the images are Pillow images and the answers plain strings.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 64

#: Colour names and their base RGB; each drawing jitters the value a little.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 155, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 205, 25),
    "orange": (245, 130, 25),
    "purple": (135, 45, 175),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
#: 3x3 grid cells, row-major, as the model says them.
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
COUNTS = (1, 2, 3, 4)
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

#: The question kinds the model is measured on (captions are trained, not scored).
KINDS = ("colour", "shape", "position", "count")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "What color is the shape?",
               "Which colour are the shapes?", "What colour is it?"),
    "shape": ("What shape is it?", "What shape is in the image?", "Which shape is shown?"),
    "position": ("Where is the shape?", "Where is the shape in the image?",
                 "In which part of the image is the shape?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?",
              "Count the shapes."),
    "caption": ("Describe the image.", "What is in the image?", "Describe the picture briefly."),
}


@dataclass(frozen=True)
class Scene:
    """One drawn image and the facts about it."""

    image: Image.Image
    colour: str
    shape: str
    count: int
    position: str | None  # only for single-shape scenes

    def caption(self) -> str:
        """A short description, e.g. 'a red circle at the top left' or 'three blue squares'."""
        if self.position is not None:
            where = "in the center" if self.position == "center" else f"at the {self.position}"
            article = "an" if self.colour[0] in "aeiou" else "a"
            return f"{article} {self.colour} {self.shape} {where}"
        plural = "s" if self.count > 1 else ""
        return f"{COUNT_WORDS[self.count]} {self.colour} {self.shape}{plural}"

    def answer(self, kind: str) -> str:
        """The expected short answer to a question of this kind."""
        if kind == "colour":
            return self.colour
        if kind == "shape":
            return self.shape
        if kind == "count":
            return str(self.count)
        if kind == "position":
            if self.position is None:
                raise ValueError("position is only asked about single-shape scenes")
            return self.position
        if kind == "caption":
            return self.caption()
        raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS} or 'caption'")

    def reply(self, kind: str) -> str:
        """The sentence the model is trained to say, e.g. 'The shape is red.'.

        Whole sentences, because a frozen chat model starts its replies that way: the image
        only has to steer the words that carry the answer, not the style.
        """
        many = self.count > 1
        if kind == "colour":
            return f"The {'shapes are' if many else 'shape is'} {self.colour}."
        if kind == "shape":
            return f"They are {self.shape}s." if many else f"It is a {self.shape}."
        if kind == "position":
            where = "in the center" if self.position == "center" else f"at the {self.position}"
            return f"The shape is {where}."
        if kind == "count":
            return f"There {'are' if many else 'is'} {self.count} shape{'s' if many else ''}."
        if kind == "caption":
            return f"The image shows {self.caption()}."
        raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS} or 'caption'")

    def png(self) -> bytes:
        """The image as PNG bytes (what a client sends)."""
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


@dataclass(frozen=True)
class Example:
    """One question about one scene, with its answer."""

    scene: Scene
    kind: str
    question: str
    answer: str  # the fact asked for ('red', 'circle', 'top left', '3')

    @property
    def reply(self) -> str:
        """The full sentence the model is trained to give."""
        return self.scene.reply(self.kind)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float,
                fill: tuple[int, ...], rng: random.Random) -> None:
    r = size / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        # An upright triangle, slightly rotated so it is not always the same pixels.
        angle = rng.uniform(-0.25, 0.25)
        points = [(cx + r * 1.15 * math.sin(angle + k * 2 * math.pi / 3),
                   cy - r * 1.15 * math.cos(angle + k * 2 * math.pi / 3)) for k in range(3)]
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def make_scene(rng: random.Random, *, single: bool | None = None, colour: str | None = None,
               shape: str | None = None, count: int | None = None,
               position: str | None = None) -> Scene:
    """Draw one scene; unspecified facts are drawn from ``rng``.

    A single-shape scene puts one shape in one 3x3 cell; otherwise 1-4 equal shapes are
    scattered without overlapping.
    """
    if single is None:
        single = count in (None, 1) and rng.random() < 0.55
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    background = tuple(rng.randint(215, 255) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    cell = IMAGE_SIZE / 3
    if single:
        position = position or rng.choice(POSITIONS)
        row, col = divmod(POSITIONS.index(position), 3)
        size = rng.uniform(11, 17)
        slack = (cell - size) / 2
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        _draw_shape(draw, shape, cx, cy, size, _jitter(COLOURS[colour], rng), rng)
        return Scene(image, colour, shape, 1, position)
    count = count or rng.choice(COUNTS)
    size = rng.uniform(9, 13)
    placed: list[tuple[float, float]] = []
    fill = _jitter(COLOURS[colour], rng)
    while len(placed) < count:
        cx, cy = rng.uniform(size, IMAGE_SIZE - size), rng.uniform(size, IMAGE_SIZE - size)
        if all(math.hypot(cx - x, cy - y) > size * 1.5 for x, y in placed):
            placed.append((cx, cy))
            _draw_shape(draw, shape, cx, cy, size, fill, rng)
    return Scene(image, colour, shape, count, None)


def make_example(rng: random.Random, kind: str | None = None) -> Example:
    """One scene plus one question about it (kind drawn from ``rng`` when not given)."""
    if kind is None:
        kind = rng.choices(("colour", "shape", "position", "count", "caption"),
                           weights=(3, 3, 3, 3, 1))[0]
    scene = make_scene(rng, single=True if kind == "position" else None)
    return Example(scene, kind, rng.choice(QUESTIONS[kind]), scene.answer(kind))


def test_set(per_kind: int = 100, seed: int = 1_000_003) -> list[Example]:
    """The held-out test set: ``per_kind`` questions of each kind, from a seed training never
    uses (training draws from ``random.Random(seed)`` with small seeds)."""
    rng = random.Random(seed)
    return [make_example(rng, kind) for kind in KINDS for _ in range(per_kind)]


#: The sample images shipped in ``assets/images/vlm/`` for the workbench: name -> scene facts.
SAMPLES: dict[str, dict[str, object]] = {
    "red_circle.png": {"single": True, "colour": "red", "shape": "circle", "position": "center"},
    "blue_square_top_left.png": {"single": True, "colour": "blue", "shape": "square",
                                 "position": "top left"},
    "green_triangle_bottom_right.png": {"single": True, "colour": "green", "shape": "triangle",
                                        "position": "bottom right"},
    "three_yellow_circles.png": {"single": False, "colour": "yellow", "shape": "circle",
                                 "count": 3},
    "two_purple_squares.png": {"single": False, "colour": "purple", "shape": "square",
                               "count": 2},
}


def write_samples(folder: "Path", scale: int = 4, seed: int = 7) -> list["Path"]:
    """Draw the SAMPLES into ``folder``, upscaled ``scale`` times (nearest neighbour, so the
    model's resize back to 64x64 gives the drawn pixels again)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, facts in SAMPLES.items():
        scene = make_scene(random.Random(f"{seed}:{name}"), **facts)  # type: ignore[arg-type]
        size = IMAGE_SIZE * scale
        scene.image.resize((size, size), Image.Resampling.NEAREST).save(folder / name)
        written.append(folder / name)
    return written
