"""Decode steps on a GPU: the fixed-shape step that a CUDA graph captures, and the GPU engine.

The fixed-shape step (``graphed_decode.StaticDecode.step``: cache write by index, attention
over the whole capacity with the unreached positions masked) runs on any device, so its
arithmetic is checked here on the CPU against the runner's own loop. The tests marked ``gpu``
need a CUDA GPU (CI has none; they run on a device machine): the engine on the GPU gives
the float32 CPU reference's greedy tokens and probabilities, graphed and ungraphed steps
agree, seeds reproduce, and interleaved runs keep their own graphs.
"""

from __future__ import annotations

import pytest
import torch

from sampler_core.engine.fast_llama import FastLlama, KVCache
from sampler_core.engine.graphed_decode import StaticDecode
from sampler_core.inputs import TokenIdsPart
from sampler_core.settings import SampleSettings
from sampler_core.tokens import Token

PROMPTS = ("The three primary colours are", "def fibonacci(n):",
           "Once upon a time in a small village,", "The capital of France is", "Water boils at")

gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                         reason="needs a CUDA GPU (measured on a device machine; CI has none)")


@pytest.fixture(scope="module")
def reference(engine):
    """A float32 copy of the default model on the CPU, as transformers loads it."""
    from transformers import AutoModelForCausalLM

    from sampler_core.engine.models import finish_model

    return finish_model(AutoModelForCausalLM.from_pretrained(engine.model.name_or_path))


def tokens_of(engine, ids, **settings) -> list[Token]:
    run = engine.start([TokenIdsPart(tuple(ids))], SampleSettings(stop_at_eos=False, **settings))
    return [e for e in run if isinstance(e, Token)]


def test_fixed_shape_step_matches_the_loop(engine, reference) -> None:
    """On the CPU, with the float32 weights: the step a graph captures gives the loop's
    logits and attention rows (to float rounding: the softmax sums over more terms), writes the same cache entries, and weighs
    the positions not yet reached exactly 0."""
    runner = FastLlama(reference)  # fuses the copy's weights: views, the same values
    ids = torch.tensor(engine.encode(PROMPTS[2]))
    capacity = len(ids) + 12
    shape = (runner.num_layers, runner.num_kv, capacity, runner.head_dim)
    loop, fixed = runner.new_cache(capacity), KVCache(torch.zeros(shape), torch.zeros(shape))
    logits, _ = runner.forward(ids, loop)
    runner.forward(ids, fixed)
    static = StaticDecode(runner, fixed, attention=True)
    for _ in range(12):
        token = logits[-1:].argmax(-1)
        position = loop.length
        logits, rows = runner.forward(token, loop, attention=True)
        static.token.copy_(token)
        static.position.fill_(position)
        with torch.inference_mode():
            got = static.step()
        fixed.length += 1
        # Logits of magnitude ~10-20: 1e-4 is a relative 1e-5 (measured: 2e-5).
        assert torch.allclose(got, logits, atol=1e-4, rtol=0)
        assert int(got.argmax()) == int(logits.argmax())
        assert torch.allclose(static.rows[:, :, :position + 1], rows, atol=1e-5, rtol=0)
        assert not static.rows[:, :, position + 1:].any()
    end = loop.length
    assert torch.allclose(fixed.keys[:, :, :end], loop.keys[:, :, :end], atol=1e-4, rtol=0)
    assert torch.allclose(fixed.values[:, :, :end], loop.values[:, :, :end], atol=1e-4, rtol=0)


def test_half_turn_is_the_rotary_half_rotation_exactly(engine, reference) -> None:
    """The fixed +-1 matrix that the graphed step multiplies by gives rotate_half bit for bit."""
    runner = FastLlama(reference)
    ids = engine.encode(PROMPTS[0])
    cache = KVCache(*(torch.zeros(runner.num_layers, runner.num_kv, len(ids), runner.head_dim)
                      for _ in range(2)))
    static = StaticDecode(runner, cache, attention=False)
    x = torch.randn(12, runner.head_dim, generator=torch.Generator().manual_seed(1)) * 1e3
    half = runner.head_dim // 2
    assert torch.equal(x @ static._half_turn, torch.cat((-x[:, half:], x[:, :half]), dim=-1))


