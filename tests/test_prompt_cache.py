"""Kept prefills (prompt_cache.py): the budget, least-recently-used order, the longest shared
head and validation on small tensors; on the real model, a run that reuses a prefill (all of
it, or the head it shares with a kept prompt) gives exactly the run that prefills, and the
engine keeps and reuses only what it may."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from conftest import need
from sampler_core.engine.prompt_cache import (BUDGET_ENV, DEFAULT_BUDGET_MB, KeptPositions,
                                              KeptPrefill, PromptCache, budget_from_env,
                                              shared_length)
from sampler_core.inputs import TokenIdsPart
from sampler_core.settings import SampleSettings
from sampler_core.tokens import Token


def entry(floats: int, rows: bool = False) -> KeptPrefill:
    """An entry of ``floats`` positions of one float32 key and one value, 4 logits, maybe 2
    rows."""
    keys = torch.zeros(1, 1, floats, 1)
    return KeptPrefill((KeptPositions(0, keys, torch.zeros_like(keys)),), floats,
                       torch.zeros(1, 4), torch.zeros(2) if rows else None)


def positions(start: int, stop: int) -> KeptPositions:
    """Kept positions whose keys are their own numbers and values their negatives."""
    keys = torch.arange(start, stop, dtype=torch.float32).reshape(1, 1, -1, 1)
    return KeptPositions(start, keys, -keys)


# ----- the budget from the environment --------------------------------------------------------

def test_the_budget_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    assert budget_from_env() == DEFAULT_BUDGET_MB * 10**6
    monkeypatch.setenv(BUDGET_ENV, " 12 ")
    assert budget_from_env() == 12 * 10**6
    monkeypatch.setenv(BUDGET_ENV, "0")
    assert budget_from_env() == 0


@pytest.mark.parametrize("value", ["-1", "1.5", "lots"])
def test_a_bad_budget_is_refused_naming_the_variable_and_the_value(monkeypatch, value) -> None:
    monkeypatch.setenv(BUDGET_ENV, value)
    with pytest.raises(ValueError) as caught:
        budget_from_env()
    assert BUDGET_ENV in str(caught.value) and repr(value) in str(caught.value)
    assert ">= 0" in str(caught.value)


def test_the_cache_refuses_a_negative_budget_or_minimum() -> None:
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -1"):
        PromptCache(-1)
    with pytest.raises(ValueError, match="min_tokens must be >= 1, got 0"):
        PromptCache(100, min_tokens=0)
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -5"):
        PromptCache(100).resize(-5)


# ----- the cache itself -------------------------------------------------------------------------

def test_the_least_recently_used_entry_leaves_first() -> None:
    one = entry(10).nbytes  # 96 bytes
    cache = PromptCache(2 * one)
    cache.keep("a", entry(10))
    cache.keep("b", entry(10))
    assert cache.lookup("a", attention=False) is not None  # now "b" is the oldest
    cache.keep("c", entry(10))
    assert cache.lookup("b", attention=False) is None
    assert cache.lookup("a", attention=False) is not None
    assert cache.lookup("c", attention=False) is not None
    assert len(cache) == 2 and cache.nbytes == 2 * one
    assert (cache.hits, cache.misses) == (3, 1)


def test_an_entry_over_the_budget_is_not_kept_and_replacing_counts_once() -> None:
    cache = PromptCache(entry(10).nbytes)
    cache.keep("big", entry(11))
    assert len(cache) == 0 and cache.nbytes == 0
    cache.keep("a", entry(10))
    cache.keep("a", entry(10))
    assert len(cache) == 1 and cache.nbytes == entry(10).nbytes
    cache.keep("a", entry(11))  # the new one does not fit: the old one is gone too
    assert len(cache) == 0 and cache.nbytes == 0


def test_an_entry_without_attention_does_not_serve_a_run_that_asks_for_it() -> None:
    cache = PromptCache(10**6)
    cache.keep("plain", entry(10))
    cache.keep("with", entry(10, rows=True))
    assert cache.lookup("plain", attention=True) is None
    assert cache.lookup("plain", attention=False) is not None
    assert cache.lookup("with", attention=True) is not None


def test_resizing_drops_what_no_longer_fits_and_zero_turns_it_off() -> None:
    one = entry(10).nbytes
    cache = PromptCache(3 * one, min_tokens=5)
    for key in "abc":
        cache.keep(key, entry(10))
    cache.resize(one)
    assert len(cache) == 1 and cache.lookup("c", attention=False) is not None
    assert cache.admits(5) and not cache.admits(4)
    cache.resize(0)
    assert len(cache) == 0 and not cache.admits(10**6)
    cache.keep("d", entry(10))
    assert len(cache) == 0



def test_the_longest_shared_head_is_found_within_its_limit_and_way() -> None:
    assert shared_length((1, 2, 3), (1, 2, 4, 5)) == 2
    assert shared_length((1, 2), (1, 2, 3)) == 2 and shared_length((), (1,)) == 0
    cache = PromptCache(10**6, min_tokens=3)
    cache.keep((tuple(range(10)), "exact"), entry(10))
    cache.keep((tuple(range(6)) + (99, 98), "exact"), entry(10))
    cache.keep((tuple(range(20)), "other way"), entry(10))
    ids = tuple(range(8)) + (50, 51)
    found = cache.longest_shared(ids, "exact", limit=len(ids) - 2)
    assert found is not None and found[1] == 8 and cache.shared_hits == 1
    assert cache.longest_shared(ids, "exact", limit=5)[1] == 5  # at most the limit
    assert cache.longest_shared((0, 1, 7, 7, 7), "exact", limit=3) is None  # under min_tokens
    assert cache.longest_shared(ids, "a way nothing was kept", limit=8) is None
    assert cache.shared_hits == 2

def test_an_entry_that_reused_a_head_shares_it_and_the_budget_counts_it_once() -> None:
    """Editing the end of a kept prompt keeps only the new tail: the head's positions are the
    same tensors, counted once, and stay while any entry holds them."""
    base = KeptPrefill((positions(0, 10),), 10, torch.zeros(1, 4), None)
    edit = KeptPrefill((*base.head(8), positions(8, 12)), 12, torch.zeros(1, 4), None)
    assert edit.spans[0] is base.spans[0]
    head, tail, own = base.spans[0].nbytes, edit.spans[1].nbytes, base.own_nbytes
    assert (head, tail, own) == (80, 32, 16)
    cache = PromptCache(10**6)
    cache.keep("base", base)
    cache.keep("edit", edit)
    assert cache.nbytes == head + tail + 2 * own  # not 2 * head
    cache.resize(head + tail + own)  # room for one entry with its head: the older one leaves
    assert cache.lookup("base", attention=False) is None and len(cache) == 1
    assert cache.nbytes == head + tail + own  # the head stays: the edit holds it
    cache.keep("edit", edit)  # replacing counts it once still
    assert cache.nbytes == head + tail + own
    cache.resize(0)
    assert cache.nbytes == 0 and len(cache) == 0


def test_a_restore_takes_each_position_from_the_span_that_holds_it_for_the_entry() -> None:
    """A head span may hold more positions than the entry shares (the kept prompt went on
    differently): those come from the entry's own next span instead."""
    longer_head = positions(0, 10)
    tail = KeptPositions(6, torch.full((1, 1, 3, 1), 100.0), torch.full((1, 1, 3, 1), -100.0))
    entry = KeptPrefill((longer_head, tail), 9, torch.zeros(1, 4), None)
    keys, values = torch.full((1, 1, 12, 1), float("nan")), torch.full((1, 1, 12, 1), float("nan"))
    entry.restore(keys, values, 9)
    assert keys.flatten()[:9].tolist() == [0, 1, 2, 3, 4, 5, 100, 100, 100]
    assert values.flatten()[:9].tolist() == [0, -1, -2, -3, -4, -5, -100, -100, -100]
    assert keys.flatten()[9:].isnan().all()  # nothing past the prompt
    keys.fill_(float("nan"))
    entry.restore(keys, values, 4)  # only a head of it (a prompt that shares 4)
    assert keys.flatten()[:4].tolist() == [0, 1, 2, 3] and keys.flatten()[4:].isnan().all()
    assert entry.head(4) == (longer_head,) and entry.head(7) == (longer_head, tail)


