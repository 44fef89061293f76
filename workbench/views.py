"""View models: tokens -> table rows, chips, heatmap matrices, seed divergence. No Streamlit here."""

from __future__ import annotations

import html
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from sampler_core.settings import SampleSettings
from sampler_core.tokens import RunSummary, Token, TokenType
from sampler_core.vision.tokens import parse_image_token  # text parsing only, no torch

#: Probability bands for chip colours, highest first: (lower bound, background, label).
PROB_BANDS: tuple[tuple[float, str, str], ...] = (
    (0.8, "#b7e4c7", "p ≥ 0.8"),
    (0.5, "#d8f3dc", "0.5 – 0.8"),
    (0.2, "#fff3b0", "0.2 – 0.5"),
    (0.05, "#ffd6a5", "0.05 – 0.2"),
    (0.0, "#ffadad", "< 0.05"),
)
PROMPT_COLOUR = "#e9ecef"
IMAGE_CHIP_COLOUR = "#e5dbff"  # image patch tokens in the context


def band(prob: float | None) -> int:
    """Index into PROB_BANDS for a probability (unknown -> the lowest band)."""
    p = 0.0 if prob is None or math.isnan(prob) else prob
    return next(i for i, (low, _, _) in enumerate(PROB_BANDS) if p >= low)


def prob_colour(prob: float | None) -> str:
    """Background colour of a chip for a probability."""
    return PROB_BANDS[band(prob)][1]


def visible(text: str) -> str:
    """Token text with whitespace made visible: space ·, tab →, newline ↵, empty ∅."""
    if text == "":
        return "∅"
    return text.replace(" ", "·").replace("\t", "→").replace("\r", "␍").replace("\n", "↵")


def chips_html(tokens: Sequence[Token], *, selected: int | None = None,
               marked: int | None = None, index_offset: int = 0) -> str:
    """Tokens as coloured inline chips; a newline token also breaks the line.

    ``selected`` and ``marked`` are indices into ``tokens`` drawn with an outline
    (selection in blue, a seed divergence in red).
    """
    out = ['<div class="pide-chips" style="line-height:2.1;font-family:ui-monospace,monospace;'
           'font-size:0.92rem;word-break:break-word">']
    for i, t in enumerate(tokens):
        unscored = t.token_type == TokenType.USER and t.logprob is None
        image_text = image_chip_text(t.token_str) if t.token_type == TokenType.USER else None
        colour = IMAGE_CHIP_COLOUR if image_text else PROMPT_COLOUR if unscored else prob_colour(t.prob)
        style = (f"background:{colour};border-radius:4px;padding:1px 3px;margin:0 1px;color:#1b1b1b;"
                 "white-space:pre;")
        if i == selected:
            style += "outline:2px solid #1c7ed6;"
        if i == marked:
            style += "outline:2px dashed #e03131;"
        tip = f"#{i + index_offset} id {t.token_id} p={t.prob:.3f}"
        if image_text:
            tip = f"#{i + index_offset} {t.token_str}"
        if t.rank is not None:
            tip += f" rank {t.rank}"
        out.append(f'<span class="pide-chip" title="{html.escape(tip)}" style="{style}">'
                   f"{html.escape(image_text or visible(t.token_str))}</span>")
        if "\n" in t.token_str:
            out.append("<br>" * t.token_str.count("\n"))
    out.append("</div>")
    return "".join(out)


def legend_html(images: bool = False) -> str:
    """The colour legend for chips (with the image-patch chip when ``images``)."""
    items = [f'<span style="background:{c};border-radius:4px;padding:1px 6px;margin-right:6px;'
             f'color:#1b1b1b">{html.escape(label)}</span>' for _, c, label in PROB_BANDS]
    items.append(f'<span style="background:{PROMPT_COLOUR};border-radius:4px;padding:1px 6px;'
                 'margin-right:6px;color:#1b1b1b">prompt</span>')
    if images:
        items.append(f'<span style="background:{IMAGE_CHIP_COLOUR};border-radius:4px;padding:1px 6px;'
                     'color:#1b1b1b">▦ image patch (image row,column)</span>')
    return ('<div style="font-size:0.8rem">Chip colour = probability the token was sampled with: '
            + "".join(items) + " · spaces show as ·, newlines as ↵</div>")


