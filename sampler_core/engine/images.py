"""Safe image decoding for vision engines.

An image part is untrusted bytes. Before any pixel is decoded we bound the byte size and the
pixel count read from the header (a small file can declare a huge image: a decompression
bomb); then Pillow verifies the file's structure and decodes it fully, so a truncated or
corrupt file fails here, in planning, and not half-way through a run. Every failure is an
:class:`~sampler_core.errors.InvalidImage` naming the part's position (``inputs[i]``).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sampler_core.errors import InvalidImage
from sampler_core.inputs import MAX_IMAGE_BYTES

#: At most this many pixels (width x height), e.g. 6000 x 4000; far below Pillow's own bomb
#: limit, and enough for any photo a vision model would downscale anyway.
MAX_IMAGE_PIXELS = 24_000_000
#: Smallest side accepted (a 0-pixel side cannot be resized to anything).
MIN_IMAGE_SIDE = 1


def _fail(position: int, message: str, value: object = None) -> InvalidImage:
    return InvalidImage(f"inputs[{position}]: {message}", field=f"inputs[{position}]",
                        value=value)


def check_size(width: int, height: int, position: int) -> None:
    """Refuse a zero-size image or one with more than MAX_IMAGE_PIXELS pixels."""
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise _fail(position, f"image has zero size ({width}x{height} pixels)",
                    f"{width}x{height}")
    if width * height > MAX_IMAGE_PIXELS:
        raise _fail(position, f"image is {width}x{height} = {width * height} pixels; at most "
                    f"{MAX_IMAGE_PIXELS} pixels allowed (possible decompression bomb)",
                    f"{width}x{height}")


def decode_image(data: bytes, position: int) -> Image.Image:
    """Encoded bytes -> a fully decoded RGB Pillow image, or InvalidImage naming ``inputs[i]``.

    Bounds bytes and pixels first, then verifies and decodes; EXIF orientation is applied and
    every colour mode (palette, grey, 16-bit, CMYK, with or without alpha) becomes RGB, with
    transparency composited onto white.
    """
    if len(data) == 0:
        raise _fail(position, "image is empty (0 bytes)", 0)
    if len(data) > MAX_IMAGE_BYTES:
        raise _fail(position, f"image is {len(data)} bytes; at most {MAX_IMAGE_BYTES} allowed",
                    len(data))
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; make that an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                check_size(probe.width, probe.height, position)
                probe.verify()  # structure and checksums; leaves the object unusable
            image = Image.open(io.BytesIO(data))
            image.load()
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _fail(position, f"image refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise _fail(position, f"cannot decode the image ({len(data)} bytes): not a format "
                    "Pillow reads (PNG, JPEG, WebP, GIF, BMP, TIFF, ...)", len(data)) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
            MemoryError) as exc:
        raise _fail(position, f"image is truncated or corrupt ({exc})", len(data)) from None
    check_size(image.width, image.height, position)
    try:
        image = ImageOps.exif_transpose(image) or image
    except (OSError, ValueError, SyntaxError, struct.error):
        pass  # a broken EXIF block only loses the orientation hint
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited onto white, high-bit-depth grey rescaled."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # convert("L") would clip 16/32-bit values to 255; rescale the range instead.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
