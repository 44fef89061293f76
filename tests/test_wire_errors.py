"""Malformed requests from a foreign client get a clean status naming the field, value and
allowed range, and the server keeps serving."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from sampler_core.wire._generated.prompt_ide import sampler_public_pb2 as pb
from wire_fixtures import sample_request, wire_server  # noqa: F401

S = pb.SampleSettings
TEXT = [pb.PromptInput(text="Hello")]
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def _req(settings: dict[str, Any] | None = None, inputs: Any = TEXT, **fields: Any
         ) -> pb.SampleTokensRequest:
    base: dict[str, Any] = dict(max_len=3, temperature=0.7, nucleus_p=0.95)
    base.update(settings or {})
    return pb.SampleTokensRequest(settings=S(**base), inputs=inputs, **fields)


# (id, request, status, substrings the message must hold, error class sent)
CASES: list[tuple[str, pb.SampleTokensRequest, grpc.StatusCode, tuple[str, ...], str]] = [
    ("negative max_len", _req({"max_len": -1}), INVALID, ("max_len", "32768", "-1"),
     "InvalidSettings"),
    ("absurd max_len", _req({"max_len": 2**31 - 1}), INVALID, ("max_len", "2147483647"),
     "InvalidSettings"),
    ("max_len past the context", _req({"max_len": 9000}), INVALID,
     ("max_len 9000", "context window of 8192"), "ContextOverflow"),
    ("negative temperature", _req({"temperature": -0.5}), INVALID, ("temperature", "-0.5"),
     "InvalidSettings"),
    ("nan temperature", _req({"temperature": float("nan")}), INVALID, ("temperature", "nan"),
     "InvalidSettings"),
    ("nucleus_p zero", _req({"nucleus_p": 0.0}), INVALID, ("nucleus_p", "(0, 1]", "0.0"),
     "InvalidSettings"),
    ("nucleus_p above one", _req({"nucleus_p": 1.5}), INVALID, ("nucleus_p", "(0, 1]", "1.5"),
     "InvalidSettings"),
    ("top_k too big", _req({"top_k": 1000}), INVALID, ("top_k", "100", "1000"), "InvalidSettings"),
    ("unknown model", _req(model_name="no-such-model"), NOT_FOUND, ("no-such-model",),
     "UnknownModel"),
    ("a local path as model", _req(model_name="/tmp"), NOT_FOUND, ("/tmp",), "UnknownModel"),
    ("allowed and disallowed", _req({"allowed_tokens": [pb.InputToken(string_token="a")],
                                     "disallowed_tokens": [pb.InputToken(token_id=5)]}),
     INVALID, ("allowed_tokens and disallowed_tokens",), "InvalidSettings"),
    ("empty input token", _req({"stop_tokens": [""]}), INVALID, ("stop_tokens",),
     "InvalidSettings"),
    ("token id outside the vocabulary",
     _req(inputs=[pb.PromptInput(token_ids=pb.TokenIds(tokens=[1, 4_000_000_000]))]),
     INVALID, ("inputs[0]", "4000000000", "0..49151"), "InvalidInput"),
    ("empty prompt", _req(inputs=[pb.PromptInput(text="")]), INVALID, ("inputs", "empty"),
     "InvalidInput"),
    ("no inputs at all", _req(inputs=[]), INVALID, ("inputs",), "InvalidInput"),
    ("input without payload", _req(inputs=[pb.PromptInput()]), INVALID,
     ("inputs[0]", "no payload"), "InvalidInput"),
    ("prompt beyond the context",
     _req(inputs=[pb.PromptInput(token_ids=pb.TokenIds(tokens=[42] * 8200))]), INVALID,
     ("8200 tokens", "context window"), "ContextOverflow"),
    ("empty image bytes", _req(inputs=[pb.PromptInput(image_bytes=b"")]), INVALID,
     ("inputs[0]", "empty"), "InvalidImage"),
    ("invalid image bytes", _req(inputs=[pb.PromptInput(text="Look"),
                                         pb.PromptInput(image_bytes=b"not an image")]),
     INVALID, ("inputs[1]",), "InvalidInput"),
    ("invalid base64", _req(inputs=[pb.PromptInput(image_base64="data:image/png;base64,%%%")]),
     INVALID, ("inputs[0]", "base64"), "InvalidImage"),
    ("image too large", _req(inputs=[pb.PromptInput(image_bytes=b"\0" * (11 * 1024 * 1024))]),
     INVALID, ("inputs[0]", "11534336 bytes", "10485760"), "InvalidImage"),
    ("oversize message", _req(inputs=[pb.PromptInput(text="x" * 900_000)] * 20), INVALID,
     ("request is", "16 MiB"), "InvalidInput"),
]


def _check_serving(stub: Any) -> None:
    assert list(stub.SampleTokens(sample_request(max_len=1), timeout=60))[-1].HasField("budget")


@pytest.mark.parametrize("request_,code,needles,cls", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_request_gets_a_clean_status(wire_server, request_: pb.SampleTokensRequest,
                                         code: grpc.StatusCode, needles: tuple[str, ...],
                                         cls: str) -> None:
    channel, stub = wire_server.stub()
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.SampleTokens(request_, timeout=60))
        assert info.value.code() == code, info.value.details()
        for needle in needles:
            assert needle in info.value.details()
        assert ("x-sampler-error", cls) in tuple(info.value.trailing_metadata())
        _check_serving(stub)


def test_message_past_the_transport_limit_is_refused_cleanly(wire_server) -> None:
    channel, stub = wire_server.stub()
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.SampleTokens(_req(inputs=[pb.PromptInput(image_bytes=b"\0" * (40 << 20))]),
                                   timeout=60))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        _check_serving(stub)


def test_tokenize_errors(wire_server) -> None:
    channel, stub = wire_server.stub()
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.Tokenize(pb.TokenizeRequest(text="hi", model_name="nope"), timeout=60)
        assert info.value.code() == NOT_FOUND and "nope" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.Tokenize(pb.TokenizeRequest(text="x" * 1_000_001), timeout=60)
        assert info.value.code() == INVALID and "1000001 characters" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.TokenizeAndSampleTokens(pb.TokenizeAndSampleTokensRequest(
                text="", settings=S(max_len=2, nucleus_p=1)), timeout=60))
        assert info.value.code() == INVALID and "inputs" in info.value.details()
        _check_serving(stub)