def token_label(index: int, token: Token) -> str:
    """A short label for selectors: index, visible text and probability."""
    image_text = image_chip_text(token.token_str) if token.token_type == TokenType.USER else None
    if image_text:
        return f"{index} {image_text}"
    text = visible(token.token_str)
    text = text if len(text) <= 14 else text[:13] + "…"
    return f"{index} {text} · {token.prob:.2f}"


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def token_rows(tokens: Sequence[Token], alternatives: int = 3) -> list[dict[str, Any]]:
    """One row per token for the per-token table (prompt tokens too, when scored)."""
    rows = []
    for t in tokens:
        if t.token_type == TokenType.USER and parse_image_token(t.token_str):
            # An image token's id is a placeholder: no probability or alternatives of its own.
            rows.append({"position": t.position, "source": "image", "text": t.token_str,
                         "id": t.token_id, "prob": None, "raw_prob": None, "logprob": None,
                         "rank": None, "entropy": None, "top alternatives": ""})
            continue
        alts = ", ".join(f"{visible(a.token_str)} ({a.raw_prob if a.raw_prob is not None else a.prob:.2f})"
                         for a in t.top_k[:alternatives])
        rows.append({
            "position": t.position, "source": "prompt" if t.token_type == TokenType.USER else "model",
            "text": visible(t.token_str), "id": t.token_id, "prob": _round(t.prob),
            "raw_prob": _round(t.raw_prob), "logprob": _round(t.logprob), "rank": t.rank,
            "entropy": _round(t.entropy), "top alternatives": alts,
        })
    return rows


def top_k_rows(token: Token) -> list[dict[str, Any]]:
    """The top-k alternatives of one token as table rows."""
    return [{"rank": a.rank, "text": visible(a.token_str), "id": a.token_id,
             "prob": _round(a.prob), "raw_prob": _round(a.raw_prob), "logprob": _round(a.logprob),
             "chosen": a.token_id == token.token_id} for a in token.top_k]


@dataclass(frozen=True)
class Heatmap:
    """A matrix ready to plot: rows are generated tokens, columns context tokens."""

    z: np.ndarray
    row_labels: tuple[str, ...]
    col_labels: tuple[str, ...]
    row_step: int = 1
    col_step: int = 1


def context_labels(prompt_labels: Sequence[str], generated: Sequence[Token], width: int) -> list[str]:
    """Labels for ``width`` context positions: prompt tokens then generated tokens."""
    names = [image_chip_text(s) or visible(s) for s in prompt_labels] + \
        [visible(t.token_str) for t in generated]
    return [f"{i}:{names[i]}" if i < len(names) else f"{i}:?" for i in range(width)]


def attention_row(token: Token, layer: int | None = None, head: int | None = None) -> np.ndarray:
    """One token's attention over its context: a layer/head, or the mean over all."""
    if (layer is not None or head is not None) and token.attention is not None:
        return np.asarray(token.attention.row(layer, head), dtype=np.float32)
    return np.asarray(token.attn_weights, dtype=np.float32)


