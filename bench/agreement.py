"""How closely each prefill mode's runs follow the float32 reference, over many prompts.

``bench/decode.py`` checks five prompts every run; this takes windows of 400 tokens from
several of the repository's files (English and code; up to 10 a file, 47 here on
2026-12-06), runs 128 greedy tokens after each in every mode named, and compares them with
transformers' float32 forward over the same tokens (teacher-forced on the run's own): the
largest probability difference (the same-answers rule allows 1e-3), how many runs part from
the reference's greedy tokens, and where one does, the reference's margin there (its top two
probabilities' difference: a near tie that any rounding may tip, or a run gone astray). Slow:
~2 minutes a mode. The last line is one JSON object.

    python bench/agreement.py [MODE ...]   (default: float32 fixed16)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from decode import cold_engine, first_parting, use_prefill
from sampler_core.inputs import TokenIdsPart
from sampler_core.settings import SampleSettings
from sampler_core.tokens import Token

ROOT = Path(__file__).resolve().parent.parent
FILES = ("README.md", "docs/DEVELOPING.md", "sampler_core/engine/fast_llama.py",
         "sampler_core/wire/server.py", "workbench/views.py", "sampler_core/engine/packed_kernel.c")


def windows(engine: Any, size: int = 400, stride: int = 700, per_file: int = 10
            ) -> list[list[int]]:
    """Windows of ``size`` tokens, ``stride`` apart, at most ``per_file`` from each file."""
    found: list[list[int]] = []
    for name in FILES:
        ids = engine.encode((ROOT / name).read_text())
        found += [ids[at:at + size] for at in range(0, len(ids) - size, stride)][:per_file]
    return found


def agreement(engine: Any, prompts: list[list[int]], new: int) -> dict[str, Any]:
    """Each prompt's greedy run against the float32 reference (``engine.model``)."""
    worst, partings = [], []
    for n, ids in enumerate(prompts):
        settings = SampleSettings(max_len=new, temperature=0.0, stop_at_eos=False)
        tokens = [t for t in engine.start([TokenIdsPart(tuple(ids))], settings)
                  if isinstance(t, Token)]
        got = [t.token_id for t in tokens]
        with torch.inference_mode():
            logits = engine.model(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1]
        probs = torch.softmax(logits, dim=-1)
        worst.append(max(abs(t.raw_prob - float(probs[i, t.token_id]))
                         for i, t in enumerate(tokens)))
        parting = first_parting(got, logits)
        if parting is not None:
            partings.append({"prompt": n, "token": parting[0], "gap": float(f"{parting[1]:.2g}")})
    return {"prompts": len(prompts), "new_tokens": new, "max_prob_diff": max(worst),
            "prompts_over_1e-3": sum(w > 1e-3 for w in worst),
            "same_greedy_tokens": len(prompts) - len(partings), "partings": partings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("modes", nargs="*", default=["float32", "fixed16"])
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    engine = cold_engine()
    prompts = windows(engine)
    report: dict[str, Any] = {}
    for mode in args.modes:
        if not use_prefill(engine, mode):
            report[mode] = "cannot run here"
            continue
        report[mode] = agreement(engine, prompts, args.new_tokens)
        print(mode, report[mode], flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