def test_spans_that_do_not_cover_the_prompt_in_order_are_refused() -> None:
    with pytest.raises(ValueError, match=r"spans must cover positions 0 \.\. 11 in order, "
                                         r"got starts \[0, 8\] and ends \[6, 12\]"):
        KeptPrefill((positions(0, 6), positions(8, 12)), 12, torch.zeros(1, 4), None)
    with pytest.raises(ValueError, match="spans must cover positions 0 .. 4 in order"):
        KeptPrefill((positions(1, 5),), 5, torch.zeros(1, 4), None)
    with pytest.raises(ValueError, match="spans must cover positions 0 .. 4 in order"):
        KeptPrefill((), 5, torch.zeros(1, 4), None)


# ----- on the real model --------------------------------------------------------------------------

@contextmanager
def fresh_cache(engine) -> Iterator[PromptCache]:
    """A fresh cache on the engine (prompts of 40 tokens or more), the engine's own back after."""
    if engine.prompt_cache is None:
        pytest.fail("the default model runs on the lean runner, which keeps prefills")
    before = engine.prompt_cache
    engine.prompt_cache = PromptCache(10**9, min_tokens=40)
    try:
        yield engine.prompt_cache
    finally:
        engine.prompt_cache = before


@pytest.fixture
def kept(engine):
    """A fresh cache on the default engine (on a GPU where there is one)."""
    with fresh_cache(engine) as cache:
        yield cache


