"""The synthetic data for vlm-1: reproducible from a seed, facts matching the pixels, and the
evaluation's reading of replies."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sampler_core.vision.evaluate import answer_in, is_correct
from sampler_core.vision.synthetic import (COLOURS, IMAGE_SIZE, KINDS, POSITIONS, Example,
                                           make_example, make_scene)
from sampler_core.vision.synthetic import test_set as held_out_set


def test_the_same_seed_draws_the_same_examples() -> None:
    first = [make_example(random.Random(5)) for _ in range(3)]
    again = [make_example(random.Random(5)) for _ in range(3)]
    assert [e.scene.png() for e in first] == [e.scene.png() for e in again]
    assert [(e.question, e.answer) for e in first] == [(e.question, e.answer) for e in again]


def test_the_test_set_has_every_kind_and_is_stable() -> None:
    examples = held_out_set(per_kind=5)
    assert [e.kind for e in examples] == [k for k in KINDS for _ in range(5)]
    assert [e.scene.png() for e in examples] == [e.scene.png() for e in held_out_set(per_kind=5)]


@pytest.mark.parametrize("position", POSITIONS)
def test_a_single_shape_sits_in_its_cell(position: str) -> None:
    scene = make_scene(random.Random(position), single=True, colour="red", position=position)
    pixels = np.asarray(scene.image).astype(int)
    red = (np.abs(pixels - np.array(COLOURS["red"])).sum(-1) < 80)
    ys, xs = np.nonzero(red)
    row, col = divmod(POSITIONS.index(position), 3)
    cell = IMAGE_SIZE / 3
    assert row * cell <= ys.mean() < (row + 1) * cell
    assert col * cell <= xs.mean() < (col + 1) * cell


def test_counts_are_the_number_of_separate_shapes() -> None:
    from PIL import ImageDraw

    for count in (1, 2, 3, 4):
        scene = make_scene(random.Random(count), single=False, colour="black", count=count)
        image = scene.image.convert("L").point(lambda v: 255 if v < 100 else 0)
        blobs = 0
        for y in range(IMAGE_SIZE):
            for x in range(IMAGE_SIZE):
                if image.getpixel((x, y)) == 255:
                    ImageDraw.floodfill(image, (x, y), 128)
                    blobs += 1
        assert blobs == count


def test_replies_state_the_answer() -> None:
    rng = random.Random(11)
    for _ in range(40):
        example = make_example(rng)
        if example.kind != "caption":
            assert answer_in(example.kind, example.reply) == example.answer
            assert is_correct(example, example.reply)


@pytest.mark.parametrize("kind,reply,fact", [
    ("colour", "The shape is red.", "red"),
    ("colour", "It is red or blue.", None),
    ("colour", "The shape of the object is", None),
    ("shape", "They are circles.", "circle"),
    ("position", "The shape is at the top left.", "top left"),
    ("position", "The shape is at the top.", "top"),
    ("position", "It is in the centre.", "center"),
    ("count", "There are three shapes.", "3"),
])
def test_answers_are_read_from_replies(kind: str, reply: str, fact: str | None) -> None:
    assert answer_in(kind, reply) == fact


def test_a_wrong_reply_is_wrong() -> None:
    scene = make_scene(random.Random(1), single=True, colour="green")
    assert not is_correct(Example(scene, "colour", "What colour?", "green"), "It is blue.")
