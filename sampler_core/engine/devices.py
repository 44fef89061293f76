"""Which device the engine runs a model on: a GPU when there is one, unless told otherwise.

The choice comes from the caller (``get_engine(name, device=...)``, ``sampler-core ... --device``)
or else ``$PROMPT_IDE_DEVICE``; ``auto`` (the default) takes the first CUDA device torch can see
and the CPU otherwise. ``cpu`` forces the CPU, and with it the packed-weight decode path
(``packed.py``), which is a CPU kernel; on a GPU the model runs in float32 through the lean
runner's torch path (``fast_llama.py``), and the step loop's vocabulary math takes the logits
back to the CPU (a 49k-float copy per token), where the seeded generator lives. There, each
run's decode steps replay one captured CUDA graph (``graphed_decode.py``) unless
``$PROMPT_IDE_CUDA_GRAPHS`` is ``0``.
"""

from __future__ import annotations

import os
import re

import torch

from sampler_core.errors import InvalidSettings

DEVICE_ENV = "PROMPT_IDE_DEVICE"
_ALLOWED = "auto, cpu, cuda or cuda:N"
CUDA_GRAPHS_ENV = "PROMPT_IDE_CUDA_GRAPHS"
_SWITCH = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}


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


def cuda_graphs_enabled() -> bool:
    """Whether decode steps on a GPU replay a captured CUDA graph: ``$PROMPT_IDE_CUDA_GRAPHS``,
    1 (the default) or 0 (launch every kernel from Python, for comparison)."""
    value = os.environ.get(CUDA_GRAPHS_ENV, "").strip().lower() or "1"
    if value not in _SWITCH:
        raise InvalidSettings(f"{CUDA_GRAPHS_ENV} must be 1 or 0, got {value!r}",
                              field=CUDA_GRAPHS_ENV, value=value)
    return _SWITCH[value]