@pytest.fixture
def cpu_kept(cpu_engine):
    """A fresh cache on the CPU engine: a prompt's tail after a kept head is run on the packed
    CPU path only (``FastLlama.tails_match_whole_prefills``)."""
    with fresh_cache(cpu_engine) as cache:
        yield cache


def prompt(engine, n: int = 60, variant: int = 0) -> tuple[int, ...]:
    """``n`` token ids of ordinary text (``variant`` changes the last one)."""
    ids = engine.encode("The river ran past the old mill, and the miller's children watched "
                        "the boats go by each morning before school. " * 6)[:n]
    return tuple(ids[:-1]) + ((ids[-1] + variant) % engine.vocab_size,)


def run(engine, ids: tuple[int, ...], **settings) -> list[tuple]:
    """Every figure of every token of a run."""
    s = SampleSettings(max_len=8, temperature=1.0, nucleus_p=0.95, top_k=5, stop_at_eos=False,
                       **settings)
    return [(t.token_id, t.prob, t.raw_prob, t.logprob, t.entropy, t.rank, t.attn_weights,
             tuple((k.token_id, k.prob, k.logprob) for k in t.top_k))
            for t in engine.start([TokenIdsPart(ids)], s) if isinstance(t, Token)]


def test_a_reused_prefill_gives_exactly_the_run_that_prefills(engine, kept) -> None:
    ids = prompt(engine)
    kept.resize(0)
    fresh = {seed: run(engine, ids, rng_seed=seed) for seed in (1, 2)}
    kept.resize(10**9)
    first = run(engine, ids, rng_seed=1)  # prefills and keeps
    assert (kept.hits, kept.misses, len(kept)) == (0, 1, 1)
    # Another seed decodes other tokens into its own copy: the kept entry must not change.
    assert run(engine, ids, rng_seed=2) == fresh[2]
    assert run(engine, ids, rng_seed=1) == first == fresh[1]
    assert (kept.hits, kept.misses) == (2, 1)
    length = len(ids)
    layers, kv_heads, head_dim = (engine._fast.num_layers, engine._fast.num_kv,
                                  engine._fast.head_dim)
    assert kept.nbytes == 2 * layers * kv_heads * length * head_dim * 4 + engine.vocab_size * 4


def test_attention_is_kept_when_asked_for_and_reused_exactly(engine, kept) -> None:
    ids = prompt(engine)
    kept.resize(0)
    fresh = run(engine, ids, rng_seed=3, return_attention=True)
    kept.resize(10**9)
    run(engine, ids, rng_seed=3)  # kept without attention
    assert run(engine, ids, rng_seed=3, return_attention=True) == fresh  # a miss: prefills
    assert (kept.hits, kept.misses) == (0, 2)
    assert run(engine, ids, rng_seed=3, return_attention=True) == fresh  # now a hit
    assert run(engine, ids, rng_seed=3) == [t[:6] + ((),) + t[7:] for t in fresh]
    assert (kept.hits, kept.misses) == (2, 2)


