"""Decode speed of the engine against transformers' generate(), all in one run.

A 200-token prompt, then 128 new tokens, for: (a) the engine plain (no top-k, no attention),
(b) top-k 20, (c) top-k 20 and attention, (d) ``generate(do_sample=True, output_scores=True)``
on the same model as the baseline. Reports decode tokens/s (tokens after the first, over the
time after the first) and time to first token, median of ``--reps`` runs each, interleaved so
that drift of the machine hits every configuration alike. Also: time to first token for a
2,000-token prompt, engine against generate() (interleaved, ``--long-reps`` each); the peak
resident memory (VmHWM) of ``sampler-core serve`` with the default model after one request;
and the largest deviation of the engine's decode path (packed GGUF weights unless
``PROMPT_IDE_WEIGHTS=float32``) from a float32 full forward: greedy tokens and probabilities.
Long prompts prefill in the engine's default mode (``prefill_default``: ``float32``, exact
arithmetic); the other modes asked for by name (``fixed16``, 16-bit fixed-point activations;
``fast``, 8-bit activations and bfloat16 attention products) each get their own 2,000-token
time to first token (``ttft_2000_<mode>_ms``). The deviation
on five 400-token prompts (windows of this repository's README) is the default mode's over
128 greedy tokens (``deviation_long_prompts``, the same-answers rule's length) and each other
mode's over 32 (``deviation_long_prompts_<mode>``); where a greedy run parts from the
reference's, ``parted_at_gaps`` says how near a tie the reference was there. Every time to
first token above is a prompt's own prefill (the engine's kept prefills are off for them); ``ttft_2000_reused_ms`` is
the 2,000-token prompt run again with its prefill kept (``prompt_cache.py``), and
``ttft_2000_tail_ms`` that prompt with its last 20 tokens changed (its kept head reused, its
tail prefilled), neither comparable with ``generate()``'s, which always prefills; after them,
``kept_prompts_after_tails`` and ``kept_mb_after_tails`` say how many of those prompts the
cache then holds and in how many MB (the edits share the head's positions).
On a GPU (``--device``, default ``auto``) the reference for the deviations is the float32
model on the CPU; decode also runs with the kernels launched one by one instead of replayed
from a CUDA graph (``plain_launched``), and the GPU's peak memory is reported.
The last line is one JSON object.

    python bench/decode.py [--reps 3] [--new-tokens 128] [--prompt-tokens 200] [--long-reps 3]
                           [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from _server import running_server
from sampler_core import Client
from sampler_core.engine import get_engine
from sampler_core.inputs import TokenIdsPart
from sampler_core.settings import SampleSettings
from sampler_core.tokens import Token

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
        "changed how books were made, sold and read across Europe. ")


def cold_engine() -> Any:
    """The default engine with kept prefills off: every run prefills its own prompt."""
    engine = get_engine("")
    if engine.prompt_cache is not None:
        engine.prompt_cache.resize(0)
    return engine


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
        out = engine.model.generate(torch.tensor([ids], device=engine.device), do_sample=True,
                                    temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=new, min_new_tokens=new,
                                    output_scores=True, return_dict_in_generate=True,
                                    streamer=clock, pad_token_id=engine.eos_id)
    if len(out.scores) != new:
        raise RuntimeError(f"generate made {len(out.scores)} tokens, expected {new}")
    return (new - 1) / (clock.stamps[-1] - clock.stamps[0]), (clock.stamps[0] - start) * 1000


def time_reused(engine: Any, ids: list[int], budget: int, reps: int
                ) -> tuple[float, float, int, float] | None:
    """Median times to first token in ms of ``ids`` run again with its prefill kept (within
    ``budget`` bytes), and of ``ids`` with its last 20 tokens changed, which reuses the kept
    head and prefills its tail; then how many prompts the cache keeps and their MB (each
    edit shares the head's positions); None when the engine keeps no prefills (not the lean
    runner, or ``$PROMPT_IDE_PROMPT_CACHE_MB=0``). The cache is off again afterwards."""
    kept = engine.prompt_cache
    if kept is None or budget == 0:
        return None
    tails = [ids[:-20] + [(t + 1 + rep) % engine.vocab_size for t in ids[-20:]]
             for rep in range(reps)]
    kept.resize(budget)
    try:
        time_engine(engine, ids, 2, top_k=20)  # prefills, and keeps what it left
        again = statistics.median(time_engine(engine, ids, 2, top_k=20)[1] for _ in range(reps))
        tail = statistics.median(time_engine(engine, edited, 2, top_k=20)[1] for edited in tails)
        return again, tail, len(kept), kept.nbytes / 1e6
    finally:
        kept.resize(0)


def server_peak_rss_mb(device: str) -> float:
    """VmHWM of ``sampler-core serve`` (default model) after one 16-token request with attention."""
    with running_server("--device", device) as (proc, host):

        async def one_request() -> int:
            client = Client(api_host=host)
            try:
                events = client.sampler.sample_events(TEXT, max_len=16, rng_seed=0,
                                                      stop_at_eos=False, return_attention=True)
                return sum([isinstance(e, Token) async for e in events])
            finally:
                await client.close()

        if asyncio.run(one_request()) != 16:
            raise RuntimeError("the server's request made too few tokens")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


PROMPTS = ("The three primary colours are", "def fibonacci(n):",
           "Once upon a time in a small village,", "The capital of France is", "Water boils at")


def first_parting(got: list[int], logits: torch.Tensor) -> tuple[int, float] | None:
    """Where greedy tokens ``got`` first part from the reference's (the argmax of each row of
    ``logits``): that token's index and the reference's margin there (its top two
    probabilities' difference); None where they never part."""
    parted = [n for n, (a, b) in enumerate(zip(got, logits.argmax(-1).tolist())) if a != b]
    if not parted:
        return None
    top = torch.softmax(logits[parted[0]], dim=-1).topk(2).values
    return parted[0], float(top[0] - top[1])


def deviation(engine: Any, reference: Any, new: int) -> dict[str, Any]:
    """The engine's greedy run against a float32 full forward of ``reference`` (a CPU model)
    over the same tokens."""
    worst, same = 0.0, 0
    for text in PROMPTS:
        ids = engine.encode(text)
        s = SampleSettings(max_len=new, temperature=0.0, stop_at_eos=False)
        tokens = [e for e in engine.start([TokenIdsPart(tuple(ids))], s) if isinstance(e, Token)]
        got = [t.token_id for t in tokens]
        with torch.inference_mode():
            logits = reference(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1]
        probs = torch.softmax(logits, dim=-1)
        same += first_parting(got, logits) is None
        worst = max(worst, max(abs(t.raw_prob - float(probs[n, t.token_id]))
                               for n, t in enumerate(tokens)))
    return {"prompts": len(PROMPTS), "same_greedy_tokens": same, "max_prob_diff": worst}


def long_windows(engine: Any, count: int = 5, size: int = 400) -> list[list[int]]:
    """``count`` prompts of ``size`` tokens: windows of the README (varied English and code)."""
    ids = engine.encode((Path(__file__).parents[1] / "README.md").read_text())
    step = max(1, (len(ids) - size) // count)
    return [ids[n * step:n * step + size] for n in range(count)]


def long_deviation(engine: Any, eager: Any, windows: list[list[int]], new: int
                   ) -> dict[str, Any]:
    """Greedy tokens, probabilities and the first token's attention rows against a float32
    forward of ``eager`` (the same model with transformers' eager attention). For each prompt
    whose greedy run parts from the reference's, ``parted_at_gaps`` gives the reference's
    margin there (its top two probabilities' difference): a margin under the probabilities'
    deviation is a near tie that any rounding may tip, a wide one a run gone astray."""
    worst, same, attention, gaps = 0.0, 0, 0.0, []
    for ids in windows:
        s = SampleSettings(max_len=new, temperature=0.0, stop_at_eos=False,
                           return_attention=True, full_attention=True)
        tokens = [e for e in engine.start([TokenIdsPart(tuple(ids))], s) if isinstance(e, Token)]
        got = [t.token_id for t in tokens]
        with torch.inference_mode():
            out = eager(torch.tensor([ids + got]), output_attentions=True)
        logits = out.logits[0, len(ids) - 1:-1]
        probs = torch.softmax(logits, dim=-1)
        parting = first_parting(got, logits)
        same += parting is None
        if parting is not None:
            gaps.append(parting[1])
        worst = max(worst, max(abs(t.raw_prob - float(probs[n, t.token_id]))
                               for n, t in enumerate(tokens)))
        # The first token's rows: attention of the prompt's last position, every layer.
        rows = torch.stack([m[0, :, len(ids) - 1, :len(ids)] for m in out.attentions])
        attention = max(attention, float((rows - torch.from_numpy(
            tokens[0].attention.weights)).abs().max()))
    return {"prompts": len(windows), "prompt_tokens": len(windows[0]), "new_tokens": new,
            "same_greedy_tokens": same, "max_prob_diff": worst,
            "max_attention_diff": attention,
            "parted_at_gaps": [float(f"{gap:.2g}") for gap in gaps]}


#: The prefill modes the bench measures by name beside the engine's default.
PREFILLS = ("float32", "fixed16", "fast")


def use_prefill(engine: Any, mode: str) -> bool:
    """Switch the engine's prefill to ``mode`` (``packed.PREFILL_MODES``); whether it can run
    here (a lean runner on packed weights, and the CPU features the mode needs)."""
    runner = engine._fast
    try:
        runner.set_prefill(kernel_attention=runner.kernel_attention_available, mode=mode)
    except (AttributeError, ValueError):
        return False
    return True


def launched(engine: Any, measure: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    """``measure`` with decode steps launching their kernels one by one (no CUDA graph)."""
    engine._fast.cuda_graphs = False
    try:
        return measure()
    finally:
        engine._fast.cuda_graphs = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--long-prompt-tokens", type=int, default=2000)
    parser.add_argument("--long-reps", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    args = parser.parse_args(argv)

    engine = get_engine("", device=args.device)
    on_gpu = engine.device.type == "cuda"
    kept = engine.prompt_cache
    budget = kept.max_bytes if kept is not None else 0
    if kept is not None:
        kept.resize(0)  # every run prefills its prompt; reuse is timed on its own below
    ids = prompt_ids(engine, args.prompt_tokens)
    configs: dict[str, Callable[[], tuple[float, float]]] = {
        "plain": lambda: time_engine(engine, ids, args.new_tokens, top_k=0),
        "topk": lambda: time_engine(engine, ids, args.new_tokens, top_k=20),
        "topk_attn": lambda: time_engine(engine, ids, args.new_tokens, top_k=20,
                                         return_attention=True),
        "generate": lambda: time_generate(engine, ids, args.new_tokens),
    }
    if on_gpu and engine._fast is not None and engine._fast.cuda_graphs:
        configs["plain_launched"] = lambda: launched(
            engine, lambda: time_engine(engine, ids, args.new_tokens, top_k=0))
    time_engine(engine, ids, 8, top_k=20, return_attention=True)  # warm-up
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for rep in range(args.reps):
        for name, measure in configs.items():
            results[name].append(measure())
            tok_s, ttft = results[name][-1]
            print(f"rep {rep + 1} {name:<10} {tok_s:6.2f} tok/s  ttft {ttft:7.1f} ms",
                  file=sys.stderr, flush=True)
    long_ids = prompt_ids(engine, args.long_prompt_tokens)
    default = engine._fast.prefill_mode if engine._fast is not None else "float32"
    modes = [m for m in PREFILLS if m != default and use_prefill(engine, m)]
    use_prefill(engine, default)
    long: dict[str, list[float]] = {name: [] for name in ["engine", *modes, "generate"]}
    for rep in range(args.long_reps):  # TTFT only: two new tokens each
        long["engine"].append(time_engine(engine, long_ids, 2, top_k=20)[1])
        for mode in modes:
            use_prefill(engine, mode)
            long[mode].append(time_engine(engine, long_ids, 2, top_k=20)[1])
            use_prefill(engine, default)
        long["generate"].append(time_generate(engine, long_ids, 2)[1])
        print(f"rep {rep + 1} ttft {args.long_prompt_tokens}: "
              + ", ".join(f"{name} {values[-1]:.0f} ms" for name, values in long.items()),
              file=sys.stderr, flush=True)
    reused = time_reused(engine, long_ids, budget, args.long_reps)
    windows = long_windows(engine)
    eager = AutoModelForCausalLM.from_pretrained(engine.model.name_or_path,
                                                 attn_implementation="eager")  # on the CPU
    dev_long = long_deviation(engine, eager, windows, 128)
    print(f"long prompts, default prefill ({default}): {dev_long}", file=sys.stderr, flush=True)
    dev_modes: dict[str, Any] = {}
    for mode in modes:
        use_prefill(engine, mode)
        dev_modes[mode] = long_deviation(engine, eager, windows, 32)
        use_prefill(engine, default)
        print(f"long prompts, {mode} prefill: {dev_modes[mode]}", file=sys.stderr, flush=True)
    median = {name: statistics.median(values) for name, values in long.items()}
    dev = deviation(engine, engine.model if engine.device.type == "cpu" else eager,
                    args.new_tokens)
    print(f"deviation from float32: {dev}", file=sys.stderr, flush=True)
    server_rss = server_peak_rss_mb(str(engine.device))
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
        "ttft_2000_ms": round(median["engine"], 1),
        "generate_ttft_2000_ms": round(median["generate"], 1),
        "ratio_ttft_2000": round(median["generate"] / median["engine"], 3),
        "prefill_default": default,
        **{f"ttft_2000_{mode}_ms": round(median[mode], 1) for mode in modes},
        **({"ttft_2000_reused_ms": round(reused[0], 1), "ttft_2000_tail_ms": round(reused[1], 1),
            "kept_prompts_after_tails": reused[2], "kept_mb_after_tails": round(reused[3], 1)}
           if reused is not None else {}),
        **{f"ratio_ttft_2000_{mode}": round(median["generate"] / median[mode], 3)
           for mode in modes},
        **({"plain_launched_tok_s": round(tok_s["plain_launched"], 2),
            "graphs_speedup_plain": round(tok_s["plain"] / tok_s["plain_launched"], 3)}
           if "plain_launched" in tok_s else {}),
        "server_peak_rss_mb": round(server_rss, 1),
        **({"gpu_name": torch.cuda.get_device_name(engine.device),
            "gpu_peak_mb": round(torch.cuda.max_memory_allocated(engine.device) / 2**20, 1)}
           if on_gpu else {}),
        "weights": engine._fast.weights if engine._fast is not None else "transformers",
        "device": str(engine.device),
        "deviation_from_float32": dev,
        "deviation_long_prompts": dev_long,
        **{f"deviation_long_prompts_{mode}": dev for mode, dev in dev_modes.items()},
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
