"""Decode steps of concurrent runs taken together (step_batcher.py, ``decode_batch`` in
packed_kernel.c): the batcher's meeting rules on a recording stand-in for the model, then on
the real model, batched steps bit for bit equal to steps alone, and concurrent runs equal to
the same runs alone."""

from __future__ import annotations

import threading
from contextlib import nullcontext

import pytest
import torch

from sampler_core.engine.step_batcher import StepBatcher
from sampler_core.inputs import TokenIdsPart
from sampler_core.settings import SampleSettings
from sampler_core.tokens import Token

#: Long enough for any thread here to finish; reaching it means a deadlock, not slowness.
JOIN_S = 120


def run_threads(*targets) -> None:
    """Run each target on its own thread; fail if one is still running after JOIN_S."""
    threads = [threading.Thread(target=t) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_S)
    assert not any(thread.is_alive() for thread in threads), "a thread never finished"


# ----- the meeting rules, on a stand-in -------------------------------------------------------

class Recorder:
    """A stand-in for the model: each item's result is item * 10; records batch sizes."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.sizes: list[int] = []
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.sizes.append(len(items))
        if self.fail_on in items:
            raise ValueError(f"item {self.fail_on} is refused")
        return [item * 10 for item in items]


def test_steps_of_runs_decoding_together_meet_in_batches() -> None:
    recorder = Recorder()
    batcher = StepBatcher(recorder, max_batch=4, lock=nullcontext(), wait_per_run_s=0.05)
    results: dict[int, list[int]] = {}
    both = threading.Barrier(2)

    def run(first: int) -> None:
        with batcher.decoding() as seat:
            both.wait()
            results[first] = [batcher.step(first + n, seat) for n in range(20)]

    run_threads(lambda: run(0), lambda: run(1000))
    assert results == {0: [n * 10 for n in range(20)],
                       1000: [(1000 + n) * 10 for n in range(20)]}
    assert sum(recorder.sizes) == batcher.steps == 40
    assert max(recorder.sizes) == 2 and batcher.batches == len(recorder.sizes) < 40


def test_a_batch_holds_at_most_max_batch_steps_oldest_first() -> None:
    recorder = Recorder()
    batcher = StepBatcher(recorder, max_batch=2, lock=nullcontext(), wait_per_run_s=0.05)
    start = threading.Barrier(5)
    out: list[int] = []

    def run(item: int) -> None:
        with batcher.decoding() as seat:
            start.wait()
            out.append(batcher.step(item, seat))

    run_threads(*[lambda i=i: run(i) for i in range(5)])
    assert sorted(out) == [0, 10, 20, 30, 40]
    assert max(recorder.sizes) <= 2 and sum(recorder.sizes) == 5


def test_a_run_away_longer_than_away_s_is_not_waited_for() -> None:
    """Waiting for the away run would take an hour: the step must return at once."""
    recorder = Recorder()
    batcher = StepBatcher(recorder, max_batch=4, lock=nullcontext(), wait_per_run_s=3600,
                          away_s=0.5)
    assert [batcher.step(n) for n in range(3)] == [0, 10, 20]  # no seat: nobody waited for
    got: list[int] = []
    with batcher.decoding() as mine, batcher.decoding() as away:
        away.back_at -= 1  # its last step came back a second ago: its consumer is slow
        run_threads(lambda: got.append(batcher.step(7, mine)))
    assert got == [70] and recorder.sizes == [1] * 4


def test_a_run_just_back_is_waited_for() -> None:
    recorder = Recorder()
    batcher = StepBatcher(recorder, max_batch=4, lock=nullcontext(), wait_per_run_s=60,
                          away_s=3600)
    got: dict[int, int] = {}
    with batcher.decoding() as first, batcher.decoding() as second:
        def late() -> None:  # hands its step in only once the first one waits for it
            while not batcher._leading:
                pass
            got[2] = batcher.step(2, second)

        run_threads(lambda: got.update({1: batcher.step(1, first)}), late)
    assert got == {1: 10, 2: 20} and recorder.sizes == [2]


def test_a_step_that_fails_its_batch_fails_its_own_run_alone() -> None:
    recorder = Recorder(fail_on=3)
    batcher = StepBatcher(recorder, max_batch=4, lock=nullcontext(), wait_per_run_s=0.2)
    outcomes: dict[int, object] = {}
    both = threading.Barrier(2)

    def run(item: int) -> None:
        with batcher.decoding() as seat:
            both.wait()
            try:
                outcomes[item] = batcher.step(item, seat)
            except ValueError as exc:
                outcomes[item] = str(exc)

    run_threads(lambda: run(3), lambda: run(4))
    assert recorder.sizes == [2, 1, 1]  # together, then again a step at a time
    assert outcomes == {3: "item 3 is refused", 4: 40}
    assert batcher.step(5) == 50


def test_the_batcher_checks_its_arguments_and_its_model() -> None:
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        StepBatcher(Recorder(), max_batch=0, lock=nullcontext())
    with pytest.raises(ValueError, match="wait_per_run_s must be >= 0, got -1"):
        StepBatcher(Recorder(), max_batch=1, lock=nullcontext(), wait_per_run_s=-1)
    with pytest.raises(ValueError, match="away_s must be >= 0, got -2"):
        StepBatcher(Recorder(), max_batch=1, lock=nullcontext(), away_s=-2)
    short = StepBatcher(lambda items: [], max_batch=1, lock=nullcontext())
    with pytest.raises(RuntimeError, match="run_batch returned 0 results for 1 steps"):
        short.step(1)


# ----- on the real model ------------------------------------------------------------------------

@pytest.fixture
def engine(cpu_engine):
    """The CPU engine: decode steps meet on the packed CPU path only."""
    return cpu_engine


@pytest.fixture
def runner(engine):
    """The lean runner on packed weights, with the kernel's batched step."""
    fast = engine._fast
    if fast is None or fast.packed is None:
        pytest.fail("the default model decodes from packed weights with the C kernel")
    return fast


