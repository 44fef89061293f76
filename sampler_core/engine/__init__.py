"""The only package that imports torch and transformers.

``get_engine(name)`` loads a model once per process and returns its engine.
"""

from __future__ import annotations

from typing import Any

from sampler_core.engine.models import Progress, get_cached, model_names


def _no_progress(message: str, fraction: float) -> None:
    return None


def get_engine(name: str = "", progress: Progress | None = None) -> Any:
    """The engine for a model name, alias or local path, loaded once and reused."""
    from sampler_core.engine.causal_lm import CausalLMEngine

    def build(canonical: str, loader: Any) -> Any:
        loaded = loader(progress or _no_progress)
        if loaded.processor is not None:  # a vision-language model: images become tokens
            from sampler_core.engine.vlm import VisionLanguageEngine

            return VisionLanguageEngine(loaded)
        return CausalLMEngine(loaded)

    return get_cached(name, build)


__all__ = ["get_engine", "model_names"]
