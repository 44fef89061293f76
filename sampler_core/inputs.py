"""Prompt parts: the SDK's loose Python values turned into a validated sequence.

A prompt is a sequence of parts in any order: text, token ids, image bytes, or a base64 image
(``data:image/...;base64,`` URI or bare base64). The engine turns parts into context tokens.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Sequence, Union

from sampler_core.errors import InvalidImage, InvalidInput

MAX_TEXT_CHARS = 1_000_000
MAX_IMAGE_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class TextPart:
    """Text to be tokenised."""

    text: str


@dataclass(frozen=True)
class TokenIdsPart:
    """Token ids used as they are."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class ImagePart:
    """An image's encoded bytes (PNG, JPEG, WebP, ...); decoded by the vision engine."""

    data: bytes


PromptPart = Union[TextPart, TokenIdsPart, ImagePart]

_DATA_URI = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII)


def decode_base64_image(value: str, *, position: int) -> ImagePart:
    """A ``data:image/...;base64,`` URI or bare base64 string -> ImagePart."""
    payload = _DATA_URI.sub("", value.strip(), count=1)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(
            f"inputs[{position}]: image_base64 is not valid base64 ({exc}); expected a "
            "'data:image/<type>;base64,' URI or bare base64", field=f"inputs[{position}]",
            value=value[:40]) from None
    return image_part(data, position=position)


def image_part(data: bytes, *, position: int) -> ImagePart:
    """Bytes -> ImagePart, checking only what needs no decoder (size)."""
    if len(data) == 0:
        raise InvalidImage(f"inputs[{position}]: image is empty (0 bytes)",
                           field=f"inputs[{position}]", value=0)
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidImage(
            f"inputs[{position}]: image is {len(data)} bytes; at most {MAX_IMAGE_BYTES} allowed",
            field=f"inputs[{position}]", value=len(data))
    return ImagePart(bytes(data))


def _token_ids(value: Sequence[Any], position: int) -> TokenIdsPart:
    ids: list[int] = []
    for item in value:
        token_id = getattr(item, "token_id", item)  # a Token or an int
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise InvalidInput(
                f"inputs[{position}]: token ids must be ints >= 0, got {token_id!r}",
                field=f"inputs[{position}]", value=token_id)
        ids.append(token_id)
    return TokenIdsPart(tuple(ids))


def to_part(value: Any, position: int = 0) -> PromptPart:
    """One SDK-style value -> a prompt part.

    ``str`` is text, unless it starts with ``data:image`` (a base64 image); ``bytes`` is an
    image; a sequence of ints or Tokens is token ids.
    """
    if isinstance(value, (TextPart, TokenIdsPart, ImagePart)):
        return value
    if isinstance(value, str):
        if value.startswith("data:image"):
            return decode_base64_image(value, position=position)
        if len(value) > MAX_TEXT_CHARS:
            raise InvalidInput(
                f"inputs[{position}]: text is {len(value)} characters; at most {MAX_TEXT_CHARS}",
                field=f"inputs[{position}]", value=len(value))
        return TextPart(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return image_part(bytes(value), position=position)
    if isinstance(value, (list, tuple)):
        return _token_ids(value, position)
    raise InvalidInput(
        f"inputs[{position}]: expected text, token ids, image bytes or a base64 image, "
        f"got {type(value).__name__}", field=f"inputs[{position}]", value=type(value).__name__)


def to_parts(prompt: Any = "", inputs: Sequence[Any] = ()) -> tuple[PromptPart, ...]:
    """The SDK's ``(prompt, inputs)`` pair -> prompt parts.

    As in the SDK, ``inputs`` wins when given; otherwise the (deprecated) ``prompt`` becomes one
    part. Empty text parts are dropped; an empty prompt overall is an error.
    """
    if isinstance(inputs, (str, bytes)):
        inputs = (inputs,)
    values = list(inputs) if inputs else ([prompt] if prompt is not None else [])
    parts = [to_part(v, i) for i, v in enumerate(values)]
    parts = [p for p in parts if not (isinstance(p, TextPart) and p.text == "")]
    parts = [p for p in parts if not (isinstance(p, TokenIdsPart) and not p.ids)]
    if not parts:
        raise InvalidInput("inputs must hold at least one non-empty part (text, token ids or "
                           "image); got an empty prompt", field="inputs", value="")
    return tuple(parts)