def test_only_the_same_prompt_long_enough_and_unscored_is_reused(engine, kept) -> None:
    run(engine, prompt(engine))
    run(engine, prompt(engine, variant=1))  # one token differs: a miss (its tail prefills)
    assert (kept.hits, kept.misses, len(kept)) == (0, 2, 2)
    run(engine, prompt(engine)[:39])  # under min_tokens: never looked up
    run(engine, prompt(engine), score_prompt=True)  # every position's logits: prefills
    assert (kept.hits, kept.misses, len(kept)) == (0, 2, 2)


def test_a_reuse_fills_every_prompt_position_of_the_new_cache(engine, kept) -> None:
    ids = prompt(engine)
    length = len(ids)
    plan = engine.plan([TokenIdsPart(ids)], SampleSettings(max_len=4))
    reference = engine._new_cache(length + 4)
    logits, _ = engine._prefill(plan, reference, all_logits=False, attention=False)
    engine._prefill_or_reuse(plan, engine._new_cache(length + 4), all_logits=False,
                             attention=False)  # prefills and keeps
    restored = engine._new_cache(length + 4)
    restored.keys.fill_(float("nan"))  # whatever memory the new cache got must not show
    restored.values.fill_(float("nan"))
    again, rows, reused = engine._prefill_or_reuse(plan, restored, all_logits=False,
                                                   attention=False)
    assert reused and kept.hits == 1 and restored.length == length and rows is None
    assert torch.equal(restored.keys[:, :, :length], reference.keys[:, :, :length])
    assert torch.equal(restored.values[:, :, :length], reference.values[:, :, :length])
    assert torch.equal(again, logits)


def test_the_summary_says_whether_the_prefill_was_reused(engine, kept) -> None:
    ids = prompt(engine, variant=2)
    settings = SampleSettings(max_len=2, stop_at_eos=False)
    summaries = [list(engine.start([TokenIdsPart(ids)], settings))[-1] for _ in range(2)]
    assert [s.prefill_reused for s in summaries] == [False, True]
    assert summaries[1].prefill == summaries[0].prefill == engine._fast.prefill_mode