def prefilled(engine, runner, n: int, length: int):
    """A cache holding the first ``length`` ids of a text, and the id that follows."""
    ids = engine.encode("Harbour notes: the tide turned at noon, the ferry waited, and the "
                        "gulls circled the pier while the nets were mended. " * 20)
    cache = runner.new_cache(length + 8)
    runner.forward(torch.tensor(ids[:length]), cache)
    return cache, ids[length + n % 3]


def test_a_batched_step_equals_each_step_alone(engine, runner) -> None:
    """Up to the kernel's limit, at different positions, with and without attention rows:
    logits, rows and the caches' new keys and values bit for bit those of lone steps."""
    lengths, attention = [5, 40, 129, 300][:runner.max_batch], [False, True, True, False]
    assert runner.max_batch == 4
    batched = [prefilled(engine, runner, n, length) for n, length in enumerate(lengths)]
    alone = [prefilled(engine, runner, n, length) for n, length in enumerate(lengths)]
    together = runner.decode_many([(token, cache, attention[n])
                                   for n, (cache, token) in enumerate(batched)])
    for n, ((cache, token), (logits, rows)) in enumerate(zip(alone, together)):
        ref_logits, ref_rows = runner.decode(token, cache, attention=attention[n])
        assert torch.equal(logits, ref_logits)
        assert (rows is None) == (ref_rows is None)
        assert rows is None or torch.equal(rows, ref_rows)
        other = batched[n][0]
        assert other.length == cache.length == lengths[n] + 1
        assert torch.equal(other.keys[:, :, :other.length], cache.keys[:, :, :cache.length])
        assert torch.equal(other.values[:, :, :other.length], cache.values[:, :, :cache.length])


def test_decode_many_refuses_what_it_cannot_take(engine, runner) -> None:
    cache, token = prefilled(engine, runner, 0, 5)
    with pytest.raises(ValueError, match="decode_many takes 1 to 4 steps, got 0"):
        runner.decode_many([])
    with pytest.raises(ValueError, match="decode_many takes 1 to 4 steps, got 5"):
        runner.decode_many([(token, cache, False)] * 5)
    other, _ = prefilled(engine, runner, 1, 5)
    with pytest.raises(ValueError, match=r"token id 49152 is outside the vocabulary \(0..49151\)"):
        runner.decode_many([(token, cache, False), (49152, other, False)])
    assert cache.length == 5  # nothing ran


