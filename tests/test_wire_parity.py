"""Remote ``Client`` == in-process ``LocalClient``: same tokens for the same request and seed
over every setting, and the same exceptions (type and message) for the same bad request."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from sampler_core import (
    Client,
    ContextOverflow,
    InvalidInput,
    InvalidSettings,
    LocalClient,
    SamplerError,
    Token,
    UnknownModel,
)
from wire_fixtures import wire_server  # noqa: F401

PROMPT = "Alice was beginning to get very tired"

# One case per setting (and the interesting combinations), each with max_len 6.
CASES: list[dict[str, Any]] = [
    {},  # the SDK's defaults: temperature 0.7, nucleus_p 0.95
    {"temperature": 0.0},
    {"temperature": 1.3, "nucleus_p": 0.5},
    {"temperature": 0.1, "nucleus_p": 1.0},
    {"top_k": 0},
    {"top_k": 12},
    {"stop_tokens": ["."]},
    {"stop_tokens": [" of"], "augment_tokens": False},
    {"stop_strings": [" the", "er"]},
    {"allowed_tokens": [" the", " a", " cat", 13]},
    {"disallowed_tokens": [" the", ".", 11]},
    {"return_attention": True},
    {"full_attention": True},
    {"score_prompt": True},
    {"score_prompt": True, "max_len": 0},
    {"stop_at_eos": False},
    {"rng_seed": 2**63 + 5},
    {"stop_tokens": ["notasingletokenatall"]},  # ignored, with a note in the summary
]
INPUTS: list[Any] = [
    (PROMPT,),
    ([504, 3437, 314],),
    ("Once", [2524, 253], " there was"),
]


async def _run_both(host: str, inputs: Any, kwargs: dict[str, Any]) -> tuple[list, list]:
    kwargs = {"max_len": 6, "rng_seed": 1234, **kwargs}
    remote, local = Client(api_host=host), LocalClient()
    try:
        got = [e async for e in remote.sampler.sample_events(inputs=inputs, **kwargs)]
        want = [e async for e in local.sampler.sample_events(inputs=inputs, **kwargs)]
        return got, want
    finally:
        await remote.close()
        await local.close()


@pytest.mark.parametrize("kwargs", CASES, ids=[",".join(c) or "defaults" for c in CASES])
def test_remote_equals_local_for_every_setting(wire_server, kwargs: dict[str, Any]) -> None:
    got, want = asyncio.run(_run_both(wire_server.host, (PROMPT,), kwargs))
    assert got == want and len(got) >= 1
    for g, w in zip(got, want):  # full attention is not part of Token equality: compare it
        if isinstance(w, Token) and w.attention is not None:
            assert g.attention is not None
            np.testing.assert_array_equal(g.attention.weights, w.attention.weights)
        elif isinstance(w, Token):
            assert g.attention is None
    if kwargs.get("full_attention"):
        assert any(isinstance(e, Token) and e.attention is not None for e in got)


@pytest.mark.parametrize("inputs", INPUTS, ids=["text", "token_ids", "mixed"])
def test_remote_equals_local_for_every_input_kind(wire_server, inputs: Any) -> None:
    got, want = asyncio.run(_run_both(wire_server.host, inputs, {"score_prompt": True}))
    assert got == want


def test_tokenize_and_list_models_agree(wire_server) -> None:
    async def main() -> Any:
        remote, local = Client(api_host=wire_server.host), LocalClient()
        try:
            return (await remote.sampler.tokenize(PROMPT), await local.sampler.tokenize(PROMPT),
                    await remote.sampler.list_models(), await local.sampler.list_models())
        finally:
            await remote.close()
            await local.close()

    r_tokens, l_tokens, r_models, l_models = asyncio.run(main())
    assert r_tokens == l_tokens
    assert set(l_models) <= set(r_models)


BAD: list[tuple[str, dict[str, Any], type[SamplerError]]] = [
    ("unknown model", {"prompt": "hi", "model_name": "no-such-model"}, UnknownModel),
    ("token id outside vocabulary", {"inputs": [[1, 99_999_999]]}, InvalidInput),
    ("context overflow", {"prompt": "hi " * 50, "max_len": 8190}, ContextOverflow),
    ("allowed names no token", {"prompt": "hi", "allowed_tokens": ["zqxjzqxjzqxjkv"],
                                "augment_tokens": False}, InvalidSettings),
    ("image to a text model", {"inputs": ["describe", b"\x89PNG\r\n\x1a\nnotreally"]},
     InvalidInput),
    ("bad base64 image", {"inputs": ["data:image/png;base64,@@@"]}, InvalidInput),
    ("negative temperature", {"prompt": "hi", "temperature": -1.0}, InvalidSettings),
    ("nucleus_p above 1", {"prompt": "hi", "nucleus_p": 1.5}, InvalidSettings),
    ("both allowed and disallowed", {"prompt": "hi", "allowed_tokens": ["a"],
                                     "disallowed_tokens": ["b"]}, InvalidSettings),
    ("empty prompt", {"prompt": ""}, InvalidInput),
    ("absurd max_len", {"prompt": "hi", "max_len": 10**9}, InvalidSettings),
]


@pytest.mark.parametrize("kwargs,expected", [(b[1], b[2]) for b in BAD], ids=[b[0] for b in BAD])
def test_same_exception_locally_and_remotely(wire_server, kwargs: dict[str, Any],
                                             expected: type[SamplerError]) -> None:
    async def raised(client: Any) -> SamplerError:
        try:
            with pytest.raises(SamplerError) as info:
                async for _ in client.sampler.sample(**{"max_len": 4, **kwargs}):
                    pass
            return info.value
        finally:
            await client.close()

    remote = asyncio.run(raised(Client(api_host=wire_server.host)))
    local = asyncio.run(raised(LocalClient()))
    assert type(remote) is type(local) and isinstance(remote, expected)
    assert str(remote) == str(local)
    assert getattr(remote, "field", None) == getattr(local, "field", None)
