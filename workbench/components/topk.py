"""One token's numbers and its top-k alternatives: a table and a bar chart."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from sampler_core.tokens import Token

from workbench.views import top_k_rows, visible


def details(token: Token, index: int) -> None:
    """Probability, raw probability, rank and entropy of a token."""
    c = st.columns(5)
    c[0].metric("token", visible(token.token_str), help=f"id {token.token_id}, position {token.position}")
    c[1].metric("probability", f"{token.prob:.4f}", help="as sampled: after temperature, nucleus, masks")
    c[2].metric("raw probability", "–" if token.raw_prob is None else f"{token.raw_prob:.4f}",
                help="the model's own softmax at temperature 1")
    c[3].metric("rank", "–" if token.rank is None else str(token.rank))
    c[4].metric("entropy (nats)", "–" if token.entropy is None else f"{token.entropy:.3f}")


def table(token: Token, key: str) -> pd.DataFrame:
    """The top-k alternatives as a DataFrame and a bar chart; returns the frame."""
    frame = pd.DataFrame(top_k_rows(token))
    if frame.empty:
        st.info("No alternatives: set top-k above 0 in the sidebar.")
        return frame
    left, right = st.columns([3, 2])
    left.dataframe(frame, hide_index=True, key=f"{key}_df", width="stretch")
    colours = ["#1c7ed6" if chosen else "#adb5bd" for chosen in frame["chosen"]]
    fig = go.Figure(go.Bar(x=frame["raw_prob"], y=[f"{r}. {t}" for r, t in zip(frame["rank"], frame["text"])],
                           orientation="h", marker_color=colours))
    fig.update_layout(height=40 + 28 * len(frame), margin=dict(l=0, r=10, t=10, b=30),
                      yaxis=dict(autorange="reversed"), xaxis_title="raw probability")
    right.plotly_chart(fig, key=f"{key}_bar", config={"displayModeBar": False})
    return frame
