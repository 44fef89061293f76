"""Start a run from a page and stream it into a placeholder; every run lands in the history."""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any, Callable, Sequence

import streamlit as st

from sampler_core.errors import SamplerError
from sampler_core.inputs import ImagePart, PromptPart, TokenIdsPart, to_parts
from sampler_core.settings import SampleSettings
from sampler_core.tokens import RunSummary, Token, TokenType

from workbench import resources, store
from workbench.components import chips
from workbench.components.sidebar import Sidebar
from workbench.views import RunResult, run_timing


def _redraw_due(n: int) -> bool:
    # Redrawing every chip on every token is quadratic; past 64 tokens redraw less often.
    return n <= 64 or n % max(1, n // 32) == 0


def prompt_parts(prompt: str, forced_ids: Sequence[int] = (), image: bytes | None = None,
                 image_after: bool = False) -> tuple[PromptPart, ...]:
    """The run's prompt parts: the image before or after the text, then forced token ids."""
    parts: list[PromptPart] = []
    if prompt:
        parts.extend(to_parts(prompt))
    if image is not None:
        parts.insert(len(parts) if image_after else 0, ImagePart(image))
    if forced_ids:
        parts.append(TokenIdsPart(tuple(forced_ids)))
    return tuple(parts) if parts else to_parts(prompt)


def with_image_settings(settings: SampleSettings) -> SampleSettings:
    """Settings for a run with an image: the prompt is scored (the image tokens name their
    patches) and attention is returned (the overlay draws it)."""
    return settings.replace(score_prompt=True, return_attention=True)


def stream_run(bar: Sidebar, prompt: str, settings: SampleSettings, where: Any, *,
               forced: Sequence[Token] = (), parent: RunResult | None = None,
               branch_index: int | None = None, image: bytes | None = None,
               image_name: str | None = None, image_after: bool = False,
               on_update: Callable[[RunResult], None] | None = None) -> RunResult:
    """Run one generation, drawing chips into ``where`` as tokens arrive.

    With an image, the settings should score the prompt (``with_image_settings``): the
    scored prompt's image tokens (``<image 1: patch r,c>``) tell which context positions are
    which patches, locally and over the wire, and they become the run's prompt labels. The
    image's bytes are kept in the store under their sha256 so the run can be reopened.

    ``on_update`` receives the run after every token, so a rerun (Stop, page switch) that
    interrupts this script still leaves the partial run in the session; the run is then
    marked stopped and saved.
    """
    run = RunResult(run_id=uuid.uuid4().hex[:12], prompt=prompt, settings=settings,
                    model=bar.model, created=time.time(), parent_id=parent.run_id if parent else None,
                    branch_index=branch_index, forced_ids=tuple(t.token_id for t in forced),
                    image_name=image_name if image is not None else None, source=bar.source,
                    tokens=tuple(forced), image_after=image_after)
    update = on_update or (lambda r: None)
    tokens: list[Token] = list(forced)
    try:
        if image is not None:
            run = run.with_tokens(tokens, image_sha=store.put_image(image))
        parts = prompt_parts(prompt, run.forced_ids, image, image_after)
        if bar.source == "local":
            resources.engine(bar.model)
        labels = tuple(t.token_str for t in resources.runner().tokenize(bar.client, prompt, bar.model)) \
            if prompt else ()
        run = run.with_tokens(tokens, prompt_labels=labels)
        update(run)
        # Where the forced tokens start in the context: the parent's first generated position
        # (the text's token count misses image tokens).
        forced_from = forced[0].position if forced and forced[0].position is not None else len(labels)
        scored: list[str] = []
        started, stamps = time.perf_counter(), []  # for the run's speed line
        with contextlib.closing(resources.runner().stream(bar.client, parts, settings, bar.model)) as events:
            for event in events:
                if isinstance(event, RunSummary):
                    run = run.with_tokens(tokens, summary=event, status="done")
                    break
                if event.token_type == TokenType.USER:
                    # With forced tokens the engine scores them too; the parent's copies stay.
                    if forced and event.position is not None and event.position >= forced_from:
                        continue
                    tokens.insert(sum(t.token_type == TokenType.USER for t in tokens), event)
                    scored.append(event.token_str)
                    if image is not None or len(scored) >= len(labels):
                        # The scored prompt is the whole context as the model saw it.
                        run = run.with_tokens(tokens, prompt_labels=tuple(scored))
                else:
                    tokens.append(event)
                    stamps.append(time.perf_counter())
                run = run.with_tokens(tokens, timing=run_timing(started, stamps))
                update(run)
                if _redraw_due(len(tokens)):
                    chips.render(tokens, where=where)
        if run.status == "running":
            run = run.with_tokens(tokens, status="stopped")
    except SamplerError as exc:
        run = run.with_tokens(tokens, status="error", error=str(exc))
        bar.show_field_error(exc)
    except Exception as exc:  # noqa: BLE001 - a broken connection is shown, not a trace
        run = run.with_tokens(tokens, status="error", error=f"{type(exc).__name__}: {exc}")
    finally:
        if run.status == "running":  # interrupted by a rerun (Stop, navigation)
            run = run.with_tokens(tokens, status="stopped")
        update(run)
        with contextlib.suppress(Exception):
            store.save(run)
    chips.render(run.tokens, where=where)
    return run
