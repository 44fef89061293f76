"""A generated token's attention over an image: the patch grid as a heatmap on the picture."""

from __future__ import annotations

import io

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from sampler_core.tokens import Token

from workbench import store
from workbench.components import heatmap
from workbench.views import (ImageGrid, RunResult, attention_row, context_labels, image_share,
                             overlay_matrix, run_image_grids, text_positions, visible)

#: Long side of the picture as drawn; small images are scaled up so the grid reads well.
DRAW_SIDE = 360
OVERLAY_SCALE = [[0.0, "rgba(255,255,255,0)"], [0.25, "rgba(255,212,59,0.35)"],
                 [0.6, "rgba(253,126,20,0.6)"], [1.0, "rgba(224,49,49,0.8)"]]


def _picture(data: bytes | None, grid: ImageGrid) -> Image.Image:
    if data is None:  # the kept copy is gone: draw the grid on a blank canvas
        return Image.new("RGB", (DRAW_SIDE * grid.cols // max(grid.rows, grid.cols),
                                 DRAW_SIDE * grid.rows // max(grid.rows, grid.cols)), "#f1f3f5")
    with Image.open(io.BytesIO(data)) as img:
        picture = img.convert("RGB")
    scale = DRAW_SIDE / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, Image.Resampling.LANCZOS)


def figure(data: bytes | None, z: np.ndarray, grid: ImageGrid, title: str) -> go.Figure:
    """The image with one translucent cell per patch, coloured by attention weight."""
    picture = _picture(data, grid)
    w, h = picture.size
    cw, ch = w / grid.cols, h / grid.rows
    top = float(np.nanmax(z)) if np.isfinite(z).any() and np.nanmax(z) > 0 else 1.0
    fig = go.Figure(go.Heatmap(
        z=np.where(np.isnan(z), None, np.round(z, 4)).tolist(),
        x=[(c + 0.5) * cw for c in range(grid.cols)], y=[(r + 0.5) * ch for r in range(grid.rows)],
        # Transparent at 0, a strong warm colour at the largest weight: the picture stays
        # visible where the token did not look.
        zmin=0.0, zmax=top, colorscale=OVERLAY_SCALE,
        customdata=[[f"{r + 1},{c + 1}" for c in range(grid.cols)] for r in range(grid.rows)],
        texttemplate="%{z:.3f}", textfont=dict(size=12, color="#1b1b1b"),
        hovertemplate="patch %{customdata}<br>weight %{z:.4f}<extra></extra>",
        colorbar=dict(title=dict(text="weight", side="right"), thickness=12, len=0.9),
        xgap=1, ygap=1, hoverongaps=False))
    fig.add_layout_image(source=picture, xref="x", yref="y", x=0, y=0, sizex=w, sizey=h,
                         sizing="stretch", layer="below", xanchor="left", yanchor="top")
    fig.update_xaxes(range=[0, w], visible=False, constrain="domain")
    fig.update_yaxes(range=[h, 0], visible=False, scaleanchor="x", constrain="domain")
    fig.update_layout(title=dict(text=title, font=dict(size=14)), height=h + 70, width=w + 120,
                      margin=dict(l=0, r=0, t=40, b=0), plot_bgcolor="white")
    return fig


def draw(data: bytes | None, z: np.ndarray, grid: ImageGrid, key: str, title: str) -> None:
    """Plot the overlay (static: zooming a 4x4 grid only gets in the way)."""
    st.plotly_chart(figure(data, z, grid, title), key=key,
                    config={"displayModeBar": False, "staticPlot": False}, width="content")


def panel(run: RunResult, token: Token, *, key: str, layer: int | None = None,
          head: int | None = None, what: str = "mean over layers and heads") -> bool:
    """The token's attention over each image (overlay) next to its attention over the text.

    Returns False when the run has no image tokens (nothing drawn).
    """
    grids = run_image_grids(run)
    if not grids:
        return False
    row = attention_row(token, layer, head)
    if len(row) == 0:
        st.info("This token has no attention row: turn on **Return attention** and run again "
                "(runs with an image turn it on by themselves).")
        return True
    data = store.get_image(run.image_sha)
    share = image_share(row, grids)
    name = visible(token.token_str)
    st.markdown(f"**Attention of `{name}`** ({what}): **{share:.0%}** on the image's "
                f"{sum(len(g.all_positions) for g in grids)} patch tokens, "
                f"{1 - share:.0%} on the text.")
    left, right = st.columns([5, 6])
    with left:
        for grid in grids:
            title = f"image {grid.image}" + (f" · {run.image_name}" if run.image_name else "")
            draw(data if grid.image == 1 else None, overlay_matrix(row, grid), grid,
                 key=f"{key}_img{grid.image}", title=title)
        if data is None:
            st.caption("The image itself was not kept with this run; the grid is drawn blank.")
        st.caption("Each cell is one image token (patch); the colour scale runs from 0 to the "
                   "largest patch weight.")
        if run.model == "vlm-1":
            st.caption("vlm-1's 16 image tokens are learned slots that each carry part of a "
                       "description of the whole picture, not a crop of it: here a cell shows "
                       "which slot the token read, not where in the picture it looked. Models "
                       "whose image tokens are patches (SmolVLM, LLaVA) map cells to places.")
    with right:
        positions = text_positions(len(row), grids)
        labels = context_labels(run.prompt_labels, run.generated, len(row))
        weights = row[positions]
        top = 40 if len(positions) > 40 else 0
        heatmap.row_bar(weights, [labels[i] for i in positions], key=f"{key}_text",
                        title="over the text tokens" + (f" (the {top} largest)" if top else ""),
                        top=top)
    return True
