"""The server's behaviour: auth, budgets across restarts, TLS, cancellation, concurrency,
graceful shutdown and the start-up safety checks."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from sampler_core import (
    BudgetExceeded,
    Client,
    LocalClient,
    Overloaded,
    RunSummary,
    SamplerError,
    ServerUnavailable,
    Token,
    Unauthenticated,
)
from sampler_core.wire._generated.prompt_ide import sampler_public_pb2 as pb
from sampler_core.wire.server import CREDIT_WINDOW
from wire_fixtures import ROOT, ProcessServer, ThreadServer, need_model, sample_request, wire_server  # noqa: F401,E501

PROMPT = "The quick brown fox"


def _rows(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "accounts.sqlite3") as db:
        return db.execute("SELECT COUNT(*) FROM transactions").fetchone()[0]


async def _collect(client: Client, **kwargs: Any) -> list[Any]:
    return [e async for e in client.sampler.sample_events(PROMPT, **kwargs)]


# ----- authentication and budgets --------------------------------------------------------------


@pytest.fixture()
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text("# test keys\nsecret-alice alice\nsecret-bob\n")
    return path


def test_missing_or_wrong_key_is_unauthenticated_and_runs_nothing(key_file: Path) -> None:
    need_model()
    with ThreadServer(api_keys=key_file) as server:
        channel, stub = server.stub()
        calls = [
            lambda md: list(stub.SampleTokens(sample_request(), metadata=md, timeout=60)),
            lambda md: list(stub.TokenizeAndSampleTokens(pb.TokenizeAndSampleTokensRequest(
                text="hi", settings=pb.SampleSettings(max_len=2, nucleus_p=1)), metadata=md,
                timeout=60)),
            lambda md: stub.Tokenize(pb.TokenizeRequest(text="hi"), metadata=md, timeout=60),
            lambda md: stub.GetTokenBudget(pb.GetTokenBudgetRequest(), metadata=md, timeout=60),
            lambda md: stub.ListTransactions(empty_pb2.Empty(), metadata=md, timeout=60),
            lambda md: stub.ListModels(empty_pb2.Empty(), metadata=md, timeout=60),
        ]
        with channel:
            for metadata in ((), (("apikey", "wrong"),), (("x-other", "1"), ("apikey", ""))):
                for call in calls:
                    with pytest.raises(grpc.RpcError) as info:
                        call(metadata)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "API key" in info.value.details()
            assert _rows(server.config.data_dir) == 0  # nothing ran
            # Extra metadata before the key is fine (the SDK sends such pairs).
            ok = list(stub.SampleTokens(sample_request(max_len=2), timeout=60,
                                        metadata=(("x-trace", "1"), ("apikey", "secret-bob"))))
            assert ok[-1].HasField("budget")

        async def remote() -> None:
            client = Client(api_key="nope", api_host=server.host)
            try:
                with pytest.raises(Unauthenticated, match="invalid API key"):
                    await client.sampler.list_models()
            finally:
                await client.close()

        asyncio.run(remote())


def test_budget_is_per_key_persists_across_restart_and_is_enforced(key_file: Path) -> None:
    need_model()
    data_dir = Path(tempfile.mkdtemp(prefix="sampler-budget-"))

    async def spend(host: str, key: str, **kwargs: Any) -> Any:
        client = Client(api_key=key, api_host=host, initial_rng_seed=1)
        try:
            events = await _collect(client, **kwargs)
            return events, await client.get_token_budget(), await client.list_transactions()
        finally:
            await client.close()

    with ThreadServer(api_keys=key_file, data_dir=data_dir, token_limit=60) as server:
        _, budget, txs = asyncio.run(spend(server.host, "secret-alice", max_len=6,
                                           stop_at_eos=False))
    prompt_tokens = txs[0].num_prompt_tokens
    assert budget.tokens_spent == prompt_tokens + 6 and budget.requests_spent == 1
    assert budget.token_limit == 60

    with ThreadServer(api_keys=key_file, data_dir=data_dir, token_limit=60) as server:
        async def after_restart() -> Any:
            alice = Client(api_key="secret-alice", api_host=server.host)
            bob = Client(api_key="secret-bob", api_host=server.host)
            try:
                kept = await alice.get_token_budget()
                kept_txs = await alice.list_transactions()
                with pytest.raises(BudgetExceeded) as info:
                    await _collect(alice, max_len=60 - budget.tokens_spent)
                bob_budget = await bob.get_token_budget()
                small = await _collect(alice, max_len=2, stop_at_eos=False)
                return kept, kept_txs, str(info.value), bob_budget, small
            finally:
                await alice.close()
                await bob.close()

        kept, kept_txs, message, bob_budget, small = asyncio.run(after_restart())
    assert kept == budget and [t.transaction_id for t in kept_txs] == [txs[0].transaction_id]
    # The message carries the numbers: spent, limit and what the request needed.
    assert f"{budget.tokens_spent} tokens spent" in message and "limit of 60" in message
    assert f"needs up to {prompt_tokens + 60 - budget.tokens_spent}" in message
    assert bob_budget.tokens_spent == 0 and bob_budget.requests_spent == 0
    assert isinstance(small[-1], RunSummary) and small[-1].num_generated_tokens == 2


def test_request_limit() -> None:
    need_model()
    with ThreadServer(request_limit=1) as server:
        channel, stub = server.stub()
        with channel:
            list(stub.SampleTokens(sample_request(max_len=1), timeout=60))
            with pytest.raises(grpc.RpcError) as info:
                list(stub.SampleTokens(sample_request(max_len=1), timeout=60))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 requests spent" in info.value.details() and "limit of 1" in info.value.details()


# ----- TLS -------------------------------------------------------------------------------------


def test_tls_with_a_self_signed_certificate(tmp_path: Path) -> None:
    need_model()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    with ThreadServer(tls_cert=cert, tls_key=key) as server:
        async def main() -> Any:
            # Not "localhost:..." -> the client uses TLS, trusting our certificate.
            secure = Client(api_host=f"127.0.0.1:{server.port}",
                            root_certificates=cert.read_bytes(), initial_rng_seed=5)
            plain = Client(api_host=server.host)
            try:
                events = await _collect(secure, max_len=3, stop_at_eos=False)
                with pytest.raises(ServerUnavailable):
                    await plain.sampler.list_models()
                return events
            finally:
                await secure.close()
                await plain.close()

        events = asyncio.run(main())
    assert [type(e) for e in events] == [Token] * 3 + [RunSummary]


# ----- cancellation ----------------------------------------------------------------------------


def test_cancel_stops_generation_within_a_step(wire_server) -> None:
    """Read 3 of 400 tokens, cancel; the server records what it generated and how many tokens
    it produced after it saw the cancel (at most the one step already running)."""
    service = wire_server.service
    overruns_before = len(service.cancel_overruns)

    async def main() -> Any:
        client = Client(api_host=wire_server.host)
        try:
            before = len(await client.list_transactions())
            agen = client.sampler.sample(PROMPT, max_len=400, stop_at_eos=False, rng_seed=1)
            received = [await anext(agen) for _ in range(3)]
            await agen.aclose()  # cancels the call
            while len(txs := await client.list_transactions()) == before:
                await asyncio.sleep(0.05)
            return received, txs[-1]
        finally:
            await client.close()

    received, tx = asyncio.run(main())
    assert len(received) == 3 and not tx.confirmed
    while len(service.cancel_overruns) == overruns_before:  # the worker has just finished
        time.sleep(0.01)
    overrun = service.cancel_overruns[-1]
    print(f"\ncancel: {tx.num_generated_tokens} generated, {len(received)} received, "
          f"{overrun} generated after the cancel was seen")
    assert 0 <= overrun <= 1
    # The client was at most the credit window (plus the step in flight) behind the engine.
    assert tx.num_generated_tokens <= len(received) + CREDIT_WINDOW + 1 + 8
    with wire_server.stub()[0] as channel:  # still serving
        assert list(wire_server.stub(channel)[1].SampleTokens(sample_request(max_len=1),
                                                              timeout=60))[-1].HasField("budget")


def test_disconnect_stops_generation(wire_server) -> None:
    """A client whose channel closes mid-stream: the run ends, unconfirmed, long before max_len."""
    channel, stub = wire_server.stub()
    stream = stub.SampleTokens(sample_request(max_len=400, stop_at_eos=False), timeout=120)
    next(stream)
    channel.close()
    with wire_server.stub()[0] as channel2:
        stub2 = wire_server.stub(channel2)[1]
        while not (txs := stub2.ListTransactions(empty_pb2.Empty(), timeout=60).transactions) \
                or txs[-1].num_generated_tokens == 0 or txs[-1].confirmed:
            time.sleep(0.05)
    assert txs[-1].num_generated_tokens < 400 and not txs[-1].confirmed


# ----- concurrency -----------------------------------------------------------------------------


def test_short_request_is_not_blocked_by_a_long_one_and_outputs_stay_identical(wire_server) -> None:
    """Fair interleaving, and determinism under load: every concurrent run's tokens equal the
    same request run alone in process."""
    requests = [dict(max_len=150, rng_seed=11, stop_at_eos=False)] + [
        dict(max_len=4 + i, rng_seed=20 + i, temperature=1.0, stop_at_eos=False) for i in range(3)]

    async def main() -> Any:
        client = Client(api_host=wire_server.host)
        long_seen: list[Token] = []
        try:
            async def long_run() -> list[Any]:
                async for e in client.sampler.sample_events(PROMPT, **requests[0]):
                    if isinstance(e, Token):
                        long_seen.append(e)
                return long_seen

            long_task = asyncio.create_task(long_run())
            while len(long_seen) < 2:
                await asyncio.sleep(0.01)
            shorts = await asyncio.gather(*(_collect(client, **r) for r in requests[1:]))
            progress_when_short_done = len(long_seen)
            long_done_then = long_task.done()
            await long_task
            return long_seen, shorts, progress_when_short_done, long_done_then
        finally:
            await client.close()

    long_tokens, shorts, progress, long_done_then = asyncio.run(main())
    assert not long_done_then and progress < 150  # the shorts finished while the long one ran

    async def alone() -> list[list[Any]]:
        local = LocalClient()
        try:
            return [await _collect(local, **r) for r in requests]
        finally:
            await local.close()

    reference = asyncio.run(alone())
    assert [t.token_id for t in long_tokens] == [t.token_id for t in reference[0][:-1]]
    for got, want in zip(shorts, reference[1:]):
        assert got == want


def test_past_max_concurrent_requests_queue_or_are_refused() -> None:
    need_model()
    with ThreadServer(max_concurrent=1, max_queue=1) as server:
        async def main() -> Any:
            client = Client(api_host=server.host)
            try:
                agen = client.sampler.sample(PROMPT, max_len=300, stop_at_eos=False)
                await anext(agen)  # the one slot is taken
                queued = asyncio.create_task(_collect(client, max_len=2, stop_at_eos=False))
                while server.service._waiting == 0:
                    await asyncio.sleep(0.01)
                with pytest.raises(Overloaded, match="--max-concurrent 1"):
                    await _collect(client, max_len=2)
                await agen.aclose()  # frees the slot: the queued request runs
                return await queued
            finally:
                await client.close()

        queued = asyncio.run(main())
    assert queued[-1].num_generated_tokens == 2


# ----- lifecycle -------------------------------------------------------------------------------


def test_sigterm_lets_short_streams_finish_and_cancels_the_rest_after_the_grace() -> None:
    need_model()
    server = ProcessServer("--grace", "5")
    try:
        async def main() -> Any:
            client = Client(api_host=server.host, initial_rng_seed=2)
            try:
                short = client.sampler.sample_events(PROMPT, max_len=4, stop_at_eos=False)
                long = client.sampler.sample_events(PROMPT, max_len=5000, stop_at_eos=False)
                first_short, first_long = await anext(short), await anext(long)
                server.proc.send_signal(15)
                rest = [e async for e in short]
                with pytest.raises(SamplerError):
                    async for _ in long:
                        pass
                return [first_short, *rest]
            finally:
                await client.close()

        events = asyncio.run(main())
        _, _ = server.proc.communicate(timeout=120)
    finally:
        server.kill()
    assert [type(e) for e in events] == [Token] * 4 + [RunSummary]
    assert server.proc.returncode == 0
    assert any("loopback only" in line for line in server.lines)  # said so at start-up


def test_serve_refuses_a_public_address_without_keys() -> None:
    result = subprocess.run([sys.executable, "-m", "sampler_core.cli", "serve", "--host",
                             "0.0.0.0", "--port", "0"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "refusing to serve on 0.0.0.0 without --api-keys" in result.stderr
