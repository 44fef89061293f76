"""Uploaded images: checked with Pillow before they go anywhere."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from sampler_core.inputs import MAX_IMAGE_BYTES

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp"]
VISION_MODEL = "vlm-1"


@dataclass(frozen=True)
class CheckedImage:
    """An image that decoded: its bytes, format and size."""

    data: bytes
    format: str
    width: int
    height: int


def check_image(data: bytes, name: str = "image") -> CheckedImage:
    """Decode and validate an upload; ValueError says what is wrong in plain words."""
    if len(data) == 0:
        raise ValueError(f"{name} is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{name} is {len(data) / 1e6:.1f} MB; the limit is "
                         f"{MAX_IMAGE_BYTES / 2**20:.0f} MiB")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            fmt, (w, h) = (img.format or "?"), img.size
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{name} is not a readable PNG, JPEG or WebP image ({exc})") from None
    if fmt not in ALLOWED_FORMATS:
        raise ValueError(f"{name} is {fmt}; allowed: PNG, JPEG, WebP")
    return CheckedImage(data, fmt, w, h)


def vision_hint(models: list[str], selected: str) -> str | None:
    """What to tell the user about sending images with the selected model (None: fine)."""
    if VISION_MODEL not in models:
        return (f"Images need the vision model '{VISION_MODEL}', which this engine does not list "
                "yet. Once it appears in the sidebar's Model list, choose it to send the image.")
    if selected != VISION_MODEL:
        return f"Choose '{VISION_MODEL}' in the sidebar's Model list to send this image."
    return None
