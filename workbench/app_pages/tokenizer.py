"""Tokenizer view: the prompt's tokens with ids and boundaries, and the count."""

from __future__ import annotations

import html

import streamlit as st

from workbench import resources, state
from workbench.components import sidebar
from workbench.views import visible


def _tokens_html(tokens: list) -> str:
    colours = ("#dbe4ff", "#ffe3e3", "#d3f9d8", "#fff3bf", "#f3d9fa")
    spans = [f'<span title="position {i}" style="background:{colours[i % len(colours)]};'
             'border-radius:3px;padding:1px 2px;margin:0 1px;display:inline-block;'
             f'color:#1b1b1b">{html.escape(visible(t.token_str))}<sub style="color:#555;'
             f'font-size:0.65rem;margin-left:2px">{t.token_id}</sub></span>'
             + ("<br>" if "\n" in t.token_str else "") for i, t in enumerate(tokens)]
    return ('<div style="line-height:2.2;font-family:ui-monospace,monospace;font-size:0.9rem">'
            + "".join(spans) + "</div>")


def page() -> None:
    """Draw the tokenizer view."""
    bar: sidebar.Sidebar = st.session_state["_sidebar"]
    st.title("Tokenizer")
    if state.TOKENIZER_TEXT_W not in st.session_state:
        st.session_state[state.TOKENIZER_TEXT_W] = state.prompt()
    text = st.text_area("Text (starts as the playground's prompt)", key=state.TOKENIZER_TEXT_W,
                        height=140)
    if bar.client is None:
        st.info("Connect to a server in the sidebar first.")
        return
    if not text:
        st.caption("0 tokens")
        return
    try:
        if bar.source == "local":
            resources.engine(bar.model)
        tokens = resources.runner().tokenize(bar.client, text, bar.model)
    except Exception as exc:  # noqa: BLE001 - shown to the user, not raised
        st.error(f"Cannot tokenise: {exc}")
        return
    st.metric("tokens", len(tokens))
    st.html(_tokens_html(tokens))
    st.caption("Each box is one token; the small number is its id. Spaces show as ·, newlines as ↵.")


page()
