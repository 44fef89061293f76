"""Score a vision engine on the held-out synthetic test set, through the real engine path.

Each test question is sent as a chat prompt with the image's bytes as an image part, sampled
greedily, and the reply compared with the expected short answer. Two layouts are scored: the
image before the question inside the user turn, and the image after the whole chat prompt
(what the SDK's ``inputs=(prompt, image_bytes)`` sends).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

from sampler_core.inputs import ImagePart, PromptPart, TextPart
from sampler_core.settings import SampleSettings
from sampler_core.tokens import Token
from sampler_core.vision.synthetic import (COLOURS, COUNT_WORDS, KINDS, POSITIONS, SHAPES,
                                           Example, test_set)

LAYOUTS = ("image_first", "image_last")


def question_parts(engine: Any, image_png: bytes, question: str,
                   layout: str = "image_first") -> list[PromptPart]:
    """A chat prompt around ``question`` with the image before it, or after the whole prompt."""
    full = engine.chat_prompt(question)
    if layout == "image_last":
        return [TextPart(full), ImagePart(image_png)]
    if layout != "image_first":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    cut = full.index(question)
    return [TextPart(full[:cut]), ImagePart(image_png), TextPart("\n" + full[cut:])]


def ask(engine: Any, image_png: bytes, question: str, layout: str = "image_first",
        max_len: int = 12) -> str:
    """The engine's greedy reply to one question about one image."""
    settings = SampleSettings(max_len=max_len, temperature=0.0, top_k=0,
                              return_attention=False)
    tokens = [e for e in engine.start(question_parts(engine, image_png, question, layout),
                                      settings) if isinstance(e, Token)]
    return engine.detokenize([t.token_id for t in tokens]).strip()


def _normal(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9 ]", " ", text.lower()) + " "


def _first(text: str, names: dict[str, tuple[str, ...]]) -> list[str]:
    """The names whose spellings occur in ``text``, in order of first occurrence; a longer
    spelling wins over one inside it ('top left' over 'top')."""
    found: list[tuple[int, str]] = []
    taken: list[tuple[int, int]] = []
    spellings = sorted(((w, n) for n, ws in names.items() for w in ws), key=lambda x: -len(x[0]))
    for word, name in spellings:
        for match in re.finditer(rf" {re.escape(word)} ", text):
            span = (match.start(), match.end())
            if not any(a < span[1] and span[0] < b for a, b in taken):
                taken.append(span)
                found.append((match.start(), name))
    return [name for _, name in sorted(found)]


def answer_in(kind: str, reply: str) -> str | None:
    """The one fact of ``kind`` a reply states ('red', 'circle', 'top left', '3'), or None
    when it states none or several different ones."""
    text = _normal(reply)
    if kind == "colour":
        names = {c: (c,) for c in COLOURS}
    elif kind == "shape":
        names = {s: (s, s + "s") for s in SHAPES}
    elif kind == "position":
        names = {p: (p, p.replace("center", "centre")) for p in POSITIONS}
    elif kind == "count":
        names = {str(n): (str(n), w) for n, w in COUNT_WORDS.items()}
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    found = set(_first(text, names))
    return found.pop() if len(found) == 1 else None


def is_correct(example: Example, reply: str) -> bool:
    """True when the reply states exactly the expected fact (and no other of its kind)."""
    return answer_in(example.kind, reply) == example.answer


def evaluate(engine: Any, examples: list[Example], layouts: tuple[str, ...] = LAYOUTS,
             other_layouts_every: int = 4,
             log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Accuracy per question kind over ``examples`` in the first layout; the other layouts
    are scored on every ``other_layouts_every``-th example (a CPU-time budget)."""
    started = time.time()
    hits: dict[str, dict[str, list[bool]]] = {layout: {} for layout in layouts}
    mistakes: list[dict[str, str]] = []
    for n, example in enumerate(examples):
        png = example.scene.png()
        for layout in layouts if n % other_layouts_every == 0 else layouts[:1]:
            reply = ask(engine, png, example.question, layout)
            ok = is_correct(example, reply)
            hits[layout].setdefault(example.kind, []).append(ok)
            if not ok and len(mistakes) < 40:
                mistakes.append({"kind": example.kind, "layout": layout,
                                 "question": example.question, "expected": example.answer,
                                 "reply": reply})
        if n % 50 == 49:
            log(f"eval {n + 1}/{len(examples)}")
    by_layout = {layout: {kind: round(sum(v) / len(v), 4) for kind, v in kinds.items()}
                 for layout, kinds in hits.items()}
    first = layouts[0]
    return {
        "model": engine.name,
        "test_set": f"{len(examples)} held-out synthetic questions "
                    f"({', '.join(KINDS)}), seed-separated from training",
        "accuracy": by_layout[first],
        "layout": first,
        "accuracy_by_layout": by_layout,
        "examples_per_kind": {layout: {k: len(v) for k, v in kinds.items()}
                              for layout, kinds in hits.items()},
        "seconds": round(time.time() - started, 1),
        "mistakes": mistakes,
    }


def evaluate_bundled(per_kind: int = 100, folder: Path | None = None,
                     log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Score the bundled ``vlm-1`` (as ``get_engine('vlm-1')`` loads it) on the test set."""
    from sampler_core.engine import get_engine

    if folder is not None:
        from sampler_core.engine.vlm import VLM1_FOLDER
        if Path(folder).resolve() != VLM1_FOLDER.resolve():
            raise ValueError(f"evaluate_bundled scores the shipped weights in {VLM1_FOLDER}, "
                             f"not {folder}")
    return evaluate(get_engine("vlm-1"), test_set(per_kind), log=log)
