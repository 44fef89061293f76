"""Load benchmark of the Sampler gRPC server (``make bench``).

Starts ``sampler-core serve`` on an ephemeral localhost port (a subprocess, so clients and
server do not share a GIL), then:

1. one stream, gRPC vs in-process (``LocalClient`` in this process), alternated over a few
   rounds; the figure is the ratio of the medians (target >= 0.95);
2. N concurrent clients (1, 4, 16): aggregate and per-stream tokens/s, p50/p95 time to first
   token.

Figures are ratios or rates from one run on this machine; the JSON object is the last line.
Usage: ``python bench/load.py [--max-len 16] [--ratio-max-len 128] [--clients 1,4,16]
[--rounds 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _server import running_server  # noqa: E402
from sampler_core import Client, LocalClient, Token  # noqa: E402

PROMPT = "In a distant future, humanity has spread across the stars, and"


async def one_stream(client: Any, max_len: int, seed: int) -> dict[str, float]:
    """Run one request; times from its start: first token, end; and the token count."""
    start = time.perf_counter()
    first = None
    count = 0
    async for event in client.sampler.sample_events(PROMPT, max_len=max_len, rng_seed=seed,
                                                    stop_at_eos=False):
        if isinstance(event, Token):
            count += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "duration": end - start, "tokens": count}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def concurrency(host: str, n: int, max_len: int) -> dict[str, float]:
    client = Client(api_host=host)
    try:
        await one_stream(client, 2, 0)  # warm the channel
        start = time.perf_counter()
        runs = await asyncio.gather(*(one_stream(client, max_len, seed) for seed in range(n)))
        wall = time.perf_counter() - start
    finally:
        await client.close()
    tokens = sum(r["tokens"] for r in runs)
    return {
        "clients": n,
        "aggregate_tokens_per_s": round(tokens / wall, 2),
        "per_stream_tokens_per_s": round(statistics.mean(r["tokens"] / r["duration"]
                                                         for r in runs), 2),
        "ttft_p50_s": round(pct([r["ttft"] for r in runs], 0.5), 4),
        "ttft_p95_s": round(pct([r["ttft"] for r in runs], 0.95), 4),
    }


async def single_stream_ratio(host: str, max_len: int, rounds: int) -> dict[str, float]:
    remote, local = Client(api_host=host), LocalClient()
    try:
        await one_stream(local, 2, 0)  # load the model here, warm both paths
        await one_stream(remote, 2, 0)
        grpc_rates, local_rates = [], []
        for r in range(rounds):  # alternate, so drift on a shared machine hits both alike
            run = await one_stream(local, max_len, r)
            local_rates.append(run["tokens"] / run["duration"])
            run = await one_stream(remote, max_len, r)
            grpc_rates.append(run["tokens"] / run["duration"])
    finally:
        await remote.close()
        await local.close()
    g, l_ = statistics.median(grpc_rates), statistics.median(local_rates)
    return {"grpc_tokens_per_s": round(g, 2), "inprocess_tokens_per_s": round(l_, 2),
            "grpc_to_inprocess_ratio": round(g / l_, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-len", type=int, default=16)
    # As long as bench/decode.py's runs: a request's fixed costs (budget reservation, the
    # transaction's SQLite write, prefill) then weigh as they do in use, not 4x more.
    parser.add_argument("--ratio-max-len", type=int, default=128)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    with running_server("--max-concurrent", str(max(counts))) as (_, host):
        ratio = asyncio.run(single_stream_ratio(host, args.ratio_max_len, args.rounds))
        print(f"one stream: gRPC {ratio['grpc_tokens_per_s']} tok/s, in-process "
              f"{ratio['inprocess_tokens_per_s']} tok/s, ratio {ratio['grpc_to_inprocess_ratio']}",
              flush=True)
        rows = []
        for n in counts:
            row = asyncio.run(concurrency(host, n, args.max_len))
            rows.append(row)
            print(f"{n:>3} clients: {row['aggregate_tokens_per_s']} tok/s aggregate, "
                  f"{row['per_stream_tokens_per_s']} tok/s per stream, TTFT p50 "
                  f"{row['ttft_p50_s']} s p95 {row['ttft_p95_s']} s", flush=True)
    print(json.dumps({"bench": "load", "max_len": args.max_len, **ratio,
                      "ratio_target": 0.95, "ratio_ok": ratio["grpc_to_inprocess_ratio"] >= 0.95,
                      "concurrency": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
