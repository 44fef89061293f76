"""Process-wide resources, cached with ``st.cache_resource``: the loop runner, the clients,
the engines (model loading shows its progress in the page)."""

from __future__ import annotations

from typing import Any

import streamlit as st

from sampler_core import LocalClient
from sampler_core.errors import SamplerError

from workbench.runner import Runner


@st.cache_resource(show_spinner=False)
def runner() -> Runner:
    """The one event-loop thread all sessions share."""
    return Runner()


@st.cache_resource(show_spinner=False)
def local_client() -> LocalClient:
    """The embedded engine's client."""
    return runner().build(LocalClient)


@st.cache_resource(show_spinner=False)
def remote_client(host: str, api_key: str) -> Any:
    """A gRPC client for a Sampler server (created on the loop thread)."""
    from sampler_core import Client

    return runner().build(lambda: Client(api_key=api_key or None, api_host=host))


@st.cache_resource(show_spinner=False)
def _loaded_models() -> set[str]:
    return set()


@st.cache_resource(show_spinner=False)
def local_model_names() -> list[str]:
    """Models the embedded engine knows."""
    from sampler_core.engine import model_names

    return model_names()


def engine(name: str) -> Any:
    """The embedded engine for ``name``; the first load in this process shows a progress bar."""
    from sampler_core.engine import get_engine

    loaded = _loaded_models()
    if name in loaded:
        return get_engine(name)
    with st.status(f"Loading model {name or 'default'} …", expanded=True) as status:
        bar = st.progress(0.0, text="starting")

        def progress(message: str, fraction: float) -> None:
            bar.progress(min(max(float(fraction), 0.0), 1.0), text=message)

        try:
            result = get_engine(name, progress=progress)
        except SamplerError as exc:
            status.update(label=f"Could not load {name}: {exc}", state="error")
            raise
        status.update(label=f"Model {result.name} loaded", state="complete", expanded=False)
    loaded.add(name)
    return result
