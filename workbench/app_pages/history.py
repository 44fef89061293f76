"""History: every run, kept in SQLite across restarts; reopen, export JSON, show the code."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import streamlit as st

from workbench import state, store
from workbench.components import chips
from workbench.views import prefill_tag, visible


def _reopen(run_id: str) -> None:
    run = store.load(run_id)
    if run is not None:
        state.store_run(run)
        st.session_state[state.PROMPT] = run.prompt
        st.session_state[state.PROMPT_W] = run.prompt
        st.session_state[state.TOKEN_PICK_W] = None
        st.session_state["reopened"] = run_id
        image = store.get_image(run.image_sha)
        if image is not None:
            # Offered (and selected) in the playground's image panel, so Run sends it again.
            state.keep_image(f"history: {run.image_name or run.image_sha[:12]}", image,
                             run.image_after)


def page() -> None:
    """Draw the history list and the selected run."""
    st.title("History")
    st.caption(f"Stored in {store.data_dir() / 'history.sqlite3'}")
    entries = store.list_runs()
    if not entries:
        st.info("No runs yet.")
        return
    frame = pd.DataFrame([{
        "when": dt.datetime.fromtimestamp(e.created).strftime("%Y-%m-%d %H:%M:%S"),
        "model": e.model, "seed": e.seed, "status": e.status, "tokens": e.num_tokens,
        "image": e.image_name or "", "prompt": visible(e.prompt[:60]),
        "output": visible(e.output[:60])} for e in entries])
    st.dataframe(frame, hide_index=True, key="history_table", width="stretch", height=260)
    ids = [e.run_id for e in entries]
    labels = {e.run_id: f"{dt.datetime.fromtimestamp(e.created):%H:%M:%S} · seed {e.seed} · "
                        f"{visible(e.prompt[:40])}" for e in entries}
    run_id = st.selectbox("Run", ids, key=state.HISTORY_PICK_W, format_func=labels.get)
    run = store.load(run_id)
    if run is None:
        return
    if st.session_state.pop("reopened", None) == run_id:
        st.success("Reopened: the Playground, Attention and per-token table now show this run"
                   + (", and its image is attached again." if run.image_sha else "."))
    if run.image_sha:
        image = store.get_image(run.image_sha)
        left, right = st.columns([1, 5])
        if image is not None:
            left.image(image, width=120)
        right.markdown(f"**Image:** {run.image_name or 'unnamed'} "
                       f"({'after' if run.image_after else 'before'} the text) · "
                       f"sha256 `{run.image_sha[:16]}…`")
        if image is None:
            right.warning("The image's kept copy is missing from the history folder.")
    if prefill_tag(run.summary):
        st.caption(f"This run's {prefill_tag(run.summary)}: its probabilities may differ from "
                   "an exact run's.")
    chips.render(run.tokens)
    c1, c2 = st.columns(2)
    c1.button("Reopen in the playground", key="history_reopen", on_click=_reopen, args=(run_id,))
    c2.download_button("Export JSON", store.to_json(run), f"run-{run_id}.json",
                       "application/json", key="history_json")
    host = None if run.source == "local" else run.source
    st.markdown("**Python that reproduces this run**")
    st.code(store.python_code(run, host), language="python")


page()