def test_a_runs_graph_does_not_keep_its_cache_alive(engine, reference) -> None:
    """The cache holds its captured steps; they must not hold the cache back (a reference
    cycle would keep a finished run's GPU memory until the garbage collector ran)."""
    import gc
    import weakref

    runner = FastLlama(reference)
    cache = KVCache(*(torch.zeros(runner.num_layers, runner.num_kv, 8, runner.head_dim)
                      for _ in range(2)))
    cache.graphs[True] = StaticDecode(runner, cache, attention=True)
    gone = weakref.ref(cache)
    gc.disable()
    try:
        del cache
        assert gone() is None
    finally:
        gc.enable()


def test_graphed_caches_round_up_and_go_back_for_the_next_run_of_their_size(
        engine, reference, monkeypatch) -> None:
    """With graphed decode a cache's room rounds up to GRAPHED_CAPACITY_STEP; once its run
    drops it, the next cache of that size is the same tensors and captured steps, zeroed and
    empty; at most SPARE_CACHES wait. (The pool's logic, on the CPU: no graph is captured.)"""
    from sampler_core.engine.fast_llama import GRAPHED_CAPACITY_STEP, SPARE_CACHES

    runner = FastLlama(reference)
    monkeypatch.setattr(runner, "cuda_graphs", True)
    cache = runner.new_cache(GRAPHED_CAPACITY_STEP + 44)
    assert cache.keys.shape[2] == cache.values.shape[2] == 2 * GRAPHED_CAPACITY_STEP
    keys, marker = cache.keys, object()
    cache.keys.fill_(float("nan"))
    cache.values.fill_(1.0)
    cache.length = 5
    cache.graphs[True] = marker
    assert runner.new_cache(GRAPHED_CAPACITY_STEP + 1).keys is not keys  # still in use
    del cache
    again = runner.new_cache(2 * GRAPHED_CAPACITY_STEP)
    assert again.keys is keys and again.graphs == {True: marker} and again.length == 0
    assert not again.keys.any() and not again.values.any()
    assert runner.new_cache(3 * GRAPHED_CAPACITY_STEP).keys.shape[2] == 3 * GRAPHED_CAPACITY_STEP
    runner._spare_caches.clear()
    caches = [runner.new_cache(GRAPHED_CAPACITY_STEP * n) for n in range(1, SPARE_CACHES + 3)]
    while caches:  # dropped smallest first
        caches.pop(0)
    assert [spare[0] for spare in runner._spare_caches] == [
        GRAPHED_CAPACITY_STEP * n for n in range(3, SPARE_CACHES + 3)]


def test_cuda_graphs_switch_is_validated(monkeypatch) -> None:
    from sampler_core.engine.devices import CUDA_GRAPHS_ENV, cuda_graphs_enabled
    from sampler_core.errors import InvalidSettings

    monkeypatch.setenv(CUDA_GRAPHS_ENV, "0")
    assert cuda_graphs_enabled() is False
    monkeypatch.setenv(CUDA_GRAPHS_ENV, " On ")
    assert cuda_graphs_enabled() is True
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "maybe")
    with pytest.raises(InvalidSettings, match=rf"{CUDA_GRAPHS_ENV} must be 1 or 0, got 'maybe'"):
        cuda_graphs_enabled()


@pytest.fixture(scope="module")
def on_gpu(engine):
    from sampler_core.engine import get_engine

    return get_engine("", device="cuda")


@gpu
def test_gpu_engine_gives_the_float32_reference_answers(on_gpu, reference) -> None:
    """Greedy 128 tokens on the GPU (graphed decode) equal the float32 CPU forward's argmax,
    probabilities within 1e-3, on 5 prompts."""
    assert on_gpu._fast is not None and on_gpu._fast.cuda_graphs
    for text in PROMPTS:
        ids = on_gpu.encode(text)
        tokens = tokens_of(on_gpu, ids, max_len=128, temperature=0.0)
        got = [t.token_id for t in tokens]
        with torch.inference_mode():
            logits = reference(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1]
        assert got == logits.argmax(-1).tolist(), text
        probs = torch.softmax(logits, dim=-1)
        expected = probs[torch.arange(len(got)), torch.tensor(got)]
        assert max(abs(t.raw_prob - float(e)) for t, e in zip(tokens, expected)) < 1e-3


