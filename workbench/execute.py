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


class LiveRun:
    """One run as it streams into a placeholder: set up, fed its events one at a time, then
    closed (status, history, the last drawing). ``stream_run`` drives one; ``stream_runs``
    several at once."""

    def __init__(self, bar: Sidebar, prompt: str, settings: SampleSettings, where: Any, *,
                 forced: Sequence[Token] = (), parent: RunResult | None = None,
                 branch_index: int | None = None, image: bytes | None = None,
                 image_name: str | None = None, image_after: bool = False,
                 on_update: Callable[[RunResult], None] | None = None) -> None:
        self.bar, self.where, self.image, self.forced = bar, where, image, tuple(forced)
        self.run = RunResult(
            run_id=uuid.uuid4().hex[:12], prompt=prompt, settings=settings, model=bar.model,
            created=time.time(), parent_id=parent.run_id if parent else None,
            branch_index=branch_index, forced_ids=tuple(t.token_id for t in forced),
            image_name=image_name if image is not None else None, source=bar.source,
            tokens=tuple(forced), image_after=image_after)
        self._update = on_update or (lambda r: None)
        self._tokens: list[Token] = list(forced)
        self._labels: tuple[str, ...] = ()
        self._scored: list[str] = []
        self._forced_from = 0
        self._started, self._stamps = time.perf_counter(), []  # for the run's speed line

    def open(self, labels: tuple[str, ...] | None = None) -> tuple[PromptPart, ...]:
        """Get ready to stream (the image kept, the prompt's labels: tokenised here unless
        given, as another run of the same prompt has them); the run's prompt parts."""
        run, prompt = self.run, self.run.prompt
        if self.image is not None:
            run = run.with_tokens(self._tokens, image_sha=store.put_image(self.image))
        parts = prompt_parts(prompt, run.forced_ids, self.image, run.image_after)
        if self.bar.source == "local":
            resources.engine(self.bar.model)
        if labels is None:
            labels = tuple(t.token_str for t in resources.runner().tokenize(
                self.bar.client, prompt, self.bar.model)) if prompt else ()
        self._labels = labels
        self.run = run.with_tokens(self._tokens, prompt_labels=self._labels)
        self._update(self.run)
        # Where the forced tokens start in the context: the parent's first generated position
        # (the text's token count misses image tokens).
        forced = self.forced
        self._forced_from = (forced[0].position if forced and forced[0].position is not None
                             else len(self._labels))
        self._started = time.perf_counter()
        return parts

    def take(self, event: Token | RunSummary) -> bool:
        """Apply one event; True once the run is over (its summary came)."""
        tokens = self._tokens
        if isinstance(event, RunSummary):
            self.run = self.run.with_tokens(tokens, summary=event, status="done")
            return True
        if event.token_type == TokenType.USER:
            # With forced tokens the engine scores them too; the parent's copies stay.
            if self.forced and event.position is not None and event.position >= self._forced_from:
                return False
            tokens.insert(sum(t.token_type == TokenType.USER for t in tokens), event)
            self._scored.append(event.token_str)
            if self.image is not None or len(self._scored) >= len(self._labels):
                # The scored prompt is the whole context as the model saw it.
                self.run = self.run.with_tokens(tokens, prompt_labels=tuple(self._scored))
        else:
            tokens.append(event)
            self._stamps.append(time.perf_counter())
        self.run = self.run.with_tokens(tokens, timing=run_timing(self._started, self._stamps))
        self._update(self.run)
        if _redraw_due(len(tokens)):
            chips.render(tokens, where=self.where)
        return False

    def fail(self, exc: BaseException) -> None:
        """Record what stopped the run: a sampler error by its message (and by the widget
        it names), anything else (a broken connection) by its type, never as a trace."""
        if isinstance(exc, SamplerError):
            self.run = self.run.with_tokens(self._tokens, status="error", error=str(exc))
            self.bar.show_field_error(exc)
        else:
            self.run = self.run.with_tokens(self._tokens, status="error",
                                            error=f"{type(exc).__name__}: {exc}")

    def close(self) -> RunResult:
        """Finish: a run without its summary was stopped (Stop, navigation); save it."""
        if self.run.status == "running":
            self.run = self.run.with_tokens(self._tokens, status="stopped")
        self._update(self.run)
        with contextlib.suppress(Exception):
            store.save(self.run)
        return self.run

    def draw(self) -> None:
        """Draw every token of the run."""
        chips.render(self.run.tokens, where=self.where)


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
    live = LiveRun(bar, prompt, settings, where, forced=forced, parent=parent,
                   branch_index=branch_index, image=image, image_name=image_name,
                   image_after=image_after, on_update=on_update)
    try:
        parts = live.open()
        with contextlib.closing(resources.runner().stream(bar.client, parts, settings,
                                                          bar.model)) as events:
            for event in events:
                if live.take(event):
                    break
    except Exception as exc:  # noqa: BLE001 - shown in the run, not as a trace
        live.fail(exc)
    finally:
        run = live.close()
    live.draw()
    return run


def stream_runs(bar: Sidebar, prompt: str, settings: Sequence[SampleSettings],
                wheres: Sequence[Any], *, image: bytes | None = None,
                image_name: str | None = None, image_after: bool = False,
                on_update: Callable[[list[RunResult]], None] | None = None
                ) -> list[RunResult]:
    """Run one prompt under several settings at once, each drawing into its own placeholder as
    its tokens arrive (the engine takes concurrent runs' steps together: step_batcher.py).
    A run that fails stops alone; ``on_update`` receives every run after each event."""
    lives: list[LiveRun] = []
    report = on_update or (lambda runs: None)
    for one, where in zip(settings, wheres):
        lives.append(LiveRun(bar, prompt, one, where, image=image, image_name=image_name,
                             image_after=image_after,
                             on_update=lambda _run: report([live.run for live in lives])))
    opened: dict[int, tuple[PromptPart, ...]] = {}
    labels: tuple[str, ...] | None = None  # one prompt: tokenised once
    try:
        for n, live in enumerate(lives):
            try:
                opened[n] = live.open(labels)
                labels = live.run.prompt_labels
            except Exception as exc:  # noqa: BLE001 - shown in the run, not as a trace
                live.fail(exc)
        order = sorted(opened)
        streams = [(opened[n], lives[n].run.settings) for n in order]
        with contextlib.closing(resources.runner().stream_many(bar.client, streams,
                                                               bar.model)) as events:
            for index, event in events:
                live = lives[order[index]]
                if isinstance(event, BaseException):
                    live.fail(event)
                else:
                    live.take(event)
    except Exception as exc:  # noqa: BLE001 - the connection broke: every open run shows it
        for n in opened:
            if lives[n].run.status == "running":
                lives[n].fail(exc)
    finally:
        runs = [live.close() for live in lives]
    for live in lives:
        live.draw()
    return runs
