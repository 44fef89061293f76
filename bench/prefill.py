"""Time to first token for a long prompt, by how the prefill runs, against generate().

Five ways, interleaved rep by rep so the machine's drift hits each alike: torch's fused
attention with MKL's float32 linears (``F.linear``: the path before ``prefill_attention.c``),
the C attention kernel with MKL's linears (the default before oneDNN's), the C attention
kernel with oneDNN's float32 linears (``prefill="float32"``, the default), the C attention
kernel with the ``fixed16`` linears (by name: not exact), ``fast``, and transformers'
``generate()``. Prints the median of each and ``generate()``'s median over it (above 1:
faster); the last line is one JSON object.

    python bench/prefill.py [--prompt-tokens 2000] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from decode import cold_engine, prompt_ids, time_engine, time_generate
from sampler_core.engine.fast_llama import onednn_linear

#: (kernel attention, linears' mode, oneDNN's float32 product) for each way the engine can
#: prefill.
ENGINE_WAYS = {"torch_attention_blas": (False, "float32", False),
               "kernel_attention_blas": (True, "float32", False),
               "kernel_attention_onednn": (True, "float32", True),
               "kernel_attention_fixed16": (True, "fixed16", True),
               "fast": (True, "fast", True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)

    engine = cold_engine()  # each rep prefills its prompt
    runner = engine._fast
    if runner is None or runner.packed is None:
        raise SystemExit("the engine is not on its packed path (no kernel?): nothing to compare")
    ways = dict(ENGINE_WAYS)
    if not runner._kernel.prefill_supported():
        del ways["kernel_attention_fixed16"]  # no AVX-512 VNNI here
    if not (runner._kernel.prefill_supported() and runner._kernel.prefill_attention_bf16_supported()):
        del ways["fast"]
    if onednn_linear() is None:
        del ways["kernel_attention_onednn"]  # this torch lacks oneDNN's product
    ids = prompt_ids(engine, args.prompt_tokens)
    time_engine(engine, ids[:300], 2)  # warm-up
    ttft: dict[str, list[float]] = {name: [] for name in [*ways, "generate"]}
    before = (runner.prefill_attention_kernel, runner.prefill_mode, runner.onednn_linears)
    try:
        for rep in range(args.reps):
            for name, (kernel_attention, mode, onednn) in ways.items():
                runner.set_prefill(kernel_attention=kernel_attention, mode=mode)
                runner.onednn_linears = onednn
                ttft[name].append(time_engine(engine, ids, 2)[1])
            ttft["generate"].append(time_generate(engine, ids, 2)[1])
            print(f"rep {rep + 1}: " + ", ".join(f"{n} {v[-1]:.0f} ms" for n, v in ttft.items()),
                  file=sys.stderr, flush=True)
    finally:
        runner.set_prefill(kernel_attention=before[0], mode=before[1])
        runner.onednn_linears = before[2]
    median = {name: statistics.median(values) for name, values in ttft.items()}
    print(json.dumps({
        "prompt_tokens": args.prompt_tokens, "reps": args.reps,
        "ttft_ms": {name: round(value, 1) for name, value in median.items()},
        "generate_over": {name: round(median["generate"] / value, 3)
                          for name, value in median.items() if name != "generate"},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
