"""Every RPC over a real channel on an ephemeral localhost port, seen as an SDK client sees it."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
from google.protobuf import empty_pb2

from sampler_core import Client, FinishReason, RunSummary, Token, TokenType
from sampler_core.wire._generated.prompt_ide import sampler_public_pb2 as pb
from conftest import need
from wire_fixtures import ThreadServer, sample_request, wire_server  # noqa: F401


def _kinds(responses: list[pb.SampleTokensResponse]) -> list[str]:
    return [r.WhichOneof("response") for r in responses]


def test_sample_tokens_streams_tokens_then_summary_transaction_budget(wire_server) -> None:
    channel, stub = wire_server.stub()
    with channel:
        responses = list(stub.SampleTokens(sample_request(max_len=5, stop_at_eos=False),
                                           timeout=120))
    kinds = _kinds(responses)
    assert kinds == ["token"] * 5 + ["summary", "transaction", "budget"]
    token = responses[0].token
    assert token.token_type == pb.MODEL and token.final_logit.string_token
    assert 0 < token.final_logit.prob <= 1 and len(token.top_k) == 5
    tx, budget = responses[-2].transaction, responses[-1].budget
    assert tx.num_generated_tokens == 5 and tx.num_prompt_tokens > 0 and tx.confirmed
    assert tx.transaction_id and tx.model_name == "smollm2-135m-instruct"
    assert budget.tokens_spent >= tx.num_prompt_tokens + 5 and budget.requests_spent >= 1
    assert responses[-3].summary.finish_reason == "max_len"


def test_tokenize_and_sample_tokens_matches_sample_tokens(wire_server) -> None:
    channel, stub = wire_server.stub()
    settings = pb.SampleSettings(max_len=4, temperature=0.9, nucleus_p=0.9, rng_seed=7)
    with channel:
        a = list(stub.TokenizeAndSampleTokens(pb.TokenizeAndSampleTokensRequest(
            text="Paris is", settings=settings), timeout=120))
        b = list(stub.SampleTokens(pb.SampleTokensRequest(
            settings=settings, inputs=[pb.PromptInput(text="Paris is")]), timeout=120))
    ids = lambda rs: [r.token.final_logit.token_id for r in rs if r.HasField("token")]  # noqa: E731
    assert _kinds(a)[-1] == "budget" and ids(a) == ids(b) and len(ids(a)) > 0


def test_deprecated_prompt_field_and_missing_settings(wire_server) -> None:
    """An old client's token-id ``prompt``; without settings the library's defaults apply."""
    channel, stub = wire_server.stub()
    with channel:
        ids = [t.final_logit.token_id for t in stub.Tokenize(
            pb.TokenizeRequest(text="Hello there"), timeout=60).tokens]
        old = list(stub.SampleTokens(pb.SampleTokensRequest(
            prompt=ids, settings=pb.SampleSettings(max_len=3, temperature=0.0, nucleus_p=1.0)),
            timeout=120))
        new = list(stub.SampleTokens(pb.SampleTokensRequest(
            inputs=[pb.PromptInput(token_ids=pb.TokenIds(tokens=ids))],
            settings=pb.SampleSettings(max_len=3, temperature=0.0, nucleus_p=1.0)), timeout=120))
    assert [r.token.final_logit.token_id for r in old if r.HasField("token")] == \
        [r.token.final_logit.token_id for r in new if r.HasField("token")]
    assert _kinds(old)[-1] == "budget"


def test_tokenize_returns_user_tokens_with_prob_zero(wire_server, engine) -> None:
    channel, stub = wire_server.stub()
    with channel:
        response = stub.Tokenize(pb.TokenizeRequest(text="Hello world, again"), timeout=60)
    assert [t.final_logit.token_id for t in response.tokens] == engine.encode("Hello world, again")
    assert all(t.final_logit.prob == 0 and t.token_type == pb.USER for t in response.tokens)
    assert "".join(t.final_logit.string_token for t in response.tokens) == "Hello world, again"


def test_budget_transactions_and_models(wire_server) -> None:
    channel, stub = wire_server.stub()
    with channel:
        before = stub.GetTokenBudget(pb.GetTokenBudgetRequest(), timeout=60)
        list(stub.SampleTokens(sample_request(max_len=2, stop_at_eos=False), timeout=120))
        after = stub.GetTokenBudget(pb.GetTokenBudgetRequest(), timeout=60)
        sample_only = stub.GetTokenBudget(pb.GetTokenBudgetRequest(transaction_type="sample"),
                                          timeout=60)
        other = stub.GetTokenBudget(pb.GetTokenBudgetRequest(transaction_type="nothing"),
                                    timeout=60)
        txs = stub.ListTransactions(empty_pb2.Empty(), timeout=60).transactions
        models = stub.ListModels(empty_pb2.Empty(), timeout=60).model_names
    assert after.requests_spent == before.requests_spent + 1
    assert after.tokens_spent == before.tokens_spent + txs[-1].num_prompt_tokens + 2
    assert sample_only.tokens_spent == after.tokens_spent and other.tokens_spent == 0
    assert after.token_limit == 2**31 - 1  # no --token-limit: unlimited
    assert txs[-1].num_generated_tokens == 2 and txs[-1].create_time.seconds > 0
    assert "smollm2-135m-instruct" in models
    from sampler_core.engine import model_names
    assert set(model_names()) <= set(models)


def test_client_speaks_every_rpc(wire_server) -> None:
    async def main() -> Any:
        client = Client(api_host=wire_server.host, initial_rng_seed=3)
        try:
            events = [e async for e in client.sampler.sample_events("Once upon", max_len=3,
                                                                      stop_at_eos=False)]
            tokens = await client.sampler.tokenize("Once upon")
            models = await client.sampler.list_models()
            budget = await client.get_token_budget()
            txs = await client.list_transactions()
            return events, tokens, models, budget, txs, client._transport.last_budget
        finally:
            await client.close()

    events, tokens, models, budget, txs, streamed_budget = asyncio.run(main())
    assert [type(e) for e in events] == [Token] * 3 + [RunSummary]
    assert events[-1].finish_reason == FinishReason.MAX_LEN
    assert all(t.token_type == TokenType.USER and t.prob == 0 for t in tokens)
    assert "smollm2-135m-instruct" in models
    assert streamed_budget == budget and txs[-1].num_generated_tokens == 3


def test_prefill_travels_both_ways(wire_server, engine) -> None:
    """A run asks for its prefill by name over the wire; the summary says what it got (the
    default where none is named; float32 for a short prompt). A mode the server does not know, or cannot run (the
    fixed-point modes need the packed CPU path), is refused by name."""
    from sampler_core.engine import packed

    kernel = packed.kernel()
    runs_fixed16 = (engine.device.type == "cpu" and kernel is not None
                    and bool(kernel.prefill_supported()))
    long_text = "The history of the printing press begins in the fifteenth century. " * 4

    def summary_or_error(**settings: Any) -> pb.RunSummary | grpc.RpcError:
        channel, stub = wire_server.stub()
        with channel:
            try:
                responses = list(stub.SampleTokens(sample_request(**settings), timeout=120))
            except grpc.RpcError as exc:
                return exc
        return next(r.summary for r in responses if r.WhichOneof("response") == "summary")

    long = summary_or_error(text=long_text, max_len=2, prefill="fixed16")
    if runs_fixed16:  # by name only, and noted: not exact
        assert long.prefill == "fixed16" and any(n.startswith("prefill fixed16:")
                                                 for n in long.notes)
        assert summary_or_error(text=long_text, max_len=2).prefill == "float32"
        assert summary_or_error(text=long_text, max_len=2, prefill="float32").prefill == "float32"
        if kernel.prefill_attention_bf16_supported():
            fast = summary_or_error(text=long_text, max_len=2, prefill="fast")
            assert fast.prefill == "fast" and any(n.startswith("prefill fast:")
                                                  for n in fast.notes)
        assert summary_or_error(max_len=2, prefill="fixed16").prefill == "float32"
    else:
        assert long.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prefill 'fixed16' needs packed weights on a CPU" in long.details()
    assert summary_or_error(max_len=2).prefill == "float32"
    refused = summary_or_error(max_len=2, prefill="int8")
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prefill must be one of float32, fixed16, fast" in refused.details()
    assert "'int8'" in refused.details()


def test_a_reused_prefill_is_said_in_the_summary_over_the_wire(wire_server) -> None:
    """The same long prompt twice: the second run's prefill is the first one's, its summary
    says so (an extension field), and its tokens are the same."""
    text = ("Notes from the wire test of kept prefills: the ferry left at nine, the harbour "
            "master logged the tide, and the gulls followed the boat out past the pier. " * 3)

    def sample() -> tuple[list[int], pb.RunSummary]:
        channel, stub = wire_server.stub()
        with channel:
            responses = list(stub.SampleTokens(sample_request(text=text, max_len=3, rng_seed=5,
                                                              stop_at_eos=False), timeout=120))
        return ([r.token.final_logit.token_id for r in responses if r.HasField("token")],
                next(r.summary for r in responses if r.WhichOneof("response") == "summary"))

    (first, before), (second, after) = sample(), sample()
    assert before.num_prompt_tokens >= 64
    assert (before.prefill_reused, after.prefill_reused) == (False, True)
    assert first == second and len(first) == 3


def test_concurrent_streams_meet_in_the_engine_and_each_equals_itself_alone(wire_server,
                                                                            engine) -> None:
    """Three SDK clients at once over the real channel: each stream's tokens are the ones it
    gets alone, and the server's engine took some of their decode steps together."""
    need(engine._batcher is not None, "decode steps meet on the packed CPU path only")
    text = "Three ferries crossed the bay at dawn, and"

    def tokens(seed: int) -> list[tuple[int, float]]:
        channel, stub = wire_server.stub()
        with channel:
            responses = list(stub.SampleTokens(sample_request(
                text=text, max_len=24, rng_seed=seed, temperature=1.0, stop_at_eos=False),
                timeout=120))
        return [(r.token.final_logit.token_id, r.token.final_logit.prob)
                for r in responses if r.HasField("token")]

    alone = {seed: tokens(seed) for seed in (1, 2, 3)}
    batcher = engine._batcher
    batches, steps = batcher.batches, batcher.steps
    together: dict[int, list[tuple[int, float]]] = {}
    threads = [threading.Thread(target=lambda s=seed: together.update({s: tokens(s)}))
               for seed in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert together == alone and all(len(t) == 24 for t in alone.values())
    assert 0 < batcher.batches - batches < batcher.steps - steps  # some steps met


def test_a_run_summary_crosses_the_wire_whole() -> None:
    """Every field of a RunSummary, extensions included, survives the proto and back."""
    from sampler_core.wire import convert

    for summary in (RunSummary("m", 70, 3, FinishReason.STOP_STRING, stop_match="\n\n",
                               notes=("a", "b"), prefill="fixed16", prefill_reused=True,
                               prefill_reused_tokens=64),
                    RunSummary("m", 2, 0, FinishReason.EOS)):
        assert convert.summary_from_proto(convert.summary_to_proto(summary)) == summary


def test_token_from_an_old_server_leaves_extensions_none() -> None:
    """A server without our extensions sends bare Logits: the Token's extra fields are None."""
    from sampler_core.wire import convert

    bare = pb.Token(final_logit=pb.Logit(token_id=5, string_token="x", prob=0.5),
                    token_type=pb.MODEL, top_k=[pb.Logit(token_id=6, string_token="y", prob=0.25)])
    token = convert.token_from_proto(bare)
    assert (token.token_id, token.token_str, token.prob) == (5, "x", 0.5)
    assert token.raw_prob is None and token.rank is None and token.entropy is None
    assert token.position is None and token.attention is None
    assert [(t.token_id, t.prob) for t in token.top_k] == [(6, 0.25)]