@gpu
def test_the_next_run_of_a_size_replays_the_last_ones_graph_and_gives_the_same(
        on_gpu, monkeypatch) -> None:
    """A finished run's cache and captured step serve the next run whose capacity rounds
    alike: no second capture, and the same seed gives every figure the same."""
    captures: list[StaticDecode] = []
    capture = StaticDecode._capture
    monkeypatch.setattr(StaticDecode, "_capture",
                        lambda static: (captures.append(static), capture(static))[1])
    on_gpu._fast._spare_caches.clear()
    ids = on_gpu.encode(PROMPTS[3])
    settings = dict(max_len=16, temperature=1.0, nucleus_p=0.95, top_k=3, rng_seed=7,
                    return_attention=True)

    def figures() -> list[tuple]:
        return [(t.token_id, t.prob, t.raw_prob, t.entropy, t.attn_weights,
                 tuple((k.token_id, k.prob) for k in t.top_k))
                for t in tokens_of(on_gpu, ids, **settings)]

    first = figures()
    assert len(captures) == 1 and len(on_gpu._fast._spare_caches) == 1
    assert figures() == first
    assert len(captures) == 1


@gpu
def test_gpu_engine_refuses_the_cpu_only_prefills_by_name(on_gpu) -> None:
    from sampler_core.errors import InvalidSettings
    from sampler_core.inputs import TextPart

    with pytest.raises(InvalidSettings, match=r"prefill 'fast' needs packed weights on a CPU "
                                              r".* does not have on a GPU; use float32"):
        on_gpu.start([TextPart("hi")], SampleSettings(prefill="fast"))


@gpu
def test_graphed_and_launched_steps_agree_on_the_gpu(on_gpu, monkeypatch) -> None:
    """The same run with kernels launched one by one and replayed from a graph: the same
    tokens, probabilities and attention rows (to float rounding)."""
    ids = on_gpu.encode(PROMPTS[0])
    settings = dict(max_len=24, temperature=0.0, top_k=5, return_attention=True,
                    full_attention=True)
    graphed = tokens_of(on_gpu, ids, **settings)
    monkeypatch.setattr(on_gpu._fast, "cuda_graphs", False)
    launched = tokens_of(on_gpu, ids, **settings)
    assert [t.token_id for t in graphed] == [t.token_id for t in launched]
    assert max(abs(a.raw_prob - b.raw_prob) for a, b in zip(graphed, launched)) < 1e-5
    assert max(float(abs(a.attention.weights - b.attention.weights).max())
               for a, b in zip(graphed, launched)) < 1e-5


@gpu
def test_gpu_sampling_is_deterministic_per_seed_and_runs_interleave(on_gpu) -> None:
    """A seed gives the same tokens twice; two runs stepped alternately (each with its own
    cache and graph) give what each gives alone."""
    settings = dict(max_len=20, temperature=1.0, nucleus_p=0.95, top_k=3, return_attention=True)
    first, second = on_gpu.encode(PROMPTS[2]), on_gpu.encode(PROMPTS[4])
    alone_a = tokens_of(on_gpu, first, rng_seed=3, **settings)
    assert tokens_of(on_gpu, first, rng_seed=3, **settings) == alone_a
    alone_b = tokens_of(on_gpu, second, rng_seed=4, **settings)
    runs = [iter(on_gpu.start([TokenIdsPart(tuple(ids))],
                              SampleSettings(stop_at_eos=False, rng_seed=seed, **settings)))
            for ids, seed in ((first, 3), (second, 4))]
    both: list[list[Token]] = [[], []]
    finished = [False, False]
    while not all(finished):
        for n, run in enumerate(runs):
            if not finished[n]:
                event = next(run, None)
                if event is None:
                    finished[n] = True
                elif isinstance(event, Token):
                    both[n].append(event)
    assert both == [alone_a, alone_b]
