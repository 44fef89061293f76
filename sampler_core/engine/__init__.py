"""The only package that imports torch and transformers.

``get_engine(name)`` loads a model once per process (per device) and returns its engine.
"""

from __future__ import annotations

from typing import Any

from sampler_core.engine.models import Progress, get_cached, model_names


def _no_progress(message: str, fraction: float) -> None:
    return None


def get_engine(name: str = "", progress: Progress | None = None,
               device: str | None = None) -> Any:
    """The engine for a model name, alias or local path, loaded once and reused.

    ``device``: ``auto`` (a CUDA GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``; None reads ``$PROMPT_IDE_DEVICE`` (see ``devices.py``).
    """
    from sampler_core.engine.causal_lm import CausalLMEngine
    from sampler_core.engine.devices import choose_device

    target = choose_device(device)

    def build(canonical: str, loader: Any) -> Any:
        loaded = loader(progress or _no_progress)
        if target.type != "cpu":  # loaders build on the CPU; the engine follows the model
            loaded.model.to(target)
            tower = getattr(loaded.processor, "tower", None)
            if tower is not None:
                tower.to(target)
        if loaded.processor is not None:  # a vision-language model: images become tokens
            from sampler_core.engine.vlm import VisionLanguageEngine

            return VisionLanguageEngine(loaded)
        return CausalLMEngine(loaded)

    return get_cached(name, build, variant=str(target))


__all__ = ["get_engine", "model_names"]
