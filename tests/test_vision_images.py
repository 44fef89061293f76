"""Image decoding: every bad image is a clear InvalidImage naming its inputs[i]; good ones of any
colour mode come out RGB. The engine-level cases (a bad image among other parts, the engine
still serving after) are in test_vision_engine.py."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sampler_core.engine import images
from sampler_core.errors import InvalidImage
from sampler_core.inputs import MAX_IMAGE_BYTES, ImagePart, to_part, to_parts


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` but whose data is one tiny row: what a
    decompression bomb or a lying header looks like to the decoder."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
            chunk(b"IDAT", zlib.compress(b"\x00" * 4)) + chunk(b"IEND", b""))


RED = png(Image.new("RGB", (20, 10), (255, 0, 0)))


def test_a_good_png_decodes_to_rgb() -> None:
    image = images.decode_image(RED, 0)
    assert image.mode == "RGB" and image.size == (20, 10)
    assert image.getpixel((3, 3)) == (255, 0, 0)


@pytest.mark.parametrize("mode,value", [("L", 128), ("P", 5), ("CMYK", (0, 255, 255, 0)),
                                        ("RGBA", (255, 0, 0, 255)), ("1", 1)])
def test_colour_modes_become_rgb(mode: str, value: object) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buffer = io.BytesIO()
    Image.new(mode, (8, 8), value).save(buffer, format=fmt)
    image = images.decode_image(buffer.getvalue(), 0)
    assert image.mode == "RGB" and image.size == (8, 8)


def test_transparency_is_composited_onto_white() -> None:
    image = images.decode_image(png(Image.new("RGBA", (4, 4), (255, 0, 0, 0))), 0)
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_is_rescaled_not_clipped() -> None:
    array = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    image = images.decode_image(png(Image.fromarray(array)), 0)
    values = sorted(np.asarray(image.convert("L")).flatten().tolist())
    assert values[0] == 0 and values[-1] == 255 and 0 < values[1] < values[2] < 255


def test_undecodable_bytes_name_the_position() -> None:
    with pytest.raises(InvalidImage, match=r"^inputs\[2\]: cannot decode the image") as info:
        images.decode_image(b"this is not an image at all", 2)
    assert info.value.field == "inputs[2]"


def test_truncated_image_names_the_position() -> None:
    big = png(Image.effect_noise((64, 64), 40).convert("RGB"))
    with pytest.raises(InvalidImage, match=r"^inputs\[1\]: image is truncated or corrupt"):
        images.decode_image(big[: len(big) // 2], 1)


def test_corrupt_checksum_is_refused() -> None:
    data = bytearray(png(Image.effect_noise((32, 32), 40).convert("RGB")))
    data[60] ^= 0xFF  # inside the image data chunk
    with pytest.raises(InvalidImage, match=r"^inputs\[0\]: image is truncated or corrupt"):
        images.decode_image(bytes(data), 0)


def test_zero_bytes_are_refused_with_the_position() -> None:
    with pytest.raises(InvalidImage, match=r"^inputs\[3\]: image is empty \(0 bytes\)"):
        images.decode_image(b"", 3)
    with pytest.raises(InvalidImage, match=r"^inputs\[1\]: image is empty"):
        to_parts(inputs=["text", b""])


def test_zero_size_image_is_refused() -> None:
    with pytest.raises(InvalidImage, match=r"^inputs\[0\]: (image has zero size|cannot decode|"
                                           r"image is truncated)"):
        images.decode_image(png_header_only(0, 5), 0)


def test_too_many_bytes_is_refused_before_decoding() -> None:
    data = RED + b"\x00" * (MAX_IMAGE_BYTES + 1 - len(RED))
    with pytest.raises(InvalidImage, match=rf"^inputs\[4\]: image is {len(data)} bytes; at most "
                                           rf"{MAX_IMAGE_BYTES}"):
        images.decode_image(data, 4)
    with pytest.raises(InvalidImage, match=r"^inputs\[0\]: image is \d+ bytes"):
        to_part(data, 0)


def test_too_many_pixels_is_refused_from_the_header() -> None:
    side = int(images.MAX_IMAGE_PIXELS ** 0.5) + 10
    with pytest.raises(InvalidImage, match=rf"^inputs\[1\]: image is {side}x{side} = "
                                           r"\d+ pixels; at most"):
        images.decode_image(png_header_only(side, side), 1)


def test_a_decompression_bomb_beyond_pillows_limit_is_refused() -> None:
    side = 40_000  # 1.6 G pixels: Pillow itself calls this a bomb; we refuse it either way
    with pytest.raises(InvalidImage, match=r"^inputs\[0\]: image (is 40000x40000|refused as a "
                                           r"decompression bomb)"):
        images.decode_image(png_header_only(side, side), 0)


def test_a_real_compressed_bomb_is_refused_quickly() -> None:
    # 5000 x 5000 x 3 of zeros compresses to ~75 kB; over the pixel bound it must not decode.
    side = int(images.MAX_IMAGE_PIXELS ** 0.5) + 1
    row = b"\x00" + b"\x00" * side * 3
    raw = zlib.compress(row * side, 9)
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0,
                                                              0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    assert len(data) < MAX_IMAGE_BYTES
    with pytest.raises(InvalidImage, match=r"^inputs\[0\]: image is \d+x\d+ = \d+ pixels"):
        images.decode_image(data, 0)


def test_bad_base64_names_the_position() -> None:
    with pytest.raises(InvalidImage, match=r"^inputs\[1\]: image_base64 is not valid base64"):
        to_parts(inputs=["What is this?", "data:image/png;base64,@@not-base64@@"])


def test_base64_of_garbage_fails_at_decoding() -> None:
    part = to_part("data:image/png;base64," + base64.b64encode(b"garbage").decode(), 0)
    assert isinstance(part, ImagePart)
    with pytest.raises(InvalidImage, match=r"^inputs\[0\]: cannot decode the image"):
        images.decode_image(part.data, 0)


def test_good_base64_round_trips() -> None:
    part = to_part("data:image/png;base64," + base64.b64encode(RED).decode(), 0)
    assert images.decode_image(part.data, 0).getpixel((0, 0)) == (255, 0, 0)
