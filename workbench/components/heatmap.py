"""The attention heatmap and one row of it as a bar chart."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from workbench.views import Heatmap


def heatmap(view: Heatmap, key: str, title: str,
            spans: Sequence[tuple[int, int, str]] = ()) -> None:
    """Plot a (downsampled) attention matrix with token labels on both axes.

    ``spans`` are context-position ranges ``(first, last, label)`` outlined over the columns
    (an image's patch tokens).
    """
    z = np.where(np.isnan(view.z), None, np.round(view.z, 4)).tolist()
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(len(view.col_labels))), y=list(range(len(view.row_labels))),
        customdata=[[c for c in view.col_labels] for _ in view.row_labels],
        text=[[r for _ in view.col_labels] for r in view.row_labels],
        hovertemplate="query %{text}<br>key %{customdata}<br>weight %{z}<extra></extra>",
        colorscale="Blues", colorbar=dict(title="weight"), hoverongaps=False))
    tick = max(1, len(view.col_labels) // 60)
    rtick = max(1, len(view.row_labels) // 40)
    # The column labels sit on top, under the title: leave room for both.
    longest = max((len(c) for c in view.col_labels[::tick]), default=4)
    top = 60 + min(140, 6 * longest)
    fig.update_layout(
        title=dict(text=title, y=0.995, yref="container", yanchor="top", x=0.01),
        height=min(900, top + 120 + 16 * len(view.row_labels)),
        margin=dict(l=10, r=10, t=top, b=10),
        xaxis=dict(tickmode="array", tickvals=list(range(0, len(view.col_labels), tick)),
                   ticktext=list(view.col_labels[::tick]), tickangle=-60, side="top",
                   title="context token"),
        yaxis=dict(tickmode="array", tickvals=list(range(0, len(view.row_labels), rtick)),
                   ticktext=list(view.row_labels[::rtick]), autorange="reversed",
                   title="generated token"))
    for first, last, label in spans:
        x0, x1 = first // view.col_step - 0.5, last // view.col_step + 0.5
        fig.add_shape(type="rect", x0=x0, x1=x1, y0=-0.5, y1=len(view.row_labels) - 0.5,
                      line=dict(color="#7048e8", width=2), fillcolor="rgba(0,0,0,0)")
        fig.add_annotation(x=(x0 + x1) / 2, y=len(view.row_labels) - 0.5, text=label,
                           showarrow=False, yanchor="top", font=dict(color="#5f3dc4", size=11),
                           bgcolor="rgba(255,255,255,0.8)")
    st.plotly_chart(fig, key=key, config={"displayModeBar": False})


def row_bar(weights: np.ndarray, labels: list[str], key: str, title: str, top: int = 0) -> None:
    """One token's attention over its context as bars (the ``top`` largest when top > 0)."""
    idx = np.arange(len(weights))
    if top and len(weights) > top:
        idx = np.sort(np.argsort(weights)[-top:])
    fig = go.Figure(go.Bar(x=[labels[i] for i in idx], y=np.round(weights[idx], 4).tolist(),
                           marker_color="#1c7ed6"))
    fig.update_layout(title=title, height=320, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis=dict(type="category", tickangle=-60), yaxis_title="weight")
    st.plotly_chart(fig, key=key, config={"displayModeBar": False})
