"""Token chips as HTML: coloured by probability, whitespace visible."""

from __future__ import annotations

from typing import Any, Sequence

import streamlit as st

from sampler_core.tokens import Token

from workbench.views import chips_html, legend_html


def render(tokens: Sequence[Token], *, where: Any = None, selected: int | None = None,
           marked: int | None = None) -> None:
    """Draw chips into ``where`` (a placeholder or container), or the page."""
    (where or st).html(chips_html(tokens, selected=selected, marked=marked))


def legend(images: bool = False) -> None:
    """The colour legend (with the image-patch chip when the run has images)."""
    st.html(legend_html(images))
