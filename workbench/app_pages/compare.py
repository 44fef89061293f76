"""Compare seeds: one prompt under N seeds side by side, divergence marked, pin a seed back."""

from __future__ import annotations

import streamlit as st

from workbench import images, state
from workbench.components import chips, sidebar
from workbench.execute import stream_runs, with_image_settings
from workbench.views import (RunResult, divergence, prefill_tag, reuse_tag, total_logprob,
                             visible)


def _pin(seed: int) -> None:
    state.pin_seed(seed)
    st.session_state["pinned_message"] = f"Seed {seed} pinned into the playground's settings (fixed)."


def page() -> None:
    """Draw the seed comparison."""
    bar: sidebar.Sidebar = st.session_state["_sidebar"]
    st.title("Compare seeds")
    prompt = state.prompt()
    if not prompt:
        st.info("Write a prompt in the Playground first.")
        return
    st.caption("Prompt: " + visible(prompt[:200]) + ("…" if len(prompt) > 200 else ""))
    attached: images.Attached | None = state.get(state.ATTACHED)
    if attached is not None and not images.vision_status(bar.models, bar.model)[0]:
        attached = None
    if attached is not None:
        left, right = st.columns([1, 8])
        left.image(attached.data, width=64)
        right.caption(f"With the playground's image **{attached.name}** "
                      f"({'after' if attached.after else 'before'} the text).")
    c1, c2, c3 = st.columns([2, 2, 1])
    n = c1.slider("Number of seeds", 2, 8, 3, key=state.COMPARE_N_W)
    base = c2.number_input("First seed", 0, 2**53 - 1, int(bar.settings.rng_seed) if bar.settings else 0,
                           key=state.COMPARE_SEED_W)
    go = c3.button("Run all", type="primary", key=state.COMPARE_RUN_W, width="stretch",
                   disabled=bar.client is None or bar.settings is None)
    if "pinned_message" in st.session_state:
        st.success(st.session_state.pop("pinned_message"))
    results: list[RunResult] = list(st.session_state.get(state.COMPARE, []))
    if go and bar.settings is not None:
        # Every seed at once, each streaming into its own column (the engine takes the runs'
        # steps together, so N seeds cost far less than N runs one after another).
        slots = [col.container(border=True) for col in _grid(int(n))]
        settings = []
        for i, slot in enumerate(slots):
            slot.markdown(f"**seed {int(base) + i}**")
            one = bar.settings.replace(rng_seed=int(base) + i)
            settings.append(with_image_settings(one) if attached is not None else one)
        results = stream_runs(bar, prompt, settings, [slot.empty() for slot in slots],
                              image=attached.data if attached else None,
                              image_name=attached.name if attached else None,
                              image_after=attached.after if attached else False,
                              on_update=lambda runs: st.session_state.update(
                                  {state.COMPARE: runs}))
        st.session_state[state.COMPARE] = results
        st.rerun()
    if not results:
        st.caption("Run all to sample the prompt under each seed.")
        return
    at = divergence([[t.token_id for t in r.generated] for r in results])
    if at is None:
        st.info("All runs are identical.")
    else:
        st.markdown(f"Runs first diverge at generated token **#{at}** (dashed red outline).")
    for slot, run in zip(_grid(len(results)), results):
        with slot.container(border=True):
            st.markdown(f"**seed {run.settings.rng_seed}** · {len(run.generated)} tokens · "
                        f"Σ logprob {total_logprob(run.tokens):.2f}"
                        + (f" · {prefill_tag(run.summary)}" if prefill_tag(run.summary) else "")
                        + (f" · {reuse_tag(run.summary)}" if reuse_tag(run.summary) else ""))
            if run.status == "error":
                st.error(run.error)
            chips.render(run.generated, marked=at)  # generated only: the prompt is shared
            st.button("Pin this seed", key=f"pin_{run.run_id}", on_click=_pin,
                      args=(run.settings.rng_seed,))


def _grid(n: int) -> list:
    """Up to four columns per row."""
    cols = []
    for start in range(0, n, 4):
        cols.extend(st.columns(min(4, n - start)))
    return cols


page()
