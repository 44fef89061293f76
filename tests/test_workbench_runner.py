"""The workbench's bridge to the async clients, on the real default model: several runs
streamed at once (Compare seeds), each event tagged with its run, a run's error its own."""

from __future__ import annotations

import pytest

from sampler_core import LocalClient, RunSummary, Token
from sampler_core.errors import InvalidSettings
from sampler_core.inputs import to_parts
from sampler_core.settings import SampleSettings
from workbench.runner import Runner


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner()


def settings(seed: int, **extra) -> SampleSettings:
    return SampleSettings(max_len=12, temperature=1.0, rng_seed=seed, top_k=2,
                          stop_at_eos=False, **extra)


def test_stream_many_tags_each_event_with_its_run_and_keeps_errors_apart(engine, runner) -> None:
    client = runner.build(LocalClient)
    parts = to_parts("The harbour at dawn")
    alone = {seed: list(runner.stream(client, parts, settings(seed), "")) for seed in (1, 2)}
    streams = [(parts, settings(1)), (parts, settings(3, allowed_tokens=("\u2603zz\u2603",))),
               (parts, settings(2))]
    got: dict[int, list] = {0: [], 1: [], 2: []}
    for index, event in runner.stream_many(client, streams, ""):
        got[index].append(event)
    assert got[0] == alone[1] and got[2] == alone[2]
    assert [type(e) for e in got[0]] == [Token] * 12 + [RunSummary]
    [error] = got[1]
    assert isinstance(error, InvalidSettings) and error.field == "allowed_tokens"


def test_closing_stream_many_early_returns_and_leaves_the_engine_serving(engine, runner) -> None:
    client = runner.build(LocalClient)
    parts = to_parts("The harbour at dawn")
    events = runner.stream_many(client, [(parts, settings(1)), (parts, settings(2))], "")
    first = [next(events) for _ in range(3)]
    events.close()
    assert all(isinstance(event, Token) for _, event in first)
    # The engine is free again: a new run goes through to its summary.
    after = list(runner.stream(client, parts, settings(4), ""))
    assert isinstance(after[-1], RunSummary) and len(after) == 13
