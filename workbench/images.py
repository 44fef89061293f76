"""Images for the vision model: checked with Pillow before they go anywhere; sample images;
what to tell the user about the selected model. No Streamlit here."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sampler_core.inputs import MAX_IMAGE_BYTES
from sampler_core.vision import VLM1_DOMAIN, VLM1_NAME

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp"]
#: Families the engine loads from a local folder with their image processor.
VISION_FAMILIES = ("smolvlm", "idefics", "llava")
SAMPLES = Path(__file__).resolve().parents[1] / "assets" / "images"


@dataclass(frozen=True)
class CheckedImage:
    """An image that decoded: its bytes, format and size."""

    data: bytes
    format: str
    width: int
    height: int


@dataclass(frozen=True)
class Attached:
    """The image the next run sends: bytes, a name for the history, and where it goes."""

    data: bytes
    name: str
    after: bool


def limit_text() -> str:
    """The upload limits in words."""
    return f"PNG, JPEG or WebP, at most {MAX_IMAGE_BYTES / 2**20:.0f} MiB"


def check_image(data: bytes, name: str = "image") -> CheckedImage:
    """Decode and validate an upload; ValueError says what is wrong in plain words."""
    if len(data) == 0:
        raise ValueError(f"{name} is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{name} is {len(data) / 2**20:.1f} MiB; the limit is "
                         f"{MAX_IMAGE_BYTES / 2**20:.0f} MiB")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            fmt, (w, h) = (img.format or "?"), img.size
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{name} is not a readable PNG, JPEG or WebP image ({exc})") from None
    if fmt not in ALLOWED_FORMATS:
        raise ValueError(f"{name} is {fmt}; allowed: PNG, JPEG, WebP")
    return CheckedImage(data, fmt, w, h)


def sample_images(root: Path = SAMPLES) -> dict[str, Path]:
    """Sample images under ``root`` by label (``vlm/red_circle.png``); vlm-1's own first."""
    if not root.is_dir():
        return {}
    files = [p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]
    files.sort(key=lambda p: (p.parent.name != "vlm", str(p.relative_to(root))))
    return {str(p.relative_to(root)): p for p in files}


def is_vision_model(name: str) -> bool:
    """Models the workbench knows take images: vlm-1 and local SmolVLM/Idefics3/LLaVA folders."""
    lowered = name.lower()
    return name == VLM1_NAME or any(f in lowered for f in VISION_FAMILIES)


def vlm1_domain() -> str:
    """What vlm-1 knows, in the library's own words (no torch needed)."""
    return VLM1_DOMAIN


def vision_status(models: list[str], selected: str) -> tuple[bool, str]:
    """Whether an image can be sent with the selected model, and what to tell the user."""
    if is_vision_model(selected):
        if selected == VLM1_NAME:
            return True, vlm1_domain().rstrip(".") + "."
        return True, f"{selected} is a vision-language model; the image goes into its context."
    if VLM1_NAME not in models:
        return False, (f"{selected or 'This model'} reads text only. Images need a vision model "
                       f"such as '{VLM1_NAME}', which this engine does not list; choose one "
                       "in the sidebar's Model list once it is there.")
    return False, (f"{selected or 'This model'} reads text only: choose '{VLM1_NAME}' in the "
                   "sidebar's Model list to send this image.")
