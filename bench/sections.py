"""Where a C decode step's time goes, section by section (q/k/v, attention, output, gate/up,
down, output head, the rest), timed with rdtsc inside the kernel, for this checkout's kernel
and optionally another checkout's, the two alternating step by step on one context.

The kernel is copied to a scratch folder with timers added around the calls in
``decode_layer`` and ``decode_step`` (found by their text; an error names the one not found)
and built by ``packed.load_kernel``; the engine's own kernel is untouched. Times are ms a step,
converted from the TSC at ``/proc/cpuinfo``'s clock. The last line is one JSON object.

    python bench/sections.py [--other <checkout>] [--context 264] [--steps 150]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sampler_core.engine import packed  # noqa: E402

SECTIONS = ("rest", "qkv", "attention", "output", "gate_up", "down", "head")
_TIMERS = """#include <x86intrin.h>
uint64_t section_ticks[8];
void section_ticks_take(uint64_t* out) {
    for (int i = 0; i < 8; i++) { out[i] = section_ticks[i]; section_ticks[i] = 0; }
}
#define TIMER_START uint64_t timer_ = __rdtsc();
#define TIMER_STOP(i) { const uint64_t now_ = __rdtsc(); section_ticks[i] += now_ - timer_; timer_ = now_; }
"""
# (where, pattern, timer): a timer statement goes before or after the first match. Patterns
# match the batched kernel (a loop over the step's sequences, ``r``) and the earlier one-row
# kernel, so either can be the other checkout.
_ROW_LOOP = r"(?:for \(int r = 0; r < count; r\+\+\)\n\s*)?"
_MARKS = (
    ("before", _ROW_LOOP + r"rms_norm\(x(?: \+ \(size_t\)r \* hidden)?, m->norm_in\[layer\]",
     "TIMER_START"),
    ("after", r"w\[0\]\.s, (?:q_size \+ 2 \* kv_size|qkv_size), qkv\);", "TIMER_STOP(1)"),
    ("before", r"const int pieces = \((?:seq->)?pos \+ 1", "TIMER_STOP(0)"),
    ("after", r"attention_combine\(&job, attended[^;]*\);", "TIMER_STOP(2)"),
    ("after", r"w\[1\]\.s, hidden, add\);", "TIMER_STOP(3)"),
    ("before", _ROW_LOOP + r"rms_norm\(x(?: \+ \(size_t\)r \* hidden)?, m->norm_post\[layer\]",
     "TIMER_STOP(0)"),
    ("after", r"2 \* intermediate, gate_up[^;]*\);", "TIMER_STOP(4)"),
    ("after", r"silu_times\(gate[^;]*\);", "TIMER_STOP(0)"),
    ("after", r"w\[3\]\.s, hidden, add\);", "TIMER_STOP(5)"),
    ("before", _ROW_LOOP + r"rms_norm\(x(?: \+ \(size_t\)r \* m->hidden)?, m->norm_final",
     "TIMER_START"),
    ("after", r"m->vocab, logits\);", "TIMER_STOP(6)"),
)


def instrumented(engine_dir: Path, into: Path) -> Path:
    """A copy of ``engine_dir``'s kernel sources with section timers, in ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    for name in packed.SOURCE_NAMES:
        shutil.copy(engine_dir / name, into / name)
    text = (into / "packed_kernel.c").read_text()
    text = text.replace('#include "kernel_common.h"', '#include "kernel_common.h"\n' + _TIMERS, 1)
    for where, pattern, timer in _MARKS:
        found = re.search(pattern, text)
        if found is None:
            raise RuntimeError(f"{engine_dir}/packed_kernel.c: no {pattern!r} to time")
        at = found.start() if where == "before" else found.end()
        text = (text[:at] + f"    {timer}\n" + text[at:] if where == "before"
                else text[:at] + f"\n    {timer}" + text[at:])
    (into / "packed_kernel.c").write_text(text)
    return into


def build(sources: Path) -> Any:
    """The kernel built from the sources in ``sources``, with its section timers typed."""
    lib = packed.load_kernel(tuple(sources / name for name in packed.SOURCE_NAMES))
    lib.section_ticks_take.argtypes = [ctypes.c_void_p]
    return lib


def tsc_hz() -> float:
    """The TSC's rate, taken as the clock /proc/cpuinfo reports (constant_tsc machines)."""
    found = re.search(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())
    if found is None:
        raise RuntimeError("no 'cpu MHz' in /proc/cpuinfo to convert TSC ticks")
    return float(found.group(1)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, help="another checkout to compare against")
    parser.add_argument("--context", type=int, default=264)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    from sampler_core.engine import get_engine

    engine = get_engine()
    runner = engine._fast
    if runner is None or runner.packed is None:
        raise SystemExit("the engine is not on its packed C decode path here")
    kernels: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        sides = {"this": ROOT} | ({"other": args.other.resolve()} if args.other else {})
        for name, checkout in sides.items():
            kernels[name] = build(instrumented(checkout / "sampler_core" / "engine",
                                               Path(scratch) / name))
    ids = engine.encode("The history of the printing press begins in the fifteenth century, "
                        * (args.context // 10 + 1))[:args.context]
    caches = {name: runner.new_cache(args.context + args.steps + 1) for name in kernels}
    ticks = {name: [0] * 8 for name in kernels}
    buffer = (ctypes.c_uint64 * 8)()
    with torch.inference_mode():
        for name, lib in kernels.items():
            runner._kernel = lib
            runner.forward(torch.tensor(ids), caches[name])
            lib.section_ticks_take(buffer)
        for step in range(args.steps):
            for name in (list(kernels) if step % 2 == 0 else list(kernels)[::-1]):
                runner._kernel = kernels[name]
                runner.decode(42, caches[name])
                kernels[name].section_ticks_take(buffer)
                ticks[name] = [t + b for t, b in zip(ticks[name], buffer)]
    per_ms = 1000 / tsc_hz() / args.steps
    report: dict[str, Any] = {"context": args.context, "steps": args.steps}
    for name in kernels:
        ms = {section: round(ticks[name][i] * per_ms, 3) for i, section in enumerate(SECTIONS)}
        ms["total"] = round(sum(ticks[name][:7]) * per_ms, 3)
        print(f"{name}: " + "  ".join(f"{k} {v:.3f}" for k, v in ms.items()) + "  (ms a step)")
        report[name] = ms
    print(json.dumps(report))


if __name__ == "__main__":
    main()
