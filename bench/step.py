"""Where a decode step's time goes: the model's forward at a few context lengths, and the step
loop's vocabulary math against the torch calls it replaced. All in one run, one JSON line last.

    python bench/step.py [--batches 7]

- ``forward_ms``: one decode step through every layer and the output head (the packed C path
  when the kernel is available), best batch of 30, at contexts of 10, 300 and 1,000 positions,
  without and with attention rows.
- ``vocab_us``: per-call costs on logits recorded from a real 128-token run (temperature 1,
  nucleus 0.95, the decode bench's prompt): the nucleus processor as the engine runs it and a
  full sort (the old fallback); ``draw`` against ``torch.multinomial``; numpy's argmax and
  rank against torch's; the entropy as ``-(p * logp).sum()`` against ``torch.special.entr``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from decode import prompt_ids
from sampler_core.engine import get_engine
from sampler_core.engine.processors import Nucleus, argmax, draw
from sampler_core.engine.threads import one_thread
from sampler_core.inputs import TokenIdsPart
from sampler_core.settings import SampleSettings


def best_ms(fn: Callable[[], Any], batches: int, per_batch: int = 30) -> float:
    """The fastest batch's mean time per call, in ms (the least disturbed by other load)."""
    fn()
    best = float("inf")
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(per_batch):
            fn()
        best = min(best, (time.perf_counter() - start) / per_batch * 1000)
    return best


def forward_ms(engine: Any, batches: int) -> dict[str, float]:
    fast = engine._fast
    x = fast.embed[torch.tensor([5])]
    out: dict[str, float] = {}
    for context in (10, 300, 1000):
        cache = fast.new_cache(context + 1)
        cache.keys.normal_()
        cache.values.normal_()
        for label, attention in (("", False), ("_attn", True)):

            def step() -> None:
                cache.length = context
                fast.forward(x.new_tensor([5], dtype=torch.long), cache, attention=attention)

            out[f"ctx{context}{label}"] = round(best_ms(step, batches), 3)
    return out


def recorded_logits(engine: Any, ids: list[int]) -> list[torch.Tensor]:
    """The raw logits of every step of one sampled 128-token run."""
    seen: list[torch.Tensor] = []
    forward = engine._forward

    def keep(*args: Any, **kwargs: Any) -> Any:
        logits, rows = forward(*args, **kwargs)
        seen.append(logits[-1].clone())
        return logits, rows

    engine._forward = keep
    try:
        settings = SampleSettings(max_len=128, temperature=1.0, nucleus_p=0.95, rng_seed=0,
                                  stop_at_eos=False, top_k=0)
        list(engine.start([TokenIdsPart(tuple(ids))], settings))
    finally:
        del engine._forward  # back to the class's method
    return seen


def vocab_us(logits: list[torch.Tensor]) -> dict[str, float]:
    nucleus = Nucleus(0.95)
    probs = [torch.softmax(l, -1) for l in logits]
    generator = torch.Generator().manual_seed(0)

    def per_call(fn: Callable[[torch.Tensor, torch.Tensor], Any]) -> float:
        with one_thread():  # as the step loop runs them
            start = time.perf_counter()
            for l, p in zip(logits, probs):
                fn(l, p)
            return round((time.perf_counter() - start) / len(logits) * 1e6, 1)

    return {
        "nucleus": per_call(lambda l, p: nucleus(l)),
        "full_sort": per_call(lambda l, p: torch.sort(p, descending=True)),
        "draw": per_call(lambda l, p: draw(p, generator)),
        "torch_multinomial": per_call(lambda l, p: torch.multinomial(p, 1, generator=generator)),
        "argmax_numpy": per_call(lambda l, p: argmax(p)),
        "argmax_torch": per_call(lambda l, p: int(torch.argmax(p))),
        "rank_numpy": per_call(lambda l, p: np.count_nonzero(l.numpy() > float(l[5]))),
        "rank_torch": per_call(lambda l, p: int((l > l[5]).sum())),
        "entropy_p_logp": per_call(lambda l, p: float(-(p * torch.log_softmax(l, -1)).sum())),
        "entropy_torch_entr": per_call(lambda l, p: float(torch.special.entr(p).sum())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=7)
    args = parser.parse_args(argv)
    engine = get_engine("")
    if engine._fast is None:
        raise SystemExit("the default model is not running the lean runner; nothing to time")
    logits = recorded_logits(engine, prompt_ids(engine, 200))
    kept = [int(torch.isfinite(Nucleus(0.95)(l)).sum()) for l in logits]
    report = {
        "weights": engine._fast.weights,
        "forward_ms": forward_ms(engine, args.batches),
        "vocab_us": vocab_us(logits),
        "nucleus_sizes": {"steps": len(kept), "one_token": sum(k == 1 for k in kept),
                          "median": statistics.median(kept), "max": max(kept)},
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
