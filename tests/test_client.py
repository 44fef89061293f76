"""The in-process client: the SDK's signatures, defaults, seed sequence and augmentation."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from sampler_core import LocalClient, SyncClient, Token
from sampler_core.client import AsyncSampler, augment
from sampler_core.errors import InvalidSettings
from sampler_core.tokens import RunSummary


def collect(agen) -> list:
    async def go() -> list:
        return [x async for x in agen]

    return asyncio.run(go())


def test_sample_signature_matches_the_sdk() -> None:
    params = inspect.signature(AsyncSampler.sample).parameters
    expected = {"prompt": "", "inputs": (), "model_name": "", "max_len": 256,
                "temperature": 0.7, "nucleus_p": 0.95, "stop_tokens": None,
                "stop_strings": None, "rng_seed": None, "allowed_tokens": None,
                "disallowed_tokens": None, "augment_tokens": True, "return_attention": False}
    assert {k: params[k].default for k in expected} == expected
    assert list(params)[1:14] == list(expected)
    assert inspect.signature(AsyncSampler.tokenize).parameters["model_name"].default == ""


def test_seed_sequence_advances_by_one_per_call() -> None:
    sampler = LocalClient(initial_rng_seed=7).sampler
    seeds = [sampler.build_settings().rng_seed for _ in range(3)]
    assert seeds == [7, 8, 9]
    assert sampler.build_settings(rng_seed=100).rng_seed == 100
    assert sampler.next_rng_seed == 10  # an explicit seed does not advance the sequence
    assert 0 <= LocalClient().sampler.next_rng_seed <= 100000


def test_augment_adds_the_word_start_variant() -> None:
    assert augment(["a", 5, "\u2581b"]) == ["a", "\u2581a", 5, "\u2581b"]
    settings = LocalClient(initial_rng_seed=0).sampler.build_settings(stop_tokens=["x"])
    assert settings.stop_tokens == ("x", "\u2581x")
    plain = LocalClient(initial_rng_seed=0).sampler.build_settings(stop_tokens=["x"],
                                                                   augment_tokens=False)
    assert plain.stop_tokens == ("x",)


def test_local_sample_streams_tokens(engine) -> None:
    client = LocalClient(initial_rng_seed=1)
    tokens = collect(client.sampler.sample("The answer to life and the universe is", max_len=4,
                                           stop_at_eos=False))
    assert len(tokens) == 4 and all(isinstance(t, Token) for t in tokens)
    assert all(t.token_type == 2 and 0 < t.prob <= 1 and len(t.top_k) == 5 for t in tokens)
    events = collect(client.sampler.sample_events("Hi", max_len=2, stop_at_eos=False))
    assert isinstance(events[-1], RunSummary) and events[-1].num_generated_tokens == 2


def test_same_seed_same_tokens_through_the_client(engine) -> None:
    a = collect(LocalClient(initial_rng_seed=5).sampler.sample("Hello", max_len=6,
                                                               temperature=1.0))
    b = collect(LocalClient(initial_rng_seed=5).sampler.sample("Hello", max_len=6,
                                                               temperature=1.0))
    assert [t.token_id for t in a] == [t.token_id for t in b]


def test_validation_errors_surface_from_sample(engine) -> None:
    with pytest.raises(InvalidSettings, match=r"nucleus_p must be in \(0, 1\], got 1.5"):
        collect(LocalClient().sampler.sample("Hi", nucleus_p=1.5))


def test_sync_client(engine) -> None:
    client = SyncClient(initial_rng_seed=3)
    try:
        text = client.complete("1, 2, 3,", max_len=4, temperature=0.0, stop_at_eos=False)
        tokens = client.tokenize("1, 2, 3,")
        streamed = list(client.stream("1, 2, 3,", max_len=4, temperature=0.0,
                                      stop_at_eos=False))
    finally:
        client.close()
    assert text == "".join(t.token_str for t in streamed) and len(streamed) == 4
    assert [t.token_str for t in tokens][:2] == ["1", ","]
