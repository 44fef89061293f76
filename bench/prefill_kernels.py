"""The long-prefill kernels' rates on the default model's shapes, each alone: the fixed-point
products of ``prefill_kernel.c`` (16 and 8 bits, ``fixed16`` and ``fast``), the float32
product the default prefill uses (oneDNN's, else ``F.linear``) on the same weights rebuilt,
and the causal attention of ``prefill_attention.c`` (float32, and bfloat16 for ``fast``).

A layer's four products (q/k/v, output, gate/up, down) on ``--rows`` random rows, and one
layer's attention over that many positions (9 heads, 3 key-value heads of 64); best of
``--reps``, in GMAC/s (multiply-adds: a causal attention counts each query's keys up to its
own). For a checkout's kernel against another's, run this in each; for whole prefills,
``bench/prefill.py``. The last line is one JSON object.

    python bench/prefill_kernels.py [--rows 2000] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sampler_core.engine import get_engine  # noqa: E402
from sampler_core.engine.fast_llama import onednn_linear  # noqa: E402
from sampler_core.engine.packed import LAYER_PARTS, kernel  # noqa: E402
from step import best_ms  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)

    engine = get_engine("")
    runner, lib = engine._fast, kernel()
    if runner is None or runner.packed is None or lib is None:
        raise SystemExit("the engine is not on its packed path (no kernel?): nothing to time")
    dense = onednn_linear() or torch.nn.functional.linear
    gen = torch.Generator().manual_seed(0)
    rows = args.rows
    ways: dict[str, Callable[..., torch.Tensor]] = {
        "float32": lambda linear, x, weight: dense(x, weight)}
    if lib.prefill_supported():  # AVX-512 VNNI
        ways["fixed16"] = lambda linear, x, weight: linear.prefill(x, 16)
        ways["fast"] = lambda linear, x, weight: linear.prefill(x, 8)
    report: dict[str, dict[str, float]] = {way: {} for way in ways}
    layer_ms = dict.fromkeys(ways, 0.0)
    layer_macs = 0
    for name, linear in zip(LAYER_PARTS, runner.packed.layers[len(runner.packed.layers) // 2]):
        x = torch.randn(rows, linear.in_features, generator=gen)
        weight = linear.unpack()
        macs = rows * linear.in_features * linear.out_features
        layer_macs += macs
        for way, product in ways.items():
            ms = best_ms(lambda: product(linear, x, weight), args.reps, per_batch=1)
            report[way][name] = macs / ms / 1e6
            layer_ms[way] += ms
    for way in ways:  # the four together, as a layer runs them
        report[way]["layer"] = layer_macs / layer_ms[way] / 1e6

    heads, kv_heads, dim = runner.num_heads, runner.num_kv, runner.head_dim
    q = torch.randn(heads, rows, dim, generator=gen) * 1.5
    keys = torch.randn(kv_heads, rows, dim, generator=gen) * 1.5
    values = torch.randn(kv_heads, rows, dim, generator=gen)
    out = torch.empty(rows, heads * dim)
    scratch = torch.empty(lib.prefill_attention_scratch_floats(heads, kv_heads, dim, 0, rows, 1))
    attention_macs = 2 * heads * dim * rows * (rows + 1) // 2
    attention: dict[str, float] = {}
    for way, bf16 in (("float32", 0), ("fast", 1)):
        if bf16 and not lib.prefill_attention_bf16_supported():
            continue
        ms = best_ms(lambda: lib.prefill_attention(
            q.data_ptr(), keys.data_ptr(), values.data_ptr(), rows, heads, kv_heads, dim, 0,
            rows, runner.scale, out.data_ptr(), scratch.data_ptr(), bf16), args.reps, per_batch=1)
        attention[way] = attention_macs / ms / 1e6
    for way, rates in report.items():
        print(f"{way} products: " + ", ".join(f"{n} {r:.1f}" for n, r in rates.items())
              + " GMAC/s", file=sys.stderr)
    print("attention: " + ", ".join(f"{w} {r:.1f}" for w, r in attention.items()) + " GMAC/s",
          file=sys.stderr)
    print(json.dumps({
        "rows": rows, "reps": args.reps, "threads": torch.get_num_threads(),
        "products_gmac_s": {way: {n: round(r, 1) for n, r in rates.items()}
                            for way, rates in report.items()},
        "attention_gmac_s": {way: round(r, 1) for way, r in attention.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
