"""Compare seeds' wall time: one prompt under N seeds run one after another against all at
once, through the workbench's own path (``workbench.runner.Runner`` over ``LocalClient``: one
thread per run, the engine taking their decode steps together, ``step_batcher.py``). The
prompt's prefill is kept before timing (as Compare seeds finds it after a playground run), so
the figure is the decode. Median of ``--reps`` interleaved pairs; the last line is JSON.

    python bench/seeds.py [--seeds 3] [--new-tokens 128] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decode import TEXT  # noqa: E402
from sampler_core import LocalClient  # noqa: E402
from sampler_core.inputs import to_parts  # noqa: E402
from sampler_core.settings import SampleSettings  # noqa: E402
from workbench.runner import Runner  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    runner = Runner()
    client = runner.build(LocalClient)
    parts = to_parts(TEXT * 8)

    def settings(seed: int) -> SampleSettings:
        return SampleSettings(max_len=args.new_tokens, temperature=1.0, rng_seed=seed, top_k=5,
                              stop_at_eos=False)

    list(runner.stream(client, parts, settings(0), ""))  # loads the model, keeps the prefill
    seeds = range(1, args.seeds + 1)
    apart: list[float] = []
    together: list[float] = []
    for rep in range(args.reps):
        start = time.perf_counter()
        for seed in seeds:
            list(runner.stream(client, parts, settings(seed), ""))
        apart.append(time.perf_counter() - start)
        start = time.perf_counter()
        list(runner.stream_many(client, [(parts, settings(seed)) for seed in seeds], ""))
        together.append(time.perf_counter() - start)
        print(f"rep {rep + 1}: one after another {apart[-1]:.2f} s, at once {together[-1]:.2f} s",
              file=sys.stderr, flush=True)
    print(json.dumps({"bench": "seeds", "seeds": args.seeds, "new_tokens": args.new_tokens,
                      "one_after_another_s": round(statistics.median(apart), 3),
                      "at_once_s": round(statistics.median(together), 3),
                      "speedup": round(statistics.median(apart) / statistics.median(together), 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
