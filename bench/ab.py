"""Decode speed of this checkout against another one (say, a ``git worktree`` of an earlier
commit), interleaved run by run so that the machine's drift hits both alike.

Each checkout's engine runs in its own process (its own kernel build, its own Python code);
the two take turns, one 128-token run each, alternating which goes first. Reports each side's
median tokens/s and the median of the per-pair ratios (this checkout / the other), for the
engine plain and with top-k 20 and attention, and the same for time to first token (this
checkout's over the other's: below 1 is faster; with ``--prompt-tokens 2000`` a prefill
comparison). The last line is one JSON object.

    git worktree add /tmp/base <commit>
    python bench/ab.py /tmp/base [--reps 12] [--prompt-tokens 200] [--new-tokens 128]
                                 [--in-thread] [--prefill float32|fixed16|fast]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
CONFIGS = {"plain": {"top_k": 0}, "topk_attn": {"top_k": 20, "return_attention": True}}


def worker(prompt_tokens: int, new_tokens: int, in_thread: bool) -> None:
    """Serve timed runs of the checkout this process imports: one JSON settings object per
    line in, one ``{"tok_s": ...}`` per line out; with ``in_thread``, each run on a worker
    thread, as the server runs them."""
    sys.path.insert(0, str(Path.cwd() / "bench"))  # the checkout's own helpers
    from decode import prompt_ids, time_engine
    from sampler_core.engine import get_engine

    engine = get_engine()
    ids = prompt_ids(engine, prompt_tokens)
    pool = ThreadPoolExecutor(1) if in_thread else None

    def timed(**settings: object) -> tuple[float, float]:
        if pool is None:
            return time_engine(engine, ids, new_tokens, **settings)
        return pool.submit(time_engine, engine, ids, new_tokens, **settings).result()

    timed(top_k=0)  # build and warm up before the first timed run
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        tok_s, ttft_ms = timed(**json.loads(line))
        print(json.dumps({"tok_s": tok_s, "ttft_ms": ttft_ms}), flush=True)


def start(checkout: Path, args: argparse.Namespace) -> subprocess.Popen[str]:
    """A worker process importing ``checkout``'s sampler_core and bench helpers."""
    # Kept prefills off (a checkout before them ignores this): every run prefills its prompt.
    env = dict(os.environ, PYTHONPATH=str(checkout), HF_HUB_OFFLINE="1",
               PROMPT_IDE_PROMPT_CACHE_MB="0")
    process = subprocess.Popen(
        [sys.executable, __file__, "--worker", "--prompt-tokens", str(args.prompt_tokens),
         "--new-tokens", str(args.new_tokens)] + (["--in-thread"] if args.in_thread else []),
        cwd=checkout, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if json.loads(_line(process.stdout)) != {"ready": True}:
        raise RuntimeError(f"the worker for {checkout} did not start")
    return process


def _line(stream: IO[str] | None) -> str:
    line = stream.readline() if stream is not None else ""
    if not line:
        raise RuntimeError("a worker exited early")
    return line


def _timed_run(process: subprocess.Popen[str], settings: dict[str, object]
               ) -> tuple[float, float]:
    """One run's decode tokens/s and time to first token (ms) from a worker."""
    if process.stdin is None:
        raise RuntimeError("a worker has no input pipe")
    process.stdin.write(json.dumps(settings) + "\n")
    process.stdin.flush()
    reply = json.loads(_line(process.stdout))
    return float(reply["tok_s"]), float(reply["ttft_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", nargs="?", type=Path, help="the checkout to compare against")
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--in-thread", action="store_true",
                        help="run each timed run on a worker thread, as the server does")
    parser.add_argument("--prefill", help="the runs' prefill mode (default: each engine's own, "
                                          "fixed16 from 2026-11-23 to 2026-12-06, else float32)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.prompt_tokens, args.new_tokens, args.in_thread)
        return
    if args.other is None or not (args.other / "sampler_core").is_dir():
        parser.error(f"other must be a checkout of this project, got {args.other}")
    sides = {"this": start(HERE.parent, args), "other": start(args.other.resolve(), args)}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {
        (s, c): [] for s in sides for c in CONFIGS}
    try:
        for rep in range(args.reps):
            for name, settings in CONFIGS.items():
                order = ("this", "other") if rep % 2 == 0 else ("other", "this")
                for side in order:
                    asked = settings | ({"prefill": args.prefill} if args.prefill else {})
                    results[(side, name)].append(_timed_run(sides[side], asked))
    finally:
        for process in sides.values():
            if process.stdin is not None:
                process.stdin.close()
            process.wait()
    report = {"other": str(args.other), "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "reps": args.reps, "prefill": args.prefill}
    for name in CONFIGS:
        this, other = results[("this", name)], results[("other", name)]
        entry: dict[str, float] = {}
        for at, (unit, key) in enumerate((("tok/s", "tok_s"), ("ms", "ttft_ms"))):
            mine, theirs = [run[at] for run in this], [run[at] for run in other]
            ratio = statistics.median(a / b for a, b in zip(mine, theirs))
            print(f"{name} {key}: this {statistics.median(mine):.1f} {unit}, other "
                  f"{statistics.median(theirs):.1f} {unit}, per-pair ratio {ratio:.3f}")
            entry |= {f"this_{key}": round(statistics.median(mine), 2),
                      f"other_{key}": round(statistics.median(theirs), 2),
                      f"ratio_{key}": round(ratio, 3)}
        report[name] = entry
    print(json.dumps(report))


if __name__ == "__main__":
    main()
