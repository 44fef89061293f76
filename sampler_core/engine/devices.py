"""Which device the engine runs a model on: a GPU when there is one, unless told otherwise.

The choice comes from the caller (``get_engine(name, device=...)``, ``sampler-core ... --device``)
or else ``$PROMPT_IDE_DEVICE``; ``auto`` (the default) takes the first CUDA device torch can see
and the CPU otherwise. ``cpu`` forces the CPU, and with it the packed-weight decode path
(``packed.py``), which is a CPU kernel; on a GPU the model runs in float32 through the lean
runner's torch path (``fast_llama.py``), and the step loop's vocabulary math takes the logits
back to the CPU (a 49k-float copy per token), where the seeded generator lives.
"""

from __future__ import annotations

import os
import re

import torch

from sampler_core.errors import InvalidSettings

DEVICE_ENV = "PROMPT_IDE_DEVICE"
_ALLOWED = "auto, cpu, cuda or cuda:N"


def choose_device(requested: str | None = None) -> torch.device:
    """``requested`` (else ``$PROMPT_IDE_DEVICE``, else ``auto``) -> the torch device to use."""
    source = "device" if requested is not None else DEVICE_ENV
    value = (requested if requested is not None else os.environ.get(DEVICE_ENV, "")).strip()
    value = value.lower() or "auto"
    if value == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", value):
        raise InvalidSettings(f"{source} must be {_ALLOWED}, got {value!r}", field=source,
                              value=value)
    if not torch.cuda.is_available():
        raise InvalidSettings(
            f"{source} is {value!r} but torch {torch.__version__} sees no CUDA device; use "
            "'auto' or 'cpu'", field=source, value=value)
    index = int(value.split(":")[1]) if ":" in value else 0
    if index >= torch.cuda.device_count():
        raise InvalidSettings(
            f"{source} is {value!r} but torch sees {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})", field=source, value=value)
    return torch.device(value)
