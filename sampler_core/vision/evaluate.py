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
from sampler_core.vision.synthetic import COUNT_WORDS, KINDS, Example, test_set

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
        max_len: int = 6) -> str:
    """The engine's greedy reply to one question about one image."""
    settings = SampleSettings(max_len=max_len, temperature=0.0, top_k=0,
                              return_attention=False)
    tokens = [e for e in engine.start(question_parts(engine, image_png, question, layout),
                                      settings) if isinstance(e, Token)]
    return engine.detokenize([t.token_id for t in tokens]).strip()


def _normal(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def is_correct(example: Example, reply: str) -> bool:
    """Exact match after lower-casing and dropping punctuation; counts as digit or word."""
    expected = {_normal(example.answer)}
    if example.kind == "count":
        expected.add(COUNT_WORDS[int(example.answer)])
    return _normal(reply) in expected


def evaluate(engine: Any, examples: list[Example], layouts: tuple[str, ...] = LAYOUTS,
             log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Accuracy per question kind (and per layout) over ``examples``."""
    started = time.time()
    hits: dict[str, dict[str, list[bool]]] = {layout: {} for layout in layouts}
    mistakes: list[dict[str, str]] = []
    for n, example in enumerate(examples):
        png = example.scene.png()
        for layout in layouts:
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
        "examples_per_kind": {k: len(v) for k, v in hits[first].items()},
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
