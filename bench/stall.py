"""How long a decoding run stalls while another run's long prompt prefills, with the prompt
prefilled in pieces (``PREFILL_PIECE`` positions a turn at the step lock, the engine's way while
others decode) against in one pass (the way before). One run decodes a short prompt; once its
tokens flow, a 2,000-token prompt starts beside it. Reports the decoding run's longest wait
between two tokens and the long prompt's time to first token, median of ``--reps``
interleaved pairs; the last line is one JSON object. Kept prefills are off.

    python bench/stall.py [--prompt-tokens 2000] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decode import cold_engine, prompt_ids  # noqa: E402
from sampler_core.engine import causal_lm  # noqa: E402
from sampler_core.inputs import TokenIdsPart  # noqa: E402
from sampler_core.settings import SampleSettings  # noqa: E402
from sampler_core.tokens import Token  # noqa: E402


def one_pair(engine, long_ids: list[int], piece: int) -> tuple[float, float]:
    """(the decoding run's longest gap between tokens in ms, the long prompt's time to first
    token in ms), with long prompts prefilled ``piece`` positions at a time."""
    causal_lm.PREFILL_PIECE = piece
    stamps: list[float] = []
    flowing, stop = threading.Event(), threading.Event()

    def decode() -> None:
        settings = SampleSettings(max_len=4000, temperature=1.0, rng_seed=1, stop_at_eos=False)
        for event in engine.start([TokenIdsPart(tuple(prompt_ids(engine, 20)))], settings,
                                  cancelled=stop.is_set):
            if isinstance(event, Token):
                stamps.append(time.perf_counter())
                if len(stamps) == 5:
                    flowing.set()

    decoder = threading.Thread(target=decode)
    decoder.start()
    flowing.wait()
    start = time.perf_counter()
    settings = SampleSettings(max_len=1, temperature=1.0, rng_seed=2, stop_at_eos=False)
    for event in engine.start([TokenIdsPart(tuple(long_ids))], settings):
        if isinstance(event, Token):
            first = time.perf_counter()
    while not stamps or stamps[-1] < first:  # the decoding run's first token after the stall
        time.sleep(0.001)
    stop.set()
    decoder.join()
    during = [b - a for a, b in zip(stamps, stamps[1:]) if b > start and a < first]
    return max(during) * 1000, (first - start) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    engine = cold_engine()
    long_ids = prompt_ids(engine, args.prompt_tokens)
    ways = {"pieces": causal_lm.PREFILL_PIECE, "one_pass": args.prompt_tokens + 1}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    try:
        for rep in range(args.reps):
            for name, piece in (ways.items() if rep % 2 == 0 else reversed(ways.items())):
                results[name].append(one_pair(engine, long_ids, piece))
                print(f"rep {rep + 1} {name}: longest gap {results[name][-1][0]:.0f} ms, "
                      f"time to first token {results[name][-1][1]:.0f} ms", file=sys.stderr,
                      flush=True)
    finally:
        causal_lm.PREFILL_PIECE = ways["pieces"]
    print(json.dumps({
        "prompt_tokens": args.prompt_tokens, "reps": args.reps, "piece": ways["pieces"],
        "longest_gap_ms": {n: round(statistics.median(r[0] for r in rs), 1)
                           for n, rs in results.items()},
        "ttft_ms": {n: round(statistics.median(r[1] for r in rs), 1)
                    for n, rs in results.items()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
