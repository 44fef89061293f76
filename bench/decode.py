"""Decode speed of the engine against transformers' generate(), all in one run.

A 200-token prompt, then 128 new tokens, for: (a) the engine plain (no top-k, no attention),
(b) top-k 20, (c) top-k 20 and attention, (d) ``generate(do_sample=True, output_scores=True)``
on the same model as the baseline. Reports decode tokens/s (tokens after the first, over the
time after the first) and time to first token, median of ``--reps`` runs each, interleaved so
that drift of the machine hits every configuration alike. The last line is one JSON object.

    python bench/decode.py [--reps 3] [--new-tokens 128] [--prompt-tokens 200]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from typing import Any, Callable

import torch
from transformers.generation.streamers import BaseStreamer

from sampler_core.engine import get_engine
from sampler_core.inputs import TokenIdsPart
from sampler_core.settings import SampleSettings
from sampler_core.tokens import Token

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
        "changed how books were made, sold and read across Europe. ")


def prompt_ids(engine: Any, n: int) -> list[int]:
    """Exactly ``n`` token ids of ordinary English text."""
    ids: list[int] = []
    while len(ids) < n:
        ids += engine.encode(TEXT)
    return ids[:n]


def time_engine(engine: Any, ids: list[int], new: int, **settings: Any) -> tuple[float, float]:
    """(decode tokens/s, time to first token in ms) for one engine run."""
    s = SampleSettings(max_len=new, temperature=1.0, nucleus_p=0.95, rng_seed=0,
                       stop_at_eos=False, **settings)
    start = time.perf_counter()
    stamps = [time.perf_counter() for e in engine.start([TokenIdsPart(tuple(ids))], s)
              if isinstance(e, Token)]
    if len(stamps) != new:
        raise RuntimeError(f"expected {new} tokens, got {len(stamps)}")
    return (new - 1) / (stamps[-1] - stamps[0]), (stamps[0] - start) * 1000


class _Clock(BaseStreamer):
    """Records when generate() emits each new token (its first put() is the prompt)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.calls = 0

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls > 1:
            self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_generate(engine: Any, ids: list[int], new: int) -> tuple[float, float]:
    """(decode tokens/s, time to first token in ms) for transformers' generate()."""
    clock = _Clock()
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(torch.tensor([ids]), do_sample=True, temperature=1.0,
                                    top_p=0.95, top_k=0, max_new_tokens=new, min_new_tokens=new,
                                    output_scores=True, return_dict_in_generate=True,
                                    streamer=clock, pad_token_id=engine.eos_id)
    if len(out.scores) != new:
        raise RuntimeError(f"generate made {len(out.scores)} tokens, expected {new}")
    return (new - 1) / (clock.stamps[-1] - clock.stamps[0]), (clock.stamps[0] - start) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    args = parser.parse_args(argv)

    engine = get_engine("")
    ids = prompt_ids(engine, args.prompt_tokens)
    configs: dict[str, Callable[[], tuple[float, float]]] = {
        "plain": lambda: time_engine(engine, ids, args.new_tokens, top_k=0),
        "topk": lambda: time_engine(engine, ids, args.new_tokens, top_k=20),
        "topk_attn": lambda: time_engine(engine, ids, args.new_tokens, top_k=20,
                                         return_attention=True),
        "generate": lambda: time_generate(engine, ids, args.new_tokens),
    }
    time_engine(engine, ids, 8, top_k=20, return_attention=True)  # warm-up
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for rep in range(args.reps):
        for name, measure in configs.items():
            results[name].append(measure())
            tok_s, ttft = results[name][-1]
            print(f"rep {rep + 1} {name:<10} {tok_s:6.2f} tok/s  ttft {ttft:7.1f} ms",
                  file=sys.stderr, flush=True)
    tok_s = {n: statistics.median(r[0] for r in rs) for n, rs in results.items()}
    ttft = {n: round(statistics.median(r[1] for r in rs), 1) for n, rs in results.items()}
    report = {
        "plain_tok_s": round(tok_s["plain"], 2),
        "topk_tok_s": round(tok_s["topk"], 2),
        "topk_attn_tok_s": round(tok_s["topk_attn"], 2),
        "generate_tok_s": round(tok_s["generate"], 2),
        "ratio_plain": round(tok_s["plain"] / tok_s["generate"], 3),
        "ratio_topk": round(tok_s["topk"] / tok_s["generate"], 3),
        "ratio_topk_attn": round(tok_s["topk_attn"] / tok_s["generate"], 3),
        "ttft_ms": ttft,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
