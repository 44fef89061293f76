"""Attention: generated tokens over context tokens, per layer/head or aggregated; one row as bars."""

from __future__ import annotations

import streamlit as st

from workbench import state
from workbench.components import heatmap, overlay
from workbench.views import attention_heatmap, attention_row, context_labels, run_image_grids, visible

AGGREGATE = "all (mean)"


def page() -> None:
    """Draw the attention views of the current run."""
    st.title("Attention")
    run = state.current_run()
    generated = [t for t in run.generated if t.attn_weights] if run else []
    if not generated:
        st.info("Turn on **Return attention** in the sidebar and run a prompt in the Playground; "
                "tick **Per-layer / per-head attention** for the layer and head selectors.")
        return
    detail = next((t.attention for t in generated if t.attention is not None), None)
    c1, c2, c3 = st.columns(3)
    layers = [AGGREGATE, *range(detail.num_layers)] if detail else [AGGREGATE]
    heads = [AGGREGATE, *range(detail.num_heads)] if detail else [AGGREGATE]
    layer = c1.selectbox("Layer", layers, key=state.ATT_LAYER_W)
    head = c2.selectbox("Head", heads, key=state.ATT_HEAD_W)
    max_cols = c3.select_slider("Columns shown (downsampled above)", [60, 120, 240, 400], 240,
                                key="att_cols_w")
    if detail is None:
        st.caption("Only the aggregate (mean over all layers and heads) was returned for this run.")
    lay = None if layer == AGGREGATE else int(layer)
    hd = None if head == AGGREGATE else int(head)
    view = attention_heatmap(generated, run.prompt_labels, layer=lay, head=hd, max_cols=int(max_cols))
    what = f"layer {layer}, head {head}" if detail else "mean over all layers and heads"
    note = "" if view.col_step == 1 and view.row_step == 1 else \
        f" · downsampled ×{view.row_step} rows, ×{view.col_step} columns (block max)"
    spans = [(min(g.all_positions), max(g.all_positions), f"image {g.image}")
             for g in run_image_grids(run) if g.all_positions]
    heatmap.heatmap(view, key="att_heatmap", title=f"{what}{note}", spans=spans)
    index = st.selectbox("Token (row)", list(range(len(generated))), key=state.ATT_ROW_W,
                         format_func=lambda i: f"{generated[i].position}: {visible(generated[i].token_str)}")
    token = generated[index]
    if run_image_grids(run):
        st.markdown("#### Over the image and the text")
        overlay.panel(run, token, key="att_overlay", layer=lay, head=hd, what=what)
        return
    row = attention_row(token, lay, hd)
    labels = context_labels(run.prompt_labels, generated, len(row))
    top = 80 if len(row) > 80 else 0
    heatmap.row_bar(row, labels, key="att_row",
                    title=f"attention of {visible(token.token_str)!s} over its context"
                          + (f" (the {top} largest)" if top else ""), top=top)


page()
