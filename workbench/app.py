"""The workbench's entry script (`make run`): the sidebar, then the page router."""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run workbench/app.py` puts workbench/ on sys.path, not the repository root.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from workbench.components import sidebar  # noqa: E402

PAGES = Path(__file__).resolve().parent / "app_pages"

st.set_page_config(page_title="Prompt IDE workbench", page_icon=":material/science:", layout="wide")
navigation = st.navigation([
    st.Page(PAGES / "playground.py", title="Playground", icon=":material/edit_note:", default=True),
    st.Page(PAGES / "compare.py", title="Compare seeds", icon=":material/casino:"),
    st.Page(PAGES / "attention.py", title="Attention", icon=":material/grid_on:"),
    st.Page(PAGES / "tokenizer.py", title="Tokenizer", icon=":material/text_fields:"),
    st.Page(PAGES / "history.py", title="History", icon=":material/history:"),
])
st.session_state["_sidebar"] = sidebar.render()
navigation.run()
