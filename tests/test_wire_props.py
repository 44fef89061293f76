"""Property: whatever settings and inputs a client throws at the server, every answer is a
result or a clean status (never INTERNAL/UNKNOWN, never a hang), and the server keeps serving."""

from __future__ import annotations

from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings, strategies as st

from sampler_core.wire._generated.prompt_ide import sampler_public_pb2 as pb
from wire_fixtures import sample_request, wire_server  # noqa: F401

CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.RESOURCE_EXHAUSTED}

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, 0.5, 0.95, 1.0, -1.0, 1.5, 100.0, 101.0]))
input_tokens = st.lists(st.one_of(
    st.builds(pb.InputToken, string_token=st.text(max_size=6)),
    st.builds(pb.InputToken, token_id=st.integers(0, 2**32 - 1)),
    st.just(pb.InputToken())), max_size=4)
wild_inputs = st.lists(st.one_of(
    st.builds(pb.PromptInput, text=st.text(max_size=30)),
    st.builds(pb.PromptInput, token_ids=st.builds(
        pb.TokenIds, tokens=st.lists(st.integers(0, 60_000), max_size=6))),
    st.builds(pb.PromptInput, image_bytes=st.binary(max_size=32)),
    st.builds(pb.PromptInput, image_base64=st.text(max_size=30)),
    st.just(pb.PromptInput())), max_size=3)

# Each field: a sane value, or (for the fields picked as wild) anything at all.
SANE: dict[str, Any] = {
    "max_len": st.integers(0, 4), "temperature": st.sampled_from([0.0, 0.7, 1.0]),
    "nucleus_p": st.sampled_from([0.5, 0.95, 1.0]), "top_k": st.integers(0, 8),
    "rng_seed": st.integers(0, 2**64 - 1),
    "stop_tokens": st.lists(st.sampled_from([".", " the", "zzqqj"]), max_size=2),
    "stop_strings": st.lists(st.sampled_from(["e", " a"]), max_size=1),
    "allowed_tokens": st.just([]), "disallowed_tokens": st.just([]),
    "full_attention": st.booleans(), "score_prompt": st.booleans(), "stop_at_eos": st.booleans(),
    "prefill": st.sampled_from(["", "float32", "fixed16", "fast"]),
    "inputs": st.lists(st.builds(pb.PromptInput, text=st.sampled_from(["Hi", "A cat"])),
                       min_size=1, max_size=2),
    "model_name": st.sampled_from(["", "smollm2"]), "prompt": st.just([]),
}
WILD: dict[str, Any] = {
    # Lengths that would run stay short; the rest probe the limits.
    "max_len": st.one_of(st.integers(-3, 5), st.sampled_from([-2**31, 9000, 32768, 32769,
                                                               2**31 - 1])),
    "temperature": floats, "nucleus_p": floats, "top_k": st.integers(-5, 120),
    "rng_seed": st.integers(0, 2**64 - 1),
    "stop_tokens": st.lists(st.text(max_size=4), max_size=3),
    "stop_strings": st.lists(st.text(max_size=4), max_size=3),
    "allowed_tokens": input_tokens, "disallowed_tokens": input_tokens,
    "full_attention": st.booleans(), "score_prompt": st.booleans(), "stop_at_eos": st.booleans(),
    "prefill": st.one_of(st.sampled_from(["", "fast", "FAST", "int8"]), st.text(max_size=4)),
    "inputs": wild_inputs,
    "model_name": st.sampled_from(["", "smollm2", "no-such-model", "/tmp", "../x.gguf"]),
    "prompt": st.lists(st.integers(0, 2**32 - 1), max_size=3),
}
REQUEST_FIELDS = ("inputs", "model_name", "prompt")


@st.composite
def requests(draw: Any) -> pb.SampleTokensRequest:
    wild = draw(st.sets(st.sampled_from(sorted(WILD)), max_size=3))
    values = {name: draw(WILD[name] if name in wild else SANE[name]) for name in SANE}
    settings_ = pb.SampleSettings(**{k: v for k, v in values.items() if k not in REQUEST_FIELDS})
    return pb.SampleTokensRequest(settings=settings_, return_attention=draw(st.booleans()),
                                  **{k: values[k] for k in REQUEST_FIELDS})


def _answer(stub: Any, request: pb.SampleTokensRequest) -> str:
    try:
        responses = list(stub.SampleTokens(request, timeout=120))
    except grpc.RpcError as exc:
        assert exc.code() in CLEAN, (exc.code(), exc.details(), request)
        assert exc.details()
        return exc.code().name
    assert responses and responses[-1].HasField("budget"), request
    return "OK"


def test_random_requests_get_a_result_or_a_clean_status(wire_server) -> None:
    channel, stub = wire_server.stub()
    seen: dict[str, int] = {}

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests())
    def check(request: pb.SampleTokensRequest) -> None:
        outcome = _answer(stub, request)
        seen[outcome] = seen.get(outcome, 0) + 1

    with channel:
        check()
        assert list(stub.SampleTokens(sample_request(max_len=1), timeout=60))[-1].HasField("budget")
    print(f"\noutcomes: {seen}")
    # The strategy reaches both the validation paths and real runs.
    assert "INVALID_ARGUMENT" in seen and "OK" in seen
