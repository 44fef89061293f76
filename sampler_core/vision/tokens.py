"""How image tokens read in a context: ``<image 1: patch 3,4>`` (image number, row, column).

Image numbers, rows and columns count from 1. A view that draws attention over an image parses
these texts back into grid cells; no torch is needed for that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IMAGE_TOKEN_RE = re.compile(r"^<image (\d+): patch (\d+),(\d+)>$")


@dataclass(frozen=True)
class ImagePatch:
    """Which image and which cell of its patch grid a context token stands for."""

    image: int
    row: int
    col: int


def image_token_text(image: int, row: int, col: int) -> str:
    """The readable text of an image token (all 1-based)."""
    return f"<image {image}: patch {row},{col}>"


def parse_image_token(text: str) -> ImagePatch | None:
    """``'<image 1: patch 3,4>'`` -> ImagePatch(1, 3, 4); None for any other token text."""
    match = IMAGE_TOKEN_RE.match(text)
    if match is None:
        return None
    return ImagePatch(*(int(g) for g in match.groups()))


@dataclass(frozen=True)
class ImageSpan:
    """Where one image sits in a context: ``length`` tokens from ``start``.

    ``patches`` lists the context positions of the image's patch tokens in row-major order
    over a ``rows x cols`` grid (a model may add framing tokens around them, which are in the
    span but not in ``patches``). ``width`` and ``height`` are the decoded image's size.
    """

    image: int
    start: int
    length: int
    rows: int
    cols: int
    patches: tuple[int, ...]
    width: int
    height: int
