"""The sidebar: where runs go (embedded engine or a remote server) and every sampling setting.

Invalid values show the library's own message right under the widget that holds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from sampler_core.errors import InvalidArgument, SamplerError
from sampler_core.settings import MAX_LEN_LIMIT, SampleSettings, TOP_K_LIMIT

from workbench import forms, resources, state
from workbench.forms import build_settings

LOCAL = "Embedded engine"
REMOTE = "Remote server"


@dataclass
class Sidebar:
    """What the sidebar resolved to for this script run."""

    client: Any = None
    source: str = "local"          # "local" or the remote host
    model: str = ""
    models: list[str] = field(default_factory=list)
    settings: SampleSettings | None = None
    error: str | None = None       # connection problem, shown in the sidebar already
    slots: dict[str, Any] = field(default_factory=dict)

    def show_field_error(self, exc: SamplerError) -> bool:
        """Show an engine error under the widget of its field; True when there was one."""
        name = getattr(exc, "field", None)
        if isinstance(exc, InvalidArgument) and name in self.slots:
            self.slots[name].error(str(exc))
            return True
        return False


def _connection(bar: Sidebar) -> None:
    st.radio("Run on", (LOCAL, REMOTE), key=state.BACKEND_W, horizontal=True,
             help="The embedded engine runs in this process; a remote server is a "
                  "`sampler-core serve` instance.")
    if st.session_state.get(state.BACKEND_W, LOCAL) == LOCAL:
        bar.client = resources.local_client()
        bar.models = resources.local_model_names()
        return
    host = st.text_input("Server (host:port)", key=state.HOST_W, placeholder="localhost:50051")
    key = st.text_input("API key", key=state.API_KEY_W, type="password")
    if not host:
        bar.error = "Enter the server's host:port to connect."
        st.info(bar.error)
        return
    try:
        client = resources.remote_client(host.strip(), key)
        bar.models = resources.runner().list_models(client)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is shown, not raised
        resources.remote_client.clear()
        bar.error = f"Cannot connect to {host}: {exc}"
        st.error(bar.error)
        return
    bar.client, bar.source = client, host.strip()
    st.success(f"Connected to {host} ({len(bar.models)} models)")


def _token_lists() -> None:
    with st.expander("Stops and token filters"):
        st.text_area("Stop tokens (one per line)", key=state.STOP_TOKENS_W, height=68,
                     help="Each line names one vocabulary token; sampling it ends the run.")
        st.text_area("Stop strings (one per line, \\n for newline)", key=state.STOP_STRINGS_W,
                     height=68, help="The run ends once the output contains one.")
        st.text_area("Allowed tokens (ids or text, one per line)", key=state.ALLOWED_W, height=68)
        st.text_area("Disallowed tokens (ids or text, one per line)", key=state.DISALLOWED_W,
                     height=68)


def render() -> Sidebar:
    """Draw the sidebar and return the client, model and validated settings."""
    state.apply_pending()
    bar = Sidebar()
    with st.sidebar:
        st.markdown("### Connection")
        _connection(bar)
        st.markdown("### Sampling")
        options = bar.models or [""]
        if st.session_state.get(state.MODEL_W) not in options:
            st.session_state[state.MODEL_W] = options[0]
        st.selectbox("Model", options, key=state.MODEL_W)
        bar.slots["model_name"] = st.empty()
        bar.model = st.session_state[state.MODEL_W]
        values: dict[str, Any] = {}
        values["max_len"] = st.number_input("max_len", 0, MAX_LEN_LIMIT, 64, key=state.MAX_LEN_W)
        bar.slots["max_len"] = st.empty()
        values["temperature"] = st.slider("temperature", 0.0, 2.0, 0.7, 0.05,
                                          key=state.TEMPERATURE_W, help="0 = greedy")
        bar.slots["temperature"] = st.empty()
        values["nucleus_p"] = st.slider("nucleus_p", 0.0, 1.0, 0.95, 0.01, key=state.NUCLEUS_W)
        bar.slots["nucleus_p"] = st.empty()
        c1, c2 = st.columns([3, 2])
        values["rng_seed"] = c1.number_input("seed", 0, 2**53 - 1, 0, key=state.SEED_W)
        c2.selectbox("seed mode", ("fixed", "advance"), key=state.SEED_MODE_W,
                     help="advance: +1 after every run, as the SDK's client does")
        bar.slots["rng_seed"] = st.empty()
        values["top_k"] = st.number_input("top-k alternatives", 0, TOP_K_LIMIT, 5, key=state.TOP_K_W)
        bar.slots["top_k"] = st.empty()
        _token_lists()
        for name, key in (("stop_tokens", state.STOP_TOKENS_W), ("stop_strings", state.STOP_STRINGS_W),
                          ("allowed_tokens", state.ALLOWED_W), ("disallowed_tokens", state.DISALLOWED_W)):
            values[name] = st.session_state.get(key, "")
            bar.slots[name] = st.empty()
        values["return_attention"] = st.checkbox("Return attention", key=state.ATTENTION_W)
        values["full_attention"] = st.checkbox(
            "Per-layer / per-head attention", key=state.FULL_ATTENTION_W,
            help="Keeps every layer and head (memory grows with context); needed for the "
                 "layer and head selectors")
        bar.slots["return_attention"] = st.empty()
        values["score_prompt"] = st.checkbox("Score the prompt", key=state.SCORE_W)
        values["stop_at_eos"] = st.checkbox(
            "Stop at end-of-sequence", value=True, key=state.STOP_AT_EOS_W,
            help="End the run when the model emits its end-of-sequence token; off, sampling "
                 "runs on to max_len")
        values["prefill"] = st.selectbox(
            "Prompt forward (prefill)", forms.PREFILL_CHOICES, key=state.PREFILL_W,
            format_func=forms.prefill_label,
            help="How a prompt over 32 tokens is computed on the CPU's packed weights. The "
                 "default, float32, is exact arithmetic. fixed16 rounds activations to "
                 "16-bit fixed point: faster, probabilities ~1e-3 off float32's; fast rounds "
                 "them to 8 bits and runs attention in bfloat16: faster still, ~0.1 off. Runs "
                 "not in float32 are labelled.")
        bar.slots["prefill"] = st.empty()
        try:
            bar.settings = build_settings(values)
        except InvalidArgument as exc:
            (bar.slots.get(exc.field or "") or st).error(str(exc))
    return bar