def test_concurrent_runs_meet_and_each_equals_itself_alone(engine) -> None:
    ids = tuple(engine.encode("A short log of the lighthouse: calm sea, two ships at dawn."))
    cases = [(1, False), (2, True), (3, False)]

    def run(seed: int, attention: bool) -> list[tuple]:
        settings = SampleSettings(max_len=24, temperature=1.0, rng_seed=seed, top_k=3,
                                  return_attention=attention, stop_at_eos=False)
        return [(t.token_id, t.prob, t.logprob, t.entropy, t.attn_weights,
                 tuple((k.token_id, k.prob) for k in t.top_k))
                for t in engine.start([TokenIdsPart(ids)], settings) if isinstance(t, Token)]

    alone = {case: run(*case) for case in cases}
    batcher = engine._batcher
    batches, steps = batcher.batches, batcher.steps
    together: dict[tuple[int, bool], list[tuple]] = {}
    run_threads(*[lambda c=c: together.update({c: run(*c)}) for c in cases])
    assert together == alone
    assert batcher.steps - steps == 3 * 23  # every decode step went through the batcher
    assert batcher.batches - batches < 3 * 23  # and some met



def test_a_long_prompt_prefills_in_pieces_while_another_run_decodes(engine, monkeypatch) -> None:
    """While a run decodes, a long prompt's prefill takes the step lock a piece at a time: the
    decoding run's steps go on between the pieces, and the prompt's run equals itself alone
    (where it prefills in one pass)."""
    from sampler_core.engine import causal_lm

    monkeypatch.setattr(causal_lm, "PREFILL_PIECE", 100)
    text = "The harbour master kept a careful record of every ship, its cargo and its crew. "
    long_ids = tuple(engine.encode(text * 30)[:330])
    short_ids = tuple(engine.encode("Tide tables for the week:"))
    settings = SampleSettings(max_len=6, temperature=1.0, rng_seed=5, top_k=3,
                              return_attention=True, stop_at_eos=False)

    def figures() -> list[tuple]:
        return [(t.token_id, t.prob, t.logprob, t.entropy, t.attn_weights,
                 tuple((k.token_id, k.prob) for k in t.top_k))
                for t in engine.start([TokenIdsPart(long_ids)], settings) if isinstance(t, Token)]

    events: list[str] = []  # in order: "prefill <positions>" and "step"
    forward, decode_many = engine._fast.forward, engine._batcher._run_batch

    def recorded_forward(input_ids, cache, **kwargs):
        events.append(f"prefill {int(input_ids.shape[0])}")
        return forward(input_ids, cache, **kwargs)

    def recorded_steps(steps):
        events.append("step")
        return decode_many(steps)

    started = threading.Event()

    def decode_meanwhile() -> None:
        s = SampleSettings(max_len=400, temperature=1.0, rng_seed=1, stop_at_eos=False)
        for event in engine.start([TokenIdsPart(short_ids)], s):
            if isinstance(event, Token):
                started.set()

    monkeypatch.setattr(engine._fast, "forward", recorded_forward)
    monkeypatch.setattr(engine._batcher, "_run_batch", recorded_steps)
    budget = engine.prompt_cache.max_bytes
    engine.prompt_cache.resize(0)  # the long run must compute its prompt both times
    try:
        alone = figures()
        assert events[0] == "prefill 330"  # nobody decoding: one pass
        events.clear()
        decoder = threading.Thread(target=decode_meanwhile)
        decoder.start()
        assert started.wait(JOIN_S)
        together = figures()
        decoder.join(JOIN_S)
    finally:
        engine.prompt_cache.resize(budget)
    assert together == alone
    at = [i for i, e in enumerate(events) if e in ("prefill 100", "prefill 30")]
    assert [events[i] for i in at] == ["prefill 100"] * 3 + ["prefill 30"]
    assert all("step" in events[a + 1:b] for a, b in zip(at, at[1:]))
