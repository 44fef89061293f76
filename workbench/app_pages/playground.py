"""Playground: prompt, run and stream, inspect a token, branch, per-token table."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from sampler_core.errors import SamplerError
from sampler_core.tokens import TokenType

from workbench import images, resources, state, store
from workbench.components import chips, overlay, sidebar, topk
from workbench.execute import stream_run, with_image_settings
from workbench.views import (RunResult, branch_forced, image_chip_text, root_of, run_image_grids,
                             prefill_tag, reuse_tag, timing_line, token_label, token_rows, tree_rows,
                             visible)


def _wrap_chat(bar: sidebar.Sidebar) -> None:
    """Callback: replace the prompt with the chat-templated message."""
    message = st.session_state.get(state.CHAT_MESSAGE_W, "")
    system = st.session_state.get(state.CHAT_SYSTEM_W) or None
    try:
        text = resources.engine(bar.model).chat_prompt(message, system)
    except SamplerError as exc:
        st.session_state["chat_error"] = str(exc)
        return
    st.session_state[state.PROMPT_W] = text
    st.session_state[state.PROMPT] = text


def _image_panel(bar: sidebar.Sidebar) -> images.Attached | None:
    """Upload or pick an image, place it before or after the text; the image to send, or None.

    Streamlit forgets a widget's value while its page is not shown (and a file uploader's for
    good), so the choice is copied into plain keys; an upload is kept as an extra option.
    """
    samples = images.sample_images()
    kept = st.session_state.get(state.KEPT_IMAGE)  # (label, bytes): an upload or a reopened run
    options = ["(none)", *samples, *([kept[0]] if kept else [])]
    if state.SAMPLE_IMAGE_W not in st.session_state:
        st.session_state[state.SAMPLE_IMAGE_W] = st.session_state.get(state.SAMPLE_IMAGE, "(none)")
    if st.session_state[state.SAMPLE_IMAGE_W] not in options:
        st.session_state[state.SAMPLE_IMAGE_W] = "(none)"
    if state.IMAGE_PLACE_W not in st.session_state:
        st.session_state[state.IMAGE_PLACE_W] = st.session_state.get(state.IMAGE_PLACE, state.PLACES[1])
    chosen = st.session_state.get(state.IMAGE_W) is not None or \
        st.session_state[state.SAMPLE_IMAGE_W] != "(none)"
    with st.expander("Image (for the vision model)", expanded=chosen, icon=":material/image:"):
        c1, c2 = st.columns([3, 2])
        upload = c1.file_uploader(f"Upload an image ({images.limit_text()})",
                                  type=images.UPLOAD_TYPES, key=state.IMAGE_W)
        sample = c2.selectbox("…or pick one", options, key=state.SAMPLE_IMAGE_W,
                              help="vlm/… are pictures like the ones vlm-1 was trained on")
        place = c2.radio("Place the image", state.PLACES, key=state.IMAGE_PLACE_W, horizontal=True,
                         help="Where the image's tokens go relative to the prompt text. vlm-1 "
                              "learnt both: after a chat-templated question, or before it.")
        st.session_state[state.SAMPLE_IMAGE] = sample
        st.session_state[state.IMAGE_PLACE] = place
        data, name = None, None
        if upload is not None:
            data, name = upload.getvalue(), upload.name
            # Offered (and restored) as an option once this page's uploader has forgotten it.
            st.session_state[state.KEPT_IMAGE] = (f"uploaded: {name}", data)
            st.session_state[state.SAMPLE_IMAGE] = f"uploaded: {name}"
        elif kept and sample == kept[0]:
            data, name = kept[1], kept[0].split(": ", 1)[1]
        elif sample in samples:
            data, name = samples[sample].read_bytes(), sample
        if data is None:
            st.caption("No image attached: runs send the text only."
                       + (" vlm-1 answers questions about pictures like the vlm/… samples; wrap "
                          "the question with the Chat template helper."
                          if bar.model == images.VLM1_NAME else ""))
            return None
        try:
            checked = images.check_image(data, name or "image")
        except ValueError as exc:
            st.error(str(exc))
            return None
        left, right = st.columns([1, 3])
        left.image(checked.data, width=160)
        right.markdown(f"**{name}** · {checked.format} {checked.width}×{checked.height} · "
                       f"{len(checked.data) / 1024:.1f} KiB · {place}")
        ok, message = images.vision_status(bar.models, bar.model)
        if not ok:
            right.warning(message, icon=":material/visibility_off:")
            return None
        right.info(message, icon=":material/visibility:")
        right.caption("Runs with an image also score the prompt and return attention: the "
                      "image's patch tokens show in the output and table, and a selected "
                      "token's attention is drawn over the picture.")
        return images.Attached(checked.data, name or "image", place == state.PLACES[1])


def _prompt_form(bar: sidebar.Sidebar) -> bool:
    if state.PROMPT_W not in st.session_state:
        st.session_state[state.PROMPT_W] = state.prompt() or "The capital of France is"
    with st.form("prompt_form", border=False):
        st.text_area("Prompt (raw completion text)", key=state.PROMPT_W, height=140,
                     help="Ctrl+Enter runs")
        c1, c2 = st.columns([1, 5])
        submitted = c1.form_submit_button("Run", type="primary", key=state.RUN_W,
                                          disabled=bar.client is None)
        c2.caption("Ctrl+Enter in the prompt runs too.")
    state.put(state.PROMPT, st.session_state[state.PROMPT_W])
    with st.expander("Chat template helper"):
        st.text_input("Message", key=state.CHAT_MESSAGE_W)
        st.text_input("System prompt (optional)", key=state.CHAT_SYSTEM_W)
        st.button("Wrap in the model's chat template", key=state.CHAT_WRAP_W, on_click=_wrap_chat,
                  args=(bar,), disabled=bar.source != "local",
                  help="Uses the embedded engine's tokenizer")
        if "chat_error" in st.session_state:
            st.error(st.session_state.pop("chat_error"))
    return submitted


def _queue_branch(run_id: str, index: int) -> None:
    alt = st.session_state.get(state.ALT_PICK_W)
    if alt is not None:
        st.session_state["pending_branch"] = (run_id, index, alt)


def _inspect(run: RunResult) -> None:
    st.markdown("#### Inspect a token")
    tokens = run.tokens
    if not tokens:
        return
    pick = st.pills("Select a token", list(range(len(tokens))), key=state.TOKEN_PICK_W,
                    format_func=lambda i: token_label(i, tokens[i]), label_visibility="collapsed")
    if pick is None:
        st.caption("Select a token above to see its probabilities and alternatives.")
        return
    token = tokens[pick]
    patch = image_chip_text(token.token_str) if token.token_type == TokenType.USER else None
    if patch:
        st.info(f"`{token.token_str}` is an image token: its content is the picture's patch "
                f"({patch}), not a word, so it has no probability of its own. Select a generated "
                "token to see how much attention it paid to each patch.")
        return
    topk.details(token, pick)
    topk.table(token, key="inspect_topk")
    if token.token_type == TokenType.USER:
        st.caption("A prompt token: branching works on generated tokens.")
        return
    index = pick - len(run.prompt_tokens)
    alts = [a for a in token.top_k if a.token_id != token.token_id]
    if alts:
        _branch_controls(run, index, alts)
    if run_image_grids(run):
        st.markdown("##### Where this token looked")
        overlay.panel(run, token, key="inspect_overlay")


def _branch_controls(run: RunResult, index: int, alts: list) -> None:
    c1, c2 = st.columns([3, 1])
    c1.selectbox("Continue from here with", [a.token_id for a in alts], key=state.ALT_PICK_W,
                 format_func=lambda i: next(f"{visible(a.token_str)}  (raw p={a.raw_prob:.3f})"
                                            for a in alts if a.token_id == i))
    c2.button("Branch", key=state.BRANCH_W, on_click=_queue_branch, args=(run.run_id, index),
              type="secondary", width="stretch")


def _tree(run: RunResult) -> None:
    runs = state.runs()
    rows = tree_rows(runs, root_of(runs, run.run_id))
    if len(rows) < 2:
        return
    ids = [r[0] for r in rows]
    labels = {r[0]: "\u2003" * r[1] + ("└ " if r[1] else "") + r[2] for r in rows}
    if st.session_state.get(state.TREE_W) not in ids or st.session_state.get("tree_sync") != run.run_id:
        st.session_state[state.TREE_W] = run.run_id
    st.session_state["tree_sync"] = run.run_id
    choice = st.radio("Branches of this prompt", ids, key=state.TREE_W, format_func=labels.get)
    if choice != run.run_id:
        state.put(state.CURRENT, choice)
        st.session_state[state.TOKEN_PICK_W] = None
        st.rerun()


def _table(run: RunResult) -> None:
    rows = token_rows(run.tokens)
    if not rows:
        return
    frame = pd.DataFrame(rows)
    st.dataframe(frame, hide_index=True, key="token_table", width="stretch", height=300)
    fig = go.Figure()
    fig.add_scatter(x=frame["position"], y=frame["prob"], name="probability", mode="lines+markers")
    fig.add_scatter(x=frame["position"], y=frame["entropy"], name="entropy (nats)",
                    mode="lines+markers", yaxis="y2")
    fig.update_layout(height=280, margin=dict(l=10, r=10, t=10, b=10), xaxis_title="position",
                      yaxis=dict(title="probability", range=[0, 1.02]),
                      yaxis2=dict(title="entropy", overlaying="y", side="right"),
                      legend=dict(orientation="h", y=1.12))
    st.plotly_chart(fig, key="token_lines", config={"displayModeBar": False})
    c1, c2 = st.columns(2)
    c1.download_button("Download CSV", frame.to_csv(index=False), f"run-{run.run_id}.csv",
                       "text/csv", key="dl_csv")
    c2.download_button("Download JSON", store.to_json(run), f"run-{run.run_id}.json",
                       "application/json", key="dl_json")


def _summary(run: RunResult) -> None:
    n = len(run.generated)
    if run.status == "error":
        st.error(run.error or "the run failed")
    elif run.status == "stopped":
        st.warning(f"Stopped after {n} tokens.")
    elif run.summary is not None:
        s = run.summary
        st.caption(f"{s.model_name} · {s.num_prompt_tokens} prompt tokens · {n} generated · "
                   f"finished: {s.finish_reason.value}"
                   + (f" ({visible(s.stop_match)})" if s.stop_match else "")
                   + f" · seed {run.settings.rng_seed}"
                   + (f" · {prefill_tag(s)}" if prefill_tag(s) else "")
                   + (f" · {reuse_tag(s)}" if reuse_tag(s) else "")
                   + (f" · {timing_line(run.timing)}" if run.timing else ""))
        for note in s.notes:
            st.warning(note)


def page() -> None:
    """Draw the playground."""
    bar: sidebar.Sidebar = st.session_state["_sidebar"]
    st.title("Playground")
    submitted = _prompt_form(bar)
    attached = _image_panel(bar)
    state.put(state.ATTACHED, attached)  # Compare seeds sends it too
    top = st.columns([6, 1])
    top[0].markdown("#### Output")
    stop = top[1].button("Stop", key=state.STOP_W, width="stretch")
    out = st.container(border=True)
    where = out.empty()
    current = state.current_run()
    if stop and current is not None and current.status == "running":
        state.store_run(current.with_tokens(current.tokens, status="stopped"))
    pending = st.session_state.pop("pending_branch", None)
    if (submitted or pending) and bar.settings is None:
        st.error("Fix the settings in the sidebar first.")
    elif submitted:
        st.session_state[state.TOKEN_PICK_W] = None
        settings = with_image_settings(bar.settings) if attached else bar.settings
        stream_run(bar, state.prompt(), settings, where,
                   image=attached.data if attached else None,
                   image_name=attached.name if attached else None,
                   image_after=attached.after if attached else False, on_update=state.store_run)
        state.seed_after_run(bar.settings.rng_seed)
    elif pending:
        parent = state.runs().get(pending[0])
        if parent is not None:
            index, alt_id = pending[1], pending[2]
            alt = next(a for a in parent.generated[index].top_k if a.token_id == alt_id)
            forced = branch_forced(parent, index, alt)
            # parent.settings.max_len excludes the parent's own forced tokens; keep the total.
            total = parent.settings.max_len + len(parent.forced_ids)
            settings = parent.settings.replace(max_len=max(0, total - len(forced)))
            st.session_state[state.TOKEN_PICK_W] = None
            image = store.get_image(parent.image_sha)
            if parent.image_sha and image is None:
                st.error("The parent run's image is no longer kept in the history folder, so "
                         "this branch cannot be run.")
            else:
                stream_run(bar, parent.prompt, settings, where, forced=forced, parent=parent,
                           branch_index=index, image=image, image_name=parent.image_name,
                           image_after=parent.image_after, on_update=state.store_run)
    current = state.current_run()
    if current is None:
        where.caption("Run a prompt to see its tokens here.")
        chips.legend()
        return
    selected = st.session_state.get(state.TOKEN_PICK_W)
    chips.render(current.tokens, where=where, selected=selected)
    chips.legend(images=bool(current.image_sha))
    _summary(current)
    if bar.settings is not None and st.session_state.get(state.SEED_MODE_W) == "advance":
        st.caption(f"Seed mode advance: the next run uses seed {st.session_state.get(state.PENDING_SEED, bar.settings.rng_seed)}.")
    _tree(current)
    tab_inspect, tab_table = st.tabs(["Inspect & branch", "Per-token table"])
    with tab_inspect:
        _inspect(current)
    with tab_table:
        _table(current)


page()