def test_runs_of_a_new_prompt_started_together_prefill_it_once(engine, kept, monkeypatch) -> None:
    import threading

    ids = prompt(engine, variant=3)
    kept.resize(0)
    alone = {seed: run(engine, ids, rng_seed=seed) for seed in (1, 2, 3)}
    kept.resize(10**9)
    prefills: list[int] = []
    prefill = engine._prefill

    def counted(*args, **kwargs):
        prefills.append(1)
        return prefill(*args, **kwargs)

    monkeypatch.setattr(engine, "_prefill", counted)
    start = threading.Barrier(3)
    together: dict[int, list[tuple]] = {}
    reused: dict[int, bool] = {}

    def go(seed: int) -> None:
        settings = SampleSettings(max_len=8, temperature=1.0, nucleus_p=0.95, top_k=5,
                                  stop_at_eos=False, rng_seed=seed)
        start.wait()
        events = list(engine.start([TokenIdsPart(ids)], settings))
        reused[seed] = events[-1].prefill_reused
        together[seed] = [(t.token_id, t.prob, t.raw_prob, t.logprob, t.entropy, t.rank,
                           t.attn_weights, tuple((k.token_id, k.prob, k.logprob) for k in t.top_k))
                          for t in events[:-1]]

    threads = [threading.Thread(target=go, args=(seed,)) for seed in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert together == alone
    assert len(prefills) == 1 and sorted(reused.values()) == [False, True, True]



def test_a_prompt_sharing_a_kept_head_prefills_only_its_tail_exactly(cpu_engine, cpu_kept,
                                                                    monkeypatch) -> None:
    """The positions a kept prompt shares are copied and only the rest runs, as a long prefill
    of the whole prompt would: every figure of every token, attention included, equals a cold
    run's, for a tail after an edit, a prompt one token longer and one token shorter. Where
    this CPU's oneDNN fails the row probe (``rows_agree``), a prompt in the default float32
    prefills whole instead, and still equals its cold run."""
    engine, kept = cpu_engine, cpu_kept
    tails = engine._fast.tails_match_whole_prefills(engine._fast.prefill_mode)
    head = prompt(engine)
    edited = head[:50] + tuple(engine.encode(" but the rain came down hard on the mill roof"))
    cases = {"edited": (edited, 50), "longer": (head + (head[5],), len(head) - 1),
             "shorter": (head[:-1], len(head) - 3)}
    kept.resize(0)
    cold = {name: run(engine, ids, rng_seed=4, return_attention=True)
            for name, (ids, _) in cases.items()}
    forwards: list[tuple[int, bool]] = []
    forward = engine._fast.forward

    def recorded(input_ids, cache, **kwargs):
        forwards.append((int(input_ids.shape[0]), kwargs.get("as_long_prefill", False)))
        return forward(input_ids, cache, **kwargs)

    monkeypatch.setattr(engine._fast, "forward", recorded)
    for name, (ids, shared) in cases.items():
        kept.resize(0)
        kept.resize(10**9)
        run(engine, head, rng_seed=4)  # keeps the head's prefill
        forwards.clear()
        hits = kept.shared_hits
        settings = SampleSettings(max_len=8, temperature=1.0, nucleus_p=0.95, top_k=5,
                                  stop_at_eos=False, rng_seed=4, return_attention=True)
        events = list(engine.start([TokenIdsPart(ids)], settings))
        figures = [(t.token_id, t.prob, t.raw_prob, t.logprob, t.entropy, t.rank, t.attn_weights,
                    tuple((k.token_id, k.prob, k.logprob) for k in t.top_k))
                   for t in events if isinstance(t, Token)]
        assert figures == cold[name], name
        summary = events[-1]
        if not tails:
            assert not summary.prefill_reused and kept.shared_hits == hits, name
            continue
        assert summary.prefill_reused and summary.prefill_reused_tokens == shared, name
        assert forwards[0] == (len(ids) - shared, True), name  # the tail, as a long prefill
        assert kept.shared_hits == hits + 1, name
        # Kept: the tail's positions only, the head's shared with the entry it came from.
        how = next(iter(kept._entries))[1]  # the way the engine prefilled both
        base, tail = (kept.lookup((key, how), attention=False) for key in (head, ids))
        assert tail.spans[0] is base.spans[0] and tail.spans[1].start == shared, name
        assert kept.nbytes == base.nbytes + tail.nbytes - base.spans[0].nbytes, name
        # Run again, it restores from both spans: still the cold run, now a whole reuse.
        forwards.clear()
        assert run(engine, ids, rng_seed=4, return_attention=True) == cold[name], name
        assert not forwards, name



@pytest.mark.parametrize("mode", ["fixed16", "fast"])
def test_a_named_prefill_reuses_a_shared_head_of_its_own_mode_exactly(cpu_engine, cpu_kept,
                                                                      mode) -> None:
    """In a mode asked for by name too, a tail after a kept head of the same mode equals that
    mode's cold run bit for bit; a head kept in another mode (the default, float32) is not
    used."""
    engine, kept = cpu_engine, cpu_kept
    from sampler_core.engine import packed

    kernel = packed.kernel()
    need(kernel is not None and kernel.prefill_supported() == 1
         and kernel.prefill_attention_bf16_supported() == 1,
         "this CPU lacks AVX-512 VNNI or BF16: no inexact prefill")
    head = prompt(engine)
    edited = head[:50] + tuple(engine.encode(" but the rain came down hard on the mill roof"))
    kept.resize(0)
    cold = run(engine, edited, rng_seed=6, prefill=mode, return_attention=True)
    kept.resize(10**9)
    run(engine, head, rng_seed=6)  # kept in the default mode: another way, not used
    assert run(engine, edited, rng_seed=6, prefill=mode, return_attention=True) == cold
    assert kept.shared_hits == 0
    kept.resize(0)
    kept.resize(10**9)
    run(engine, head, rng_seed=6, prefill=mode)  # kept in this mode
    settings = SampleSettings(max_len=8, temperature=1.0, nucleus_p=0.95, top_k=5,
                              stop_at_eos=False, rng_seed=6, prefill=mode, return_attention=True)
    events = list(engine.start([TokenIdsPart(edited)], settings))
    assert [(t.token_id, t.prob, t.raw_prob, t.logprob, t.entropy, t.rank, t.attn_weights,
             tuple((k.token_id, k.prob, k.logprob) for k in t.top_k))
            for t in events if isinstance(t, Token)] == cold
    tails = engine._fast.tails_match_whole_prefills(mode)
    assert events[-1].prefill == mode and events[-1].prefill_reused_tokens == (50 if tails else 0)
    assert kept.shared_hits == (1 if tails else 0)