def _block_reduce(z: np.ndarray, axis: int, step: int) -> np.ndarray:
    if step <= 1:
        return z
    n = z.shape[axis]
    pad = (-n) % step
    widths = [(0, 0), (0, 0)]
    widths[axis] = (0, pad)
    padded = np.pad(z, widths, constant_values=np.nan)
    shape = list(padded.shape)
    shape[axis: axis + 1] = [shape[axis] // step, step]
    # A block past the causal edge is all NaN; numpy warns about it and we want NaN there.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(padded.reshape(shape), axis=axis + 1)


def _reduce_labels(labels: Sequence[str], step: int) -> tuple[str, ...]:
    if step <= 1:
        return tuple(labels)
    return tuple(labels[i] if i + step >= len(labels) else f"{labels[i]} … {labels[min(i + step, len(labels)) - 1]}"
                 for i in range(0, len(labels), step))


def attention_heatmap(generated: Sequence[Token], prompt_labels: Sequence[str], *,
                      layer: int | None = None, head: int | None = None,
                      max_rows: int = 120, max_cols: int = 240) -> Heatmap:
    """Generated tokens (rows) over context tokens (columns), downsampled to fit the screen.

    Cells past a row's causal edge are NaN (drawn blank). Downsampling keeps the block maximum,
    so a sharp peak stays visible; only this small matrix goes to the browser.
    """
    rows = [attention_row(t, layer, head) for t in generated]
    width = max((len(r) for r in rows), default=0)
    z = np.full((len(rows), width), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        z[i, : len(r)] = r
    cols = context_labels(prompt_labels, generated, width)
    row_names = [f"{t.position}:{visible(t.token_str)}" for t in generated]
    row_step = max(1, math.ceil(len(rows) / max_rows))
    col_step = max(1, math.ceil(width / max_cols))
    z = _block_reduce(_block_reduce(z, 0, row_step), 1, col_step)
    return Heatmap(z, _reduce_labels(row_names, row_step), _reduce_labels(cols, col_step),
                   row_step, col_step)


#: How each prefill mode that is not float32 arithmetic is labelled.
_PREFILL_QUALIFIERS = {"fixed16": "~1e-3 off float32"}


def prefill_tag(summary: RunSummary | None) -> str:
    """A run's label when its prompt's forward was not float32 arithmetic (else empty)."""
    if summary is None or summary.prefill in ("", "float32"):
        return ""
    return f"prefill {summary.prefill} ({_PREFILL_QUALIFIERS.get(summary.prefill, 'not exact')})"


def reuse_tag(summary: RunSummary | None) -> str:
    """A run's label when some of its prompt's forward was copied from an earlier prefill
    (why its first token came sooner; else empty): all of it, or its first tokens."""
    if summary is None or not summary.prefill_reused:
        return ""
    part = summary.prefill_reused_tokens
    if 0 < part < summary.num_prompt_tokens:
        return f"prefill reused for {part:,} of {summary.num_prompt_tokens:,} tokens"
    return "prefill reused"


def divergence(runs: Sequence[Sequence[int]]) -> int | None:
    """The first index where the token-id sequences differ (None when all are identical)."""
    if len(runs) < 2:
        return None
    for i in range(max(len(r) for r in runs)):
        column = {r[i] if i < len(r) else None for r in runs}
        if len(column) > 1:
            return i
    return None


def total_logprob(tokens: Sequence[Token]) -> float:
    """Sum of the model's log-probabilities of the generated tokens."""
    return float(sum(t.logprob or 0.0 for t in tokens if t.token_type == TokenType.MODEL))


@dataclass(frozen=True)
class RunTiming:
    """How fast a run came back, as the page saw it: seconds from the request to the first
    generated token, and generated tokens per second after it (None with fewer than two)."""

    first_token_s: float
    tokens_per_s: float | None


def run_timing(started: float, stamps: Sequence[float]) -> RunTiming | None:
    """Timing from the request's start and the arrival time of each generated token."""
    if not stamps:
        return None
    span = stamps[-1] - stamps[0]
    rate = (len(stamps) - 1) / span if len(stamps) > 1 and span > 0 else None
    return RunTiming(first_token_s=stamps[0] - started, tokens_per_s=rate)


def timing_line(timing: RunTiming) -> str:
    """``first token 0.41 s · 131.2 tokens/s``."""
    line = f"first token {timing.first_token_s:.2f} s"
    return line + (f" · {timing.tokens_per_s:.1f} tokens/s" if timing.tokens_per_s else "")


@dataclass(frozen=True)
class RunResult:
    """One run as the workbench keeps it: what was asked and what came back.

    ``forced`` are generated tokens copied from a parent run up to a branch point (the last
    one is the alternative the user picked); ``tokens`` holds scored prompt tokens (USER)
    then every generated token, forced ones included.
    """

    run_id: str
    prompt: str
    settings: SampleSettings
    model: str
    tokens: tuple[Token, ...] = ()
    prompt_labels: tuple[str, ...] = ()
    summary: RunSummary | None = None
    status: str = "running"
    error: str | None = None
    parent_id: str | None = None
    branch_index: int | None = None
    forced_ids: tuple[int, ...] = ()
    created: float = 0.0
    image_name: str | None = None
    source: str = "local"
    image_sha: str | None = None      # sha256 of the image sent (bytes kept by store.put_image)
    image_after: bool = False         # the image came after the text (else before it)
    timing: RunTiming | None = None   # measured while streaming; not kept in the history store
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def generated(self) -> tuple[Token, ...]:
        """The model's tokens (forced ones included)."""
        return tuple(t for t in self.tokens if t.token_type != TokenType.USER)

    @property
    def prompt_tokens(self) -> tuple[Token, ...]:
        """Scored prompt tokens (empty unless score_prompt was on)."""
        return tuple(t for t in self.tokens if t.token_type == TokenType.USER)

    @property
    def text(self) -> str:
        """The generated text."""
        return "".join(t.token_str for t in self.generated)

    def with_tokens(self, tokens: Sequence[Token], **changes: Any) -> "RunResult":
        """A copy with new tokens (and other fields changed)."""
        return replace(self, tokens=tuple(tokens), **changes)


def branch_forced(parent: RunResult, index: int, alternative: Token) -> tuple[Token, ...]:
    """The generated tokens a branch starts with: the parent's up to ``index``, then ``alternative``."""
    base = parent.generated[:index]
    position = parent.generated[index].position if index < len(parent.generated) else None
    alt = replace(alternative, token_type=TokenType.MODEL, position=position, top_k=parent.generated[index].top_k,
                  attn_weights=parent.generated[index].attn_weights,
                  entropy=parent.generated[index].entropy)
    return (*base, alt)


def tree_rows(runs: dict[str, RunResult], root_id: str) -> list[tuple[str, int, str]]:
    """The branch tree under ``root_id``, depth first: (run_id, depth, label)."""
    children: dict[str | None, list[RunResult]] = {}
    for r in runs.values():
        children.setdefault(r.parent_id, []).append(r)
    out: list[tuple[str, int, str]] = []

    def walk(run: RunResult, depth: int) -> None:
        text = visible(run.text)
        text = text if len(text) <= 40 else text[:39] + "…"
        if run.parent_id is None:
            label = f"root · seed {run.settings.rng_seed} · {text}"
        else:
            alt = run.generated[run.branch_index] if run.branch_index is not None and \
                run.branch_index < len(run.generated) else None
            at = f"#{run.branch_index} → {visible(alt.token_str)!s}" if alt else "branch"
            label = f"{at} · {text}"
        out.append((run.run_id, depth, label))
        for child in sorted(children.get(run.run_id, []), key=lambda r: r.created):
            walk(child, depth + 1)

    if root_id in runs:
        walk(runs[root_id], 0)
    return out


def root_of(runs: dict[str, RunResult], run_id: str) -> str:
    """The root of the branch tree holding ``run_id``."""
    seen = set()
    while run_id in runs and runs[run_id].parent_id and runs[run_id].parent_id in runs and run_id not in seen:
        seen.add(run_id)
        run_id = runs[run_id].parent_id  # type: ignore[assignment]
    return run_id


# ----- images in the context ------------------------------------------------------------------


def image_chip_text(text: str) -> str | None:
    """A short chip text for an image token (``▦1 3,4``), None for any other token."""
    patch = parse_image_token(text)
    return None if patch is None else f"▦{patch.image} {patch.row},{patch.col}"


@dataclass(frozen=True)
class ImageGrid:
    """Where one image's patch tokens sit in the context.

    ``positions[r][c]`` is the context position of the patch in row ``r``, column ``c``
    (0-based here; the token texts count from 1), or None when no token names that cell.
    """

    image: int
    rows: int
    cols: int
    positions: tuple[tuple[int | None, ...], ...]

    @property
    def all_positions(self) -> tuple[int, ...]:
        """Every patch's context position, row-major."""
        return tuple(p for row in self.positions for p in row if p is not None)


def image_grids(tokens: Sequence[tuple[int, str]]) -> tuple[ImageGrid, ...]:
    """``(context position, token text)`` pairs -> one patch grid per image, by image number.

    Image tokens read ``<image N: patch r,c>`` (what the engine reports for a scored prompt,
    locally and over the wire); every other text is ignored. The grid's size is the largest
    row and column named.
    """
    cells: dict[int, dict[tuple[int, int], int]] = {}
    for position, text in tokens:
        patch = parse_image_token(text)
        if patch is not None and patch.row >= 1 and patch.col >= 1:
            cells.setdefault(patch.image, {})[(patch.row - 1, patch.col - 1)] = position
    grids = []
    for image in sorted(cells):
        found = cells[image]
        rows = 1 + max(r for r, _ in found)
        cols = 1 + max(c for _, c in found)
        grids.append(ImageGrid(image, rows, cols, tuple(
            tuple(found.get((r, c)) for c in range(cols)) for r in range(rows))))
    return tuple(grids)


def run_image_grids(run: "RunResult") -> tuple[ImageGrid, ...]:
    """The patch grids of a run's images, from its scored prompt tokens (or prompt labels)."""
    if run.prompt_tokens:
        return image_grids([(t.position if t.position is not None else i, t.token_str)
                            for i, t in enumerate(run.prompt_tokens)])
    return image_grids(list(enumerate(run.prompt_labels)))


def overlay_matrix(weights: Sequence[float] | np.ndarray, grid: ImageGrid) -> np.ndarray:
    """One attention row laid onto an image's patch grid: ``rows x cols``, NaN where unknown."""
    row = np.asarray(weights, dtype=np.float32)
    z = np.full((grid.rows, grid.cols), np.nan, dtype=np.float32)
    for r, cells in enumerate(grid.positions):
        for c, position in enumerate(cells):
            if position is not None and 0 <= position < len(row):
                z[r, c] = row[position]
    return z


def image_share(weights: Sequence[float] | np.ndarray, grids: Sequence[ImageGrid]) -> float:
    """The fraction of an attention row that falls on image tokens."""
    row = np.asarray(weights, dtype=np.float64)
    total = float(np.nansum(row))
    if total <= 0:
        return 0.0
    positions = [p for g in grids for p in g.all_positions if p < len(row)]
    return float(np.nansum(row[positions])) / total


def text_positions(width: int, grids: Sequence[ImageGrid]) -> list[int]:
    """Context positions below ``width`` that are not image patches (the text-attention view)."""
    taken = {p for g in grids for p in g.all_positions}
    return [i for i in range(width) if i not in taken]
